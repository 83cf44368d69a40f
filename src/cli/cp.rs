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
//! agent or Podman, made it): see [`unpack`] and [`check_member`].

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use conductor_agent_protocol::{FileKind, TarGuard};
use conductor_service::files::{self, DownloadKind, PutOptions};
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
            let body = files::reader_stream(std::io::stdin());
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
                let body = files::writer_stream(move |out| {
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
                c.put_file(id, &target, files::reader_stream(file), opts).await?
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
            let top = download.name.clone();
            let name = match base_name(path) {
                "" | "." | ".." => top.clone(),
                n => n.to_string(),
            };
            let reader = files::blocking_reader(download.stream);
            let shown = dst.display().to_string();
            let target = tokio::task::spawn_blocking(move || unpack(reader, &dst, &top, &name))
                .await
                .map_err(|e| ServiceError::host("unpack", e))?
                .map_err(host_err(format!("copy {id}:{path} to {shown}")))?;
            eprintln!("copied {id}:{path} to {}", target.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks one member of a directory's tar from the workspace, which is not trusted: its
/// name must lie under `top/` (the directory copied) without `..` or a leading `/`, the
/// entry `top` itself must be a directory, and only files, directories and symlinks are
/// accepted (no hard links, devices, FIFOs). The error names the member.
pub fn check_member(top: &str, name: &[u8], kind: tar::EntryType) -> Result<(), String> {
    use std::path::Component;
    let bad = |why: String| Err(format!("member {:?}: {why}", String::from_utf8_lossy(name)));
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory | tar::EntryType::Symlink => {}
        tar::EntryType::Link => return bad("hard links are not accepted".into()),
        other => {
            return bad(format!(
                "entries of type {other:?} are not accepted (only files, directories and symlinks)"
            ))
        }
    }
    if name.contains(&0) {
        return bad("the name contains a NUL byte".into());
    }
    if name.starts_with(b"/") {
        return bad("absolute names are not accepted".into());
    }
    let mut parts = Vec::new();
    for part in Path::new(std::ffi::OsStr::from_bytes(name)).components() {
        match part {
            Component::CurDir => {}
            Component::Normal(p) => parts.push(p),
            Component::ParentDir => return bad("'..' is not accepted in names".into()),
            Component::RootDir | Component::Prefix(_) => return bad("absolute names are not accepted".into()),
        }
    }
    match parts.first() {
        Some(first) if first.as_bytes() == top.as_bytes() => {}
        _ => return bad(format!("not under {top:?}, the directory copied")),
    }
    if parts.len() == 1 && kind != tar::EntryType::Directory {
        return bad(format!("{top:?}, the directory copied, must be a directory"));
    }
    Ok(())
}

/// Unpacks a directory's tar (entries under `top/`) from the workspace into the existing
/// directory `dst` as `dst/<name>`, or as the new path `dst`; returns where it went.
///
/// The tar is not trusted: every member is checked by [`check_member`] (one bad member
/// refuses the whole copy), nothing is written below a symlink member, set-id and sticky
/// bits are dropped (modes `& 0o777`), owners and xattrs are not restored, and extension
/// entries over 64 KiB are refused by a [`TarGuard`]. Members are unpacked with the tar
/// crate's `unpack_in` (which keeps each inside) into a fresh temporary directory next to
/// the destination, which is moved into place only when the whole tar was good: renamed
/// when the destination does not exist, else merged into it (a file or symlink replaces one
/// of the same name; a directory meeting a non-directory refuses the copy before anything
/// is moved).
fn unpack(reader: impl std::io::Read, dst: &Path, top: &str, name: &str) -> std::io::Result<PathBuf> {
    use std::io::{Error, ErrorKind};
    for n in [top, name] {
        if n.is_empty() || n == "." || n == ".." || n.contains('/') {
            return Err(Error::other(format!("cannot copy a directory named {n:?}")));
        }
    }
    let (parent, target) = if dst.is_dir() {
        (dst.to_path_buf(), dst.join(name))
    } else if dst.symlink_metadata().is_ok() {
        return Err(Error::other(format!("{} exists and is not a directory", dst.display())));
    } else {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, dst.to_path_buf())
    };
    let tmp = tempfile::Builder::new().prefix(".conductor-cp-").tempdir_in(&parent)?;
    // On any error the temporary directory goes, and with it all that was unpacked.
    let dirs = unpack_checked(reader, tmp.path(), top).map_err(|e| {
        let why = if e.kind() == ErrorKind::InvalidData {
            "refused, "
        } else {
            ""
        };
        Error::new(e.kind(), format!("{why}nothing was copied: {e}"))
    })?;
    let unpacked = tmp.path().join(top);
    if unpacked.symlink_metadata().is_err() {
        return Err(Error::other(format!("the archive holds nothing under {top:?}")));
    }
    install(&unpacked, &target)?;
    // Directory modes last (deepest first), so a read-only directory could be filled.
    for (rel, mode) in dirs.iter().rev() {
        let path = target.join(rel);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(*mode))?;
    }
    Ok(target)
}

/// Unpacks the checked members of the tar into the empty directory `into`; returns the
/// directories' paths below `top` (sorted) and modes, to apply once the tree is in place.
fn unpack_checked(reader: impl std::io::Read, into: &Path, top: &str) -> std::io::Result<Vec<(PathBuf, u32)>> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::PermissionsExt;
    let refused = |m: String| Error::new(ErrorKind::InvalidData, m);
    let mut ar = tar::Archive::new(TarGuard::new(reader));
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut links: Vec<PathBuf> = Vec::new();
    // The last mode given for each directory.
    let mut dirs: std::collections::BTreeMap<PathBuf, u32> = Default::default();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        check_member(top, &raw, kind).map_err(refused)?;
        // Relative to `top`: checked above to start with it.
        let rel: PathBuf = Path::new(std::ffi::OsStr::from_bytes(&raw))
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .skip(1)
            .collect();
        if let Some(link) = links.iter().find(|l| rel.starts_with(l) && rel != **l) {
            return Err(refused(format!(
                "member {:?}: goes through the symlink member {:?}",
                String::from_utf8_lossy(&raw),
                Path::new(top).join(link)
            )));
        }
        if !entry.unpack_in(into)? {
            return Err(refused(format!("member {:?}: refused", String::from_utf8_lossy(&raw))));
        }
        match kind {
            tar::EntryType::Symlink => links.push(rel),
            tar::EntryType::Directory => {
                // Writable meanwhile; the mode from the header (no set-id, no sticky) later.
                let mode = entry.header().mode().unwrap_or(0o755) & 0o777;
                std::fs::set_permissions(into.join(top).join(&rel), PermissionsExt::from_mode(mode | 0o700))?;
                dirs.insert(rel, mode);
            }
            _ => {}
        }
    }
    Ok(dirs.into_iter().collect())
}

/// Moves the unpacked tree `src` to `dst`: renamed when `dst` does not exist, else merged
/// (directories into directories; a file or symlink replaces a file or symlink). A
/// directory meeting a non-directory (a symlink included: it is never followed) is refused
/// before anything moves.
fn install(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    // Pass 1: conflicts.
    let mut pending = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = pending.pop() {
        let d_meta = match d.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let s_dir = s.symlink_metadata()?.is_dir();
        match (s_dir, d_meta.is_dir()) {
            (true, true) => {
                for child in std::fs::read_dir(&s)? {
                    let child = child?;
                    pending.push((child.path(), d.join(child.file_name())));
                }
            }
            (true, false) => {
                return Err(Error::other(format!(
                    "{} exists and is not a directory; nothing was copied",
                    d.display()
                )))
            }
            (false, true) => {
                return Err(Error::other(format!(
                    "{} exists and is a directory; nothing was copied",
                    d.display()
                )))
            }
            (false, false) => {}
        }
    }
    // Pass 2: move.
    let mut pending = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = pending.pop() {
        match d.symlink_metadata() {
            Ok(m) if m.is_dir() => {
                for child in std::fs::read_dir(&s)? {
                    let child = child?;
                    pending.push((child.path(), d.join(child.file_name())));
                }
            }
            _ => std::fs::rename(&s, &d)?,
        }
    }
    Ok(())
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

    use std::os::unix::fs::PermissionsExt;
    use tar::EntryType as T;

    /// A header with a raw name (no checks: the tar crate refuses to write bad names).
    fn header(name: &[u8], kind: T, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_cksum();
        h
    }

    fn link(name: &[u8], target: &str) -> tar::Header {
        let mut h = header(name, T::Symlink, 0, 0o777);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        h
    }

    fn tar_of(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (h, data) in entries {
            b.append(h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn members_outside_the_copied_directory_or_of_other_kinds_are_refused() {
        for (name, kind) in [
            (&b"proj/"[..], T::Directory),
            (b"proj", T::Directory),
            (b"./proj/a.txt", T::Regular),
            (b"proj/sub/deep/x", T::Regular),
            (b"proj/link", T::Symlink),
            (b"proj//a", T::Continuous),
        ] {
            assert_eq!(check_member("proj", name, kind), Ok(()), "{name:?}");
        }
        for (name, kind, why) in [
            (&b"../x"[..], T::Regular, "'..'"),
            (b"proj/../../x", T::Regular, "'..'"),
            (b"proj/a/../../other/x", T::Regular, "'..'"),
            (b"/etc/cron.d/x", T::Regular, "absolute"),
            (b"/proj/x", T::Regular, "absolute"),
            (b"other/x", T::Regular, "not under \"proj\""),
            (b"projx/a", T::Regular, "not under"),
            (b"./", T::Directory, "not under"),
            (b"proj", T::Symlink, "must be a directory"),
            (b"proj", T::Regular, "must be a directory"),
            (b"proj/h", T::Link, "hard links"),
            (b"proj/p", T::Fifo, "Fifo"),
            (b"proj/c", T::Char, "Char"),
            (b"proj/b", T::Block, "Block"),
            (b"proj/s", T::GNUSparse, "GNUSparse"),
        ] {
            let e = check_member("proj", name, kind).unwrap_err();
            assert!(
                e.contains(&format!("{:?}", String::from_utf8_lossy(name))) && e.contains(why),
                "{name:?}: {e}"
            );
        }
    }

    fn good_tar() -> Vec<u8> {
        tar_of(&[
            (header(b"proj/", T::Directory, 0, 0o1777), b""),
            (header(b"proj/run.sh", T::Regular, 3, 0o4755), b"run"),
            (header(b"proj/g", T::Regular, 1, 0o2640), b"g"),
            (header(b"proj/ro/", T::Directory, 0, 0o555), b""),
            (header(b"proj/ro/f", T::Regular, 1, 0o444), b"f"),
            (link(b"proj/link", "/etc/passwd"), b""),
        ])
    }

    #[test]
    fn a_good_tar_lands_without_set_id_or_sticky_bits() {
        let host = tempfile::tempdir().unwrap();
        // To a new path.
        let dst = host.path().join("copy");
        let got = unpack(&good_tar()[..], &dst, "proj", "proj").unwrap();
        assert_eq!(got, dst);
        assert_eq!(names(&dst), ["g", "link", "ro", "run.sh"]);
        assert_eq!(std::fs::read(dst.join("run.sh")).unwrap(), b"run");
        assert_eq!(mode(&dst), 0o777);
        assert_eq!(mode(&dst.join("run.sh")), 0o755);
        assert_eq!(mode(&dst.join("g")), 0o640);
        assert_eq!(mode(&dst.join("ro")), 0o555);
        assert_eq!(std::fs::read_link(dst.join("link")).unwrap(), Path::new("/etc/passwd"));
        // Into an existing directory, as `<dir>/<name>`; again: merged, files replaced.
        let into = host.path().join("into");
        std::fs::create_dir(&into).unwrap();
        for _ in 0..2 {
            let got = unpack(&good_tar()[..], &into, "proj", "asked").unwrap();
            assert_eq!(got, into.join("asked"));
            assert_eq!(names(&into), ["asked"], "no temporary directory left");
            assert_eq!(mode(&into.join("asked/run.sh")), 0o755);
        }
        assert_eq!(names(host.path()), ["copy", "into"]);
    }

    #[test]
    fn a_bad_member_refuses_the_whole_copy_and_leaves_nothing() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let ok = (header(b"proj/a.txt", T::Regular, 1, 0o644), &b"a"[..]);
        let mut oversized = header(b"././@LongLink", T::GNULongName, 1 << 30, 0o644)
            .as_bytes()
            .to_vec();
        oversized.extend(std::iter::repeat_n(b'a', 1 << 20));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_of(&[ok.clone(), (header(b"../escape", T::Regular, 1, 0o644), b"x")]),
                "\"../escape\"",
            ),
            (
                tar_of(&[ok.clone(), (header(b"/tmp/escape", T::Regular, 1, 0o644), b"x")]),
                "absolute",
            ),
            (
                tar_of(&[ok.clone(), (header(b"other/x", T::Regular, 1, 0o644), b"x")]),
                "\"other/x\"",
            ),
            (
                tar_of(&[
                    ok.clone(),
                    (link(b"proj/evil", outside.to_str().unwrap()), b""),
                    (header(b"proj/evil/x", T::Regular, 1, 0o644), b"x"),
                ]),
                "goes through the symlink member",
            ),
            (
                tar_of(&[
                    (link(b"proj/evil", "."), b""),
                    (header(b"proj/evil/x", T::Regular, 1, 0o644), b"x"),
                ]),
                "goes through the symlink member",
            ),
            (
                tar_of(&[ok.clone(), (header(b"proj/h", T::Link, 0, 0o644), b"")]),
                "hard links",
            ),
            (
                tar_of(&[ok.clone(), (header(b"proj/dev", T::Char, 0, 0o644), b"")]),
                "Char",
            ),
            (
                tar_of(&[ok.clone(), (header(b"proj/fifo", T::Fifo, 0, 0o644), b"")]),
                "Fifo",
            ),
            (oversized, "64 KiB"),
        ];
        for (tar, why) in cases {
            let e = unpack(&tar[..], &host.path().join("copy"), "proj", "proj").unwrap_err();
            assert!(
                e.to_string().contains(why) && e.to_string().contains("nothing was copied"),
                "{why}: {e}"
            );
            assert_eq!(names(host.path()), ["outside"], "{why}: nothing left");
            assert!(names(&outside).is_empty(), "{why}");
        }
    }

    #[test]
    fn existing_files_are_never_written_through_and_conflicts_move_nothing() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let into = host.path().join("into");
        std::fs::create_dir_all(into.join("proj/dir")).unwrap();
        std::os::unix::fs::symlink(&outside, into.join("proj/sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), into.join("proj/file")).unwrap();
        // A directory where the host has a symlink to one: refused, before anything moved.
        let tar = tar_of(&[
            (header(b"proj/new", T::Regular, 1, 0o644), b"n"),
            (header(b"proj/sub/x", T::Regular, 1, 0o644), b"x"),
        ]);
        let e = unpack(&tar[..], &into, "proj", "proj").unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        // A file where the host has a directory.
        let tar = tar_of(&[(header(b"proj/dir", T::Regular, 1, 0o644), b"x")]);
        let e = unpack(&tar[..], &into, "proj", "proj").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert_eq!(names(&into.join("proj")), ["dir", "file", "sub"]);
        assert_eq!(names(&into), ["proj"]);
        // A file where the host has a symlink: the link is replaced, not followed.
        let tar = tar_of(&[(header(b"proj/file", T::Regular, 3, 0o644), b"new")]);
        unpack(&tar[..], &into, "proj", "proj").unwrap();
        assert_eq!(std::fs::read(into.join("proj/file")).unwrap(), b"new");
        assert!(names(&outside).is_empty());
        // A new path that is a dangling symlink is not written through either.
        std::os::unix::fs::symlink(outside.join("made"), host.path().join("dangling")).unwrap();
        let e = unpack(&good_tar()[..], &host.path().join("dangling"), "proj", "proj").unwrap_err();
        assert!(e.to_string().contains("exists and is not a directory"), "{e}");
        assert!(names(&outside).is_empty());
    }
}
