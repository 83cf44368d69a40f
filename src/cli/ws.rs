//! `conductor ws …` and `conductor run`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_core::command::shell_quote;
use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::engine::OutputChunk;
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::resources::LimitOverrides;
use conductor_core::size::{ByteSize, Cpu};
use conductor_service::exec::{Command, ExecRequest};
use conductor_service::fork::ForkRequest;
use conductor_service::workspaces::{CreateRequest, ListFilter, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};
use conductor_store::{EgressDecision, EgressEventRecord, EgressFilter};
use tokio::sync::mpsc;

use super::progress::Spinner;
use super::{open, Cli};

#[derive(Debug, Subcommand)]
pub enum WsCommand {
    /// Create and start a workspace.
    Create(CreateArgs),
    /// Run a command in a workspace; streams its output and exits with its exit code.
    Exec(ExecArgs),
    /// List workspaces.
    Ls {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long = "env")]
        environment: Option<String>,
        #[arg(long)]
        state: Option<WorkspaceState>,
        /// Include removed, lost and failed workspaces.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show a workspace with its limits and live usage.
    Inspect {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a workspace until `start` (exec and tasks do not bring it back).
    Stop { id: String },
    /// Start a stopped workspace again.
    Start { id: String },
    /// Freeze every process of a running workspace: no CPU, memory kept. Exec, files and
    /// tasks resume it on their own (unless isolated_workspace.auto_resume is off).
    Pause { id: String },
    /// Thaw a paused workspace, or start a suspended or stopped one again.
    Resume { id: String },
    /// Stop a workspace's container to free its memory: files stay (also the root file
    /// system's changes), processes do not. Resumed like a paused one.
    Suspend { id: String },
    /// Copy files between the host and a workspace, like `docker cp`: exactly one of SRC
    /// and DST is WORKSPACE:PATH (PATH relative to /workspace or absolute under it).
    /// Directories are copied with their contents; `-` is stdin (one file) or stdout (the
    /// file, or a tar of a directory).
    Cp {
        /// A host path, `-`, or WORKSPACE:PATH.
        src: String,
        /// A host path, `-`, or WORKSPACE:PATH.
        dst: String,
    },
    /// Fork a workspace into new running workspaces holding its state now (or at one of
    /// its snapshots): files in /workspace and elsewhere, installed packages, variables,
    /// network policy. The source is paused only for the capture. Prints the new ids.
    Fork(ForkArgs),
    /// Show a workspace's egress audit (proxy mode): its outbound connection attempts
    /// through conductor's proxy, allowed and denied, oldest first.
    Egress(EgressArgs),
    /// Remove a workspace.
    Rm {
        id: String,
        /// Keep its data volume (default: kept only for persistent volumes).
        #[arg(long, conflicts_with = "purge")]
        keep_volumes: bool,
        /// Delete its data volume even when it is persistent.
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub agent: String,
    #[arg(long = "env")]
    pub environment: String,
    #[command(flatten)]
    pub opts: WorkspaceOpts,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Workspace id, container name, or agent id with one live workspace.
    pub id: String,
    /// How many copies (at most isolated_workspace.fork.max_count).
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u32,
    /// Fork from this snapshot instead of the workspace's state now.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// The copies' agent (default: the source's).
    #[arg(long = "agent-id", alias = "agent")]
    pub agent_id: Option<String>,
    /// Memory limit of each copy (default: the source's), at most resources.maximums.memory.
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// CPU limit of each copy (default: the source's).
    #[arg(long)]
    pub cpus: Option<Cpu>,
    /// Process limit of each copy (default: the source's).
    #[arg(long)]
    pub pids: Option<u32>,
    /// A variable set over the source's, NAME=value (repeatable).
    #[arg(long = "setenv", value_name = "NAME=VALUE")]
    pub setenv: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EgressArgs {
    /// Workspace id or container name.
    pub workspace: String,
    /// Show the last N attempts (0: all of them).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Only `allowed` or only `denied` attempts.
    #[arg(long, value_name = "DECISION")]
    pub decision: Option<EgressDecision>,
    /// Only attempts made while this task ran in the workspace.
    #[arg(long = "task", value_name = "ID")]
    pub task: Option<String>,
    /// After the last N, print new attempts as they are made, until Ctrl-C or the workspace
    /// is removed.
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object per line (an audit row) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct WorkspaceOpts {
    /// Memory limit (e.g. 512Mi), at most resources.maximums.memory.
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// CPU limit (e.g. 0.5).
    #[arg(long)]
    pub cpus: Option<Cpu>,
    #[arg(long)]
    pub pids: Option<u32>,
    /// Data volume size (e.g. 1Gi).
    #[arg(long)]
    pub volume_size: Option<ByteSize>,
    /// isolated (loopback only; `none` is the same), proxy (only what --allow lets through,
    /// over HTTP(S) via conductor's audited proxy; `ws egress` shows the attempts) or egress
    /// (the public internet over a bridge; never the host or private ranges). Default: the environment's, else the configuration's.
    #[arg(long, value_name = "MODE")]
    pub network: Option<NetworkMode>,
    /// A destination a proxy-mode workspace may reach (repeatable; implies --network proxy):
    /// a host name (`pypi.org`), a `*.suffix` wildcard (its subdomains only), an address
    /// range written as a CIDR (`203.0.113.0/24`; private and loopback addresses are only
    /// reachable through one), each with an optional `:port` (default 80 and 443), or a
    /// bundle: pypi, npm, debian, github. Replaces the environment's allow list.
    #[arg(long = "allow", value_name = "ENTRY")]
    pub allow: Vec<String>,
    /// A destination that stays unreachable even when --allow matches it (repeatable; the
    /// forms of --allow, without a port: every port). Adds to the environment's.
    #[arg(long = "deny", value_name = "ENTRY")]
    pub deny: Vec<String>,
    /// Read-only root file system with a tmpfs /tmp.
    #[arg(long)]
    pub readonly_rootfs: bool,
    /// Publish a container port on 127.0.0.1 (host port from container_port_range; needs
    /// --network egress). Repeatable; `ws inspect` shows the mapping.
    #[arg(long = "publish", value_name = "PORT")]
    pub publish: Vec<u16>,
    /// Environment variables for the container, NAME=value.
    #[arg(long = "setenv", value_name = "NAME=VALUE")]
    pub setenv: Vec<String>,
    /// A registered secret (`conductor secret set`) the workspace may use (repeatable;
    /// within secrets.max_allow; implies --network proxy and allows its rules' hosts). The
    /// workspace holds only a placeholder in <NAME>_TOKEN, which the egress proxy replaces
    /// by the value in requests to those hosts.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub id: String,
    #[command(flatten)]
    pub exec: ExecOpts,
    /// The command: one argument is a shell command line; several are quoted and joined
    /// (with --no-shell: a program and its arguments, run without a shell).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub struct ExecOpts {
    /// Working directory inside the workspace.
    #[arg(long)]
    pub cwd: Option<String>,
    /// NAME=value for the command.
    #[arg(long = "env-var", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Seconds after which the command's whole process tree is killed (exit code 124).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Pass this process's stdin to the command.
    #[arg(long, short)]
    pub interactive: bool,
    /// Execute the arguments as a program and its arguments, without a shell in between (as
    /// `podman exec` does).
    #[arg(long)]
    pub no_shell: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long = "env")]
    pub environment: String,
    #[arg(long, default_value = "cli")]
    pub agent: String,
    /// Keep the workspace afterwards (its id is printed).
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub opts: WorkspaceOpts,
    #[command(flatten)]
    pub exec: ExecOpts,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_pairs(field: &str, items: &[String]) -> Result<BTreeMap<String, String>, ServiceError> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ServiceError::invalid(field, format!("{kv:?} is not NAME=value")))
        })
        .collect()
}

/// The command the arguments name: with `--no-shell` an argv executed directly; else one
/// argument is taken as a shell command line, and several are shell-quoted and joined.
pub fn command_of(args: &[String], no_shell: bool) -> Command {
    if no_shell {
        return Command::Argv(args.to_vec());
    }
    if args.len() == 1 {
        return Command::Shell(args[0].clone());
    }
    Command::Shell(args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "))
}

/// The network the options ask for: `None` leaves it to the environment and the
/// configuration. An allow list without a mode implies proxy mode (the service layers it).
fn network_policy(o: &WorkspaceOpts) -> Option<NetworkPolicy> {
    if o.network.is_none() && o.allow.is_empty() && o.deny.is_empty() {
        return None;
    }
    Some(NetworkPolicy {
        mode: o.network,
        allow: (!o.allow.is_empty()).then(|| o.allow.clone()),
        deny: o.deny.clone(),
    })
}

fn create_request(agent: &str, environment: &str, o: &WorkspaceOpts) -> Result<CreateRequest, ServiceError> {
    Ok(CreateRequest {
        agent_id: agent.to_string(),
        environment: environment.to_string(),
        limits: LimitOverrides {
            memory: o.memory,
            cpu: o.cpus,
            pids: o.pids,
            volume_size: o.volume_size,
        },
        network: network_policy(o),
        readonly_rootfs: o.readonly_rootfs,
        env: parse_pairs("setenv", &o.setenv)?,
        ports: o.publish.clone(),
        secrets: o.secrets.clone(),
        ..Default::default()
    })
}

async fn create(c: &Conductor, cli: &Cli, req: CreateRequest) -> Result<WorkspaceInfo, ServiceError> {
    let spinner = Spinner::new(&format!("{}/{}", req.agent_id, req.environment));
    spinner.bar.set_message("creating workspace");
    let r = c.create_workspace(req, spinner.sink(cli.verbose)).await;
    spinner.bar.finish_and_clear();
    r
}

/// Runs a command, copying its output to ours as it arrives; returns its exit code.
async fn exec_streaming(c: &Conductor, id: &str, command: &[String], o: &ExecOpts) -> Result<i64, ServiceError> {
    let stdin = if o.interactive {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|e| ServiceError::host("read stdin", e))?;
        Some(buf.into())
    } else {
        None
    };
    let req = ExecRequest {
        command: command_of(command, o.no_shell),
        cwd: o.cwd.clone(),
        env: parse_pairs("env-var", &o.env)?,
        stdin,
        timeout: o.timeout.map(std::time::Duration::from_secs),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(64);
    let printer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let _ = match chunk {
                OutputChunk::Stdout(b) => std::io::stdout().write_all(&b).and_then(|_| std::io::stdout().flush()),
                OutputChunk::Stderr(b) => std::io::stderr().write_all(&b).and_then(|_| std::io::stderr().flush()),
            };
        }
    });
    let outcome = c.exec(id, req, tx).await;
    let _ = printer.await;
    let outcome = outcome?;
    if outcome.timed_out {
        eprintln!(
            "conductor: command timed out after {}s; its processes were killed",
            o.timeout.unwrap_or(0)
        );
    }
    Ok(outcome.exit_code)
}

fn exit(code: i64) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn print_table(list: &[WorkspaceInfo]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "id",
        "agent",
        "environment",
        "state",
        "container",
        "memory",
        "cpu",
    ]);
    for w in list {
        t.add_row([
            w.id.clone(),
            w.agent_id.clone(),
            w.environment.clone(),
            w.state.to_string(),
            w.container_name.clone(),
            w.limits.memory.to_string(),
            w.limits.cpu.to_string(),
        ]);
    }
    println!("{t}");
}

/// Rows of the audit read at once while following.
const FOLLOW_PAGE: usize = 500;
/// How often `ws egress --follow` looks for new rows.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// `host:port`, with an IPv6 literal in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The columns of an audit row: time, decision, method, host:port, resolved, bytes
/// up/down, duration, then why (the rule that allowed it, or the reason it was denied
/// with the deny rule if one matched, and any error after the decision).
fn egress_cells(r: &EgressEventRecord) -> [String; 8] {
    let mut why = match (&r.reason, &r.rule) {
        (Some(reason), Some(rule)) => format!("{reason} ({rule})"),
        (Some(reason), None) => reason.clone(),
        (None, Some(rule)) => rule.clone(),
        (None, None) => "-".to_string(),
    };
    if let Some(e) = &r.error {
        why.push_str(&format!("; error: {e}"));
    }
    [
        conductor_core::task::rfc3339(r.at_ms),
        r.decision.to_string(),
        r.method.clone(),
        host_port(&r.host, r.port),
        r.resolved.clone().unwrap_or_else(|| "-".into()),
        format!("{}/{}", r.bytes_up, r.bytes_down),
        format!("{} ms", r.duration_ms),
        why,
    ]
}

const EGRESS_HEADER: [&str; 8] = [
    "time",
    "decision",
    "method",
    "host:port",
    "resolved",
    "bytes up/down",
    "duration",
    "rule/reason",
];

/// One line of `ws egress --follow` without --json: fixed-width columns, so rows printed
/// as they come line up under the header (a table needs all its rows first).
fn egress_line(cells: &[String; 8]) -> String {
    format!(
        "{:<24}  {:<8}  {:<7}  {:<32}  {:<24}  {:>13}  {:>9}  {}",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
    )
}

/// An audit row as `--json` prints it: the record, with `at` (RFC 3339 UTC) as the HTTP
/// API gives it.
#[derive(serde::Serialize)]
struct EgressJson<'a> {
    at: String,
    #[serde(flatten)]
    row: &'a EgressEventRecord,
}

fn egress_json(r: &EgressEventRecord) -> String {
    let row = EgressJson {
        at: conductor_core::task::rfc3339(r.at_ms),
        row: r,
    };
    serde_json::to_string(&row).unwrap_or_default()
}

/// Writes `rows` to stdout; `false` once stdout is closed (e.g. piped into `head`).
fn print_egress(rows: &[EgressEventRecord], as_json: bool, lines: bool) -> bool {
    let mut text = String::new();
    if as_json {
        for r in rows {
            text.push_str(&egress_json(r));
            text.push('\n');
        }
    } else if lines {
        for r in rows {
            text.push_str(egress_line(&egress_cells(r)).trim_end());
            text.push('\n');
        }
    } else if !rows.is_empty() {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(EGRESS_HEADER);
        for r in rows {
            t.add_row(egress_cells(r));
        }
        text = format!("{t}\n");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_ok()
}

/// `conductor ws egress`.
async fn egress(c: &Conductor, a: &EgressArgs) -> Result<ExitCode, ServiceError> {
    let w = c.get_workspace(&a.workspace)?;
    if w.network_policy.mode != NetworkMode::Proxy {
        eprintln!(
            "note: workspace {} is in {} mode; only proxy mode's connections go through the audited proxy",
            w.id, w.network_policy.mode
        );
    }
    let filter = EgressFilter {
        task_id: a.task.clone(),
        decision: a.decision,
        limit: a.limit,
        ..Default::default()
    };
    let backlog = c.egress_events(&w.id, filter.clone())?;
    if !a.follow {
        if backlog.is_empty() && !a.json {
            eprintln!("no connection attempts recorded for {}", w.id);
        }
        print_egress(&backlog, a.json, false);
        return Ok(ExitCode::SUCCESS);
    }
    if !a.json {
        let header = EGRESS_HEADER.map(String::from);
        println!("{}", egress_line(&header).trim_end());
    }
    if !print_egress(&backlog, a.json, true) {
        return Ok(ExitCode::SUCCESS);
    }
    // Poll the store rather than subscribe to `Conductor::follow_egress`: that broadcast
    // carries only the connections this process's proxy serves, while this CLI runs the
    // service in-process as a guest and a workspace's proxy is usually served by another
    // process (`conductor serve`, or the CLI process that created it). Every process records
    // its rows in the shared SQLite store, and ids only grow, so `after_id` is a cursor
    // that misses nothing.
    let mut cursor = backlog.last().map_or(0, |r| r.id);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(FOLLOW_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        // Read the state first: rows recorded before the removal are still printed.
        let state = c.get_workspace(&w.id)?.state;
        loop {
            let page = c.egress_events(
                &w.id,
                EgressFilter {
                    after_id: Some(cursor),
                    limit: FOLLOW_PAGE,
                    ..filter.clone()
                },
            )?;
            let Some(last) = page.last() else { break };
            cursor = last.id;
            if !print_egress(&page, a.json, true) {
                return Ok(ExitCode::SUCCESS);
            }
            if page.len() < FOLLOW_PAGE {
                break;
            }
        }
        if state.is_terminal() {
            eprintln!("workspace {} is {state}; no more connections will come", w.id);
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn fork_request(a: &ForkArgs) -> Result<ForkRequest, ServiceError> {
    Ok(ForkRequest {
        count: a.count,
        snapshot: a.snapshot.clone(),
        agent_id: a.agent_id.clone(),
        env: parse_pairs("setenv", &a.setenv)?,
        limits: LimitOverrides {
            memory: a.memory,
            cpu: a.cpus,
            pids: a.pids,
            volume_size: None,
        },
    })
}

async fn fork(c: &Conductor, a: &ForkArgs) -> Result<(), ServiceError> {
    let out = c.fork_workspace(&a.id, fork_request(a)?).await?;
    if a.json {
        println!("{}", json(&out));
        return Ok(());
    }
    for w in &out.workspaces {
        println!("{}", w.id);
    }
    let from = out
        .snapshot
        .as_ref()
        .map_or_else(|| "its state now".to_string(), |s| format!("snapshot '{s}'"));
    let paused = out
        .paused_ms
        .map_or_else(String::new, |ms| format!(", the source paused {ms} ms"));
    eprintln!(
        "forked {} into {} workspace(s) from {from} in {} ms{paused}",
        out.source_id,
        out.workspaces.len(),
        out.took_ms
    );
    Ok(())
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub async fn run(cli: &Cli, cmd: &WsCommand) -> Result<ExitCode, ServiceError> {
    let c = open(cli).await?;
    match cmd {
        WsCommand::Create(a) => {
            let w = create(&c, cli, create_request(&a.agent, &a.environment, &a.opts)?).await?;
            if a.json {
                println!("{}", json(&w));
            } else {
                println!("{}", w.id);
                eprintln!(
                    "created {} ({}) for agent {} from {}",
                    w.container_name, w.id, w.agent_id, w.image
                );
            }
        }
        WsCommand::Exec(a) => return Ok(exit(exec_streaming(&c, &a.id, &a.command, &a.exec).await?)),
        WsCommand::Ls {
            agent,
            environment,
            state,
            all,
            json: as_json,
        } => {
            if let Err(e) = c.refresh_states().await {
                tracing::debug!("listing without refreshing the workspaces' states: {e}");
            }
            let list = c.list_workspaces(&ListFilter {
                agent_id: agent.clone(),
                environment: environment.clone(),
                state: *state,
                all: *all,
            })?;
            if *as_json {
                println!("{}", json(&list));
            } else {
                print_table(&list);
            }
        }
        WsCommand::Inspect { id, json: as_json } => {
            let (w, usage) = c.inspect_workspace(id).await?;
            if *as_json {
                println!("{}", json(&serde_json::json!({ "workspace": w, "usage": usage })));
            } else {
                println!("{}", json(&w));
                if let Some(u) = usage {
                    println!("usage: {}", json(&u));
                }
            }
        }
        WsCommand::Fork(a) => fork(&c, a).await?,
        WsCommand::Cp { src, dst } => return super::cp::run(&c, src, dst).await,
        WsCommand::Egress(a) => return egress(&c, a).await,
        WsCommand::Stop { id } => println!("{}", c.stop_workspace(id).await?.state),
        WsCommand::Start { id } => println!("{}", c.start_workspace(id).await?.state),
        WsCommand::Pause { id } => println!("{}", c.pause_workspace(id).await?.state),
        WsCommand::Resume { id } => println!("{}", c.resume_workspace(id).await?.state),
        WsCommand::Suspend { id } => println!("{}", c.suspend_workspace(id).await?.state),
        WsCommand::Rm {
            id,
            keep_volumes,
            purge,
        } => {
            let keep = if *keep_volumes {
                Some(true)
            } else if *purge {
                Some(false)
            } else {
                None
            };
            let w = c.remove_workspace(id, keep).await?;
            println!("removed {}", w.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_once(cli: &Cli, a: &RunArgs) -> Result<ExitCode, ServiceError> {
    let c = open(cli).await?;
    let mut req = create_request(&a.agent, &a.environment, &a.opts)?;
    req.ephemeral = !a.keep;
    let w = create(&c, cli, req).await?;
    let result = exec_streaming(&c, &w.id, &a.command, &a.exec).await;
    if a.keep {
        eprintln!("kept workspace {} ({})", w.id, w.container_name);
    } else {
        c.remove_workspace(&w.id, Some(false)).await?;
    }
    Ok(exit(result?))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use conductor_core::config::{NetworkMode, NetworkPolicy};
    use conductor_store::{EgressDecision, EgressEventRecord};

    use super::{command_of, create_request, egress_cells, egress_json, host_port, Command, WsCommand};
    use crate::cli::{Cli, Command as CliCommand};

    fn ws(args: &[&str]) -> WsCommand {
        let cli = Cli::try_parse_from(["conductor", "ws"].iter().chain(args)).unwrap_or_else(|e| panic!("{e}"));
        match cli.command {
            CliCommand::Ws(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn network_of(args: &[&str]) -> Option<NetworkPolicy> {
        let mut all = vec!["create", "--agent", "a", "--env", "minimal"];
        all.extend(args);
        let WsCommand::Create(a) = ws(&all) else { unreachable!() };
        create_request(&a.agent, &a.environment, &a.opts).unwrap().network
    }

    #[test]
    fn network_flags_build_the_policy() {
        assert_eq!(network_of(&[]), None);
        assert_eq!(
            network_of(&["--network", "none"]),
            Some(NetworkPolicy::mode(NetworkMode::Isolated))
        );
        assert_eq!(
            network_of(&["--network", "egress"]),
            Some(NetworkPolicy::mode(NetworkMode::Egress))
        );
        // --allow alone leaves the mode to the service, which takes it as proxy.
        assert_eq!(
            network_of(&[
                "--allow",
                "pypi",
                "--allow",
                "*.example.com:8443",
                "--deny",
                "10.0.0.0/8"
            ]),
            Some(NetworkPolicy {
                mode: None,
                allow: Some(vec!["pypi".into(), "*.example.com:8443".into()]),
                deny: vec!["10.0.0.0/8".into()],
            })
        );
        assert_eq!(
            network_of(&["--network", "proxy"]),
            Some(NetworkPolicy::mode(NetworkMode::Proxy))
        );
        let e = Cli::try_parse_from([
            "conductor",
            "ws",
            "create",
            "--agent",
            "a",
            "--env",
            "m",
            "--network",
            "web",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a network mode"), "{e}");
    }

    #[test]
    fn fork_flags() {
        let WsCommand::Fork(a) = ws(&[
            "fork",
            "ws-1",
            "--count",
            "3",
            "--snapshot",
            "base",
            "--agent-id",
            "b2",
            "--memory",
            "512Mi",
            "--setenv",
            "A=1",
        ]) else {
            panic!("not fork")
        };
        let r = super::fork_request(&a).unwrap();
        assert_eq!(
            (r.count, r.snapshot.as_deref(), r.agent_id.as_deref()),
            (3, Some("base"), Some("b2"))
        );
        assert_eq!(r.limits.memory, Some(conductor_core::size::ByteSize::mib(512)));
        assert_eq!(r.env.get("A").map(String::as_str), Some("1"));
        let WsCommand::Fork(a) = ws(&["fork", "ws-1"]) else {
            panic!("not fork")
        };
        assert_eq!((a.count, a.snapshot, a.agent_id), (1, None, None));
    }

    #[test]
    fn egress_flags() {
        let WsCommand::Egress(a) = ws(&["egress", "ws-1"]) else {
            unreachable!()
        };
        assert_eq!(
            (a.workspace.as_str(), a.limit, a.decision, a.follow, a.json),
            ("ws-1", 100, None, false, false)
        );
        let WsCommand::Egress(a) = ws(&[
            "egress",
            "ws-1",
            "--limit",
            "5",
            "--decision",
            "denied",
            "--task",
            "task-1",
            "--follow",
            "--json",
        ]) else {
            unreachable!()
        };
        assert_eq!(
            (a.limit, a.decision, a.task.as_deref(), a.follow, a.json),
            (5, Some(EgressDecision::Denied), Some("task-1"), true, true)
        );
        assert!(Cli::try_parse_from(["conductor", "ws", "egress", "ws-1", "--decision", "maybe"]).is_err());
    }

    #[test]
    fn egress_rows_as_cells() {
        let r = EgressEventRecord {
            id: 1,
            at_ms: 1_714_566_896_789,
            workspace_id: "ws-1".into(),
            task_id: None,
            method: "CONNECT".into(),
            host: "pypi.org".into(),
            port: 443,
            resolved: Some("151.101.0.223".into()),
            decision: EgressDecision::Allowed,
            rule: Some("pypi (pypi.org)".into()),
            reason: None,
            bytes_up: 1200,
            bytes_down: 34000,
            duration_ms: 812,
            error: None,
            injected: Vec::new(),
        };
        assert_eq!(
            egress_cells(&r),
            [
                "2024-05-01T12:34:56.789Z",
                "allowed",
                "CONNECT",
                "pypi.org:443",
                "151.101.0.223",
                "1200/34000",
                "812 ms",
                "pypi (pypi.org)"
            ]
            .map(String::from)
        );
        let denied = EgressEventRecord {
            decision: EgressDecision::Denied,
            host: "denied.test".into(),
            port: 80,
            method: "GET".into(),
            resolved: None,
            rule: None,
            reason: Some("not_allowed".into()),
            ..r.clone()
        };
        let cells = egress_cells(&denied);
        assert_eq!(
            (cells[3].as_str(), cells[4].as_str(), cells[7].as_str()),
            ("denied.test:80", "-", "not_allowed")
        );
        let failed = EgressEventRecord {
            error: Some("connection refused".into()),
            ..r
        };
        assert_eq!(egress_cells(&failed)[7], "pypi (pypi.org); error: connection refused");
        assert_eq!(host_port("2001:db8::1", 443), "[2001:db8::1]:443");
        let v: serde_json::Value = serde_json::from_str(&egress_json(&denied)).unwrap();
        assert_eq!(
            (&v["at"], &v["at_ms"], &v["reason"]),
            (
                &"2024-05-01T12:34:56.789Z".into(),
                &1_714_566_896_789i64.into(),
                &"not_allowed".into()
            )
        );
    }

    fn line(args: &[&str]) -> Command {
        command_of(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), false)
    }

    #[test]
    fn one_argument_is_a_shell_line_several_are_quoted() {
        assert_eq!(line(&["cd /x && ls | wc -l"]), Command::from("cd /x && ls | wc -l"));
        assert_eq!(line(&["echo", "a b", "it's"]), Command::from("echo 'a b' 'it'\\''s'"));
        assert_eq!(line(&["pytest", "-q"]), Command::from("pytest -q"));
    }

    #[test]
    fn no_shell_gives_an_argv() {
        let args = vec!["sh".to_string(), "-c".into(), "echo $0".into()];
        assert_eq!(command_of(&args, true), Command::Argv(args.clone()));
        assert_eq!(command_of(&args[..1], true), Command::Argv(vec!["sh".into()]));
    }
}
