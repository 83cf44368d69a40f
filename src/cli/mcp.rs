//! `conductor mcp`: the Model Context Protocol server on stdin/stdout (see
//! `conductor_mcp`). Stdout carries the protocol only; warnings and logs go to stderr.
//!
//! The data directory is not reconciled here: a `conductor serve` may share it, and what
//! looks orphaned to this process may be that service's work in progress.

use std::process::ExitCode;
use std::sync::Arc;

use conductor_service::ServiceError;

use super::{open, Cli};

pub async fn run(cli: &Cli) -> Result<ExitCode, ServiceError> {
    let conductor = Arc::new(open(cli).await?);
    conductor_mcp::serve_stdio(conductor).await?;
    Ok(ExitCode::SUCCESS)
}
