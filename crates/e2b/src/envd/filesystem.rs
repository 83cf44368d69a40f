//! envd's filesystem service over the service's file API: `Stat`, `ListDir` (with depth),
//! `MakeDir`, `Move`, `Remove`, and watching a directory (`WatchDir` streaming, or the
//! `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher` trio) through [`super::watch`].
//! Paths are confined to `/workspace` as everywhere in conductor: relative ones are
//! relative to it, an absolute one elsewhere is `invalid_argument`.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use conductor_core::validate::{self, WORKSPACE_ROOT};
use conductor_service::files::{FileEntry, FileKind};

use super::{unary, unknown_method, Sandbox};
use crate::connect::{self, Code, RpcError};
use crate::pb::filesystem as pb;

/// Most entries one `ListDir` returns.
const MAX_ENTRIES: usize = 100_000;

/// The absolute path (`/workspace/…`) of a request's path, checked.
pub(crate) fn absolute(path: &str, field: &str) -> Result<String, RpcError> {
    let rel = validate::workspace_path(path).map_err(|m| {
        RpcError::invalid(format!(
            "{field}: {m} (sandbox files live in {WORKSPACE_ROOT}: use a relative path or one under it)"
        ))
    })?;
    Ok(if rel.is_empty() {
        WORKSPACE_ROOT.to_string()
    } else {
        format!("{WORKSPACE_ROOT}/{rel}")
    })
}

fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn user_name(id: u32) -> String {
    match id {
        0 => "root".into(),
        1000 => "agent".into(),
        n => n.to_string(),
    }
}

/// envd's description of an entry at `path`.
pub(crate) fn entry_info(e: &FileEntry, path: &str) -> pb::EntryInfo {
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    pb::EntryInfo {
        name: if e.name.is_empty() { name } else { e.name.clone() },
        r#type: match e.kind {
            FileKind::Dir => pb::FileType::Directory,
            FileKind::Symlink => pb::FileType::Symlink,
            FileKind::File => pb::FileType::File,
            FileKind::Other => pb::FileType::Unspecified,
        } as i32,
        path: path.to_string(),
        size: i64::try_from(e.size).unwrap_or(i64::MAX),
        mode: e.mode & 0o7777,
        permissions: permissions(e.kind, e.mode),
        owner: user_name(e.uid),
        group: user_name(e.gid),
        modified_time: Some(pbjson_types::Timestamp {
            seconds: e.mtime_ms.div_euclid(1000),
            nanos: (e.mtime_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        symlink_target: e.link_target.clone(),
        metadata: Default::default(),
    }
}

pub(crate) async fn call(
    Extension(sandbox): Extension<Sandbox>,
    method: Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let s = &sandbox;
    match method.0.as_str() {
        "Stat" => unary(&headers, &body, |r: pb::StatRequest| stat(s, r)).await,
        "ListDir" => unary(&headers, &body, |r: pb::ListDirRequest| list_dir(s, r)).await,
        "MakeDir" => unary(&headers, &body, |r: pb::MakeDirRequest| make_dir(s, r)).await,
        "Move" => unary(&headers, &body, |r: pb::MoveRequest| move_entry(s, r)).await,
        "Remove" => unary(&headers, &body, |r: pb::RemoveRequest| remove(s, r)).await,
        "WatchDir" => match connect::stream_request::<pb::WatchDirRequest>(&headers, &body) {
            Ok((codec, req)) => match super::watch::stream(s, req).await {
                Ok(stream) => connect::stream_response(codec, stream),
                Err(e) => connect::stream_error(codec, e),
            },
            Err((codec, e)) => connect::stream_error(codec, e),
        },
        "CreateWatcher" => {
            unary(&headers, &body, |r: pb::CreateWatcherRequest| {
                super::watch::create(s, r)
            })
            .await
        }
        "GetWatcherEvents" => {
            unary(&headers, &body, |r: pb::GetWatcherEventsRequest| async move {
                super::watch::events(s, r)
            })
            .await
        }
        "RemoveWatcher" => {
            unary(&headers, &body, |r: pb::RemoveWatcherRequest| async move {
                super::watch::remove(s, r)
            })
            .await
        }
        _ => unknown_method("filesystem.Filesystem", &method),
    }
}

async fn stat_entry(s: &Sandbox, path: &str) -> Result<pb::EntryInfo, RpcError> {
    let e = s.e2b.conductor.stat_file(&s.id, path).await?;
    Ok(entry_info(&e, path))
}

async fn stat(s: &Sandbox, r: pb::StatRequest) -> Result<pb::StatResponse, RpcError> {
    let path = absolute(&r.path, "path")?;
    Ok(pb::StatResponse {
        entry: Some(stat_entry(s, &path).await?),
    })
}

async fn list_dir(s: &Sandbox, r: pb::ListDirRequest) -> Result<pb::ListDirResponse, RpcError> {
    let root = absolute(&r.path, "path")?;
    let depth = r.depth.max(1);
    let top = s.e2b.conductor.stat_file(&s.id, &root).await?;
    if top.kind != FileKind::Dir {
        return Err(RpcError::invalid(format!("path: {root} is not a directory")));
    }
    let mut entries = Vec::new();
    let mut level = vec![root];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            for e in s.e2b.conductor.list_files(&s.id, &dir).await? {
                let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
                if e.kind == FileKind::Dir {
                    next.push(path.clone());
                }
                entries.push(entry_info(&e, &path));
                if entries.len() > MAX_ENTRIES {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("more than {MAX_ENTRIES} entries: list with a smaller depth"),
                    ));
                }
            }
        }
        level = next;
    }
    Ok(pb::ListDirResponse { entries })
}

async fn make_dir(s: &Sandbox, r: pb::MakeDirRequest) -> Result<pb::MakeDirResponse, RpcError> {
    let path = absolute(&r.path, "path")?;
    if !s.e2b.conductor.make_dir(&s.id, &path).await? {
        return Err(RpcError::new(
            Code::AlreadyExists,
            format!("directory {path} already exists"),
        ));
    }
    Ok(pb::MakeDirResponse {
        entry: Some(stat_entry(s, &path).await?),
    })
}

async fn move_entry(s: &Sandbox, r: pb::MoveRequest) -> Result<pb::MoveResponse, RpcError> {
    let from = absolute(&r.source, "source")?;
    let to = absolute(&r.destination, "destination")?;
    s.e2b.conductor.move_path(&s.id, &from, &to).await?;
    Ok(pb::MoveResponse {
        entry: Some(stat_entry(s, &to).await?),
    })
}

async fn remove(s: &Sandbox, r: pb::RemoveRequest) -> Result<pb::RemoveResponse, RpcError> {
    let path = absolute(&r.path, "path")?;
    s.e2b.conductor.delete_file(&s.id, &path, true).await?;
    Ok(pb::RemoveResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_in_the_workspace() {
        assert_eq!(absolute("a/b", "path").unwrap(), "/workspace/a/b");
        assert_eq!(absolute("/workspace", "path").unwrap(), "/workspace");
        let e = absolute("/etc/passwd", "path").unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.starts_with("path: "), "{}", e.message);
        assert_eq!(absolute("../x", "destination").unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn entries_read_like_ls() {
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileKind::File, 0o640), "-rw-r-----");
        let e = FileEntry {
            name: "a.txt".into(),
            kind: FileKind::File,
            size: 3,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime_ms: 1_500,
            link_target: None,
        };
        let info = entry_info(&e, "/workspace/a.txt");
        assert_eq!(info.r#type, pb::FileType::File as i32);
        assert_eq!((info.owner.as_str(), info.size, info.mode), ("agent", 3, 0o644));
        let ts = info.modified_time.unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1, 500_000_000));
    }
}
