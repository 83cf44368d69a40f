//! One attempt of one task: get a workspace per isolation mode, take the hybrid snapshot,
//! start the sidecars and place `source`, run the pre-task hooks, the commands and the
//! post-task hooks in the task's shell session, then release the workspace per mode.
//! Failures before the first command are reported so the caller can tell a retry from a
//! failure ([`Attempt::setup_failed`]); a stop request interrupts a running command by
//! killing the task's processes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::config::Mode;
use conductor_core::engine::{Progress, ProgressSink};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_core::task::{service_name, TaskSpec};
use conductor_store::{CommandResult, TaskRecord};
use tokio::sync::{mpsc, watch, OwnedMutexGuard};

use super::output::collect_output;
use super::source::place_source;
use super::{end_session, kill_task_processes, stop_requested, Ending, TASK_MARKER};
use crate::exec::ExecRequest;
use crate::handle::WorkspaceHandle;
use crate::sidecars::service_hosts;
use crate::tasks::{StopReason, TaskLog};
use crate::workspaces::{CreateRequest, ListFilter};
use crate::{now_ms, Conductor, Result, ServiceError};

/// Time each post-task hook gets, also after the task's own timeout.
const POST_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed command may take to report its end.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A workspace held by a task for one attempt: its handle, read once for all the task's
/// commands.
struct Lease {
    ws: WorkspaceHandle,
    sandbox: bool,
    /// Held while a shared workspace runs this task.
    _turn: Option<OwnedMutexGuard<()>>,
}

/// How one command ended.
enum CommandEnd {
    Exited(i64),
    TimedOut,
    Stopped(StopReason),
}

/// One attempt of one task.
pub(super) struct Attempt<'a> {
    c: &'a Conductor,
    task: TaskRecord,
    spec: TaskSpec,
    stop: watch::Receiver<Option<StopReason>>,
    log: TaskLog,
    /// Log bytes written so far (capped at [`MAX_LOG_BYTES`](super::output::MAX_LOG_BYTES)).
    log_bytes: usize,
    /// Hybrid mode: what happened with the before-task snapshot.
    pub(super) snapshot_note: Option<String>,
    /// A finished sandbox marked `removing`: removed once the outcome is recorded.
    pub(super) removal: Option<String>,
}

impl<'a> Attempt<'a> {
    pub(super) fn new(
        c: &'a Conductor,
        task: TaskRecord,
        spec: TaskSpec,
        stop: watch::Receiver<Option<StopReason>>,
        log: TaskLog,
    ) -> Self {
        Attempt {
            c,
            task,
            spec,
            stop,
            log,
            log_bytes: 0,
            snapshot_note: None,
            removal: None,
        }
    }

    fn stopped(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }

    /// A failure before the first command: a stop request wins, infrastructure trouble
    /// (engine, host, image, capacity) may be retried, anything else fails the task.
    fn setup_failed(&self, e: ServiceError) -> Ending {
        setup_ending(self.stopped(), e)
    }

    pub(super) async fn run(&mut self) -> Ending {
        let mode = self.c.config.isolated_workspace.mode;
        self.log.system(&format!(
            "attempt {}: preparing a {mode} workspace for environment {}",
            self.task.attempt, self.spec.environment
        ));
        let lease = match self.acquire(mode).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return Ending::Stopped(self.stopped().unwrap_or(StopReason::Cancel)),
            Err(e) => return self.setup_failed(e),
        };
        let snapshot = match self.snapshot_before(mode, &lease).await {
            Ok(name) => name,
            Err(e) => {
                let ending = self.setup_failed(e);
                self.release(lease, &ending, None).await;
                return ending;
            }
        };
        let ending = match self.prepare(&lease).await {
            Ok(()) => self.run_commands(&lease).await,
            Err(e) => self.setup_failed(e),
        };
        self.release(lease, &ending, snapshot.as_deref()).await;
        ending
    }

    /// Hybrid mode with `snapshot_before_task`: snapshots the workspace as
    /// `before-<task id>` and returns that name.
    async fn snapshot_before(&mut self, mode: Mode, lease: &Lease) -> Result<Option<String>> {
        let isolation = &self.c.config.task_execution.isolation;
        if mode != Mode::Hybrid || !isolation.snapshot_before_task {
            return Ok(None);
        }
        let name = format!("before-{}", self.task.id);
        self.c.create_snapshot(&lease.ws.record.id, &name, true).await?;
        self.log.system(&format!("snapshot {name} taken before the task"));
        self.snapshot_note = Some(format!("snapshot {name} taken before the task"));
        Ok(Some(name))
    }

    /// Gets the workspace for this attempt; `None` when stopped while waiting for a shared
    /// workspace.
    async fn acquire(&mut self, mode: Mode) -> Result<Option<Lease>> {
        let c = self.c;
        let services: Vec<String> = self.spec.services.iter().map(|s| service_name(s)).collect();
        let (agent, turn, extra_hosts) = match mode {
            Mode::Sandbox => {
                let agent = self
                    .spec
                    .agent_id
                    .clone()
                    .unwrap_or_else(|| format!("task-{}", naming::short_id(&self.task.id)));
                (agent, None, service_hosts(services.iter().map(String::as_str)))
            }
            Mode::Shared | Mode::Hybrid => {
                let agent = self.spec.agent_id.clone().unwrap_or_else(|| "shared".to_string());
                let lock = c.tasks.shared_lock(&format!("{agent}/{}", self.spec.environment));
                let turn = tokio::select! {
                    turn = lock.lock_owned() => turn,
                    _ = stop_requested(&mut self.stop) => return Ok(None),
                };
                let existing = c.list_workspaces(&ListFilter {
                    agent_id: Some(agent.clone()),
                    environment: Some(self.spec.environment.clone()),
                    ..Default::default()
                })?;
                // Running first, else one to bring back (paused, suspended or stopped).
                let reuse = existing
                    .iter()
                    .find(|w| w.state == WorkspaceState::Running)
                    .or_else(|| existing.iter().find(|w| w.state.can_resume()));
                if let Some(w) = reuse {
                    if w.state != WorkspaceState::Running {
                        c.resume_workspace(&w.id).await?;
                    }
                    self.log
                        .system(&format!("using the shared workspace {} ({})", w.id, w.container_name));
                    return Ok(Some(Lease {
                        ws: c.handle(&w.id)?,
                        sandbox: false,
                        _turn: Some(turn),
                    }));
                }
                // The hosts file is fixed when the workspace is made: also name the sidecars
                // later tasks are most likely to ask for.
                let mut names = vec!["postgres", "redis"];
                names.extend(
                    services
                        .iter()
                        .map(String::as_str)
                        .filter(|n| !["postgres", "redis"].contains(n)),
                );
                (agent, Some(turn), service_hosts(names))
            }
        };
        let sandbox = turn.is_none();
        let step_log = self.log.clone();
        let progress: ProgressSink = Arc::new(move |p| {
            if let Progress::Step { index, total, text } = p {
                step_log.system(&format!("environment image: STEP {index}/{total}: {text}"));
            }
        });
        let req = CreateRequest {
            agent_id: agent,
            environment: self.spec.environment.clone(),
            ephemeral: sandbox,
            labels: if sandbox {
                [(naming::LABEL_TASK.to_string(), self.task.id.clone())].into()
            } else {
                BTreeMap::new()
            },
            extra_hosts,
            // A sandbox is the task's own: its network and secrets are the task's (a shared
            // workspace a task makes is made with them too).
            network: self.spec.network.clone(),
            secrets: self.spec.secrets.clone(),
            ..Default::default()
        };
        let info = c.create_workspace(req, progress).await?;
        self.log
            .system(&format!("workspace {} ({}) is running", info.id, info.container_name));
        Ok(Some(Lease {
            ws: c.handle(&info.id)?,
            sandbox,
            _turn: turn,
        }))
    }

    /// Tells the workspace's egress proxy which task runs, and for a shared workspace puts
    /// the task's own `network` over the workspace's while the task runs, and narrows the
    /// secrets injected to the task's own when it names some (they must be among the
    /// workspace's: its container holds only their placeholders).
    fn apply_network(&self, lease: &Lease) -> Result<()> {
        let c = self.c;
        let ws = &lease.ws.record;
        let task_secrets = match (self.spec.secrets.is_empty(), lease.sandbox) {
            (false, false) => {
                let mut bound = Vec::with_capacity(self.spec.secrets.len());
                for (i, name) in self.spec.secrets.iter().enumerate() {
                    let Some(b) = ws.secrets.iter().find(|b| &b.name == name) else {
                        let made_with: Vec<&str> = ws.secrets.iter().map(|b| b.name.as_str()).collect();
                        return Err(ServiceError::invalid(
                            format!("secrets[{i}]"),
                            format!(
                                "the shared workspace {} was made without secret {name:?} (made with: {}); a task in a shared workspace may use only the secrets its workspace was made with (remove the workspace, or create it with that secret)",
                                ws.id,
                                if made_with.is_empty() { "none".to_string() } else { made_with.join(", ") }
                            ),
                        ));
                    };
                    bound.push(b.clone());
                }
                Some(bound)
            }
            _ => None,
        };
        let task_net = match (&self.spec.network, lease.sandbox) {
            (Some(net), false) => {
                let base = conductor_core::egress::PolicyLayer {
                    mode: Some(ws.network_policy.mode),
                    allow: Some(ws.network_policy.allow.clone()),
                    deny: ws.network_policy.deny.clone(),
                };
                let mut resolved = conductor_core::egress::resolve(&[base, net.layer()]);
                if resolved.mode == conductor_core::config::NetworkMode::Proxy {
                    // The hosts of the secrets in force stay reachable under the task's list.
                    let names: Vec<&str> = match &task_secrets {
                        Some(bound) => bound.iter().map(|b| b.name.as_str()).collect(),
                        None => ws.secrets.iter().map(|b| b.name.as_str()).collect(),
                    };
                    for entry in c.secret_hosts(names)? {
                        if !resolved.allow.contains(&entry) {
                            resolved.allow.push(entry);
                        }
                    }
                }
                if resolved.mode != ws.network_policy.mode {
                    return Err(ServiceError::invalid(
                        "network",
                        format!(
                            "the shared workspace {} has network mode \"{}\"; a task cannot change it to \"{}\" (remove the workspace, or create it with that mode)",
                            ws.id, ws.network_policy.mode, resolved.mode
                        ),
                    ));
                }
                if resolved.mode == conductor_core::config::NetworkMode::Proxy {
                    self.log.system(&format!(
                        "network for this task: proxy, allow [{}]",
                        resolved.allow.join(", ")
                    ));
                }
                Some(resolved)
            }
            _ => None,
        };
        if let Some(bound) = &task_secrets {
            let names: Vec<&str> = bound.iter().map(|b| b.name.as_str()).collect();
            self.log.system(&format!("secrets for this task: {}", names.join(", ")));
        }
        c.egress_task(
            ws.id.as_str(),
            Some((self.task.id.as_str(), task_net.as_ref(), task_secrets.as_deref())),
        )
    }

    /// Records the workspace, starts the sidecars and places the source.
    async fn prepare(&mut self, lease: &Lease) -> Result<()> {
        let c = self.c;
        if !c.store.set_task_workspace(&self.task.id, lease.ws.id())? {
            return Err(ServiceError::Conflict(format!(
                "task '{}' is no longer running",
                self.task.id
            )));
        }
        // Once per task, not per command: the workspace is busy (never cleaned up) meanwhile.
        c.store.touch_workspace(lease.ws.id(), now_ms())?;
        self.apply_network(lease)?;
        if !self.spec.services.is_empty() {
            c.start_services(&lease.ws, &self.task.id, &self.spec.services, &self.log)
                .await?;
        }
        if self.stopped().is_none() {
            place_source(c, &lease.ws.record, self.spec.source.as_deref(), &self.log).await?;
        }
        Ok(())
    }

    /// Runs the pre-task hooks and the commands until one fails (under the task's timeout),
    /// then the post-task hooks (unless stopped).
    async fn run_commands(&mut self, lease: &Lease) -> Ending {
        if let Some(reason) = self.stopped() {
            return Ending::Stopped(reason);
        }
        let timeout = Duration::from_secs(self.spec.timeout.unwrap_or(self.c.config.task_execution.task_timeout));
        let deadline = Instant::now() + timeout;
        let pre = self.c.config.container_lifecycle.pre_task.clone();
        let main = self.spec.commands.clone();
        let mut ending = Ending::Succeeded { exit_code: 0 };
        'phases: for (phase, commands) in [("pre", &pre), ("main", &main)] {
            for (i, command) in commands.iter().enumerate() {
                let budget = deadline.saturating_duration_since(Instant::now());
                let what = match phase {
                    "pre" => format!("pre_task hook {i}"),
                    _ => format!("commands[{i}]"),
                };
                let end = match self.run_command(lease, phase, i, command, budget).await {
                    Ok(end) => end,
                    Err(e) => {
                        ending = Ending::Failed {
                            exit_code: None,
                            error: format!("{what} could not run: {e}"),
                        };
                        break 'phases;
                    }
                };
                match command_ending(&what, command, end, timeout) {
                    None => continue,
                    Some(e) => ending = e,
                }
                break 'phases;
            }
        }
        if matches!(ending, Ending::TimedOut { .. }) {
            // Background processes of earlier commands outlive the killed one.
            if let Err(e) = kill_task_processes(&lease.ws.channel, &self.task.id).await {
                self.log
                    .system(&format!("could not kill the task's remaining processes: {e}"));
            }
        }
        if !matches!(ending, Ending::Stopped(_)) {
            // A command's own result counts only from a workspace that is still whole.
            match self.c.check_container(&lease.ws.record).await {
                Ok(Some(fault)) => {
                    let error = format!(
                        "workspace {} failed during the task: {}",
                        lease.ws.record.id,
                        fault.reason()
                    );
                    self.log.system(&error);
                    return Ending::Failed { exit_code: None, error };
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(task = %self.task.id, "checking the workspace's container failed: {e}"),
            }
            self.run_post_hooks(lease).await;
        }
        ending
    }

    /// Runs `container_lifecycle.post_task`; a failing hook is recorded but changes nothing.
    async fn run_post_hooks(&mut self, lease: &Lease) {
        let post = self.c.config.container_lifecycle.post_task.clone();
        for (i, command) in post.iter().enumerate() {
            let end = self.run_command(lease, "post", i, command, POST_HOOK_TIMEOUT).await;
            let problem = match end {
                Ok(CommandEnd::Exited(0)) => continue,
                Ok(CommandEnd::Stopped(_)) => return,
                Ok(CommandEnd::Exited(code)) => format!("exited with code {code}"),
                Ok(CommandEnd::TimedOut) => format!("timed out after {} s", POST_HOOK_TIMEOUT.as_secs()),
                Err(e) => format!("could not run: {e}"),
            };
            self.log
                .system(&format!("post_task hook {i} {problem}; the task's outcome stands"));
            return;
        }
    }

    /// Runs one command as the next step of the task's shell session, streaming its output
    /// to the log and recording its result. `budget` is what is left of the timeout.
    async fn run_command(
        &mut self,
        lease: &Lease,
        phase: &str,
        idx: usize,
        command: &str,
        budget: Duration,
    ) -> Result<CommandEnd> {
        let c = self.c;
        let id = self.task.id.clone();
        if let Some(reason) = self.stopped() {
            return Ok(CommandEnd::Stopped(reason));
        }
        if budget < Duration::from_millis(1) {
            return Ok(CommandEnd::TimedOut);
        }
        if !c.store.mark_command_started(&id)? {
            // Its outcome was recorded elsewhere (a cancel no worker was there to see).
            return Ok(CommandEnd::Stopped(StopReason::Cancel));
        }
        let mut result = CommandResult {
            task_id: id.clone(),
            idx: u32::try_from(idx).unwrap_or(u32::MAX),
            phase: phase.to_string(),
            command: command.to_string(),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            duration_ms: 0,
            started_at: now_ms(),
        };
        c.store.put_command_result(&result)?;
        let label = if phase == "main" {
            String::new()
        } else {
            format!("[{phase}_task] ")
        };
        self.log.system(&format!("{label}$ {command}"));

        // The task's shell session: one long-lived shell in the agent, else the state-file
        // wrapper (see `ExecRequest::session`). The environment counts when it starts.
        let req = ExecRequest {
            command: command.into(),
            env: self.spec.env.clone(),
            internal_env: vec![(TASK_MARKER.to_string(), id.clone())],
            timeout: Some(budget),
            session: Some(id.clone()),
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(64);
        let begin = Instant::now();
        let exec = c.exec_in(&lease.ws, req, tx);
        let collect = collect_output(rx, &self.log, &mut self.log_bytes);
        let work = async { tokio::join!(exec, collect) };
        tokio::pin!(work);
        let mut stop = self.stop.clone();
        let (finished, stopped) = tokio::select! {
            done = &mut work => (Some(done), None),
            reason = stop_requested(&mut stop) => {
                if let Err(e) = kill_task_processes(&lease.ws.channel, &id).await {
                    tracing::warn!(task = %id, error = %e, "killing the task's processes failed");
                }
                (tokio::time::timeout(KILL_WAIT, &mut work).await.ok(), Some(reason))
            }
        };
        result.duration_ms = u64::try_from(begin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let end = match (stopped, finished) {
            (Some(reason), finished) => {
                if let Some((_, (stdout, stderr))) = finished {
                    (result.stdout, result.stderr) = (stdout, stderr);
                }
                CommandEnd::Stopped(reason)
            }
            (None, Some((exec_result, (stdout, stderr)))) => {
                (result.stdout, result.stderr) = (stdout, stderr);
                match exec_result {
                    Ok(o) if o.timed_out => CommandEnd::TimedOut,
                    Ok(o) => CommandEnd::Exited(o.exit_code),
                    Err(e) => {
                        c.store.put_command_result(&result)?;
                        return Err(e);
                    }
                }
            }
            // Only a stop abandons a command before it ends.
            (None, None) => CommandEnd::Stopped(StopReason::Cancel),
        };
        result.exit_code = match end {
            CommandEnd::Exited(code) => Some(code),
            _ => None,
        };
        c.store.put_command_result(&result)?;
        let how = match end {
            CommandEnd::Exited(code) => format!("exit code {code}"),
            CommandEnd::TimedOut => "timed out".to_string(),
            CommandEnd::Stopped(_) => "stopped".to_string(),
        };
        self.log
            .system(&format!("{label}[{how} after {} ms]", result.duration_ms));
        Ok(end)
    }

    /// Releases the workspace per mode: a sandbox is removed (or kept after a failure when
    /// configured), a shared workspace stays and loses the task's sidecars, processes and
    /// shell state.
    async fn release(&mut self, lease: Lease, ending: &Ending, snapshot: Option<&str>) {
        let c = self.c;
        if let Err(e) = c.egress_task(lease.ws.id(), None) {
            tracing::warn!(task = %self.task.id, error = %e, "resetting the workspace's egress policy failed");
        }
        let result = if lease.sandbox {
            let failed = matches!(ending, Ending::Failed { .. } | Ending::TimedOut { .. });
            if failed && c.config.preserve_failed_workspaces() {
                self.log.system(&format!(
                    "workspace {} ({}) kept for debugging",
                    lease.ws.record.id, lease.ws.record.container_name
                ));
                Ok(())
            } else {
                // The task's outcome is recorded before the container goes (it costs ~130 ms
                // of Podman work the caller need not wait for); `removing` makes it survive
                // a crash in between.
                match c.begin_removal(&lease.ws.record.id) {
                    Ok(_) => {
                        self.removal = Some(lease.ws.record.id.clone());
                        Ok(())
                    }
                    Err(_) => c.remove_workspace(&lease.ws.record.id, Some(false)).await.map(|_| ()),
                }
            }
        } else {
            let released = match c.remove_task_services(&self.task.id).await {
                Ok(()) => end_session(&lease.ws.channel, &self.task.id).await,
                Err(e) => Err(e),
            };
            let failed = matches!(ending, Ending::Failed { .. } | Ending::TimedOut { .. });
            match snapshot {
                Some(name) if failed && c.config.task_execution.isolation.restore_on_error => {
                    let note = match c
                        .restore_snapshot_for_task(&lease.ws.record.id, name, &self.task.id)
                        .await
                    {
                        Ok(_) => format!("snapshot {name} taken before the task; restored after the failure"),
                        Err(e) => format!("snapshot {name} taken before the task; restoring it failed: {e}"),
                    };
                    self.log.system(&note);
                    self.snapshot_note = Some(note);
                }
                _ => {}
            }
            released
        };
        if let Err(e) = result {
            tracing::warn!(task = %self.task.id, error = %e, "releasing the workspace failed");
            self.log
                .system(&format!("releasing workspace {} failed: {e}", lease.ws.record.id));
        }
    }
}

/// How an attempt ends when getting ready failed: a stop request wins, infrastructure
/// trouble (engine, host, image, capacity) may be retried, anything else fails the task.
fn setup_ending(stopped: Option<StopReason>, e: ServiceError) -> Ending {
    if let Some(reason) = stopped {
        return Ending::Stopped(reason);
    }
    let retryable = e.is_infrastructure() || matches!(e, ServiceError::Environment { .. } | ServiceError::Exhausted(_));
    if retryable {
        Ending::Infrastructure(e)
    } else {
        Ending::Failed {
            exit_code: None,
            error: e.to_string(),
        }
    }
}

/// How the task ends after command `what` ended so; `None`: go on with the next command.
fn command_ending(what: &str, command: &str, end: CommandEnd, timeout: Duration) -> Option<Ending> {
    match end {
        CommandEnd::Exited(0) => None,
        CommandEnd::Exited(code) => Some(Ending::Failed {
            exit_code: Some(code),
            error: format!("{what} ({command:?}) exited with code {code}"),
        }),
        CommandEnd::TimedOut => Some(Ending::TimedOut {
            error: format!("timed out after {} s (during {what})", timeout.as_secs()),
        }),
        CommandEnd::Stopped(reason) => Some(Ending::Stopped(reason)),
    }
}

#[cfg(test)]
mod tests {
    use conductor_core::engine::EngineError;

    use super::*;

    #[test]
    fn a_setup_failure_is_retried_only_for_infrastructure_and_a_stop_wins() {
        let engine = || ServiceError::Engine(EngineError::Unavailable("socket gone".into()));
        assert!(matches!(setup_ending(None, engine()), Ending::Infrastructure(_)));
        assert!(matches!(
            setup_ending(None, ServiceError::Exhausted("max_containers".into())),
            Ending::Infrastructure(_)
        ));
        assert!(matches!(
            setup_ending(
                None,
                ServiceError::Environment {
                    name: "e".into(),
                    message: "build".into()
                }
            ),
            Ending::Infrastructure(_)
        ));
        match setup_ending(None, ServiceError::invalid("source", "not a directory")) {
            Ending::Failed { exit_code: None, error } => assert_eq!(error, "source: not a directory"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            setup_ending(None, ServiceError::WorkspaceExited("died".into())),
            Ending::Failed { .. }
        ));
        assert!(matches!(
            setup_ending(Some(StopReason::Cancel), engine()),
            Ending::Stopped(StopReason::Cancel)
        ));
        assert!(matches!(
            setup_ending(Some(StopReason::Shutdown), ServiceError::invalid("x", "y")),
            Ending::Stopped(StopReason::Shutdown)
        ));
    }

    #[test]
    fn a_command_end_decides_whether_the_task_goes_on() {
        let t = Duration::from_secs(30);
        assert!(command_ending("commands[0]", "true", CommandEnd::Exited(0), t).is_none());
        match command_ending("commands[1]", "false", CommandEnd::Exited(1), t) {
            Some(Ending::Failed {
                exit_code: Some(1),
                error,
            }) => {
                assert_eq!(error, "commands[1] (\"false\") exited with code 1")
            }
            other => panic!("{other:?}"),
        }
        match command_ending("pre_task hook 0", "sleep 99", CommandEnd::TimedOut, t) {
            Some(Ending::TimedOut { error }) => assert_eq!(error, "timed out after 30 s (during pre_task hook 0)"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            command_ending("commands[0]", "x", CommandEnd::Stopped(StopReason::Cancel), t),
            Some(Ending::Stopped(StopReason::Cancel))
        ));
    }
}
