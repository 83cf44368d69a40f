//! `conductor env list|build`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_service::ServiceError;

use super::progress::Spinner;
use super::{open, Cli};

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// List environments: name, description, image, built or not, size.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Build environment images (the base image first when missing).
    Build {
        /// Environments to build.
        names: Vec<String>,
        /// Build every environment.
        #[arg(long)]
        all: bool,
        /// Rebuild even when the image for the current definition exists.
        #[arg(long)]
        force: bool,
        /// Also make the sidecar service images (postgres:14, redis:7): pulled where a
        /// registry answers, built from services/ otherwise.
        #[arg(long)]
        services: bool,
    },
}

pub async fn run(cli: &Cli, cmd: &EnvCommand) -> Result<ExitCode, ServiceError> {
    let c = open(cli).await?;
    match cmd {
        EnvCommand::List { json } => {
            let envs = c.environments().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&envs).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_header(["name", "kind", "built", "size", "image", "description"]);
            for e in envs {
                let size = e
                    .size_bytes
                    .map(|b| format!("{} MB", b / 1_000_000))
                    .unwrap_or_else(|| "-".into());
                t.add_row([
                    e.name,
                    e.kind.to_string(),
                    if e.built { "yes" } else { "no" }.to_string(),
                    size,
                    e.image,
                    e.description,
                ]);
            }
            println!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        EnvCommand::Build {
            names,
            all,
            force,
            services,
        } => {
            let names: Vec<String> = if *all {
                c.catalog.names().map(str::to_string).collect()
            } else if names.is_empty() && !*services {
                return Err(ServiceError::invalid(
                    "names",
                    "name at least one environment, or use --all or --services",
                ));
            } else {
                names.clone()
            };
            for n in &names {
                c.catalog
                    .require(n)
                    .map_err(|m| ServiceError::invalid("environment", m))?;
            }
            let mut failed = 0;
            for name in &names {
                let spinner = Spinner::new(name);
                let start = Instant::now();
                match c.ensure_environment(name, spinner.sink(cli.verbose), *force).await {
                    Ok(img) => {
                        let what = if img.made_now { "built" } else { "up to date" };
                        spinner.finish(format!(
                            "{what}: {} ({} MB) in {:.1}s",
                            img.reference,
                            img.info.size_bytes / 1_000_000,
                            start.elapsed().as_secs_f64()
                        ));
                    }
                    Err(e) => {
                        spinner.finish(format!("FAILED after {:.1}s", start.elapsed().as_secs_f64()));
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            if *services {
                let spinner = Spinner::new("services");
                let start = Instant::now();
                match c.build_service_images(spinner.sink(cli.verbose)).await {
                    Ok(images) => spinner.finish(format!(
                        "ready: {} in {:.1}s",
                        images.join(", "),
                        start.elapsed().as_secs_f64()
                    )),
                    Err(e) => {
                        spinner.finish(format!("FAILED after {:.1}s", start.elapsed().as_secs_f64()));
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
