//! `conductor doctor`.

use std::process::ExitCode;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_service::doctor::{self, Status};
use conductor_service::ServiceError;

use super::{load_config, Cli};

pub async fn run(cli: &Cli, json: bool) -> Result<ExitCode, ServiceError> {
    let report = doctor::run(load_config(cli)?).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED)
            .set_header(["check", "status", "found", "fix"]);
        for c in &report.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            t.add_row([
                c.name.as_str(),
                status,
                c.value.as_str(),
                c.fix.as_deref().unwrap_or(""),
            ]);
        }
        println!("{t}");
        let problems: Vec<_> = report.checks.iter().filter(|c| c.status != Status::Ok).collect();
        if problems.is_empty() {
            println!("All checks passed.");
        } else {
            println!("To fix:");
            for c in problems {
                if let Some(fix) = &c.fix {
                    println!("  - {}: {fix}", c.name);
                }
            }
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
