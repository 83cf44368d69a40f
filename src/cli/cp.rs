//! `conductor ws cp SRC DST`: files between the host and a workspace, like `docker cp`.
//!
//! Exactly one side is `WORKSPACE:PATH` (a workspace id or container name, then a path
//! relative to `/workspace` or absolute under it). A file goes to a file, or into a
//! directory that exists; a directory is copied with its contents to a path that does not
//! exist yet, or into a directory that exists (as `DIR/<its name>`). Directories travel as
//! tar streams, files raw; nothing is held whole in memory. `-` as SRC uploads stdin as
//! one file; `-` as DST writes the file (or the tar of a directory) to stdout.
//!
//! A directory's tar coming out of a workspace is not trusted (the workspace, through its
//! agent or Podman, made it): the service unpacks it on the protocol's member rules
//! ([`Download::unpack_on_host`](conductor_service::files::Download::unpack_on_host)).

use std::path::PathBuf;
use std::process::ExitCode;

use conductor_agent_protocol::FileKind;
use conductor_service::files::{DownloadKind, PutOptions};
use conductor_service::streams::{reader_stream, writer_stream};
use conductor_service::{Conductor, ServiceError};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(Local),
    Workspace { id: String, path: String },
}

/// The host side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// `-`: stdin or stdout.
    Std,
    Path(PathBuf),
}

/// `ws-1:src/a.py` is in a workspace; `./a:b`, `/tmp/x:y` and `a` are host paths.
pub fn parse_location(s: &str) -> Location {
    if s == "-" {
        return Location::Local(Local::Std);
    }
    match s.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') => Location::Workspace {
            id: id.to_string(),
            path: if path.is_empty() {
                ".".to_string()
            } else {
                path.to_string()
            },
        },
        _ => Location::Local(Local::Path(PathBuf::from(s))),
    }
}

fn host_err(op: String) -> impl FnOnce(std::io::Error) -> ServiceError {
    move |e| ServiceError::host(op, e)
}

/// The last component of a workspace path (`""` for the root).
fn base_name(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// `dir/name` for a workspace path.
fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// What the workspace has at `path`: `Some(kind)`, or `None` when nothing is there.
async fn remote_kind(c: &Conductor, id: &str, path: &str) -> Result<Option<FileKind>, ServiceError> {
    match c.stat_file(id, path).await {
        Ok(st) => Ok(Some(st.kind)),
        Err(ServiceError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn run(c: &Conductor, src: &str, dst: &str) -> Result<ExitCode, ServiceError> {
    match (parse_location(src), parse_location(dst)) {
        (Location::Local(from), Location::Workspace { id, path }) => upload(c, from, &id, &path).await,
        (Location::Workspace { id, path }, Location::Local(to)) => download(c, &id, &path, to).await,
        _ => Err(ServiceError::invalid(
            "cp",
            "exactly one of SRC and DST must be WORKSPACE:PATH (the other a host path or -)",
        )),
    }
}

async fn upload(c: &Conductor, from: Local, id: &str, path: &str) -> Result<ExitCode, ServiceError> {
    let written = match from {
        Local::Std => {
            let body = reader_stream(std::io::stdin());
            c.put_file(id, path, body, PutOptions::default()).await?
        }
        Local::Path(src) => {
            let meta = std::fs::metadata(&src).map_err(host_err(format!("read {}", src.display())))?;
            let name = src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| ".".into());
            let existing = remote_kind(c, id, path).await?;
            if meta.is_dir() {
                // Into an existing directory as <name>/…; else as the new directory `path`.
                let (dir, top) = match existing {
                    Some(FileKind::Dir) => (path.to_string(), name),
                    None => {
                        let top = base_name(path).to_string();
                        let parent = path.trim_end_matches('/');
                        let parent = &parent[..parent.len() - top.len()];
                        let parent = if parent.is_empty() { "." } else { parent };
                        (parent.to_string(), top)
                    }
                    Some(_) => {
                        return Err(ServiceError::Conflict(format!(
                            "{path} exists in the workspace and is not a directory"
                        )))
                    }
                };
                if top.is_empty() || top == "." || top == ".." {
                    return Err(ServiceError::invalid(
                        "dst",
                        format!("cannot copy a directory to {path:?}"),
                    ));
                }
                let body = writer_stream(move |out| {
                    let mut b = tar::Builder::new(out);
                    b.follow_symlinks(false);
                    b.append_dir_all(&top, &src)?;
                    b.finish()
                });
                c.put_archive(id, &dir, body, None).await?
            } else {
                let target = match existing {
                    Some(FileKind::Dir) => join(path, &name),
                    _ if path.ends_with('/') => join(path, &name),
                    _ => path.to_string(),
                };
                let file = std::fs::File::open(&src).map_err(host_err(format!("open {}", src.display())))?;
                let opts = PutOptions {
                    mode: Some(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777),
                    size: Some(meta.len()),
                };
                c.put_file(id, &target, reader_stream(file), opts).await?
            }
        }
    };
    eprintln!("copied {} bytes to {id}:{}", written.size, written.path);
    Ok(ExitCode::SUCCESS)
}

async fn download(c: &Conductor, id: &str, path: &str, to: Local) -> Result<ExitCode, ServiceError> {
    let download = c.get_file(id, path).await?;
    let dst = match to {
        Local::Std => {
            let mut out = tokio::io::stdout();
            let mut stream = download.stream;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ServiceError::host("download", e))?;
                out.write_all(&chunk).await.map_err(host_err("write stdout".into()))?;
            }
            out.flush().await.map_err(host_err("write stdout".into()))?;
            return Ok(ExitCode::SUCCESS);
        }
        Local::Path(p) => p,
    };
    match download.kind {
        DownloadKind::File => {
            let target = if dst.is_dir() { dst.join(&download.name) } else { dst };
            let mut file = tokio::fs::File::create(&target)
                .await
                .map_err(host_err(format!("create {}", target.display())))?;
            let mut stream = download.stream;
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ServiceError::host("download", e))?;
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(host_err(format!("write {}", target.display())))?;
            }
            file.flush()
                .await
                .map_err(host_err(format!("write {}", target.display())))?;
            eprintln!("copied {size} bytes to {}", target.display());
        }
        DownloadKind::Archive => {
            // The tar's entries are named from `download.name`; the copy is named after the
            // path asked for (they differ for a symlink through the Podman fallback).
            let name = match base_name(path) {
                "" | "." | ".." => download.name.clone(),
                n => n.to_string(),
            };
            let shown = dst.display().to_string();
            let target = download
                .unpack_on_host(dst, name)
                .await
                .map_err(host_err(format!("copy {id}:{path} to {shown}")))?;
            eprintln!("copied {id}:{path} to {}", target.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(parse_location("-"), Location::Local(Local::Std));
        assert_eq!(
            parse_location("ws-1:src/a.py"),
            Location::Workspace {
                id: "ws-1".into(),
                path: "src/a.py".into()
            }
        );
        assert_eq!(
            parse_location("ws-1:"),
            Location::Workspace {
                id: "ws-1".into(),
                path: ".".into()
            }
        );
        for host in ["./a:b", "/tmp/x:y", "a", ":x"] {
            assert_eq!(
                parse_location(host),
                Location::Local(Local::Path(host.into())),
                "{host}"
            );
        }
        assert_eq!(base_name("/workspace/src/"), "src");
        assert_eq!(join("/workspace/", "a"), "/workspace/a");
    }
}
