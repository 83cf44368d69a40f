//! The storage pool: a file system with copy-on-write file clones (reflinks) under the
//! workspaces path, so that copying a workspace's data volume for a snapshot costs what
//! changed since, not what the volume holds.
//!
//! Each data volume is an ext4 image file ([`crate::volumes`]): ext4 gives the hard size
//! limit, but a plain copy of the image reads and writes every allocated block. XFS made
//! with `-m reflink=1` (and btrfs) can clone a file instead: the clone shares the blocks, and
//! only blocks written later get their own copy; cloning a 1 GiB image takes ~50 ms and no
//! space. Our hosts have ext4 roots, so when conductor runs as root and the workspaces path
//! (`storage.isolated_workspaces_path`) is not already on a file system that clones, conductor
//! makes a sparse file `<base_path>/pool.xfs`, formats it XFS with reflink and loop-mounts it
//! on the workspaces path. The volume images and the snapshot copies
//! (`<workspaces>/.snapshots/`) then share one file system, which a clone needs.
//!
//! - **Size**: the pool file is as large as the file system holding it. It is sparse, so it
//!   takes only what is written plus the XFS log (65–130 MB), and the pool never runs out
//!   before the disk does; it is mounted with `discard`, so deleted files give their space
//!   back to the host. Like the sparse volume images, it overcommits: when the host disk is
//!   full, writes into the pool fail.
//! - **Never over data**: a workspaces path that already holds files (an installation older
//!   than the pool) is left as it is; snapshots there are full copies.
//! - **Lifetime**: every open [`Conductor`](crate::Conductor) keeps the pool busy (it holds
//!   the pool's root directory open). When one is dropped, the pool is unmounted if nothing
//!   uses it any more: no other conductor process and no mounted workspace volume. The next
//!   `open` mounts it again. So a stopped service without workspaces, or a test's temporary
//!   data directory, leaves no mount behind, while running workspaces keep their volumes.
//! - **Without the pool** (not root, no `mkfs.xfs`, a non-empty path): [`copy_file`] falls
//!   back to `cp --sparse=always`, which reads and writes every allocated block: time and
//!   space grow with the data, ~1 s and 1 GiB per GiB on our hosts.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conductor_core::config::DataPaths;
use tokio::process::Command;

use crate::{host, Result, ServiceError};

/// Name of the pool file in `storage.base_path`.
pub const POOL_FILE: &str = "pool.xfs";
/// Smallest pool made (XFS needs 300 MB).
const MIN_POOL_BYTES: u64 = 1 << 30;
/// How long a drop waits for lazily unmounted volumes to release the pool.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// How [`copy_file`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// A reflink clone: shares every block with the source.
    Reflink,
    /// A full copy of the allocated blocks (holes stay holes).
    Full,
}

impl CopyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::Full => "full copy",
        }
    }
}

/// The mounted pool, held busy while this value lives; see the module documentation.
#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    file: PathBuf,
    /// The pool's root directory, open: a mount with an open file cannot be unmounted.
    hold: Option<File>,
}

impl Pool {
    /// Mounts the pool on `paths.workspaces`, or joins it when another conductor process
    /// mounted it. `None` when conductor works without one (see the module documentation);
    /// the reason is logged, and nothing here stops conductor from starting.
    pub async fn open(paths: &DataPaths) -> Option<Pool> {
        let root = paths.workspaces.canonicalize().ok()?;
        let file = paths.base.canonicalize().ok()?.join(POOL_FILE);
        if !host::is_root() || file.starts_with(&root) {
            return None;
        }
        if mounted_pool(&root).as_deref() == Some(file.as_path()) {
            return Pool::hold(root, file);
        }
        if host::is_mounted(&root) {
            // Someone else's file system: used as it is.
            return None;
        }
        let empty = std::fs::read_dir(&root)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            if file.exists() {
                tracing::warn!(
                    "{} is not empty, so the storage pool {} is not mounted over it; snapshots make full copies",
                    root.display(),
                    file.display()
                );
            }
            return None;
        }
        if !file.exists() {
            if reflinks_work(&root).await {
                return None;
            }
            if let Err(e) = make_pool(&file, &paths.base).await {
                tracing::warn!("no storage pool, snapshots make full copies: {e}");
                return None;
            }
        }
        let mounted = Command::new("mount")
            .args(["-o", "loop,nosuid,nodev,discard"])
            .arg(&file)
            .arg(&root)
            .output()
            .await;
        match mounted {
            Ok(out) if out.status.success() => Pool::hold(root, file),
            Ok(out) => {
                // Another process may have mounted it meanwhile (XFS refuses a second mount).
                if mounted_pool(&root).as_deref() == Some(file.as_path()) {
                    return Pool::hold(root, file);
                }
                tracing::warn!(
                    "mount the storage pool {}: {}; snapshots make full copies",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                tracing::warn!("mount the storage pool {}: {e}", file.display());
                None
            }
        }
    }

    fn hold(root: PathBuf, file: PathBuf) -> Option<Pool> {
        let hold = File::open(&root).ok()?;
        Some(Pool {
            root,
            file,
            hold: Some(hold),
        })
    }
}

impl Drop for Pool {
    /// Unmounts the pool when nothing uses it any more (blocking; at most [`RELEASE_WAIT`]
    /// when volumes were just lazily unmounted).
    fn drop(&mut self) {
        drop(self.hold.take());
        if mounted_pool(&self.root).as_deref() != Some(self.file.as_path()) {
            return;
        }
        if host::mounts_under(&self.root).iter().any(|m| *m != self.root) {
            return;
        }
        // A volume unmounted with `umount -l` keeps its loop device, and so the pool, busy
        // until its last user is gone (a container being torn down): wait for it.
        let begin = Instant::now();
        while loops_backed_under(&self.root) && begin.elapsed() < RELEASE_WAIT {
            std::thread::sleep(Duration::from_millis(50));
        }
        // EBUSY means another conductor process still holds it.
        if let Err(e) = nix::mount::umount(&self.root) {
            tracing::debug!("storage pool {} stays mounted: {e}", self.root.display());
        }
    }
}

/// Creates the sparse pool file and formats it XFS with reflink.
async fn make_pool(file: &Path, base: &Path) -> Result<()> {
    let (_, size) = host::disk_usage(base)
        .ok_or_else(|| ServiceError::host("size the storage pool", format!("statvfs {} failed", base.display())))?;
    let size = (size & !((1 << 20) - 1)).max(MIN_POOL_BYTES);
    let f = File::create_new(file).map_err(|e| ServiceError::host(format!("create {}", file.display()), e))?;
    let made = match f.set_len(size) {
        Ok(()) => {
            drop(f);
            // -K: no discard of the fresh (all-hole) file.
            let out = Command::new("mkfs.xfs")
                .args(["-q", "-K", "-m", "reflink=1"])
                .arg(file)
                .output()
                .await;
            match out {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(ServiceError::host(
                    format!("format {} (mkfs.xfs)", file.display()),
                    String::from_utf8_lossy(&o.stderr).trim(),
                )),
                Err(e) => Err(ServiceError::host(
                    "run mkfs.xfs (apt-get install xfsprogs)".to_string(),
                    e,
                )),
            }
        }
        Err(e) => Err(ServiceError::host(format!("size {}", file.display()), e)),
    };
    if made.is_err() {
        let _ = std::fs::remove_file(file);
    }
    made
}

/// Whether files in `dir` can be cloned (tried on a small probe file).
async fn reflinks_work(dir: &Path) -> bool {
    let probe = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let copy = probe.with_extension("copy");
    let works = std::fs::write(&probe, [0u8; 4096]).is_ok()
        && Command::new("cp")
            .arg("--reflink=always")
            .arg(&probe)
            .arg(&copy)
            .output()
            .await
            .is_ok_and(|o| o.status.success());
    let _ = std::fs::remove_file(&probe);
    let _ = std::fs::remove_file(&copy);
    works
}

/// The file backing the loop device mounted (topmost) at `root`, if it is a loop mount.
fn mounted_pool(root: &Path) -> Option<PathBuf> {
    let target = root.to_string_lossy().replace(' ', "\\040");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let source = mountinfo
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(target.as_str()))
        .filter_map(|l| l.split_once(" - ").and_then(|(_, rest)| rest.split_whitespace().nth(1)))
        .next_back()?;
    let device = source.strip_prefix("/dev/")?;
    let backing = std::fs::read_to_string(format!("/sys/block/{device}/loop/backing_file")).ok()?;
    // A pool file deleted while mounted (a removed data directory) is still the pool.
    Some(PathBuf::from(backing.trim_end().trim_end_matches(" (deleted)")))
}

/// Whether a loop device is backed by a file under `root` (a volume image in the pool).
fn loops_backed_under(root: &Path) -> bool {
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    devices.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("loop/backing_file"))
            .is_ok_and(|b| Path::new(b.trim_end()).starts_with(root))
    })
}

/// Copies `src` to `dst` (which must not exist): a reflink clone when the file system can,
/// else a full copy of the allocated blocks.
pub async fn copy_file(src: &Path, dst: &Path) -> Result<CopyMethod> {
    let clone = Command::new("cp")
        .arg("--reflink=always")
        .arg(src)
        .arg(dst)
        .output()
        .await
        .map_err(|e| ServiceError::host("run cp", e))?;
    if clone.status.success() {
        return Ok(CopyMethod::Reflink);
    }
    tracing::debug!(
        "no reflink from {} ({}); copying",
        src.display(),
        String::from_utf8_lossy(&clone.stderr).trim()
    );
    let _ = std::fs::remove_file(dst);
    let full = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .output()
        .await
        .map_err(|e| ServiceError::host("run cp", e))?;
    if !full.status.success() {
        let _ = std::fs::remove_file(dst);
        return Err(ServiceError::host(
            format!("copy {} to {}", src.display(), dst.display()),
            String::from_utf8_lossy(&full.stderr).trim(),
        ));
    }
    Ok(CopyMethod::Full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_keep_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&src)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"head"))
            .unwrap();
        let dst = dir.path().join("dst.img");
        copy_file(&src, &dst).await.unwrap();
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 1 << 20,
            "holes stay holes"
        );
        assert_eq!(&std::fs::read(&dst).unwrap()[..4], b"head");
        assert!(copy_file(&dir.path().join("missing"), &dir.path().join("x"))
            .await
            .is_err());
    }
}
