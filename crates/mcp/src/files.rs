//! The file tools' work, over the service's file API ([`Conductor::put_file`],
//! [`Conductor::get_file`], [`Conductor::list_files`], [`Conductor::stat_file`]): the calls
//! the HTTP `/workspaces/{id}/files` routes and `conductor ws cp` make, so the path rules
//! and the choice of the way in (the workspace's agent, else Podman) are the same for every
//! client.
//!
//! A path is relative to `/workspace` or absolute under it; `..`, NUL bytes and a path
//! through a symlink that leads out of `/workspace` are refused. Nothing else of the
//! container is reachable by these tools, `/tmp` included: `run_command` reaches the rest.
//! Files are read and written as the workspace user (uid 1000). This module adds what a
//! model needs on top: limits on what one call returns, a listing several levels deep, and
//! errors that say what to do.

use std::collections::VecDeque;

use conductor_core::validate::{self, WORKSPACE_ROOT};
use conductor_service::files::{DownloadKind, FileKind};
use conductor_service::{streams, Conductor, ServiceError};

/// Most bytes `read_file` returns.
pub const READ_LIMIT: usize = 256 * 1024;
/// Most bytes `write_file` accepts.
pub const WRITE_LIMIT: usize = 10 * 1024 * 1024;
/// Most entries `list_files` returns.
pub const LIST_LIMIT: usize = 1000;
/// Deepest `list_files` descends.
pub const MAX_DEPTH: u32 = 10;

/// What the file tools reach, for errors about paths.
const PATH_RULE: &str = "the file tools reach /workspace only: give a path relative to it or \
                         absolute under it (run_command reaches the rest of the workspace, /tmp included)";

/// A path given to a file tool, absolute and cleaned (`/workspace/src/a.py`), by the rules
/// of the file API ([`validate::workspace_path`]).
pub fn absolute(path: &str) -> Result<String, String> {
    let rel = validate::workspace_path(path).map_err(|m| format!("invalid path: {m}; {PATH_RULE}"))?;
    Ok(join(WORKSPACE_ROOT, &rel))
}

fn join(dir: &str, name: &str) -> String {
    match (dir, name) {
        (d, "") => d.to_string(),
        ("", n) => n.to_string(),
        (d, n) => format!("{}/{n}", d.trim_end_matches('/')),
    }
}

/// A failure of the file API on `path` as a tool error; the rest goes to `other`.
pub fn file_failure(e: ServiceError, path: &str, other: impl FnOnce(ServiceError) -> String) -> String {
    match e {
        ServiceError::NotFound { .. } => format!("no such file or directory: {path}"),
        ServiceError::Invalid { field, message } if field == "path" => {
            format!("invalid path: {message}; {PATH_RULE}")
        }
        e => other(e),
    }
}

/// Why reading a file failed: the file API's error, or what it is instead of a file.
pub enum ReadError {
    Service(ServiceError),
    IsADirectory,
    Stream(std::io::Error),
}

/// The first [`READ_LIMIT`] bytes of the file `path` (absolute) and its size.
pub async fn read_prefix(c: &Conductor, id: &str, path: &str) -> Result<(u64, Vec<u8>), ReadError> {
    let download = c.get_file(id, path).await.map_err(ReadError::Service)?;
    if download.kind != DownloadKind::File {
        // Dropping the stream ends the archive the workspace began.
        return Err(ReadError::IsADirectory);
    }
    let size = download.size.unwrap_or(0);
    let bytes = streams::read_prefix(download.stream, READ_LIMIT)
        .await
        .map_err(ReadError::Stream)?;
    Ok((size, bytes))
}

/// One entry of a listing, its path relative to the directory listed.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: FileKind,
    pub size: u64,
    pub path: String,
    pub target: String,
}

/// A directory's entries, `depth` levels deep, shallower levels first and at most
/// [`LIST_LIMIT`] of them (sorted by path); whether there are more; and the
/// subdirectories that could not be listed, with why.
pub struct Listing {
    pub entries: Vec<Entry>,
    pub more: bool,
    pub unreadable: Vec<(String, ServiceError)>,
}

/// Lists the directory `dir` (absolute, known to be a directory) `depth` levels deep, one
/// call of the file API per directory, breadth first (symlinks are not followed).
pub async fn list_tree(c: &Conductor, id: &str, dir: &str, depth: u32) -> Result<Listing, ServiceError> {
    let mut entries = Vec::new();
    let mut unreadable = Vec::new();
    // (path relative to `dir`, level of its entries)
    let mut pending: VecDeque<(String, u32)> = VecDeque::from([(String::new(), 1)]);
    while let Some((rel, level)) = pending.pop_front() {
        if entries.len() > LIST_LIMIT {
            break;
        }
        let listed = match c.list_files(id, &join(dir, &rel)).await {
            Ok(listed) => listed,
            Err(e) if rel.is_empty() => return Err(e),
            Err(e) => {
                unreadable.push((rel, e));
                continue;
            }
        };
        for e in listed {
            let path = join(&rel, &e.name);
            if e.kind == FileKind::Dir && level < depth {
                pending.push_back((path.clone(), level + 1));
            }
            entries.push(Entry {
                kind: e.kind,
                size: e.size,
                path,
                target: e.link_target.unwrap_or_default(),
            });
        }
    }
    let more = entries.len() > LIST_LIMIT;
    entries.truncate(LIST_LIMIT);
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Listing {
        entries,
        more,
        unreadable,
    })
}

/// The listing as a model reads it: one entry per line, directories with a trailing `/`.
pub fn render_list(dir: &str, depth: u32, entries: &[Entry], more: bool) -> String {
    let mut out = format!(
        "{dir} (depth {depth}): {} entr{}{}\n",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        if more { " shown, more exist" } else { "" }
    );
    for e in entries {
        let line = match e.kind {
            FileKind::Dir => format!("dir  {:>10}  {}/", "", e.path),
            FileKind::File => format!("file {:>10}  {}", e.size, e.path),
            FileKind::Symlink => format!("link {:>10}  {} -> {}", "", e.path, e.target),
            FileKind::Other => format!("other{:>10}  {}", "", e.path),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if more {
        out.push_str(&format!(
            "[only the first {LIST_LIMIT} entries are shown; list a subdirectory or use a smaller depth]\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_rules_of_the_file_api() {
        for (ok, abs) in [
            ("/workspace", "/workspace"),
            ("/workspace/src/a.py", "/workspace/src/a.py"),
            ("src/a.py", "/workspace/src/a.py"),
            (".", "/workspace"),
            ("/workspace/./a//b/", "/workspace/a/b"),
        ] {
            assert_eq!(absolute(ok).unwrap_or_else(|e| panic!("{ok}: {e}")), abs);
        }
        for (bad, why) in [
            ("/tmp/x", "outside /workspace"),
            ("/etc/passwd", "outside /workspace"),
            ("/workspaces/a", "outside /workspace"),
            ("/workspace/../etc/passwd", "'..'"),
            ("a\0b", "NUL"),
            ("", "empty"),
        ] {
            let e = absolute(bad).expect_err(bad);
            assert!(e.contains(why) && e.contains("run_command"), "{bad:?}: {e}");
        }
    }

    fn entry(kind: FileKind, size: u64, path: &str, target: &str) -> Entry {
        Entry {
            kind,
            size,
            path: path.into(),
            target: target.into(),
        }
    }

    #[test]
    fn listings_are_typed() {
        let entries = [
            entry(FileKind::Symlink, 7, "lib", "/usr/lib"),
            entry(FileKind::Dir, 4096, "src", ""),
            entry(FileKind::File, 12, "src/b.py", ""),
            entry(FileKind::Other, 0, "sock", ""),
        ];
        assert_eq!(
            render_list("/workspace", 2, &entries, false),
            "/workspace (depth 2): 4 entries\n\
             link             lib -> /usr/lib\n\
             dir              src/\n\
             file         12  src/b.py\n\
             other            sock\n"
        );
    }

    #[test]
    fn long_listings_are_cut_with_a_note() {
        let entries: Vec<Entry> = (0..LIST_LIMIT)
            .map(|i| entry(FileKind::File, 1, &format!("f{i:05}"), ""))
            .collect();
        let text = render_list("/workspace/x", 1, &entries, true);
        assert!(
            text.starts_with("/workspace/x (depth 1): 1000 entries shown, more exist\n"),
            "{text}"
        );
        assert!(text.ends_with("use a smaller depth]\n"));
        assert_eq!(text.lines().count(), LIST_LIMIT + 2);
    }
}
