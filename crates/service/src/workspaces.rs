//! Workspaces: one agent's isolated container, its data volume and its network.
//!
//! Creation records intent first (`creating`), then makes the volume, the network and the
//! container, then records `running`; any failure undoes what was made and records
//! `failed`. Removal records `removing` before touching the engine. A crash in between is
//! finished by [`Conductor::reconcile`](crate::reconcile).

use std::collections::BTreeMap;

use conductor_core::config::{next_free_block, parse_cidr, NetworkMode, NetworkPolicy};
use conductor_core::engine::{
    ContainerSpec, ContainerStatus, Labels, Mount, NetworkAttachment, NetworkSpec, OutputChunk, ProgressSink,
    ResourceLimits, SecurityOptions,
};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_core::resources::{LimitOverrides, WorkspaceLimits};
use conductor_core::validate;
use conductor_store::{WorkspaceFilter, WorkspaceRecord};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::exec::{self, ExecOutcome, ExecPath, ExecRequest};
use crate::volumes::DataVolume;
use crate::{host, now_ms, Conductor, Result, ServiceError};

/// Everything a caller may choose about a new workspace.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub agent_id: String,
    pub environment: String,
    pub limits: LimitOverrides,
    /// `None` takes the environment's, then the configuration's policy.
    pub network: Option<NetworkPolicy>,
    /// A throw-away volume even when `persistent_volumes` is on (sandbox tasks).
    pub ephemeral: bool,
    /// May only turn a read-only root file system on, never off.
    pub readonly_rootfs: bool,
    pub env: BTreeMap<String, String>,
    /// Container ports to publish on 127.0.0.1 (host ports from `container_port_range`).
    pub ports: Vec<u16>,
    /// Extra labels (e.g. the task id).
    pub labels: Labels,
    /// Extra `/etc/hosts` entries (name, address): sidecar services that join the
    /// workspace's network namespace are reached by name on 127.0.0.1.
    pub extra_hosts: Vec<(String, String)>,
    /// Registered secrets the workspace may use (within `secrets.max_allow`): the egress
    /// proxy injects them into requests to their rules' hosts, which the workspace may then
    /// reach; the workspace holds only placeholders (`GITHUB_TOKEN=conductor-secret-…`).
    /// Implies proxy mode.
    pub secrets: Vec<String>,
}

/// A workspace as shown to users.
#[derive(Debug, Clone, Serialize)]
pub struct WorkspaceInfo {
    pub id: String,
    pub agent_id: String,
    pub environment: String,
    pub image: String,
    pub container_name: String,
    pub state: WorkspaceState,
    pub network: Option<String>,
    /// The network policy it was made with: mode, and in proxy mode what it may reach.
    pub network_policy: conductor_core::egress::ResolvedNetwork,
    /// The names of the secrets it may use (never values, nor placeholders).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub limits: WorkspaceLimits,
    pub volume_dir: String,
    pub created_at: i64,
    pub last_used_at: i64,
    pub error: Option<String>,
}

/// Live resource use of a running workspace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
    pub pids_limit: u64,
    /// Processes killed by the kernel for exceeding the memory limit.
    pub oom_kills: Option<u64>,
    pub disk_used_bytes: Option<u64>,
    pub disk_limit_bytes: Option<u64>,
    /// How commands reach the workspace now: its agent, or Podman exec when the agent does
    /// not answer.
    pub exec_path: Option<ExecPath>,
    /// Published ports: (container port, host port on 127.0.0.1).
    pub published_ports: Vec<(u16, u16)>,
}

/// Filter for [`Conductor::list_workspaces`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub agent_id: Option<String>,
    pub environment: Option<String>,
    pub state: Option<WorkspaceState>,
    /// Include removed, lost and failed workspaces.
    pub all: bool,
}

pub(crate) const LIVE_STATES: [WorkspaceState; 6] = WorkspaceState::LIVE;

impl From<WorkspaceRecord> for WorkspaceInfo {
    fn from(r: WorkspaceRecord) -> Self {
        WorkspaceInfo {
            id: r.id,
            agent_id: r.agent_id,
            environment: r.environment,
            image: r.image,
            container_name: r.container_name,
            state: r.state,
            network: r.network,
            network_policy: r.network_policy,
            secrets: r.secrets.into_iter().map(|b| b.name).collect(),
            limits: r.limits,
            volume_dir: r.volume_dir,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            error: r.error,
        }
    }
}

/// Everything made so far during a create, for undoing it.
#[derive(Default)]
struct Made {
    workspace_id: Option<String>,
    volume: Option<(DataVolume, bool)>,
    network: Option<String>,
    container: Option<String>,
    /// The egress socket directory and listener (proxy mode).
    egress: bool,
}

impl Conductor {
    pub(crate) fn record(&self, id: &str) -> Result<WorkspaceRecord> {
        self.store
            .get_workspace(id)?
            .ok_or_else(|| ServiceError::not_found(format!("workspace '{id}'")))
    }

    /// Looks up a workspace by id, or by container name.
    pub fn get_workspace(&self, id: &str) -> Result<WorkspaceInfo> {
        Ok(self.handle(id)?.record.into())
    }

    pub fn list_workspaces(&self, f: &ListFilter) -> Result<Vec<WorkspaceInfo>> {
        let states = match (f.state, f.all) {
            (Some(s), _) => vec![s],
            (None, true) => Vec::new(),
            (None, false) => LIVE_STATES.to_vec(),
        };
        let filter = WorkspaceFilter {
            agent_id: f.agent_id.clone(),
            environment: f.environment.clone(),
            states,
        };
        Ok(self
            .store
            .list_workspaces(&filter)?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Creates and starts a workspace; builds its environment's image first if needed.
    pub async fn create_workspace(&self, req: CreateRequest, progress: ProgressSink) -> Result<WorkspaceInfo> {
        validate::agent_id(&req.agent_id).map_err(|m| ServiceError::invalid("agent_id", m))?;
        if let Some(claimed) = self.warm_pool_first(&req).await? {
            return Ok(claimed);
        }
        let env = self
            .catalog
            .require(&req.environment)
            .map_err(|m| ServiceError::invalid("environment", m))?
            .clone();
        let limits = WorkspaceLimits::resolve(&self.config, &req.limits)
            .map_err(|e| ServiceError::invalid(format!("limits.{}", e.field), e.message))?;
        for (k, v) in &req.env {
            validate::user_env(k, v).map_err(|m| ServiceError::invalid(format!("env.{k}"), m))?;
        }
        let (lo, hi) = self
            .config
            .port_range()
            .map_err(|m| ServiceError::invalid("ports", m))?;
        if req.ports.contains(&0) {
            return Err(ServiceError::invalid("ports", "0 is not a port"));
        }
        let requested: Vec<(&str, &NetworkPolicy)> = req.network.iter().map(|n| ("network", n)).collect();
        let mut network_policy = self.resolve_network(&env.name, &requested)?;
        self.check_secret_names("secrets", &req.secrets)?;
        if !req.secrets.is_empty() {
            self.add_secret_hosts(&mut network_policy, req.network.as_ref(), &req.secrets)?;
            for b in &req.secrets {
                let var = conductor_core::secrets::env_var(b);
                if req.env.contains_key(&var) {
                    return Err(ServiceError::invalid(
                        format!("env.{var}"),
                        format!("is the placeholder variable of secret {b:?}, which conductor sets"),
                    ));
                }
            }
        }
        let secrets = self.bind_secrets(&req.secrets)?;
        if !req.ports.is_empty() && network_policy.mode != NetworkMode::Egress {
            return Err(ServiceError::invalid(
                "ports",
                format!(
                    "publishing ports needs network \"egress\" (this workspace's is \"{}\"): a workspace in \"isolated\" or \"proxy\" has no interface but loopback",
                    network_policy.mode
                ),
            ));
        }
        if network_policy.mode == NetworkMode::Proxy && !self.agents.available(&self.config) {
            return Err(ServiceError::invalid(
                "network",
                "proxy mode needs the in-workspace agent (isolated_workspace.agent_containers.agent_binary)",
            ));
        }
        let active = self.store.list_workspaces(&WorkspaceFilter {
            states: LIVE_STATES.to_vec(),
            ..Default::default()
        })?;
        let max = self.config.isolated_workspace.cleanup.max_containers as usize;
        if active.len() >= max {
            return Err(ServiceError::Exhausted(format!(
                "{} workspaces exist, the configured maximum (isolated_workspace.cleanup.max_containers) is {max}; remove one first",
                active.len()
            )));
        }
        let image = self.ensure_environment(&env.name, progress, false).await?.reference;

        let id = format!("ws-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let container_name = naming::workspace_container(&req.agent_id, &id);
        let agent_dir = self.paths.workspaces.join(naming::agent_dir(&req.agent_id));
        let persistent_dir = agent_dir.join(&env.name);
        let shared_in_use = active
            .iter()
            .any(|w| std::path::Path::new(&w.volume_dir) == persistent_dir);
        let persistent =
            self.config.isolated_workspace.agent_containers.persistent_volumes && !req.ephemeral && !shared_in_use;
        let volume_dir = if persistent {
            persistent_dir
        } else {
            agent_dir.join(&id)
        };
        let now = now_ms();
        let record = WorkspaceRecord {
            id: id.clone(),
            agent_id: req.agent_id.clone(),
            environment: env.name.clone(),
            image: image.clone(),
            container_name: container_name.clone(),
            container_id: None,
            network: None,
            network_policy,
            state: WorkspaceState::Creating,
            limits: limits.clone(),
            volume_dir: volume_dir.display().to_string(),
            created_at: now,
            last_used_at: now,
            error: None,
            secrets,
        };
        self.store.insert_workspace(&record)?;

        let mut made = Made {
            workspace_id: Some(id.clone()),
            ..Default::default()
        };
        let result = self
            .make_workspace(&record, &env, &limits, &req, persistent, (lo, hi), &mut made)
            .await;
        match result {
            Ok(()) => self.get_workspace(&id),
            Err(e) => {
                self.undo(&made).await;
                self.agents.remove(&id);
                self.store
                    .set_workspace_state(&id, WorkspaceState::Failed, Some(&e.to_string()))?;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn make_workspace(
        &self,
        record: &WorkspaceRecord,
        env: &conductor_core::environment::Environment,
        limits: &WorkspaceLimits,
        req: &CreateRequest,
        persistent: bool,
        port_range: (u16, u16),
        made: &mut Made,
    ) -> Result<()> {
        let sub_names: Vec<String> = env.volumes.iter().map(|v| v.name.clone()).collect();
        let vol = self
            .volumes
            .prepare(
                std::path::Path::new(&record.volume_dir),
                limits.volume_size.bytes(),
                self.config.storage.volume_inodes(),
                &sub_names,
            )
            .await?;
        made.volume = Some((vol.clone(), persistent));

        let mut labels = naming::workspace_labels(&self.instance, &record.id, &record.agent_id, &env.name);
        labels.extend(req.labels.clone());
        let network = match record.network_policy.mode {
            // A private network namespace with loopback only. An internal bridge would add
            // nothing a workspace can use (no other member, no route, no DNS), would cost a
            // netavark set-up and tear-down per workspace, and would expose the host's IPv6
            // link-local address on that bridge, hence every host service listening on `::`.
            // Proxy mode too: its only way out is the agent's relay to the host's proxy.
            NetworkMode::Isolated | NetworkMode::Proxy => NetworkAttachment::None,
            NetworkMode::Egress => {
                let name = naming::workspace_network(&self.config.podman_config.network.name, &record.id);
                self.create_network(&name, labels.clone()).await?;
                made.network = Some(name.clone());
                NetworkAttachment::Network(name)
            }
        };

        let ac = &self.config.isolated_workspace.agent_containers;
        let readonly = ac.readonly_rootfs || req.readonly_rootfs;
        let mut mounts = vec![Mount::Bind {
            source: vol.workspace_dir(),
            target: "/workspace".into(),
            readonly: false,
        }];
        for v in &env.volumes {
            mounts.push(Mount::Bind {
                source: vol.sub_volume(&v.name),
                target: v.target.clone(),
                readonly: false,
            });
        }
        if readonly {
            mounts.push(Mount::Tmpfs {
                target: "/tmp".into(),
                size_bytes: ac.tmpfs_size.bytes(),
                options: vec!["noexec".into(), "nosuid".into(), "nodev".into()],
            });
        }
        let mut env_vars: Vec<(String, String)> = vec![
            ("CONDUCTOR_WORKSPACE_ID".into(), record.id.clone()),
            ("CONDUCTOR_AGENT_ID".into(), record.agent_id.clone()),
        ];
        env_vars.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let published = allocate_ports(&req.ports, port_range)?;
        labels.insert(naming::LABEL_ROLE.into(), "workspace".into());
        let mut spec = ContainerSpec {
            name: record.container_name.clone(),
            image: record.image.clone(),
            labels,
            env: env_vars,
            // PID 1 is a shell that reaps orphans and exits at once on SIGTERM.
            entrypoint: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done".into(),
            ]),
            cmd: Some(Vec::new()),
            user: Some(exec::WORKSPACE_USER.into()),
            workdir: Some("/workspace".into()),
            hostname: Some(naming::short_id(&record.id).to_string()),
            mounts,
            network,
            extra_hosts: req.extra_hosts.clone(),
            published_ports: published,
            limits: ResourceLimits {
                memory_bytes: limits.memory.bytes(),
                nano_cpus: limits.cpu.nano_cpus(),
                pids: limits.pids,
                nofile: limits.nofile,
                nproc: limits.nproc,
            },
            security: SecurityOptions {
                cap_drop_all: true,
                no_new_privileges: true,
                seccomp_profile: Some(self.seccomp_path().to_path_buf()),
                readonly_rootfs: readonly,
            },
        };
        // With the agent binary, the agent is PID 1 instead of the shell loop.
        let agent = self.agents.container_setup(&self.config, &record.id)?;
        let proxied = record.network_policy.mode == NetworkMode::Proxy;
        if let Some((agent_mounts, mut entrypoint)) = agent.clone() {
            spec.mounts.extend(agent_mounts);
            if proxied {
                let egress = self.egress_container_setup(&record.id)?;
                made.egress = true;
                spec.mounts.push(egress.mount);
                entrypoint.extend(egress.agent_args);
                spec.env.extend(egress.env);
                if !record.secrets.is_empty() {
                    // Placeholders, never values; and the conductor CA in the trust.
                    spec.env.extend(
                        record
                            .secrets
                            .iter()
                            .map(|b| (conductor_core::secrets::env_var(&b.name), b.placeholder.clone())),
                    );
                    spec.env.extend(self.secrets_trust_setup(&record.id)?);
                }
            }
            spec.entrypoint = Some(entrypoint);
        } else if proxied {
            return Err(ServiceError::invalid(
                "network",
                "proxy mode needs the in-workspace agent (isolated_workspace.agent_containers.agent_binary), which cannot run here",
            ));
        }
        if proxied {
            // Listening before the container starts: its first request finds the proxy.
            self.egress_attach(&record.id, &record.network_policy, &record.secrets)?;
        }
        let cid = self.engine.container_create(&spec).await?;
        made.container = Some(cid.clone());
        self.engine.container_start(&cid).await?;
        if let Some(net) = &made.network {
            // Before anything of the workload's runs (nothing does before exec).
            self.confine_bridge(&cid, net).await?;
        }
        if agent.is_some() && !self.agents.wait_ready(&record.id).await {
            tracing::warn!(workspace = %record.id, "the workspace agent does not answer; exec uses podman");
        }
        self.save_container_spec(&record.id, &spec)?;
        self.store
            .set_workspace_container(&record.id, &cid, made.network.as_deref())?;
        self.store
            .set_workspace_state(&record.id, WorkspaceState::Running, None)?;
        Ok(())
    }

    /// Secrets imply proxy mode, and each one's rule hosts are allowed (`host:port`, the
    /// port the rule means), outside `network.egress.max_allow`: the operator's bound on
    /// secrets (`secrets.max_allow`) is what bounds them. Deny entries still win.
    pub(crate) fn add_secret_hosts(
        &self,
        net: &mut conductor_core::egress::ResolvedNetwork,
        requested: Option<&NetworkPolicy>,
        names: &[String],
    ) -> Result<()> {
        let asked = requested.and_then(|n| n.mode);
        if matches!(asked, Some(m) if m != NetworkMode::Proxy) || net.mode == NetworkMode::Egress {
            return Err(ServiceError::invalid(
                "secrets",
                format!(
                    "secrets are injected by the egress proxy and need network mode \"proxy\" (this workspace's is \"{}\")",
                    asked.unwrap_or(net.mode)
                ),
            ));
        }
        net.mode = NetworkMode::Proxy;
        for entry in self.secret_hosts(names.iter().map(String::as_str))? {
            if !net.allow.contains(&entry) {
                net.allow.push(entry);
            }
        }
        Ok(())
    }

    /// Best-effort removal of what a failed create made.
    async fn undo(&self, made: &Made) {
        if let Some(c) = &made.container {
            let _ = self.engine.container_remove(c).await;
        }
        if let Some(id) = made.egress.then_some(()).and(made.workspace_id.as_deref()) {
            self.egress_detach(id);
        }
        if let Some(n) = &made.network {
            let _ = self.engine.network_remove(n).await;
        }
        if let Some((vol, persistent)) = &made.volume {
            let _ = if *persistent {
                self.volumes.detach(vol).await
            } else {
                self.volumes.destroy(vol).await
            };
        }
    }

    /// Keeps an `egress` workspace off the host and private ranges: netfilter rules in its
    /// network namespace (`firewall.rs`), which the workload cannot change (no
    /// CAP_NET_ADMIN). The public internet stays reachable, DNS only at the gateway.
    pub(crate) async fn confine_bridge(&self, container: &str, network: &str) -> Result<()> {
        let pid = self
            .engine
            .container_inspect(container)
            .await?
            .and_then(|c| c.pid)
            .ok_or_else(|| ServiceError::host("confine an egress workspace", "its container has no process"))?;
        let subnet = self
            .engine
            .network_list(&[])
            .await?
            .into_iter()
            .find(|n| n.name == network)
            .and_then(|n| n.subnets.into_iter().next())
            .ok_or_else(|| {
                ServiceError::host(
                    "confine an egress workspace",
                    format!("network {network} has no subnet"),
                )
            })?;
        let base: std::net::Ipv4Addr = subnet.split('/').next().and_then(|a| a.parse().ok()).ok_or_else(|| {
            ServiceError::host(
                "confine an egress workspace",
                format!("{subnet:?} is not an IPv4 subnet"),
            )
        })?;
        // Podman gives a network's gateway its first address.
        let gateway = std::net::Ipv4Addr::from(u32::from(base) + 1);
        crate::firewall::confine(pid, gateway, &crate::firewall::host_addresses()).await
    }

    /// Creates an egress workspace's bridge network (route out, DNS) on the next free block
    /// of `podman_config.network.subnet`.
    pub(crate) async fn create_network(&self, name: &str, labels: Labels) -> Result<()> {
        let _guard = self.net_lock.lock().await;
        let cfg = &self.config.podman_config.network;
        let mut spec = NetworkSpec {
            name: name.to_string(),
            internal: false,
            dns: true,
            subnet: None,
            mtu: Some(cfg.mtu),
            driver: cfg.driver.clone(),
            labels,
        };
        if cfg.subnet.is_empty() {
            self.engine.network_create(&spec).await?;
            return Ok(());
        }
        let (base, len) =
            parse_cidr(&cfg.subnet).map_err(|m| ServiceError::invalid("podman_config.network.subnet", m))?;
        // Another conductor (or a Podman user) may take the same block between our listing
        // and our create: skip blocks that fail and try the next ones.
        let mut tried: Vec<String> = Vec::new();
        loop {
            let mut taken: Vec<String> = self
                .engine
                .network_list(&[])
                .await?
                .into_iter()
                .flat_map(|n| n.subnets)
                .collect();
            taken.extend(tried.iter().cloned());
            let block = next_free_block(base, len, &taken).ok_or_else(|| {
                ServiceError::Exhausted(format!(
                    "no free /29 left in podman_config.network.subnet {}",
                    cfg.subnet
                ))
            })?;
            spec.subnet = Some(block.clone());
            match self.engine.network_create(&spec).await {
                Ok(()) => return Ok(()),
                Err(e) if tried.len() < 8 => {
                    tracing::debug!("network {name} on {block} failed ({e}); trying the next block");
                    tried.push(block);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs a command in a running workspace, streaming its output.
    pub async fn exec(&self, id: &str, req: ExecRequest, output: mpsc::Sender<OutputChunk>) -> Result<ExecOutcome> {
        let h = self.running(id, "exec").await?;
        self.exec_in(&h, req, output).await
    }

    /// Runs a command and collects its output (for the HTTP API).
    pub async fn exec_collect(&self, id: &str, req: ExecRequest) -> Result<(ExecOutcome, String, String)> {
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(chunk) = rx.recv().await {
                match chunk {
                    OutputChunk::Stdout(b) => out.extend_from_slice(&b),
                    OutputChunk::Stderr(b) => err.extend_from_slice(&b),
                }
            }
            (
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
            )
        });
        let outcome = self.exec(id, req, tx).await?;
        let (out, err) = collector.await.map_err(|e| ServiceError::host("collect output", e))?;
        Ok((outcome, out, err))
    }

    /// The workspace plus live usage when it runs.
    pub async fn inspect_workspace(&self, id: &str) -> Result<(WorkspaceInfo, Option<Usage>)> {
        let info = self.get_workspace(id)?;
        if info.state != WorkspaceState::Running {
            return Ok((info, None));
        }
        let record = self.record(&info.id)?;
        if self.check_container(&record).await?.is_some() {
            return Ok((self.get_workspace(&info.id)?, None));
        }
        let container = record.container().to_string();
        let stats = match self.engine.container_stats(&container).await {
            Ok(stats) => stats,
            // It stopped between the check and the reading.
            Err(e) => {
                if self.check_container(&self.record(&info.id)?).await?.is_some() {
                    return Ok((self.get_workspace(&info.id)?, None));
                }
                return Err(e.into());
            }
        };
        let pid = self.engine.container_inspect(&container).await?.and_then(|c| c.pid);
        let disk = self
            .volumes
            .usage(&self.volumes.open(std::path::Path::new(&info.volume_dir)));
        let usage = Usage {
            cpu_percent: stats.cpu_percent,
            memory_bytes: stats.memory_bytes,
            memory_limit_bytes: stats.memory_limit_bytes,
            pids: stats.pids,
            pids_limit: stats.pids_limit,
            oom_kills: pid.and_then(host::oom_kills),
            disk_used_bytes: disk.map(|d| d.0),
            disk_limit_bytes: disk.map(|d| d.1),
            exec_path: Some(if self.agents.connect(&info.id).await.is_ok() {
                ExecPath::Agent
            } else {
                ExecPath::Podman
            }),
            published_ports: self
                .load_container_spec(&info.id)
                .map(|s| s.published_ports)
                .unwrap_or_default(),
        };
        Ok((info, Some(usage)))
    }

    pub async fn stop_workspace(&self, id: &str) -> Result<WorkspaceInfo> {
        let w = self.record(id)?;
        if !w.state.can_stop() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is {}; only a running, paused or suspended one can be stopped",
                w.id, w.state
            )));
        }
        let container = w.container().to_string();
        match w.state {
            // Its container is stopped already.
            WorkspaceState::Suspended => {}
            WorkspaceState::Paused => {
                // A frozen process cannot take the stop signal.
                self.thaw_if_paused(&w).await?;
                self.engine.container_stop(&container, 5).await?;
            }
            _ => self.engine.container_stop(&container, 5).await?,
        }
        self.store.set_workspace_state(&w.id, WorkspaceState::Stopped, None)?;
        self.get_workspace(&w.id)
    }

    pub async fn start_workspace(&self, id: &str) -> Result<WorkspaceInfo> {
        let w = self.record(id)?;
        if !w.state.can_start() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is {}; only a stopped one can be started",
                w.id, w.state
            )));
        }
        self.boot(&w).await?;
        self.get_workspace(&w.id)
    }

    /// Unpauses the workspace's containers (its own and its sidecars) that are paused.
    pub(crate) async fn thaw_if_paused(&self, w: &WorkspaceRecord) -> Result<()> {
        let paused = self
            .engine
            .container_list(&[(naming::LABEL_WORKSPACE, Some(w.id.as_str()))])
            .await?
            .into_iter()
            .filter(|c| c.status == ContainerStatus::Paused);
        for c in paused {
            self.engine.container_unpause(&c.id).await?;
        }
        Ok(())
    }

    /// After a (re)start of a workspace's container: waits for its agent (when it has one)
    /// and records which process it is, before anything else runs in the container.
    pub(crate) async fn await_agent(&self, id: &str) {
        if self.agents.is_set_up(id) && !self.agents.wait_ready(id).await {
            tracing::warn!(workspace = %id, "the workspace agent does not answer; exec uses podman");
        }
    }

    /// Removes a workspace's container and network. `keep_volumes`: `Some(true)` keeps its
    /// data, `Some(false)` deletes it, `None` keeps it only for a persistent volume with
    /// `persistent_volumes` on.
    pub async fn remove_workspace(&self, id: &str, keep_volumes: Option<bool>) -> Result<WorkspaceInfo> {
        let w = self.begin_removal(id)?;
        self.release_resources(&w, keep_volumes).await?;
        self.store.set_workspace_state(&w.id, WorkspaceState::Removed, None)?;
        // An E2B sandbox's lease ends with its workspace.
        self.store.delete_lease(&w.id)?;
        self.get_workspace(&w.id)
    }

    /// First half of removing a throw-away workspace (a finished sandbox): marks it
    /// `removing`, so that the caller may report first and call [`Self::finish_removal`]
    /// after. Should conductor stop in between, reconcile finishes the removal (it removes
    /// every `removing` workspace, its ephemeral volume included).
    pub(crate) fn begin_removal(&self, id: &str) -> Result<WorkspaceRecord> {
        let w = self.record(id)?;
        if !w.state.can_remove() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is already removed",
                w.id
            )));
        }
        self.store.set_workspace_state(&w.id, WorkspaceState::Removing, None)?;
        Ok(w)
    }

    /// Second half of [`Self::begin_removal`]: removes the container and deletes the data.
    pub(crate) async fn finish_removal(&self, id: &str) -> Result<()> {
        let w = self.record(id)?;
        if w.state != WorkspaceState::Removing {
            return Ok(());
        }
        self.release_resources(&w, Some(false)).await?;
        self.store.set_workspace_state(&w.id, WorkspaceState::Removed, None)?;
        Ok(())
    }

    /// Whether the workspace's volume is its agent's persistent one for its environment
    /// (`agent_<id>/<environment>`), which outlives the workspace, rather than its own.
    pub(crate) fn is_persistent_volume(&self, w: &WorkspaceRecord) -> bool {
        let persistent_dir = self
            .paths
            .workspaces
            .join(naming::agent_dir(&w.agent_id))
            .join(&w.environment);
        std::path::Path::new(&w.volume_dir) == persistent_dir
    }

    /// Removes the engine objects of a workspace and releases or deletes its volume (and
    /// with it its snapshots).
    pub(crate) async fn release_resources(&self, w: &WorkspaceRecord, keep_volumes: Option<bool>) -> Result<()> {
        // A paused container's processes cannot die until thawed.
        self.thaw_if_paused(w).await?;
        // Sidecars and holders share the workspace label; remove them first.
        let others = self
            .engine
            .container_list(&[(naming::LABEL_WORKSPACE, Some(w.id.as_str()))])
            .await?;
        for c in others
            .iter()
            .filter(|c| c.labels.get(naming::LABEL_ROLE).map(String::as_str) != Some("workspace"))
        {
            self.engine.container_remove(&c.id).await?;
        }
        self.engine.container_remove(w.container()).await?;
        self.agents.remove(&w.id);
        self.egress_detach(&w.id);
        if let Some(n) = &w.network {
            self.engine.network_remove(n).await?;
        }
        let vol = self.volumes.open(std::path::Path::new(&w.volume_dir));
        let keep = keep_volumes.unwrap_or(
            self.is_persistent_volume(w) && self.config.isolated_workspace.agent_containers.persistent_volumes,
        );
        if keep {
            self.volumes.detach(&vol).await?;
        } else {
            self.volumes.destroy(&vol).await?;
        }
        self.release_snapshots(w, keep).await
    }
}

/// Picks free host ports on 127.0.0.1 for the requested container ports.
pub(crate) fn allocate_ports(ports: &[u16], (lo, hi): (u16, u16)) -> Result<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    let mut next = lo;
    for &p in ports {
        let host = (next..=hi)
            .find(|h| std::net::TcpListener::bind(("127.0.0.1", *h)).is_ok())
            .ok_or_else(|| ServiceError::Exhausted("no free port left in podman_config.container_port_range".into()))?;
        out.push((p, host));
        next = host.saturating_add(1);
    }
    Ok(out)
}
