//! `conductor env list|build`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_service::images::{host_build_jobs, BuildScheduler, Built};
use conductor_service::{Conductor, ServiceError};
use futures_util::stream::{FuturesUnordered, StreamExt};

use super::progress::Board;
use super::{open, Cli};

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// List environments: name, description, image, built or not, size.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Build environment images: the base image first when missing, then up to --jobs
    /// images at once.
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
        /// Builds at once (default: one per 2 GiB of available memory, at most 2 per CPU
        /// and 4).
        #[arg(long, short, env = "CONDUCTOR_BUILD_JOBS", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: Option<u16>,
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
            jobs,
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
            let jobs = jobs.map_or_else(host_build_jobs, usize::from);
            build_batch(&c, &names, *services, *force, jobs, cli.verbose).await
        }
    }
}

/// Builds a batch: the base image first, then up to `jobs` images at once, each as soon as
/// the images it builds `FROM` exist; an overall line shows how far it is.
async fn build_batch(
    c: &Conductor,
    names: &[String],
    services: bool,
    force: bool,
    jobs: usize,
    verbose: bool,
) -> Result<ExitCode, ServiceError> {
    let targets = c.build_targets(names, services)?;
    let total = targets.len();
    let width = targets.iter().map(|(t, _)| t.to_string().len()).max().unwrap_or(0);
    let board = Board::new(total, width);
    if total > 1 {
        board.println(format!(
            "building {total} images, up to {jobs} at a time (--jobs to change)"
        ));
    }
    let mut scheduler = BuildScheduler::new(targets, jobs);
    let mut running = FuturesUnordered::new();
    loop {
        for target in scheduler.start_ready() {
            let spinner = board.spinner(&target.to_string());
            running.push(async move {
                let start = Instant::now();
                let result = c.build_target(&target, spinner.sink(verbose), force).await;
                (target, spinner, start.elapsed(), result)
            });
        }
        let building: Vec<String> = scheduler.running().iter().map(ToString::to_string).collect();
        if !building.is_empty() {
            board.update(scheduler.progress(), &building);
        }
        let Some((target, spinner, took, result)) = running.next().await else {
            break;
        };
        let secs = took.as_secs_f64();
        let ok = match result {
            Ok(Built::Image(img)) => {
                let what = if img.made_now { "built" } else { "up to date" };
                spinner.finish(format!(
                    "{what}: {} ({} MB) in {secs:.1}s",
                    img.reference,
                    img.info.size_bytes / 1_000_000
                ));
                true
            }
            Ok(Built::Services(images)) => {
                spinner.finish(format!("ready: {} in {secs:.1}s", images.join(", ")));
                true
            }
            Err(e) => {
                spinner.finish(format!("FAILED after {secs:.1}s"));
                board.println(format!("error: {target}: {e}"));
                false
            }
        };
        for skipped in scheduler.finished(&target, ok) {
            board.println(format!("{skipped}: not built, {target} failed"));
        }
    }
    for stuck in scheduler.take_stuck() {
        board.println(format!(
            "{stuck}: not built, its image and another build FROM each other"
        ));
    }
    let progress = scheduler.progress();
    board.finish(progress);
    let failed = progress.failed;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
