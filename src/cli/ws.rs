//! `conductor ws …` and `conductor run`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_core::command::shell_quote;
use conductor_core::config::NetworkPolicy;
use conductor_core::engine::OutputChunk;
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::resources::LimitOverrides;
use conductor_core::size::{ByteSize, Cpu};
use conductor_service::exec::{Command, ExecRequest};
use conductor_service::workspaces::{CreateRequest, ListFilter, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};
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
    Stop {
        id: String,
    },
    Start {
        id: String,
    },
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
    /// none, isolated (default) or egress.
    #[arg(long)]
    pub network: Option<NetworkPolicy>,
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
        network: o.network,
        readonly_rootfs: o.readonly_rootfs,
        env: parse_pairs("setenv", &o.setenv)?,
        ports: o.publish.clone(),
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
        WsCommand::Cp { src, dst } => return super::cp::run(&c, src, dst).await,
        WsCommand::Stop { id } => println!("{}", c.stop_workspace(id).await?.state),
        WsCommand::Start { id } => println!("{}", c.start_workspace(id).await?.state),
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
    use super::{command_of, Command};

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
