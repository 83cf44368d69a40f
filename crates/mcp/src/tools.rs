//! The MCP tools: one method per tool over [`Conductor`], with the parameter types whose
//! doc comments become the JSON Schema descriptions a model reads.
//!
//! Every tool returns text written for a model: what happened, the ids to use next, and
//! for a failure what to do about it. Failures are tool errors (`isError: true` with that
//! text), never protocol errors, so the model can read them and correct its call; that
//! includes arguments that do not match the schema (the SDK reports serde's message, e.g.
//! "unknown field `cmd`"). State-changing calls run on their own task, so a
//! client that cancels a call or hangs up does not leave a workspace half created or half
//! restored.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::egress::ResolvedNetwork;
use conductor_core::engine::{OutputChunk, Progress};
use conductor_core::naming;
use conductor_service::exec::{Command, ExecOutcome, ExecRequest, WORKSPACE_USER};
use conductor_service::files::{FileKind, PutOptions};
use conductor_service::fork::ForkRequest;
use conductor_service::workspaces::{CreateRequest, ListFilter, WorkspaceInfo};
use conductor_service::{streams, Conductor, ServiceError};
use conductor_store::{EgressDecision, EgressEventRecord, EgressFilter};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::schemars::{self, JsonSchema};
use rmcp::{tool, tool_handler, tool_router, ServerHandler};
use serde::Deserialize;
use tokio::sync::{mpsc, RwLock};

use crate::files::{self, file_failure, ReadError};
use crate::output::{Tail, KEEP_BYTES};

/// What a tool returns: text for the model, or the text of a tool error.
type ToolResult = Result<String, String>;

/// Agent id of workspaces created without one.
pub const DEFAULT_AGENT: &str = "mcp-agent";
/// Timeout of `run_command` when the model gives none.
const DEFAULT_TIMEOUT_SECS: u64 = 120;
/// Timeout of a file tool's work.
const FILE_TIMEOUT: Duration = Duration::from_secs(120);
/// Audit rows `workspace_egress` returns when the model gives no limit.
const DEFAULT_EGRESS_ROWS: usize = 50;
/// The most audit rows `workspace_egress` returns.
const MAX_EGRESS_ROWS: usize = 1000;

const INSTRUCTIONS: &str = "\
conductor gives you isolated Linux workspaces: each is a Podman container with its own file \
system, processes and network, where you can run commands without affecting the host.

Typical flow: list_environments -> create_workspace (remember the workspace_id it returns) -> \
write_file / run_command / read_file / list_files -> snapshot before a risky change, restore if \
it goes wrong -> destroy_workspace when finished.

Commands run as an unprivileged user (uid 1000, no root, no sudo) through bash in /workspace, \
your working directory and data volume. Workspaces have no internet access unless created with \
network \"egress\", or with an allow list (network \"proxy\", e.g. allow [\"pypi\"]: only those \
destinations, over HTTP(S); workspace_egress shows what was tried and refused). Each tool call is \
independent: `cd` or `export` in one run_command does not carry over to the next (chain them with && \
instead).";

/// The tool server: a conductor plus a record of the operations still running.
#[derive(Clone)]
pub struct WorkspaceTools {
    conductor: Arc<Conductor>,
    /// Held (shared) by every detached operation; the server takes it exclusively at
    /// shutdown to wait for them.
    pub(crate) inflight: Arc<RwLock<()>>,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspaceArgs {
    /// Environment to create it from, e.g. "python-dev", "nodejs-dev", "fullstack", "minimal"
    /// (list_environments shows all).
    pub environment: String,
    /// Who the workspace belongs to: lowercase letters, digits, '-', '_', '.'. Default
    /// "mcp-agent". With persistent volumes, a later workspace of the same agent_id and
    /// environment finds the same /workspace data again.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Network mode: "isolated" (loopback only, no internet; "none" is the same), "proxy" (only
    /// the destinations in `allow` are reachable, over HTTP(S) through conductor's audited
    /// proxy; the workspace's HTTP_PROXY/HTTPS_PROXY point at it) or "egress" (the public
    /// internet over a bridge, never the host or private ranges). Default: the environment's or the service's setting, normally
    /// "isolated"; giving `allow` implies "proxy".
    #[serde(default)]
    pub network: Option<String>,
    /// Proxy mode: what the workspace may reach, e.g. ["pypi", "github", "api.example.com",
    /// "*.example.org", "example.net:8443"]. An entry is an exact host name; a "*.suffix"
    /// wildcard (every subdomain, not the suffix itself); an address range written as a CIDR
    /// ("203.0.113.0/24"; private, loopback and link-local addresses are reachable only
    /// through such an entry, never through a name resolving to them); any of these with an
    /// optional ":port" (default: 80 and 443); or a bundle: "pypi", "npm", "debian",
    /// "github". Replaces the environment's allow list.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Proxy mode: entries (the same forms as in `allow`; without a port: every port) that
    /// stay unreachable even when `allow` matches; added to the environment's.
    #[serde(default)]
    pub deny: Option<Vec<String>>,
    /// Names of secrets the operator registered (e.g. ["github"]) that the workspace may
    /// use; implies "proxy" and allows each secret's hosts. The workspace never holds a
    /// value: each secret is a placeholder in <NAME>_TOKEN (e.g. GITHUB_TOKEN), which the
    /// proxy replaces by the real token in HTTPS requests to that secret's hosts only. Use
    /// the variable as the token (e.g. `Authorization: Bearer $GITHUB_TOKEN`); git over
    /// HTTPS to those hosts needs no credential at all.
    #[serde(default)]
    pub secrets: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceEgressArgs {
    /// Workspace id from create_workspace or list_workspaces.
    #[serde(alias = "workspace")]
    pub workspace_id: String,
    /// How many of the latest attempts to return, 1 to 1000 (default 50).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only "allowed" or only "denied" attempts (default both).
    #[serde(default)]
    pub decision: Option<String>,
}

/// The schema of a command: a command line or an argv.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum CommandArg {
    Line(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandArgs {
    /// Workspace id from create_workspace or list_workspaces, e.g. "ws-3f2c9a1b7d4e".
    pub workspace_id: String,
    /// A bash command line, e.g. "cd /workspace/src && python -m pytest -q". Pipes, &&,
    /// redirections and quoting work as in a terminal. Or an array of strings, e.g.
    /// ["python3", "-c", "print(1)"]: a program and its arguments, run without a shell. Do
    /// not start interactive programs; start servers in the background with their output
    /// redirected, e.g. "nohup python3 -m http.server 8000 > /tmp/server.log 2>&1 &".
    #[schemars(with = "CommandArg")]
    pub command: Command,
    /// Seconds before the command and all its child processes are killed (default 120).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Absolute working directory inside the workspace (default /workspace).
    #[serde(default)]
    pub cwd: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
    /// Path in /workspace: relative to it or absolute under it, e.g. "src/app.py" or
    /// "/workspace/src/app.py" (/tmp and other places are not reachable: use run_command).
    /// Missing parent directories are created; an existing file is replaced.
    pub path: String,
    /// The complete new content of the file (UTF-8 text, at most 10 MiB).
    pub content: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
    /// Path of a text file in /workspace: relative to it or absolute under it, e.g.
    /// "src/app.py" (/tmp and other places are not reachable: use run_command).
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
    /// Directory in /workspace: relative to it or absolute under it (default /workspace
    /// itself; /tmp and other places are not reachable: use run_command).
    #[serde(default)]
    pub path: Option<String>,
    /// How many levels to descend, 1 to 10 (default 1: the directory's own entries).
    #[serde(default)]
    pub depth: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
    /// Snapshot name: lowercase letters, digits, '-', '_', '.', e.g. "before-refactor".
    pub name: String,
    /// Replace an existing snapshot of that name (default false: an existing name is an
    /// error).
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
    /// Name of a snapshot taken earlier with the snapshot tool.
    pub name: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkArgs {
    /// Workspace id from create_workspace or list_workspaces: the workspace to copy.
    pub workspace_id: String,
    /// How many copies, 1 to the service's maximum (default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Copy the state of this snapshot (taken earlier with the snapshot tool) instead of the
    /// workspace's state now.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Who the copies belong to (default: the source's agent).
    #[serde(default)]
    pub agent_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestroyArgs {
    /// Workspace id from create_workspace or list_workspaces.
    pub workspace_id: String,
    /// true: keep the /workspace data for a later workspace of the same agent_id and
    /// environment; false: delete it. Default: the service's persistent_volumes setting.
    #[serde(default)]
    pub keep_data: Option<bool>,
}

/// A service error as a tool error a model can act on.
fn failure(e: ServiceError) -> String {
    match e {
        ServiceError::Invalid { field, message } => format!("invalid {field}: {message}"),
        ServiceError::NotFound { what } => format!(
            "{what} not found; list_workspaces shows the live workspaces and list_environments the environments"
        ),
        ServiceError::Exhausted(m) => {
            format!("{m}; destroy workspaces you no longer need (list_workspaces shows them)")
        }
        ServiceError::Environment { name, message } => format!(
            "the image of environment '{name}' could not be built or pulled: {message}; \
             try another environment (list_environments)"
        ),
        e @ (ServiceError::Engine(_) | ServiceError::Host { .. } | ServiceError::Store(_)) => {
            tracing::error!("{e}");
            format!("conductor failed: {e}")
        }
        other => other.to_string(),
    }
}

/// The command's output, collected as raw bytes with the end of each stream kept.
struct Collected {
    outcome: ExecOutcome,
    stdout: Tail,
    stderr: Tail,
}

/// Runs `req` in the workspace and collects its output, keeping at most `limit` bytes of
/// each stream (the last ones).
async fn exec_collect(c: &Conductor, id: &str, req: ExecRequest, limit: usize) -> conductor_service::Result<Collected> {
    let (tx, mut rx) = mpsc::channel(64);
    let collector = tokio::spawn(async move {
        let (mut out, mut err) = (Tail::new(limit), Tail::new(limit));
        while let Some(chunk) = rx.recv().await {
            match chunk {
                OutputChunk::Stdout(b) => out.push(&b),
                OutputChunk::Stderr(b) => err.push(&b),
            }
        }
        (out, err)
    });
    let outcome = c.exec(id, req, tx).await?;
    let (stdout, stderr) = collector
        .await
        .map_err(|e| ServiceError::host("collect command output", e))?;
    Ok(Collected {
        outcome,
        stdout,
        stderr,
    })
}

/// Runs a file tool's work with [`FILE_TIMEOUT`].
async fn timed<T>(what: &str, work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(FILE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("{what} timed out after {} s", FILE_TIMEOUT.as_secs())))
}

fn check_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err("invalid workspace_id: must not be empty; create_workspace returns one".into());
    }
    Ok(())
}

fn describe(w: &WorkspaceInfo) -> String {
    format!(
        "{}  agent={}  environment={}  state={}",
        w.id,
        w.agent_id,
        w.environment,
        w.state.as_str()
    )
}

/// The network of a new workspace from the tool's arguments: `None` when none is given.
fn network_policy(
    mode: Option<&str>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
) -> Result<Option<NetworkPolicy>, String> {
    let mode = match mode.map(str::trim) {
        None => None,
        Some(m) => Some(m.parse::<NetworkMode>().map_err(|e| format!("invalid network: {e}"))?),
    };
    if mode.is_none() && allow.is_none() && deny.as_ref().is_none_or(Vec::is_empty) {
        return Ok(None);
    }
    Ok(Some(NetworkPolicy {
        mode,
        allow,
        deny: deny.unwrap_or_default(),
    }))
}

/// A workspace's secrets in a sentence ending in a newline; empty without any.
fn describe_secrets(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let vars: Vec<String> = names
        .iter()
        .map(|n| format!("{} ({n})", conductor_core::secrets::env_var(n)))
        .collect();
    format!(
        "Secrets: {} hold placeholders, not the tokens; the proxy puts the real token into HTTPS \
         requests to each secret's own hosts, so use the variable as the token there.\n",
        vars.join(", ")
    )
}

/// A workspace's network in a sentence.
fn describe_network(n: &ResolvedNetwork) -> String {
    match n.mode {
        NetworkMode::Proxy if n.allow.is_empty() => {
            "proxy, nothing allowed (every outbound connection is refused)".to_string()
        }
        NetworkMode::Proxy => {
            let mut s = format!(
                "proxy (HTTP/HTTPS through HTTP_PROXY only) allowing {}",
                n.allow.join(", ")
            );
            if !n.deny.is_empty() {
                s.push_str(&format!(", denying {}", n.deny.join(", ")));
            }
            s + "; workspace_egress shows what was tried"
        }
        NetworkMode::Isolated => "isolated (no internet access)".to_string(),
        NetworkMode::Egress => "egress (internet access)".to_string(),
    }
}

/// An audit row for the model: the record, with `at` (RFC 3339 UTC) as the HTTP API gives it.
#[derive(serde::Serialize)]
struct EgressRow<'a> {
    at: String,
    #[serde(flatten)]
    row: &'a EgressEventRecord,
}

/// Audit rows as a JSON array, one row per line.
fn egress_json(rows: &[EgressEventRecord]) -> String {
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            let row = EgressRow {
                at: conductor_core::task::rfc3339(r.at_ms),
                row: r,
            };
            serde_json::to_string(&row).unwrap_or_default()
        })
        .collect();
    format!("[\n{}\n]", lines.join(",\n"))
}

impl WorkspaceTools {
    pub fn new(conductor: Arc<Conductor>) -> Self {
        WorkspaceTools {
            conductor,
            inflight: Arc::new(RwLock::new(())),
            tool_router: Self::tool_router(),
        }
    }

    /// Runs a service call on its own task, so that a cancelled tool call does not stop a
    /// workflow half-way; shutdown waits for it.
    async fn detached<T, F>(&self, fut: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: Future<Output = conductor_service::Result<T>> + Send + 'static,
    {
        self.detached_raw(fut).await?.map_err(failure)
    }

    /// [`detached`](Self::detached), leaving the service's error to the caller.
    async fn detached_raw<T, F>(&self, fut: F) -> Result<conductor_service::Result<T>, String>
    where
        T: Send + 'static,
        F: Future<Output = conductor_service::Result<T>> + Send + 'static,
    {
        let guard = self.inflight.clone().read_owned().await;
        let task = tokio::spawn(async move {
            let result = fut.await;
            drop(guard);
            result
        });
        task.await.map_err(|e| {
            tracing::error!("tool task failed: {e}");
            "conductor failed: the operation stopped unexpectedly".to_string()
        })
    }

    /// The workspace an id (or container name) names.
    fn workspace(&self, id: &str) -> Result<WorkspaceInfo, String> {
        check_id(id)?;
        self.conductor.get_workspace(id.trim()).map_err(failure)
    }

    /// Runs a command in the workspace on a detached task.
    async fn exec(&self, id: &str, req: ExecRequest, limit: usize) -> Result<Collected, String> {
        let w = self.workspace(id)?;
        let c = self.conductor.clone();
        self.detached(async move { exec_collect(&c, &w.id, req, limit).await })
            .await
    }

    fn max_timeout(&self) -> u64 {
        self.conductor
            .config
            .task_execution
            .task_timeout
            .max(DEFAULT_TIMEOUT_SECS)
    }

    /// Whether removing `w` with `keep` keeps its data (the service's rule).
    fn keeps_data(&self, w: &WorkspaceInfo, keep: Option<bool>) -> bool {
        keep.unwrap_or_else(|| {
            let persistent_dir = self
                .conductor
                .paths
                .workspaces
                .join(naming::agent_dir(&w.agent_id))
                .join(&w.environment);
            std::path::Path::new(&w.volume_dir) == persistent_dir
                && self
                    .conductor
                    .config
                    .isolated_workspace
                    .agent_containers
                    .persistent_volumes
        })
    }
}

#[tool_router]
impl WorkspaceTools {
    /// List the environments workspaces can be created from.
    #[tool(
        description = "List the environments a workspace can be created from (name, what it contains, \
                       whether its image is built). Use a name with create_workspace.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_environments(&self) -> ToolResult {
        let envs = self.conductor.environments().await.map_err(failure)?;
        let mut out = String::new();
        for e in envs {
            out.push_str(&format!(
                "{} - {}{}\n",
                e.name,
                e.description,
                if e.built {
                    ""
                } else {
                    " (image not built yet: the first create_workspace builds it, which can take minutes)"
                }
            ));
        }
        Ok(out)
    }

    /// Create a workspace.
    #[tool(
        description = "Create an isolated workspace (a Linux container) from an environment and start it. \
                       Returns its workspace_id, which every other tool needs. The first workspace of an \
                       environment may take minutes while its image is built. Destroy workspaces you no \
                       longer need with destroy_workspace. Network: none by default; network \"egress\" \
                       for the public internet (never the host or private ranges), or an allow list for only some destinations over \
                       HTTP(S) (network \"proxy\"; entries: an exact host name such as \"api.example.com\", \
                       a \"*.example.com\" wildcard matching its subdomains only, an address range written \
                       as a CIDR, each with an optional \":port\" (default 80 and 443), or a bundle: \
                       \"pypi\", \"npm\", \"debian\", \"github\"), optionally with deny entries. \
                       `secrets` names registered secrets the workspace may use: it gets placeholders \
                       (e.g. GITHUB_TOKEN) that the proxy turns into the real token for their hosts only.",
        annotations(destructive_hint = false, open_world_hint = false)
    )]
    async fn create_workspace(&self, Parameters(args): Parameters<CreateWorkspaceArgs>) -> ToolResult {
        let network = network_policy(args.network.as_deref(), args.allow, args.deny)?;
        let agent_id = args.agent_id.unwrap_or_else(|| DEFAULT_AGENT.to_string());
        let req = CreateRequest {
            agent_id,
            environment: args.environment.trim().to_string(),
            network,
            secrets: args.secrets.unwrap_or_default(),
            ..Default::default()
        };
        let c = self.conductor.clone();
        let progress = Arc::new(|p: Progress| tracing::info!("environment image: {p:?}"));
        let w = self
            .detached(async move { c.create_workspace(req, progress).await })
            .await?;
        Ok(format!(
            "Created workspace {id} (environment {env}, agent {agent}); it is running.\n\
             workspace_id: {id}\n\
             Limits: memory {mem}, cpu {cpu}, processes {pids}, /workspace size {vol}.\n\
             Network: {net}.\n\
             {secrets}\
             Commands run as user {user} in /workspace. Use this workspace_id with run_command, \
             write_file, read_file, list_files, snapshot, restore and destroy_workspace.",
            net = describe_network(&w.network_policy),
            secrets = describe_secrets(&w.secrets),
            id = w.id,
            env = w.environment,
            agent = w.agent_id,
            mem = w.limits.memory,
            cpu = w.limits.cpu,
            pids = w.limits.pids,
            vol = w.limits.volume_size,
            user = WORKSPACE_USER,
        ))
    }

    /// List live workspaces.
    #[tool(
        description = "List the live workspaces (id, agent, environment, state). Use it to find a \
                       workspace_id again.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_workspaces(&self) -> ToolResult {
        let list = self
            .conductor
            .list_workspaces(&ListFilter::default())
            .map_err(failure)?;
        if list.is_empty() {
            return Ok("No live workspaces; create one with create_workspace.".into());
        }
        Ok(list.iter().map(|w| describe(w) + "\n").collect())
    }

    /// A workspace's egress audit.
    #[tool(
        description = "Show the outbound connection attempts of a workspace in \"proxy\" network mode, oldest \
                       first, as a JSON array: for each its time (at, UTC; at_ms in unix milliseconds), \
                       method (CONNECT for HTTPS, else the HTTP method), host and port asked for, the address \
                       connected to (resolved), decision (\"allowed\" or \"denied\"), the policy entry that \
                       decided (rule), why it was denied (reason: not_allowed, denied, ip_literal, special_address, \
                       sni_mismatch, connection_limit, ...), bytes up and down, duration_ms and any error. \
                       Use it when a download or API call fails in a proxy-mode workspace: a \"not_allowed\" \
                       host needs to be in the workspace's allow list (create a new workspace with it).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn workspace_egress(&self, Parameters(args): Parameters<WorkspaceEgressArgs>) -> ToolResult {
        let limit = args.limit.unwrap_or(DEFAULT_EGRESS_ROWS);
        if !(1..=MAX_EGRESS_ROWS).contains(&limit) {
            return Err(format!("invalid limit: must be between 1 and {MAX_EGRESS_ROWS}"));
        }
        let decision = match args.decision.as_deref().map(str::trim) {
            None => None,
            Some(d) => Some(
                d.parse::<EgressDecision>()
                    .map_err(|_| format!("invalid decision: {d:?} is neither \"allowed\" nor \"denied\""))?,
            ),
        };
        let w = self.workspace(&args.workspace_id)?;
        let filter = EgressFilter {
            decision,
            limit,
            ..Default::default()
        };
        let rows = self.conductor.egress_events(&w.id, filter).map_err(failure)?;
        if rows.is_empty() {
            let what = match decision {
                Some(d) => format!("no {d} outbound connection attempts"),
                None => "no outbound connection attempts".to_string(),
            };
            return Ok(match w.network_policy.mode {
                NetworkMode::Proxy => format!("Workspace {} has {what} recorded.", w.id),
                mode => format!(
                    "Workspace {} has {what} recorded: its network mode is \"{mode}\", and only \"proxy\" \
                     mode goes through the audited proxy.",
                    w.id
                ),
            });
        }
        Ok(egress_json(&rows))
    }

    /// Run a shell command.
    #[tool(
        description = "Run a bash command line (or an argv array, without a shell) in a workspace and return its exit code, stdout and stderr \
                       (only the last 64 KiB of each are returned; a note says when output was cut). The \
                       command runs in /workspace unless cwd is given, as an unprivileged user, and is \
                       killed with its children after timeout_secs (default 120; exit code 124 then). \
                       Each call is a fresh shell: chain steps with && in one command.",
        annotations(destructive_hint = true, open_world_hint = false)
    )]
    async fn run_command(&self, Parameters(args): Parameters<RunCommandArgs>) -> ToolResult {
        let max = self.max_timeout();
        let timeout = args.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS.min(max));
        if !(1..=max).contains(&timeout) {
            return Err(format!("invalid timeout_secs: must be between 1 and {max}"));
        }
        let req = ExecRequest {
            command: args.command,
            cwd: args.cwd,
            timeout: Some(Duration::from_secs(timeout)),
            ..Default::default()
        };
        req.validate().map_err(failure)?;
        let r = self.exec(&args.workspace_id, req, KEEP_BYTES).await?;
        let mut out = format!("exit_code: {}", r.outcome.exit_code);
        if r.outcome.timed_out {
            out.push_str(&format!(
                " (timed out after {timeout} s; the command and its children were killed)"
            ));
        }
        out.push_str(&format!("\nduration_ms: {}\n", r.outcome.duration_ms));
        out.push_str(&r.stdout.finish().render("stdout"));
        out.push_str(&r.stderr.finish().render("stderr"));
        Ok(out)
    }

    /// Write a file.
    #[tool(
        description = "Write a text file in a workspace (replacing it if it exists, creating missing parent \
                       directories), as the workspace user. The path is in /workspace: relative to it or \
                       absolute under it; /tmp and other places are not reachable (use run_command).",
        annotations(destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn write_file(&self, Parameters(args): Parameters<WriteFileArgs>) -> ToolResult {
        let path = files::absolute(&args.path)?;
        if args.content.len() > files::WRITE_LIMIT {
            return Err(format!(
                "content is {} bytes; write_file takes at most {} bytes per call",
                args.content.len(),
                files::WRITE_LIMIT
            ));
        }
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let opts = PutOptions {
            mode: None,
            size: Some(args.content.len() as u64),
        };
        let (id, target, content) = (w.id.clone(), path.clone(), args.content);
        let what = format!("writing {path}");
        let work = async move {
            let body = streams::from_bytes(content);
            // On its own task, as every state-changing call: a cancelled call does not stop
            // the upload half-way (which would leave the previous file, if any, anyway).
            let written = self
                .detached_raw(async move { c.put_file(&id, &target, body, opts).await })
                .await?
                .map_err(|e| file_failure(e, &path, failure))?;
            Ok(format!("Wrote {} bytes to {}.", written.size, written.path))
        };
        timed(&what, work).await
    }

    /// Read a file.
    #[tool(
        description = "Read a UTF-8 text file from a workspace and return its content (the first 256 KiB; a \
                       note says when the file is longer). The path is in /workspace: relative to it or \
                       absolute under it; /tmp and other places are not reachable (use run_command). For \
                       binary files use run_command (e.g. base64 or xxd).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn read_file(&self, Parameters(args): Parameters<ReadFileArgs>) -> ToolResult {
        let path = files::absolute(&args.path)?;
        let w = self.workspace(&args.workspace_id)?;
        let (size, content) = timed(&format!("reading {path}"), async {
            files::read_prefix(&self.conductor, &w.id, &path)
                .await
                .map_err(|e| match e {
                    ReadError::Service(e) => file_failure(e, &path, failure),
                    ReadError::IsADirectory => format!("{path} is a directory; use list_files"),
                    ReadError::Stream(e) => format!("reading {path} failed: {e}"),
                })
        })
        .await?;
        let truncated = (content.len() as u64) < size;
        let text = match std::str::from_utf8(&content) {
            Ok(t) => t,
            // The cut at the limit may split the last character.
            Err(e) if truncated && e.error_len().is_none() => {
                std::str::from_utf8(&content[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(_) => {
                return Err(format!(
                    "{path} is not UTF-8 text ({size} bytes); inspect binary files with run_command, e.g. \
                     `xxd {path} | head` or `base64 {path}`"
                ))
            }
        };
        if size == 0 {
            return Ok(format!("({path} is empty)"));
        }
        let mut out = text.to_string();
        if truncated {
            out.push_str(&format!(
                "\n[truncated: the file has {size} bytes and only the first {} are shown; read the rest \
                 with run_command, e.g. `tail -c +{} {path} | head -c {}`]",
                text.len(),
                text.len() + 1,
                files::READ_LIMIT
            ));
        }
        Ok(out)
    }

    /// List files.
    #[tool(
        description = "List a directory of a workspace: one entry per line with its type (file, dir, link), \
                       size in bytes and path relative to the directory. depth > 1 descends into \
                       subdirectories. The path is in /workspace: relative to it or absolute under it \
                       (default /workspace); /tmp and other places are not reachable (use run_command).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_files(&self, Parameters(args): Parameters<ListFilesArgs>) -> ToolResult {
        let path = files::absolute(args.path.as_deref().unwrap_or("/workspace"))?;
        let depth = args.depth.unwrap_or(1);
        if !(1..=files::MAX_DEPTH).contains(&depth) {
            return Err(format!("invalid depth: must be between 1 and {}", files::MAX_DEPTH));
        }
        let w = self.workspace(&args.workspace_id)?;
        let c = &self.conductor;
        let work = async {
            let on_path = |e| file_failure(e, &path, failure);
            let st = c.stat_file(&w.id, &path).await.map_err(on_path)?;
            if st.kind != FileKind::Dir {
                return Err(format!("{path} is not a directory; use read_file"));
            }
            files::list_tree(c, &w.id, &path, depth).await.map_err(on_path)
        };
        let listing = timed(&format!("listing {path}"), work).await?;
        let mut out = files::render_list(&path, depth, &listing.entries, listing.more);
        if !listing.unreadable.is_empty() {
            let notes: String = listing
                .unreadable
                .into_iter()
                .map(|(dir, e)| format!("{dir}/: {e}\n"))
                .collect();
            out.push_str(&format!("some directories could not be listed:\n{notes}"));
        }
        Ok(out)
    }

    /// Snapshot a workspace.
    #[tool(
        description = "Save the complete state of a workspace (files in /workspace and elsewhere, installed \
                       packages) under a name, to go back to it later with restore. Take one before a risky \
                       change. Running processes are not saved.",
        annotations(destructive_hint = false, open_world_hint = false)
    )]
    async fn snapshot(&self, Parameters(args): Parameters<SnapshotArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let (id, name) = (w.id.clone(), args.name.trim().to_string());
        let s = self
            .detached(async move { c.create_snapshot(&id, &name, args.overwrite).await })
            .await?;
        Ok(format!(
            "Took snapshot '{}' of workspace {} ({} bytes). Go back to it with restore.",
            s.name, s.workspace_id, s.size_bytes
        ))
    }

    /// List a workspace's snapshots.
    #[tool(
        description = "List the snapshots of a workspace (name, time taken), oldest first.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_snapshots(&self, Parameters(args): Parameters<WorkspaceArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let list = self.conductor.list_snapshots(&w.id).map_err(failure)?;
        if list.is_empty() {
            return Ok(format!("Workspace {} has no snapshots.", w.id));
        }
        Ok(list
            .iter()
            .map(|s| format!("{}  taken {}  {} bytes\n", s.name, s.created_at, s.size_bytes))
            .collect())
    }

    /// Pause a workspace.
    #[tool(
        description = "Freeze every process of a workspace you will not use for a while: it uses no CPU, \
                       keeps its memory, files and running processes. The next run_command or file tool \
                       resumes it on its own (unless the service turned auto_resume off); resume_workspace \
                       does so explicitly.",
        annotations(idempotent_hint = false, open_world_hint = false)
    )]
    async fn pause_workspace(&self, Parameters(args): Parameters<WorkspaceArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let id = w.id.clone();
        let done = self.detached(async move { c.pause_workspace(&id).await }).await?;
        Ok(format!("Workspace {} is {}.", done.id, done.state.as_str()))
    }

    /// Resume a workspace.
    #[tool(
        description = "Bring a paused, suspended or stopped workspace back to running. A paused one goes on \
                       where it was; a suspended or stopped one starts again with its files (its processes \
                       were ended).",
        annotations(idempotent_hint = true, open_world_hint = false)
    )]
    async fn resume_workspace(&self, Parameters(args): Parameters<WorkspaceArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let id = w.id.clone();
        let done = self.detached(async move { c.resume_workspace(&id).await }).await?;
        Ok(format!("Workspace {} is {}.", done.id, done.state.as_str()))
    }

    /// Suspend a workspace.
    #[tool(
        description = "Stop a workspace's container to free its memory while keeping every file (/workspace \
                       and installed packages). Running processes are ended. The next run_command or file \
                       tool starts it again.",
        annotations(destructive_hint = true, open_world_hint = false)
    )]
    async fn suspend_workspace(&self, Parameters(args): Parameters<WorkspaceArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let id = w.id.clone();
        let done = self.detached(async move { c.suspend_workspace(&id).await }).await?;
        Ok(format!(
            "Workspace {} is {}; its files are kept.",
            done.id,
            done.state.as_str()
        ))
    }

    /// Restore a snapshot.
    #[tool(
        description = "Bring a workspace back to a snapshot taken earlier: every change made since (files, \
                       installed packages) is undone and running processes are stopped. The workspace keeps \
                       its workspace_id and runs afterwards.",
        annotations(destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn restore(&self, Parameters(args): Parameters<RestoreArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let (id, name) = (w.id.clone(), args.name.trim().to_string());
        let restored = self
            .detached(async move { c.restore_snapshot(&id, &name).await })
            .await?;
        Ok(format!(
            "Restored workspace {} to snapshot '{}'; it is {}.",
            restored.id,
            args.name.trim(),
            restored.state.as_str()
        ))
    }

    /// Fork a workspace.
    #[tool(
        description = "Copy a workspace into `count` new running workspaces that start with its exact state \
                       now (files in /workspace and elsewhere, installed packages, variables, network policy) \
                       or at a named snapshot; running processes are not copied. Use it to try several \
                       approaches in parallel from one starting point: each copy has its own workspace_id, \
                       and what you do in one is not seen by the source or the other copies. All or \
                       nothing: if one copy fails, none is kept. Destroy copies you no longer need.",
        annotations(destructive_hint = false, open_world_hint = false)
    )]
    async fn workspace_fork(&self, Parameters(args): Parameters<ForkArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let c = self.conductor.clone();
        let id = w.id.clone();
        let req = ForkRequest {
            count: args.count.unwrap_or(1),
            snapshot: args.snapshot.map(|s| s.trim().to_string()),
            agent_id: args.agent_id.map(|a| a.trim().to_string()),
            ..Default::default()
        };
        let out = self.detached(async move { c.fork_workspace(&id, req).await }).await?;
        let from = out
            .snapshot
            .as_ref()
            .map_or_else(|| "its state now".to_string(), |s| format!("snapshot '{s}'"));
        let mut text = format!(
            "Forked workspace {} from {from} into {} new running workspace(s):\n",
            out.source_id,
            out.workspaces.len()
        );
        for f in &out.workspaces {
            text.push_str(&format!("workspace_id: {} (agent {})\n", f.id, f.agent_id));
        }
        text.push_str("Each is independent: use its workspace_id with run_command and the other tools.");
        Ok(text)
    }

    /// Destroy a workspace.
    #[tool(
        description = "Stop and remove a workspace you no longer need, with its processes. By default its \
                       /workspace data is kept only when the service uses persistent volumes (then a later \
                       workspace with the same agent_id and environment sees it again); keep_data=false \
                       deletes it, keep_data=true keeps it.",
        annotations(destructive_hint = true, open_world_hint = false)
    )]
    async fn destroy_workspace(&self, Parameters(args): Parameters<DestroyArgs>) -> ToolResult {
        let w = self.workspace(&args.workspace_id)?;
        let kept = self.keeps_data(&w, args.keep_data);
        let c = self.conductor.clone();
        let id = w.id.clone();
        let keep = args.keep_data;
        self.detached(async move { c.remove_workspace(&id, keep).await })
            .await?;
        Ok(format!(
            "Removed workspace {}; its /workspace data was {}.",
            w.id,
            if kept { "kept" } else { "deleted" }
        ))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for WorkspaceTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("conductor", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn network_arguments_build_the_core_policy() {
        assert_eq!(network_policy(None, None, None), Ok(None));
        assert_eq!(network_policy(None, None, Some(vec![])), Ok(None));
        assert_eq!(
            network_policy(Some("none"), None, None),
            Ok(Some(NetworkPolicy::mode(NetworkMode::Isolated)))
        );
        assert_eq!(
            network_policy(Some(" egress "), None, None),
            Ok(Some(NetworkPolicy::mode(NetworkMode::Egress)))
        );
        // An allow list alone leaves the mode to the service (it implies proxy).
        assert_eq!(
            network_policy(
                None,
                Some(strings(&["pypi", "*.example.com:8443"])),
                Some(strings(&["evil.example.com"]))
            ),
            Ok(Some(NetworkPolicy {
                mode: None,
                allow: Some(strings(&["pypi", "*.example.com:8443"])),
                deny: strings(&["evil.example.com"]),
            }))
        );
        let e = network_policy(Some("internet"), None, None).unwrap_err();
        assert!(e.starts_with("invalid network: ") && e.contains("proxy"), "{e}");
    }

    #[test]
    fn create_workspace_takes_network_allow_and_deny() {
        let args: CreateWorkspaceArgs = serde_json::from_value(serde_json::json!({
            "environment": "python-dev", "network": "proxy", "allow": ["pypi"], "deny": ["10.0.0.0/8"]
        }))
        .unwrap();
        assert_eq!(args.network.as_deref(), Some("proxy"));
        assert_eq!(args.allow, Some(strings(&["pypi"])));
        assert_eq!(args.deny, Some(strings(&["10.0.0.0/8"])));
        assert_eq!(args.secrets, None);
        let args: CreateWorkspaceArgs =
            serde_json::from_value(serde_json::json!({"environment": "python-dev", "secrets": ["github"]})).unwrap();
        assert_eq!(args.secrets, Some(strings(&["github"])));
        let schema = serde_json::to_value(schemars::schema_for!(CreateWorkspaceArgs)).unwrap();
        for field in ["network", "allow", "deny", "secrets"] {
            assert!(
                schema["properties"][field]["description"].is_string(),
                "{field}: {schema}"
            );
        }
    }

    #[test]
    fn workspace_egress_takes_workspace_id_or_workspace() {
        for key in ["workspace_id", "workspace"] {
            let args: WorkspaceEgressArgs =
                serde_json::from_value(serde_json::json!({ key: "ws-1", "decision": "denied" })).unwrap();
            assert_eq!(
                (args.workspace_id.as_str(), args.decision.as_deref()),
                ("ws-1", Some("denied"))
            );
        }
    }

    #[test]
    fn secrets_are_described_by_variable_and_name() {
        assert_eq!(describe_secrets(&[]), "");
        let d = describe_secrets(&strings(&["github", "npm-corp"]));
        assert!(
            d.starts_with("Secrets: GITHUB_TOKEN (github), NPM_CORP_TOKEN (npm-corp) hold placeholders"),
            "{d}"
        );
        assert!(d.ends_with('\n'), "{d}");
    }

    #[test]
    fn networks_are_described() {
        let proxy = ResolvedNetwork {
            mode: NetworkMode::Proxy,
            allow: strings(&["pypi", "github"]),
            deny: strings(&["gist.github.com"]),
        };
        let d = describe_network(&proxy);
        assert!(d.contains("allowing pypi, github, denying gist.github.com"), "{d}");
        assert!(describe_network(&ResolvedNetwork::default()).starts_with("isolated"));
    }

    #[test]
    fn audit_rows_are_a_json_array() {
        let row = EgressEventRecord {
            id: 7,
            at_ms: 1_700_000_000_000,
            workspace_id: "ws-1".into(),
            task_id: None,
            method: "CONNECT".into(),
            host: "denied.test".into(),
            port: 443,
            resolved: None,
            decision: EgressDecision::Denied,
            rule: None,
            reason: Some("not_allowed".into()),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 1,
            error: None,
            injected: Vec::new(),
        };
        let text = egress_json(&[row.clone(), EgressEventRecord { id: 8, ..row }]);
        assert_eq!(text.lines().count(), 4, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v[1]["id"], 8);
        assert_eq!(v[0]["decision"], "denied");
        assert_eq!(v[0]["reason"], "not_allowed");
        assert_eq!(v[0]["at"], "2023-11-14T22:13:20.000Z");
    }
}
