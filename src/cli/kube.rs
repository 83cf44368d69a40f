//! `conductor kube render`: the Kubernetes manifests of a preset, a workspace or conductor's
//! RBAC, as YAML for review and `kubectl apply -f -` (docs/kubernetes.md).

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use conductor_core::config::KubeMode;
use conductor_service::kube::{self, PresetOptions};
use conductor_service::ServiceError;

use super::{load_config, open, Cli};

#[derive(Debug, Subcommand)]
pub enum KubeCommand {
    /// Print manifests (YAML; `--json` for a JSON array).
    #[command(subcommand)]
    Render(RenderCommand),
    /// Build the agent image (engine.kubernetes.agent_image) from the static agent with the
    /// local Podman, to push to the cluster's registry.
    AgentImage {
        /// Tag of the image; default: engine.kubernetes.agent_image.
        #[arg(long)]
        tag: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Pod,
    AgentSandbox,
}

impl From<ModeArg> for KubeMode {
    fn from(m: ModeArg) -> KubeMode {
        match m {
            ModeArg::Pod => KubeMode::Pod,
            ModeArg::AgentSandbox => KubeMode::AgentSandbox,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RenderCommand {
    /// A workspace of a preset: NetworkPolicy, PVC and Pod (mode pod), or NetworkPolicy,
    /// SandboxTemplate, SandboxWarmPool and SandboxClaim (mode agent-sandbox).
    Preset {
        name: String,
        /// Overrides engine.kubernetes.mode.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// A sidecar image (repeatable), a container of the same Pod reached by its name.
        #[arg(long = "service", value_name = "IMAGE")]
        services: Vec<String>,
        /// The agent the Pod is named after.
        #[arg(long)]
        agent_id: Option<String>,
        /// Replicas of the SandboxWarmPool (agent-sandbox mode); default: the preset's
        /// isolated_workspace.warm_pool entry, else 0 (every claim a cold start).
        #[arg(long)]
        warm: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// An existing workspace, from the container spec it was created with.
    Workspace {
        id: String,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        #[arg(long)]
        json: bool,
    },
    /// conductor's ServiceAccount, Role (exactly the verbs it uses), RoleBinding, and the
    /// ClusterRole for the doctor's reads of storage and snapshot classes.
    Rbac {
        #[arg(long)]
        json: bool,
    },
}

/// The `io.conductor.instance` label of manifests rendered outside a running conductor:
/// objects applied by hand are not conductor's to reconcile.
pub const RENDERED_INSTANCE: &str = "rendered";

fn print(docs: &[serde_json::Value], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(docs).unwrap_or_default());
    } else {
        print!("{}", kube::to_yaml(docs));
    }
}

pub async fn run(cli: &Cli, cmd: &KubeCommand) -> Result<ExitCode, ServiceError> {
    let cmd = match cmd {
        KubeCommand::Render(cmd) => cmd,
        KubeCommand::AgentImage { tag } => {
            let c = open(cli).await?;
            let spinner = super::progress::Spinner::new("agent image");
            let info = c.build_agent_image(tag.as_deref(), spinner.sink(cli.verbose)).await;
            let info = match info {
                Ok(i) => i,
                Err(e) => {
                    spinner.finish(format!("failed: {e}"));
                    return Err(e);
                }
            };
            let tag = tag
                .clone()
                .unwrap_or_else(|| c.config.engine.kubernetes.agent_image.clone());
            spinner.finish(format!("built {tag} ({})", info.id));
            println!("{tag}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    match cmd {
        RenderCommand::Preset {
            name,
            mode,
            services,
            agent_id,
            warm,
            json,
        } => {
            let config = load_config(cli)?;
            let opts = PresetOptions {
                services: services.clone(),
                agent_id: agent_id.clone(),
                mode: mode.map(Into::into),
            };
            let plan = kube::preset_plan(&config, name, &opts, RENDERED_INSTANCE)?;
            let warm = warm.unwrap_or_else(|| config.isolated_workspace.warm_pool.get(name).copied().unwrap_or(0));
            print(&kube::manifests(&plan, &config.engine.kubernetes, warm), *json);
        }
        RenderCommand::Workspace { id, mode, json } => {
            let c = open(cli).await?;
            let plan = c.kube_workspace_plan(id, mode.map(Into::into))?;
            print(&kube::manifests(&plan, &c.config.engine.kubernetes, 0), *json);
        }
        RenderCommand::Rbac { json } => {
            let config = load_config(cli)?;
            print(&kube::rbac_manifests(&config.engine.kubernetes), *json);
        }
    }
    Ok(ExitCode::SUCCESS)
}
