//! Placing a task's `source` in its workspace: the host directory is copied straight into
//! the workspace's volume (never mounted), at `/workspace/src` or wherever the
//! environment's volumes put that path. Conductor usually runs as root and a shared
//! workspace may have planted links there, so everything inside the workspace's
//! directories is done through directory file descriptors that never follow a link.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use conductor_core::task::{source_location, SOURCE_TARGET};
use conductor_core::volume::VolumeSpec;
use conductor_store::WorkspaceRecord;
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode as FileMode};
use nix::unistd::{fchown, fchownat, symlinkat, Gid, Uid};

use crate::backend::Progress;
use crate::tasks::TaskLog;
use crate::volumes::{DataVolume, WORKSPACE_UID};
use crate::{host, Conductor, Result, ServiceError};

/// Copies `source` into the workspace's `/workspace/src`, or creates that directory
/// empty, through the backend's [`SourceUpload`](crate::backend::SourceUpload).
pub(super) async fn place_source(
    c: &Conductor,
    ws: &WorkspaceRecord,
    source: Option<&str>,
    log: &TaskLog,
) -> Result<()> {
    let vol = c.volumes.open(Path::new(&ws.volume_dir));
    let env_volumes = c
        .catalog
        .get(&ws.environment)
        .map(|e| e.volumes.clone())
        .unwrap_or_default();
    c.sources.place(ws, &vol, &env_volumes, source, log).await
}

impl Progress for TaskLog {
    fn note(&self, line: &str) {
        self.system(line)
    }
}

/// The host implementation: straight into the volume's directories (never a mount).
pub(crate) async fn place_source_on_host(
    vol: &DataVolume,
    env_volumes: &[VolumeSpec],
    source: Option<&str>,
    progress: &dyn Progress,
) -> Result<()> {
    let target = match source_location(env_volumes, SOURCE_TARGET) {
        Some((v, rest)) if rest.is_empty() => SourceTarget {
            base: vol.sub_volume(&v.name),
            sub: None,
        },
        Some((v, rest)) => SourceTarget {
            base: vol.sub_volume(&v.name),
            sub: Some(rest),
        },
        None => SourceTarget {
            base: vol.workspace_dir(),
            sub: Some(SOURCE_TARGET.trim_start_matches("/workspace/").to_string()),
        },
    };
    let source = source.map(PathBuf::from);
    let free = host::disk_usage(&vol.mountpoint()).map(|(used, total)| total.saturating_sub(used));
    if let Some(s) = &source {
        progress.note(&format!("copying {} into {SOURCE_TARGET}", s.display()));
    }
    tokio::task::spawn_blocking(move || place_source_blocking(source.as_deref(), &target, free))
        .await
        .map_err(|e| ServiceError::host("copy the task's source", e))?
}

/// Where `/workspace/src` lives on the host: `base` is a directory conductor made that a
/// workspace cannot rename or replace (it is a mount point inside the container); `sub`,
/// when set, is the name of the source directory inside it, which the workspace owns.
struct SourceTarget {
    base: PathBuf,
    sub: Option<String>,
}

impl SourceTarget {
    fn path(&self) -> PathBuf {
        match &self.sub {
            Some(sub) => self.base.join(sub),
            None => self.base.clone(),
        }
    }
}

/// Flags for opening a directory without following a link a workspace may have put there.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn owner() -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(WORKSPACE_UID)), Some(Gid::from_raw(WORKSPACE_UID)))
}

/// Removes a file, link or directory tree without following links.
fn remove_entry(path: &Path) -> std::io::Result<()> {
    match path.symlink_metadata() {
        // `remove_dir_all` never follows links, even ones swapped in while it runs.
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes the target hold a copy of `source` (or exist, empty, without one), owned by the
/// workspace user. Refuses a source larger than the volume's free space. Inside the
/// workspace's own directories everything goes through directory file descriptors with
/// `O_NOFOLLOW`/`O_EXCL`, so a process in a shared workspace that swaps in symlinks cannot
/// make conductor (root) write or change anything outside the volume.
fn place_source_blocking(source: Option<&Path>, target: &SourceTarget, free: Option<u64>) -> Result<()> {
    let invalid = |m: String| ServiceError::invalid("source", m);
    let host_err = |what: &str, e: std::io::Error| ServiceError::host(format!("{what} {}", target.path().display()), e);
    if let Some(source) = source {
        let size = tree_size(source).map_err(|e| invalid(format!("{} cannot be read: {e}", source.display())))?;
        // The previous contents (shared workspaces) are replaced, so their space counts as free.
        let reclaimed = match target.path().symlink_metadata() {
            Ok(meta) if meta.is_dir() => tree_size(&target.path()).unwrap_or(0),
            _ => 0,
        };
        if let Some(free) = free {
            if size > free + reclaimed {
                return Err(invalid(format!(
                    "{} needs about {size} bytes, but the workspace volume has {} bytes free",
                    source.display(),
                    free + reclaimed
                )));
            }
        }
        match &target.sub {
            Some(_) => remove_entry(&target.path()).map_err(|e| host_err("remove", e))?,
            None => {
                let entries = std::fs::read_dir(&target.base).map_err(|e| host_err("read", e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| host_err("read", e))?;
                    remove_entry(&entry.path()).map_err(|e| host_err("clear", e))?;
                }
            }
        }
    }
    if source.is_none() {
        // Only make the directory when missing; whatever a shared workspace put there is its own.
        match target.path().symlink_metadata() {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(host_err("inspect", e)),
        }
    }
    let base = std::fs::File::open(&target.base).map_err(|e| host_err("open", e))?;
    let dir: OwnedFd = match &target.sub {
        Some(sub) => {
            match mkdirat(&base, sub.as_str(), FileMode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(host_err("create", e.into())),
            }
            openat(&base, sub.as_str(), dir_flags(), FileMode::empty()).map_err(|e| host_err("open", e.into()))?
        }
        None => base.into(),
    };
    let as_root = host::is_root();
    if as_root {
        let (uid, gid) = owner();
        fchown(&dir, uid, gid).map_err(|e| host_err("chown", e.into()))?;
    }
    match source {
        Some(source) => {
            copy_into(source, &dir, as_root).map_err(|e| invalid(format!("copying {} failed: {e}", source.display())))
        }
        None => Ok(()),
    }
}

/// Bytes a tree takes, each entry rounded up to a 4 KiB block; links are not followed.
fn tree_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        total += meta.len().div_ceil(4096).max(1) * 4096;
        if meta.is_dir() {
            total += tree_size(&entry.path())?;
        }
    }
    Ok(total)
}

/// Copies the contents of the host directory `from` into the directory open as `to`:
/// directories, regular files (with their permission bits) and symlinks (as links, never
/// followed); other file types are skipped. With `chown`, everything becomes the
/// workspace user's.
fn copy_into(from: &Path, to: &OwnedFd, chown: bool) -> std::io::Result<()> {
    let (uid, gid) = owner();
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let name = entry.file_name();
        let kind = entry.file_type()?;
        let mode = || -> std::io::Result<FileMode> {
            Ok(FileMode::from_bits_truncate(
                src.symlink_metadata()?.permissions().mode() & 0o777,
            ))
        };
        if kind.is_dir() {
            mkdirat(to, name.as_os_str(), FileMode::from_bits_truncate(0o700))?;
            let sub = openat(to, name.as_os_str(), dir_flags(), FileMode::empty())?;
            copy_into(&src, &sub, chown)?;
            fchmod(&sub, mode()?)?;
            if chown {
                fchown(&sub, uid, gid)?;
            }
        } else if kind.is_file() {
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut out = std::fs::File::from(openat(
                to,
                name.as_os_str(),
                flags,
                FileMode::from_bits_truncate(0o600),
            )?);
            std::io::copy(&mut std::fs::File::open(&src)?, &mut out)?;
            fchmod(&out, mode()?)?;
            if chown {
                fchown(&out, uid, gid)?;
            }
        } else if kind.is_symlink() {
            symlinkat(&std::fs::read_link(&src)?, to, name.as_os_str())?;
            if chown {
                fchownat(to, name.as_os_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_copied_with_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("tests")).unwrap();
        std::fs::write(src.join("tests/test_a.py"), "def test_a(): pass\n").unwrap();
        std::fs::write(src.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("link")).unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("src")).unwrap();
        std::fs::write(ws.join("src/old"), "stale").unwrap();
        let target = SourceTarget {
            base: ws.clone(),
            sub: Some("src".into()),
        };

        place_source_blocking(Some(&src), &target, Some(1 << 30)).unwrap();
        let copied = ws.join("src");
        assert_eq!(
            std::fs::read_to_string(copied.join("tests/test_a.py")).unwrap(),
            "def test_a(): pass\n"
        );
        let mode = std::fs::metadata(copied.join("run.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(copied.join("link")).unwrap(),
            Path::new("/etc/shadow"),
            "links are copied, not followed"
        );
        assert!(!copied.join("old").exists(), "previous contents are replaced");

        let fresh = SourceTarget {
            base: ws.clone(),
            sub: Some("other".into()),
        };
        match place_source_blocking(Some(&src), &fresh, Some(100)) {
            Err(ServiceError::Invalid { field, message }) => {
                assert_eq!(field, "source");
                assert!(message.contains("bytes free"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let empty = SourceTarget {
            base: dir.path().join("ws2"),
            sub: Some("src".into()),
        };
        std::fs::create_dir_all(&empty.base).unwrap();
        place_source_blocking(None, &empty, None).unwrap();
        assert!(empty.path().is_dir());
    }

    #[test]
    fn a_symlink_planted_by_the_workspace_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "keep").unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a"), "new").unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("src")).unwrap();
        let target = SourceTarget {
            base: ws.clone(),
            sub: Some("src".into()),
        };
        place_source_blocking(Some(&src), &target, None).unwrap();
        assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep");
        assert!(!outside.join("a").exists());
        assert!(!ws.join("src").is_symlink());
        assert_eq!(std::fs::read_to_string(ws.join("src/a")).unwrap(), "new");
        // Without a source, whatever is there stays untouched.
        std::fs::remove_dir_all(ws.join("src")).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("src")).unwrap();
        place_source_blocking(None, &target, None).unwrap();
        assert!(ws.join("src").is_symlink());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }
}
