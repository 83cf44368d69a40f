//! Proxy mode: a workspace with no network interface but loopback reaches the outside only
//! through conductor's allowlist proxy, and every attempt is audited.
//!
//! ```text
//! workload ──HTTP(S)_PROXY──▶ agent 127.0.0.1:3128 ──relay──▶ /run/conductor-egress/egress.sock
//!   (inside the workspace)       (crates/agent, egress.rs)      (read-only bind of <base>/egress/<id>/)
//!                                                                │ host side: this module
//!                                                                ▼
//!             conductor-egress-proxy (CONNECT / plain HTTP) ◀── Gate: the workspace's policy
//!                                                                │  (core::egress), task override
//!                                                                ▼
//!                                  upstream, on an address the policy allowed (never private,
//!                                  loopback, link-local or the host's own unless a CIDR says so)
//! ```
//!
//! The host side listens on one Unix socket per workspace, so it knows who asks without
//! trusting anything the workload sends. The socket's directory is mounted read-only, so
//! the workload cannot replace it. The policy in force is the workspace's, or while a task
//! that gave its own `network` runs, the task's over it. Each connection ends as one row of
//! `egress_events` (bounded by `network.egress.audit_retention_days` and `audit_max_rows`)
//! and one broadcast to followers.
//!
//! A workspace made with secrets is served by a proxy that may intercept: its gate asks for
//! interception of a `CONNECT` whose host:port a rule of one of its secrets in force matches
//! (`crate::secrets`), and the audit row names the secrets injected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use conductor_agent_protocol::{EGRESS_SOCKET_DIR, EGRESS_SOCKET_NAME};
use conductor_core::config::{EgressConfig, NetworkMode, NetworkPolicy};
use conductor_core::egress::{resolve, EgressPolicy, PolicyLayer, ResolvedNetwork, Verdict as CoreVerdict};
use conductor_core::engine::Mount;
use conductor_core::secrets::SecretBinding;
use conductor_egress_proxy::mitm::Injector;
use conductor_egress_proxy::{ConnectionLimiter, Decision, EgressEvent, Gate, Proxy, ProxyConfig, Verdict};
use conductor_store::{EgressDecision, EgressEventRecord, EgressFilter, SecretKey, Store};
use tokio::net::UnixListener;
use tokio::sync::broadcast;

use crate::secrets::SecretSource;
use crate::{now_ms, Conductor, Result, ServiceError};

/// Inserts between two prunings of the audit.
const PRUNE_EVERY: u64 = 500;

/// The policy a workspace's connections are judged by now.
struct Active {
    workspace: Arc<EgressPolicy>,
    /// While a task with its own `network` runs: its id and policy.
    task: Option<(String, Arc<EgressPolicy>)>,
    /// The task running in the workspace, for the audit (also without a policy of its own).
    task_id: Option<String>,
    /// The secrets the workspace was made with (and their placeholders).
    secrets: Arc<Vec<SecretBinding>>,
    /// While a task that named its own `secrets` runs: those (a subset of the workspace's),
    /// the only ones injected meanwhile.
    task_secrets: Option<Arc<Vec<SecretBinding>>>,
}

struct Listener {
    /// Shared with the accept loop, which reads it for every connection.
    active: Arc<RwLock<Active>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Every proxy-mode workspace's listener in this process.
pub struct EgressHub {
    proxy: Arc<Proxy>,
    proxy_config: ProxyConfig,
    /// The proxy for workspaces with secrets: it may intercept. Made at first use.
    intercepting: Mutex<Option<Arc<Proxy>>>,
    bundles: std::collections::BTreeMap<String, Vec<String>>,
    host_addrs: Arc<Vec<IpAddr>>,
    listeners: Mutex<HashMap<String, Listener>>,
    events: broadcast::Sender<EgressEventRecord>,
    inserted: AtomicU64,
}

impl EgressHub {
    pub fn new(config: &EgressConfig) -> Self {
        let resolver_override = config
            .resolve
            .iter()
            .map(|(name, addrs)| {
                (
                    name.to_ascii_lowercase(),
                    addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                )
            })
            .collect();
        let proxy_config = ProxyConfig {
            connect_timeout: Duration::from_secs(config.connect_timeout),
            idle_timeout: Duration::from_secs(config.idle_timeout),
            resolver_override,
            ..Default::default()
        };
        EgressHub {
            proxy: Arc::new(Proxy::new(proxy_config.clone())),
            proxy_config,
            intercepting: Mutex::default(),
            bundles: config.bundles(),
            host_addrs: Arc::new(crate::firewall::host_addresses()),
            listeners: Mutex::default(),
            events: broadcast::channel(1024).0,
            inserted: AtomicU64::new(0),
        }
    }

    fn policy(&self, net: &ResolvedNetwork) -> Result<EgressPolicy> {
        EgressPolicy::parse(&net.allow, &net.deny, &self.bundles)
            .map_err(|e| ServiceError::invalid(format!("network.{}[{}]", e.list, e.index), e.message))
    }

    /// Whether this process serves the workspace's proxy.
    pub fn serves(&self, workspace_id: &str) -> bool {
        self.listeners.lock().unwrap().contains_key(workspace_id)
    }

    /// New audit rows as they are recorded.
    pub fn subscribe(&self) -> broadcast::Receiver<EgressEventRecord> {
        self.events.subscribe()
    }
}

/// The gate of one connection: the policy and secrets in force when it was accepted.
struct WorkspaceGate {
    policy: Arc<EgressPolicy>,
    host_addrs: Arc<Vec<IpAddr>>,
    secrets: Option<SecretSource>,
}

fn verdict(v: CoreVerdict, allow_hint: bool) -> Verdict {
    match v {
        CoreVerdict::Allow { rule } => Verdict::Allow { rule },
        CoreVerdict::Deny { reason, rule } => {
            let mut message = reason.message();
            if allow_hint && rule.is_none() {
                message.push_str(" (the workspace's or the task's network.allow decides)");
            }
            Verdict::Deny {
                reason: reason.as_str().to_string(),
                message,
                rule,
            }
        }
    }
}

impl Gate for WorkspaceGate {
    fn check_name(&self, host: &str, port: u16) -> Verdict {
        verdict(self.policy.check_name(host, port), true)
    }

    fn check_addr(&self, host: &str, addr: IpAddr, port: u16) -> Verdict {
        verdict(self.policy.check_addr(host, addr, port, &self.host_addrs), false)
    }

    fn intercept(&self, host: &str, port: u16) -> Option<Arc<dyn Injector>> {
        self.secrets.as_ref()?.injector_for(host, port)
    }
}

fn record_of(workspace_id: &str, task_id: Option<String>, e: &EgressEvent) -> EgressEventRecord {
    EgressEventRecord {
        id: 0,
        at_ms: e
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        workspace_id: workspace_id.to_string(),
        task_id,
        method: e.method.clone(),
        host: e.host.clone(),
        port: e.port,
        resolved: e.resolved.map(|a| a.to_string()),
        decision: match e.decision {
            Decision::Allowed => EgressDecision::Allowed,
            Decision::Denied => EgressDecision::Denied,
        },
        rule: e.rule.clone(),
        reason: e.reason.clone(),
        bytes_up: e.bytes_up,
        bytes_down: e.bytes_down,
        duration_ms: e.duration.as_millis() as u64,
        error: e.error.clone(),
        injected: e.injected.clone(),
    }
}

/// A running task's part in its workspace's egress: its id, its own network (resolved over
/// the workspace's) and its own secrets, if it gave them.
pub(crate) type TaskEgress<'a> = (&'a str, Option<&'a ResolvedNetwork>, Option<&'a [SecretBinding]>);

/// What a proxy-mode workspace's container needs: the socket directory (read-only), the
/// agent's relay options and the proxy variables.
pub struct ContainerEgress {
    pub mount: Mount,
    pub agent_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Conductor {
    /// Host directory of a workspace's egress socket (root-owned; mounted read-only).
    pub fn egress_dir(&self, workspace_id: &str) -> PathBuf {
        self.paths.base.join("egress").join(workspace_id)
    }

    /// The resolved network of a new workspace: the configuration's default, the
    /// environment's, then `request` (the workspace's or a sandbox task's), checked against
    /// `network.egress.max_allow`. Errors name `field` (`network.allow[1]`).
    pub fn resolve_network(&self, environment: &str, request: &[(&str, &NetworkPolicy)]) -> Result<ResolvedNetwork> {
        let egress = &self.config.network.egress;
        let mut layers: Vec<PolicyLayer> = vec![self.config.isolated_workspace.agent_containers.network.layer()];
        if let Some(env) = self.catalog.get(environment).and_then(|e| e.network.as_ref()) {
            layers.push(env.layer());
        }
        for (field, policy) in request {
            egress
                .check(field, policy)
                .map_err(|(field, message)| ServiceError::invalid(field, message))?;
            layers.push(policy.layer());
        }
        let resolved = resolve(&layers);
        self.egress.policy(&resolved)?;
        Ok(resolved)
    }

    /// Prepares the socket directory of a proxy-mode workspace and says what its
    /// container needs.
    pub(crate) fn egress_container_setup(&self, workspace_id: &str) -> Result<ContainerEgress> {
        let parent = self.paths.base.join("egress");
        let dir = self.egress_dir(workspace_id);
        for (d, mode) in [(&parent, 0o711), (&dir, 0o755)] {
            std::fs::create_dir_all(d).map_err(|e| ServiceError::host(format!("create {}", d.display()), e))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                .map_err(|e| ServiceError::host(format!("chmod {}", d.display()), e))?;
        }
        let port = self.config.network.egress.proxy_port;
        let url = format!("http://127.0.0.1:{port}");
        let no_proxy = "localhost,127.0.0.1,::1".to_string();
        let env = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
            .into_iter()
            .map(|k| (k.to_string(), url.clone()))
            .chain(
                ["NO_PROXY", "no_proxy"]
                    .into_iter()
                    .map(|k| (k.to_string(), no_proxy.clone())),
            )
            .collect();
        Ok(ContainerEgress {
            mount: Mount::Bind {
                source: dir,
                target: EGRESS_SOCKET_DIR.into(),
                readonly: true,
            },
            agent_args: vec![
                "--egress-listen".into(),
                format!("127.0.0.1:{port}"),
                "--egress-socket".into(),
                format!("{EGRESS_SOCKET_DIR}/{EGRESS_SOCKET_NAME}"),
            ],
            env,
        })
    }

    /// The proxy that may intercept (the egress CA and the upstream trust loaded).
    fn intercepting_proxy(&self) -> Result<Arc<Proxy>> {
        let mut slot = self.egress.intercepting.lock().unwrap();
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let proxy = Arc::new(Proxy::with_interception(
            self.egress.proxy_config.clone(),
            self.interception()?,
        ));
        *slot = Some(proxy.clone());
        Ok(proxy)
    }

    /// Starts (or restarts) serving the proxy of workspace `id` under `net`, in this process;
    /// with `secrets`, the hosts of their rules are intercepted and the secrets injected.
    pub(crate) fn egress_attach(
        self: &Conductor,
        workspace_id: &str,
        net: &ResolvedNetwork,
        secrets: &[SecretBinding],
    ) -> Result<()> {
        let policy = Arc::new(self.egress.policy(net)?);
        let (proxy, key) = if secrets.is_empty() {
            (self.egress.proxy.clone(), None)
        } else {
            (self.intercepting_proxy()?, Some(self.secret_key()?))
        };
        let dir = self.egress_dir(workspace_id);
        let socket = dir.join(EGRESS_SOCKET_NAME);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| ServiceError::host(format!("listen on {}", socket.display()), e))?;
        // The workload's uid connects through the read-only mount: the socket must be
        // writable for it (the directory is not).
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| ServiceError::host(format!("chmod {}", socket.display()), e))?;
        let active = Arc::new(RwLock::new(Active {
            workspace: policy,
            task: None,
            task_id: None,
            secrets: Arc::new(secrets.to_vec()),
            task_secrets: None,
        }));
        let accept = tokio::spawn(accept_loop(
            listener,
            workspace_id.to_string(),
            active.clone(),
            proxy,
            key,
            self.egress.host_addrs.clone(),
            ConnectionLimiter::new(self.config.network.egress.max_connections as usize),
            self.store.clone(),
            self.egress.events.clone(),
            Sink {
                inserted: Arc::new(AtomicU64::new(self.egress.inserted.load(Ordering::Relaxed))),
                retention_ms: i64::from(self.config.network.egress.audit_retention_days) * 86_400_000,
                max_rows: self.config.network.egress.audit_max_rows,
            },
        ));
        let old = self
            .egress
            .listeners
            .lock()
            .unwrap()
            .insert(workspace_id.to_string(), Listener { active, accept });
        drop(old);
        tracing::debug!(workspace = workspace_id, "serving the egress proxy");
        Ok(())
    }

    /// Stops serving workspace `id`'s proxy and removes its socket directory.
    pub(crate) fn egress_detach(&self, workspace_id: &str) {
        self.egress.listeners.lock().unwrap().remove(workspace_id);
        let dir = self.egress_dir(workspace_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }

    /// While task `task` runs in the workspace: its id for the audit and, when it gave its
    /// own `network`, its policy over the workspace's, and when it named its own `secrets`,
    /// those (the only ones injected meanwhile). `None` when the task ends.
    pub(crate) fn egress_task(&self, workspace_id: &str, task: Option<TaskEgress<'_>>) -> Result<()> {
        let listeners = self.egress.listeners.lock().unwrap();
        let Some(l) = listeners.get(workspace_id) else {
            return Ok(());
        };
        let policy = match task {
            Some((_, Some(net), _)) => Some(Arc::new(self.egress.policy(net)?)),
            _ => None,
        };
        let mut active = l.active.write().unwrap();
        active.task_id = task.map(|(id, _, _)| id.to_string());
        active.task = match (task, policy) {
            (Some((id, _, _)), Some(p)) => Some((id.to_string(), p)),
            _ => None,
        };
        active.task_secrets = match task {
            Some((_, _, Some(secrets))) => Some(Arc::new(secrets.to_vec())),
            _ => None,
        };
        Ok(())
    }

    /// Serves the proxy of every running proxy-mode workspace this process does not serve
    /// yet (at `serve` start, and on its watch: workspaces a CLI process made).
    pub async fn adopt_egress(&self) -> Result<usize> {
        let rows = self.store.list_workspaces(&conductor_store::WorkspaceFilter {
            // A paused one keeps its connections: its proxy must be there when it thaws.
            states: vec![
                conductor_core::lifecycle::WorkspaceState::Running,
                conductor_core::lifecycle::WorkspaceState::Paused,
            ],
            ..Default::default()
        })?;
        let mut adopted = 0;
        for w in rows {
            if w.network_policy.mode == NetworkMode::Proxy && !self.egress.serves(&w.id) {
                self.egress_attach(&w.id, &w.network_policy, &w.secrets)?;
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// A workspace's audit rows (`filter.workspace_id` is set from `workspace`).
    pub fn egress_events(&self, workspace: &str, mut filter: EgressFilter) -> Result<Vec<EgressEventRecord>> {
        let h = self.handle(workspace)?;
        filter.workspace_id = Some(h.record.id.clone());
        Ok(self.store.list_egress_events(&filter)?)
    }

    /// New audit rows of every workspace, as they are recorded.
    pub fn follow_egress(&self) -> broadcast::Receiver<EgressEventRecord> {
        self.egress.subscribe()
    }
}

/// Where a connection's event goes.
#[derive(Clone)]
struct Sink {
    inserted: Arc<AtomicU64>,
    retention_ms: i64,
    max_rows: u64,
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: UnixListener,
    workspace_id: String,
    active: Arc<RwLock<Active>>,
    proxy: Arc<Proxy>,
    key: Option<Arc<SecretKey>>,
    host_addrs: Arc<Vec<IpAddr>>,
    limiter: ConnectionLimiter,
    store: Arc<Store>,
    events: broadcast::Sender<EgressEventRecord>,
    sink: Sink,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(workspace = %workspace_id, "accepting on the egress socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (policy, task_id, bindings) = {
            let a = active.read().unwrap();
            let policy = a.task.as_ref().map_or_else(|| a.workspace.clone(), |(_, p)| p.clone());
            let bindings = a.task_secrets.clone().unwrap_or_else(|| a.secrets.clone());
            (policy, a.task_id.clone(), bindings)
        };
        let secrets = match &key {
            Some(key) if !bindings.is_empty() => Some(SecretSource {
                store: store.clone(),
                key: key.clone(),
                bindings,
            }),
            _ => None,
        };
        let gate = WorkspaceGate {
            policy,
            host_addrs: host_addrs.clone(),
            secrets,
        };
        let (proxy, limiter, store, events, sink, workspace_id) = (
            proxy.clone(),
            limiter.clone(),
            store.clone(),
            events.clone(),
            sink.clone(),
            workspace_id.clone(),
        );
        tokio::spawn(async move {
            let event = proxy.serve_limited(stream, &gate, &limiter).await;
            let mut record = record_of(&workspace_id, task_id, &event);
            tracing::debug!(
                workspace = %workspace_id, host = %record.host, port = record.port,
                decision = record.decision.as_str(), reason = record.reason.as_deref().unwrap_or(""),
                "egress"
            );
            let stored = tokio::task::spawn_blocking(move || {
                let id = store.insert_egress_event(&record)?;
                record.id = id;
                if sink.inserted.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == 0 {
                    store.prune_egress_events(now_ms() - sink.retention_ms, sink.max_rows)?;
                }
                Ok::<_, conductor_store::StoreError>(record)
            })
            .await;
            match stored {
                Ok(Ok(record)) => {
                    let _ = events.send(record);
                }
                Ok(Err(e)) => tracing::error!(workspace = %workspace_id, "recording an egress event failed: {e}"),
                Err(e) => tracing::error!(workspace = %workspace_id, "recording an egress event failed: {e}"),
            }
        });
    }
}
