//! Workspace data volumes with a hard size limit.
//!
//! Each volume is an ext4 file system in a sparse image file, loop-mounted on the host and
//! bind-mounted into the container: writes stop with ENOSPC at `volume_size`, and the host
//! disk only holds what was written. (XFS project quotas are not available on our hosts;
//! see docs/workspaces.md.) Layout of a volume directory:
//!
//! ```text
//! <dir>/data.img            the ext4 image (sparse)
//! <dir>/mnt/                its mount point
//! <dir>/mnt/workspace/      → /workspace in the container
//! <dir>/mnt/volumes/<name>/ → named sub-volumes (source:/workspace/src)
//! ```
//!
//! Without root (rootless), `mnt/` is a plain directory and no limit applies; `doctor` says
//! so.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::host;
use crate::storage_pool::{self, CopyMethod};
use crate::{Result, ServiceError};

/// Owner of everything a workspace writes: the workspace user.
pub const WORKSPACE_UID: u32 = 1000;

#[derive(Debug, Clone)]
pub struct DataVolume {
    pub dir: PathBuf,
    pub limited: bool,
}

impl DataVolume {
    pub fn at(dir: &Path) -> Self {
        DataVolume {
            dir: dir.to_path_buf(),
            limited: dir.join("data.img").exists(),
        }
    }
    pub fn image(&self) -> PathBuf {
        self.dir.join("data.img")
    }
    pub fn mountpoint(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    /// Host directory mounted at `/workspace`.
    pub fn workspace_dir(&self) -> PathBuf {
        self.mountpoint().join("workspace")
    }
    /// Host directory of a named sub-volume.
    pub fn sub_volume(&self, name: &str) -> PathBuf {
        self.mountpoint().join("volumes").join(name)
    }
}

async fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().await.map_err(|e| ServiceError::host(what, e))?;
    if !out.status.success() {
        return Err(ServiceError::host(
            what,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

fn chown(path: &Path) -> Result<()> {
    let uid = Some(nix::unistd::Uid::from_raw(WORKSPACE_UID));
    let gid = Some(nix::unistd::Gid::from_raw(WORKSPACE_UID));
    nix::unistd::chown(path, uid, gid).map_err(|e| ServiceError::host(format!("chown {}", path.display()), e))
}

fn mkdir_owned(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| ServiceError::host(format!("create {}", path.display()), e))?;
    if host::is_root() {
        chown(path)?;
    }
    Ok(())
}

/// Creates (first time) and mounts the volume in `dir`, with the given sub-volumes.
pub async fn prepare(dir: &Path, size_bytes: u64, inodes: Option<u64>, sub_volumes: &[String]) -> Result<DataVolume> {
    std::fs::create_dir_all(dir.join("mnt")).map_err(|e| ServiceError::host(format!("create {}", dir.display()), e))?;
    let vol = DataVolume {
        dir: dir.to_path_buf(),
        limited: host::is_root(),
    };
    if vol.limited {
        let image = vol.image();
        if !image.exists() {
            let f = std::fs::File::create(&image)
                .map_err(|e| ServiceError::host(format!("create {}", image.display()), e))?;
            f.set_len(size_bytes)
                .map_err(|e| ServiceError::host(format!("size {}", image.display()), e))?;
            drop(f);
            let mut mkfs = Command::new("mkfs.ext4");
            mkfs.args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                &format!("root_owner={WORKSPACE_UID}:{WORKSPACE_UID},nodiscard"),
            ]);
            if let Some(n) = inodes {
                mkfs.args(["-N", &n.to_string()]);
            }
            mkfs.arg(&image);
            if let Err(e) = run(&mut mkfs, &format!("format the data volume {}", image.display())).await {
                let _ = std::fs::remove_file(&image);
                return Err(e);
            }
        }
        if !host::is_mounted(&vol.mountpoint()) {
            run(
                Command::new("mount")
                    .args(["-o", "loop,nosuid,nodev"])
                    .arg(&image)
                    .arg(vol.mountpoint()),
                &format!("mount the data volume {}", image.display()),
            )
            .await?;
        }
    }
    mkdir_owned(&vol.workspace_dir())?;
    for name in sub_volumes {
        mkdir_owned(&vol.sub_volume(name))?;
    }
    Ok(vol)
}

/// Unmounts the volume (its data stays in the image).
pub async fn unmount(vol: &DataVolume) -> Result<()> {
    let mnt = vol.mountpoint();
    if host::is_mounted(&mnt) {
        let plain = Command::new("umount").arg(&mnt).output().await;
        if !plain.map(|o| o.status.success()).unwrap_or(false) {
            // Still busy (a container is being torn down): detach now, freed when idle.
            run(
                Command::new("umount").arg("-l").arg(&mnt),
                &format!("unmount {}", mnt.display()),
            )
            .await?;
        }
    }
    Ok(())
}

/// Unmounts and deletes the volume and its data.
pub async fn destroy(vol: &DataVolume) -> Result<()> {
    unmount(vol).await?;
    if vol.dir.exists() {
        std::fs::remove_dir_all(&vol.dir)
            .map_err(|e| ServiceError::host(format!("remove {}", vol.dir.display()), e))?;
    }
    Ok(())
}

pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ServiceError::host(format!("remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

async fn fsfreeze(mode: &str, mnt: &Path) -> Result<()> {
    let out = Command::new("fsfreeze")
        .arg(mode)
        .arg(mnt)
        .output()
        .await
        .map_err(|e| ServiceError::host("run fsfreeze", e))?;
    if !out.status.success() {
        return Err(ServiceError::host(
            format!("fsfreeze {mode} {}", mnt.display()),
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(())
}

/// Copies the volume image to `dst` with its file system frozen (when mounted), so the
/// copy is flushed and its journal clean.
pub async fn copy_frozen(vol: &DataVolume, dst: &Path) -> Result<CopyMethod> {
    let mnt = vol.mountpoint();
    let mounted = host::is_mounted(&mnt);
    if mounted {
        fsfreeze("-f", &mnt).await?;
    }
    remove_file(dst)?;
    let copied = storage_pool::copy_file(&vol.image(), dst).await;
    if mounted {
        let thawed = fsfreeze("-u", &mnt).await;
        if copied.is_ok() {
            thawed?;
        }
    }
    copied
}

/// Thaws the volume's file system if an interrupted [`copy_frozen`] left it frozen.
pub async fn thaw(vol: &DataVolume) {
    let mnt = vol.mountpoint();
    if host::is_mounted(&mnt) {
        // Fails with EINVAL when it was not frozen: nothing to do then.
        let _ = fsfreeze("-u", &mnt).await;
    }
}

/// Where a restore stages a snapshot's copy before it replaces the image.
pub fn staged_image(vol: &DataVolume) -> PathBuf {
    vol.dir.join("data.img.restore")
}
