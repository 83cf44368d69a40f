//! `conductor`: isolated Podman workspaces for AI agents. This binary only parses arguments,
//! sets up logging and hands over to the CLI layer, which calls the service library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONDUCTOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if args.verbose { "info" } else { "warn" }));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The runtime (and with it the managed Podman service) is dropped before exiting.
    let code = runtime.block_on(cli::run(args));
    drop(runtime);
    code
}
