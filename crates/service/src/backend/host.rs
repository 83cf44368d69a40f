//! Today's implementations of the backend seams, for an engine on this host (Podman):
//! loop-mounted ext4 volumes on the reflink pool, the agent's Unix socket in a bind-mounted
//! host directory, and `source` copied straight into the volume.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use conductor_core::config::DataPaths;
use conductor_core::engine::Mount;
use conductor_core::volume::VolumeSpec;
use conductor_core::Config;
use conductor_store::WorkspaceRecord;

use super::{AgentTransport, Progress, SourceUpload, VolumeStore};
use crate::agent_client::{self, AgentConn, AgentError};
use crate::storage_pool::{self, CopyMethod};
use crate::volumes::{self, DataVolume};
use crate::{host, Result, ServiceError};

/// Volumes as sparse ext4 images loop-mounted on the host (`volumes.rs`); a plain
/// directory without root.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostVolumes;

#[async_trait]
impl VolumeStore for HostVolumes {
    fn kind(&self) -> &'static str {
        if host::is_root() {
            "loop-ext4"
        } else {
            "directory"
        }
    }

    fn open(&self, dir: &Path) -> DataVolume {
        DataVolume::at(dir)
    }

    async fn prepare(
        &self,
        dir: &Path,
        size_bytes: u64,
        inodes: Option<u64>,
        sub_volumes: &[String],
    ) -> Result<DataVolume> {
        volumes::prepare(dir, size_bytes, inodes, sub_volumes).await
    }

    async fn detach(&self, vol: &DataVolume) -> Result<()> {
        volumes::unmount(vol).await
    }

    async fn destroy(&self, vol: &DataVolume) -> Result<()> {
        volumes::destroy(vol).await
    }

    async fn capture(&self, vol: &DataVolume, dst: &Path) -> Result<CopyMethod> {
        volumes::copy_frozen(vol, dst).await
    }

    async fn thaw(&self, vol: &DataVolume) {
        volumes::thaw(vol).await
    }

    async fn stage(&self, vol: &DataVolume, src: &Path) -> Result<()> {
        let staged = volumes::staged_image(vol);
        volumes::remove_file(&staged)?;
        storage_pool::copy_file(src, &staged).await.map(|_| ())
    }

    async fn replace(&self, vol: &DataVolume) -> Result<()> {
        let staged = volumes::staged_image(vol);
        std::fs::rename(&staged, vol.image()).map_err(|e| ServiceError::host(format!("rename {}", staged.display()), e))
    }

    async fn create_from(&self, dir: &Path, src: &Path) -> Result<CopyMethod> {
        let vol = DataVolume::at(dir);
        std::fs::create_dir_all(vol.mountpoint())
            .map_err(|e| ServiceError::host(format!("create {}", dir.display()), e))?;
        let image = vol.image();
        volumes::remove_file(&image)?;
        storage_pool::copy_file(src, &image).await
    }

    fn usage(&self, vol: &DataVolume) -> Option<(u64, u64)> {
        host::disk_usage(&vol.mountpoint())
    }

    fn attached_under(&self, root: &Path) -> Vec<PathBuf> {
        host::mounts_under(root)
            .into_iter()
            .filter(|mnt| mnt.file_name().is_some_and(|n| n == "mnt"))
            .filter_map(|mnt| mnt.parent().map(Path::to_path_buf))
            .collect()
    }
}

/// The agent's Unix socket in `<base>/agents/<workspace>/`, bind-mounted into the
/// workspace (`agent_client.rs`).
#[derive(Debug, Clone)]
pub struct UnixAgentTransport {
    paths: DataPaths,
}

impl UnixAgentTransport {
    pub fn new(paths: &DataPaths) -> Self {
        UnixAgentTransport { paths: paths.clone() }
    }

    fn dir(&self, workspace_id: &str) -> PathBuf {
        agent_client::socket_dir(&self.paths, workspace_id)
    }
}

#[async_trait]
impl AgentTransport for UnixAgentTransport {
    fn available(&self, config: &Config) -> bool {
        agent_client::binary(config).is_some() && crate::host::is_root()
    }

    fn container_setup(&self, config: &Config, workspace_id: &str) -> Result<Option<(Vec<Mount>, Vec<String>)>> {
        agent_client::container_setup(config, &self.paths, workspace_id)
    }

    async fn wait_ready(&self, workspace_id: &str) -> bool {
        agent_client::wait_ready(&self.dir(workspace_id)).await
    }

    fn is_set_up(&self, workspace_id: &str) -> bool {
        self.dir(workspace_id).is_dir()
    }

    async fn connect(&self, workspace_id: &str) -> Result<AgentConn, AgentError> {
        AgentConn::connect(&self.dir(workspace_id)).await
    }

    fn remove(&self, workspace_id: &str) {
        agent_client::remove_dir(&self.paths, workspace_id)
    }

    fn known(&self) -> Vec<String> {
        let Ok(dirs) = std::fs::read_dir(self.paths.base.join("agents")) else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for entry in dirs.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".server.tmp") {
                // A recording interrupted by a crash.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            // `<id>/` (the socket) and `<id>.server` (which process the agent is).
            let id = name.strip_suffix(".server").unwrap_or(&name).to_string();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// `source` copied on the host straight into the workspace's volume
/// (`orchestrator/source.rs`), through directory descriptors that never follow a link.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostSourceUpload;

#[async_trait]
impl SourceUpload for HostSourceUpload {
    async fn place(
        &self,
        _ws: &WorkspaceRecord,
        vol: &DataVolume,
        env_volumes: &[VolumeSpec],
        source: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<()> {
        crate::orchestrator::place_source_on_host(vol, env_volumes, source, progress).await
    }
}
