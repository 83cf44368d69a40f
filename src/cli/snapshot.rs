//! `conductor snapshot …`: take, list, restore and delete snapshots of a workspace.

use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_service::snapshots::SnapshotInfo;
use conductor_service::ServiceError;

use super::{open, Cli};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a workspace (its root file system changes and its volume); a running
    /// workspace is paused meanwhile and keeps running.
    Create {
        /// Workspace id, container name, or agent id with one live workspace.
        workspace: String,
        /// Lowercase letters, digits, '-', '_', '.'.
        name: String,
        /// Replace an existing snapshot of that name.
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        json: bool,
    },
    /// List a workspace's snapshots, oldest first.
    Ls {
        workspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Restore a workspace to a snapshot (its container is re-created and runs afterwards).
    Restore { workspace: String, name: String },
    /// Delete a snapshot.
    Rm { workspace: String, name: String },
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn print_table(list: &[SnapshotInfo]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["name", "workspace", "created", "size"]);
    for s in list {
        t.add_row([
            s.name.clone(),
            s.workspace_id.clone(),
            s.created_at.clone(),
            megabytes(s.size_bytes),
        ]);
    }
    println!("{t}");
}

pub async fn run(cli: &Cli, cmd: &SnapshotCommand) -> Result<ExitCode, ServiceError> {
    let c = open(cli).await?;
    match cmd {
        SnapshotCommand::Create {
            workspace,
            name,
            overwrite,
            json,
        } => {
            let begin = Instant::now();
            let s = c.create_snapshot(workspace, name, *overwrite).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                println!(
                    "created snapshot {} of {} ({}) in {} ms",
                    s.name,
                    s.workspace_id,
                    megabytes(s.size_bytes),
                    begin.elapsed().as_millis()
                );
            }
        }
        SnapshotCommand::Ls { workspace, json } => {
            let list = c.list_snapshots(workspace)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                print_table(&list);
            }
        }
        SnapshotCommand::Restore { workspace, name } => {
            let begin = Instant::now();
            let w = c.restore_snapshot(workspace, name).await?;
            println!(
                "restored {} ({}) to snapshot {name} in {} ms",
                w.id,
                w.container_name,
                begin.elapsed().as_millis()
            );
        }
        SnapshotCommand::Rm { workspace, name } => {
            c.delete_snapshot(workspace, name).await?;
            println!("deleted snapshot {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
