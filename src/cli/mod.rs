//! Command-line interface: argument definitions and dispatch. Every command is a thin
//! layer over `conductor_service`; errors print the service's message and exit non-zero.

mod cp;
mod doctor;
mod env;
mod kube;
mod mcp;
mod progress;
mod secret;
mod serve;
mod snapshot;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use conductor_service::{config_file, Conductor, ServiceError};

#[derive(Debug, Parser)]
#[command(
    name = "conductor",
    version,
    about = "Isolated, reproducible Podman workspaces for AI agents"
)]
pub struct Cli {
    /// Configuration file (else $CONDUCTOR_CONFIG, ~/.claude-conductor/config/standalone-isolated.yaml,
    /// then the repository's config/standalone-isolated.yaml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Show build output and engine logs.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the host: Podman, runtime, cgroups, storage, environment images.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// List and build environments.
    #[command(subcommand)]
    Env(env::EnvCommand),
    /// Create and drive workspaces.
    #[command(subcommand, name = "ws")]
    Ws(ws::WsCommand),
    /// Create a workspace, run one command in it, remove it.
    Run(ws::RunArgs),
    /// Snapshot a workspace, list, restore and delete its snapshots.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Register, rotate, list and delete secrets: kept on the host, injected by the egress
    /// proxy into requests to their hosts (`ws create --secret NAME`); values are never shown.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Agree the database with Podman after a crash: remove orphans, mark vanished workspaces lost.
    Reconcile,
    /// Apply the cleanup policy (max_age_hours, max_containers) now.
    Cleanup,
    /// Run the HTTP API and the task orchestrator until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Print the resolved data paths, pid and log file, and API address as JSON.
    Paths,
    /// Serve the Model Context Protocol on stdin/stdout: workspaces as tools for AI agents.
    Mcp,
    /// Kubernetes: render the manifests of a preset, a workspace or conductor's RBAC.
    #[command(subcommand)]
    Kube(kube::KubeCommand),
}

/// Loads the configuration, printing its warnings.
pub(crate) fn load_config(cli: &Cli) -> Result<conductor_core::Config, ServiceError> {
    let (loaded, source) = config_file::load(cli.config.as_deref())?;
    for w in &loaded.warnings {
        eprintln!("warning: {source}: {w}");
    }
    tracing::info!("configuration: {source}");
    Ok(loaded.config)
}

pub(crate) async fn open(cli: &Cli) -> Result<Conductor, ServiceError> {
    Conductor::open(load_config(cli)?).await
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match &cli.command {
        Command::Doctor { json } => doctor::run(&cli, *json).await,
        Command::Env(cmd) => env::run(&cli, cmd).await,
        Command::Ws(cmd) => ws::run(&cli, cmd).await,
        Command::Run(args) => ws::run_once(&cli, args).await,
        Command::Snapshot(cmd) => snapshot::run(&cli, cmd).await,
        Command::Secret(cmd) => secret::run(&cli, cmd).await,
        Command::Reconcile => reconcile(&cli).await,
        Command::Cleanup => cleanup(&cli).await,
        Command::Serve(args) => serve::run(&cli, args).await,
        Command::Paths => serve::paths(&cli),
        Command::Mcp => mcp::run(&cli).await,
        Command::Kube(cmd) => kube::run(&cli, cmd).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn reconcile(cli: &Cli) -> Result<ExitCode, ServiceError> {
    let config = load_config(cli)?;
    let base = config.storage.resolve(&conductor_service::home_dir()).base;
    if base.exists() {
        conductor_service::instance_lock::InstanceLock::ensure_no_service(&base, "reconcile")?;
    }
    let c = Conductor::open(config).await?;
    let r = c.reconcile().await?;
    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

async fn cleanup(cli: &Cli) -> Result<ExitCode, ServiceError> {
    let c = open(cli).await?;
    let r = c.cleanup(&[]).await?;
    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
