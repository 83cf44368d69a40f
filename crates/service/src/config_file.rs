//! Finding and reading the configuration file.
//!
//! Search order: `--config`, `$CONDUCTOR_CONFIG`,
//! `~/.claude-conductor/config/standalone-isolated.yaml`, then the repository's
//! `config/standalone-isolated.yaml` (next to the current directory or above the binary).
//! No file at all means the defaults.

use std::path::{Path, PathBuf};

use conductor_core::config::{Config, Loaded};

use crate::{home_dir, Result, ServiceError};

pub const FILE_NAME: &str = "standalone-isolated.yaml";

/// Where the configuration came from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => f.write_str("(built-in defaults; no configuration file found)"),
        }
    }
}

/// Candidate locations in search order (the explicit ones must exist).
fn candidates() -> Vec<PathBuf> {
    let mut out = vec![home_dir().join(".claude-conductor/config").join(FILE_NAME)];
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join("config").join(FILE_NAME));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/conductor → the repository root is three levels up.
        for dir in exe.ancestors().skip(1).take(3) {
            out.push(dir.join("config").join(FILE_NAME));
        }
    }
    out
}

/// Locates and parses the configuration.
pub fn load(explicit: Option<&Path>) -> Result<(Loaded, Source)> {
    let env = std::env::var_os("CONDUCTOR_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(path) = explicit.map(Path::to_path_buf).or(env) {
        if !path.exists() {
            return Err(ServiceError::invalid(
                "config",
                format!("configuration file {} does not exist", path.display()),
            ));
        }
        return read(&path).map(|l| (l, Source::File(path)));
    }
    for path in candidates() {
        if path.is_file() {
            return read(&path).map(|l| (l, Source::File(path)));
        }
    }
    Ok((
        Loaded {
            config: Config::default(),
            warnings: Vec::new(),
        },
        Source::Defaults,
    ))
}

fn read(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|e| ServiceError::host(format!("read {}", path.display()), e))?;
    Config::parse(&text).map_err(|e| ServiceError::Invalid {
        field: path.display().to_string(),
        message: e.to_string(),
    })
}
