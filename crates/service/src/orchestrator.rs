//! The orchestrator: workers that take tasks from the persistent queue and run them.
//!
//! At start it first repairs what a previous process left behind ([`recover`]): the
//! reconciler cleans the engine, then every task still `running` in the store is either
//! queued again (it never started a command, so nothing can run twice) or failed with a
//! clear reason, and its sidecars, sandbox workspace and stray processes are removed.
//! Then `task_execution.max_workers` workers loop: claim the best eligible task (priority,
//! then FIFO, honouring retry delays), run it, record the outcome.
//!
//! One attempt of a task: get a workspace per isolation mode (sandbox: a fresh one; shared
//! and hybrid: the agent's persistent one, one task at a time), start the sidecars, copy
//! `source`, run the pre-task hooks, the commands and the post-task hooks, release the
//! workspace. Only failures before the first command (engine or host trouble while making
//! the workspace, its image or its sidecars) are retried; a command that fails is the
//! task's result. Cancellation and shutdown are observed between steps and interrupt a
//! running command by killing every process carrying the task's marker variable.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::config::Mode;
use conductor_core::engine::{OutputChunk, Progress, ProgressSink};
use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_core::naming;
use conductor_core::task::{service_name, source_location, state_dir, TaskSpec, SOURCE_TARGET};
use conductor_store::{CommandResult, TaskRecord, WorkspaceRecord};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode as FileMode};
use nix::unistd::{fchown, fchownat, symlinkat, Gid, Uid};
use tokio::sync::{mpsc, watch, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::agent_client;
use crate::exec::{kill_script, run_quiet_in, ExecRequest, TIMEOUT_EXIT_CODE};
use crate::sidecars::service_hosts;
use crate::tasks::{ResultDoc, StopReason, TaskLog};
use crate::volumes::{DataVolume, WORKSPACE_UID};
use crate::workspaces::{CreateRequest, ListFilter};
use crate::{host, now_ms, Conductor, Result, ServiceError};

/// How often an idle worker looks for eligible tasks without being woken (retry delays).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Time each post-task hook gets, also after the task's own timeout.
const POST_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed command may take to report its end.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// After the shutdown grace period, how long cancelled tasks get to clean up.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// Output of one command kept in its result (the end is kept; the log has everything).
const MAX_CAPTURE: usize = 1 << 20;
/// Log bytes stored per task; output beyond it is only counted.
const MAX_LOG_BYTES: usize = 16 << 20;
/// Marker variable every process of a task inherits, so all of them can be killed.
const TASK_MARKER: &str = "CONDUCTOR_TASK_ID";
/// The note hybrid-mode tasks carry when `task_execution.isolation.snapshot_before_task` is off.
const HYBRID_NOTE: &str = "hybrid mode without snapshot_before_task: ran as shared";

/// Runs queued tasks on `task_execution.max_workers` workers.
pub struct Orchestrator {
    conductor: Arc<Conductor>,
    stop: watch::Sender<bool>,
    supervisor: JoinHandle<()>,
}

impl Orchestrator {
    /// Repairs what a previous process left running, then starts the workers. Returns at
    /// once; both happen in the background. Must be called within a Tokio runtime.
    pub fn start(conductor: Arc<Conductor>) -> Orchestrator {
        let (stop, stop_rx) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(conductor.clone(), stop_rx));
        Orchestrator {
            conductor,
            stop,
            supervisor,
        }
    }

    /// Stops taking tasks, lets running ones finish for up to `grace`, then cancels the rest
    /// (their processes are killed, their workspaces released, they end `cancelled`).
    pub async fn shutdown(self, grace: Duration) {
        let Orchestrator {
            conductor,
            stop,
            mut supervisor,
        } = self;
        stop.send_replace(true);
        if tokio::time::timeout(grace, &mut supervisor).await.is_ok() {
            return;
        }
        conductor.tasks.stop_all(StopReason::Shutdown);
        if tokio::time::timeout(CANCEL_WAIT, &mut supervisor).await.is_err() {
            // Tasks still `running` are recovered by the next start.
            tracing::warn!(
                "tasks did not end within {} s of being cancelled; abandoning them",
                CANCEL_WAIT.as_secs()
            );
            supervisor.abort();
        }
    }
}

async fn supervise(c: Arc<Conductor>, stop: watch::Receiver<bool>) {
    if let Err(error) = recover(&c).await {
        tracing::error!(%error, "crash recovery failed; starting the workers anyway");
    }
    if *stop.borrow() {
        return;
    }
    let mut workers = tokio::task::JoinSet::new();
    workers.spawn(crate::warm_pool::keep_filled(c.clone(), stop.clone()));
    for _ in 0..c.config.task_execution.max_workers {
        workers.spawn(worker(c.clone(), stop.clone()));
    }
    while workers.join_next().await.is_some() {}
}

async fn worker(c: Arc<Conductor>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        // Registered before looking at the queue, so a submit in between still wakes us.
        let woken = c.tasks.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match c.store.claim_next_task(now_ms()) {
            Ok(Some(task)) => run_task(&c, task).await,
            Ok(None) => {
                tokio::select! {
                    _ = &mut woken => {}
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot claim a task");
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }
}

/// Finishes what a previous conductor process left running. Called before any worker of
/// this process runs, so every `running` task is an orphan.
async fn recover(c: &Conductor) -> Result<()> {
    c.reconcile().await?;
    for t in c.store.running_tasks()? {
        let log = c.task_log(&t.id);
        if let Err(error) = clean_up_orphan(c, &t).await {
            tracing::warn!(task = %t.id, %error, "cleaning up after an interrupted task failed");
        }
        if t.commands_started == 0 {
            log.system("conductor restarted before the task ran a command; queued again");
            c.store.requeue_task(
                &t.id,
                now_ms(),
                Some("conductor restarted before the task ran a command; queued again"),
            )?;
        } else {
            log.system("conductor restarted while the task was running");
            c.conclude_task(
                &t.id,
                TaskState::Failed,
                None,
                Some("conductor restarted while the task was running"),
                None,
            )?;
        }
    }
    c.tasks.wake.notify_waiters();
    Ok(())
}

/// Removes an interrupted task's sidecars and sandbox workspace, and kills its processes in
/// a shared workspace.
async fn clean_up_orphan(c: &Conductor, t: &TaskRecord) -> Result<()> {
    c.remove_task_services(&t.id).await?;
    let owned = c
        .engine
        .container_list(&[
            (naming::LABEL_INSTANCE, Some(c.instance.as_str())),
            (naming::LABEL_TASK, Some(t.id.as_str())),
        ])
        .await?;
    for ws in owned.iter().filter_map(|ct| ct.labels.get(naming::LABEL_WORKSPACE)) {
        if c.get_workspace(ws)?.state.can_remove() {
            c.remove_workspace(ws, Some(false)).await?;
        }
    }
    if let Some(ws) = &t.workspace_id {
        if let Some(w) = c.store.get_workspace(ws)? {
            // A sandbox claimed from the warm pool has no task label (labels are immutable).
            if c.config.isolated_workspace.mode == Mode::Sandbox && c.born_in_warm_pool(&w) && w.state.can_remove() {
                c.remove_workspace(ws, Some(false)).await?;
            } else if w.state == WorkspaceState::Running {
                let container = w.container_id.clone().unwrap_or(w.container_name.clone());
                end_session(c, &w.id, &container, &t.id).await?;
            }
        }
    }
    Ok(())
}

/// Kills the task's processes in `container`: the whole tree of every command of the task,
/// background ones included, and its shell session in the agent.
async fn kill_task_processes(c: &Conductor, workspace_id: &str, container: &str, task_id: &str) -> Result<()> {
    let agent = agent_client::socket_dir(&c.paths, workspace_id);
    end_agent_session(&agent, task_id).await;
    run_quiet_in(c.engine.as_ref(), container, &agent, kill_script(TASK_MARKER, task_id)).await
}

/// Kills the task's processes in `container` and removes its shell state (the agent's
/// session, the state directory of the fallback): what a shared workspace keeps of a task
/// is its files.
async fn end_session(c: &Conductor, workspace_id: &str, container: &str, task_id: &str) -> Result<()> {
    let script = format!("{}; rm -rf '{}'", kill_script(TASK_MARKER, task_id), state_dir(task_id));
    let agent = agent_client::socket_dir(&c.paths, workspace_id);
    end_agent_session(&agent, task_id).await;
    run_quiet_in(c.engine.as_ref(), container, &agent, script).await
}

/// Ends the task's shell session in the workspace's agent, if the agent answers and keeps
/// sessions (the marker kill that follows catches whatever this misses).
async fn end_agent_session(agent_dir: &Path, task_id: &str) {
    let Ok(mut conn) = agent_client::AgentConn::connect(agent_dir).await else {
        return;
    };
    if conn.has_sessions() {
        if let Err(error) = conn.end_session(task_id).await {
            tracing::warn!(task = %task_id, %error, "ending the task's shell session failed");
        }
    }
}

/// How one attempt of a task ended.
#[derive(Debug)]
enum Ending {
    Succeeded {
        exit_code: i64,
    },
    Failed {
        exit_code: Option<i64>,
        error: String,
    },
    TimedOut {
        error: String,
    },
    Stopped(StopReason),
    /// Could not get ready to run (engine or host trouble): may be retried.
    Infrastructure(ServiceError),
}

async fn run_task(c: &Conductor, task: TaskRecord) {
    let id = task.id.clone();
    let stop = c.tasks.register(&id);
    let log = c.task_log(&id);
    let attempt = task.attempt;
    let (ending, snapshot_note, removal) = match serde_json::from_str::<TaskSpec>(&task.spec_json) {
        Ok(spec) => {
            let mut attempt = Attempt {
                c,
                task,
                spec,
                stop,
                log: log.clone(),
                log_bytes: 0,
                snapshot_note: None,
                removal: None,
            };
            let ending = attempt.run().await;
            (ending, attempt.snapshot_note, attempt.removal)
        }
        Err(e) => (
            Ending::Failed {
                exit_code: None,
                error: format!("the stored task spec cannot be read: {e}"),
            },
            None,
            None,
        ),
    };
    c.tasks.unregister(&id);
    record_outcome(c, &id, attempt, ending, snapshot_note, &log);
    if let Some(ws) = removal {
        if let Err(error) = c.finish_removal(&ws).await {
            tracing::warn!(task = %id, workspace = %ws, %error, "removing the sandbox failed; it stays `removing` until the next start's reconcile");
        }
    }
}

/// Records how the task ended (or queues it again after an infrastructure failure).
fn record_outcome(c: &Conductor, id: &str, attempt: u32, ending: Ending, snapshot_note: Option<String>, log: &TaskLog) {
    let hybrid = c.config.isolated_workspace.mode == Mode::Hybrid;
    let result = hybrid.then(|| ResultDoc {
        snapshot: Some(snapshot_note.unwrap_or_else(|| HYBRID_NOTE.to_string())),
    });
    let outcome = match ending {
        Ending::Succeeded { exit_code } => (TaskState::Succeeded, Some(exit_code), None),
        Ending::Failed { exit_code, error } => (TaskState::Failed, exit_code, Some(error)),
        Ending::TimedOut { error } => (TaskState::TimedOut, Some(TIMEOUT_EXIT_CODE), Some(error)),
        Ending::Stopped(StopReason::Cancel) => (TaskState::Cancelled, None, Some("cancelled by request".to_string())),
        Ending::Stopped(StopReason::Shutdown) => (
            TaskState::Cancelled,
            None,
            Some("conductor stopped before the task finished".to_string()),
        ),
        Ending::Infrastructure(e) => {
            let te = &c.config.task_execution;
            if attempt <= te.max_retries {
                let message = format!("attempt {attempt} failed: {e}; retrying in {} s", te.retry_delay);
                log.system(&message);
                let not_before = now_ms() + i64::try_from(te.retry_delay.saturating_mul(1000)).unwrap_or(i64::MAX);
                match c.store.requeue_task(id, not_before, Some(&message)) {
                    // Queued again, or no longer running (its outcome was recorded meanwhile).
                    Ok(_) => return,
                    Err(error) => tracing::error!(task = %id, %error, "cannot requeue the task"),
                }
            }
            (TaskState::Failed, None, Some(format!("{e} (attempt {attempt})")))
        }
    };
    let (state, exit_code, error) = outcome;
    if let Some(e) = &error {
        log.system(&format!("task {state}: {e}"));
    } else {
        log.system(&format!("task {state}"));
    }
    if let Err(err) = c.conclude_task(id, state, exit_code, error.as_deref(), result.as_ref()) {
        tracing::error!(task = %id, error = %err, "cannot record the outcome of the task");
    }
}

/// Resolves with the reason once a stop is requested (a request made before counts).
async fn stop_requested(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    // The guard returned by `wait_for` must not live across an await: copy the value out.
    let reason = stop.wait_for(Option::is_some).await.ok().and_then(|r| *r);
    reason.unwrap_or(StopReason::Cancel)
}

/// A workspace held by a task for one attempt.
struct Lease {
    record: WorkspaceRecord,
    sandbox: bool,
    /// Held while a shared workspace runs this task.
    _turn: Option<OwnedMutexGuard<()>>,
}

impl Lease {
    fn container(&self) -> String {
        self.record
            .container_id
            .clone()
            .unwrap_or(self.record.container_name.clone())
    }
}

/// How one command ended.
enum CommandEnd {
    Exited(i64),
    TimedOut,
    Stopped(StopReason),
}

/// One attempt of one task.
struct Attempt<'a> {
    c: &'a Conductor,
    task: TaskRecord,
    spec: TaskSpec,
    stop: watch::Receiver<Option<StopReason>>,
    log: TaskLog,
    /// Log bytes written so far (capped at [`MAX_LOG_BYTES`]).
    log_bytes: usize,
    /// Hybrid mode: what happened with the before-task snapshot.
    snapshot_note: Option<String>,
    /// A finished sandbox marked `removing`: removed once the outcome is recorded.
    removal: Option<String>,
}

impl Attempt<'_> {
    fn stopped(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }

    /// A failure before the first command: a stop request wins, infrastructure trouble
    /// (engine, host, image, capacity) may be retried, anything else fails the task.
    fn setup_failed(&self, e: ServiceError) -> Ending {
        if let Some(reason) = self.stopped() {
            return Ending::Stopped(reason);
        }
        let retryable =
            e.is_infrastructure() || matches!(e, ServiceError::Environment { .. } | ServiceError::Exhausted(_));
        if retryable {
            Ending::Infrastructure(e)
        } else {
            Ending::Failed {
                exit_code: None,
                error: e.to_string(),
            }
        }
    }

    async fn run(&mut self) -> Ending {
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
        self.c.create_snapshot(&lease.record.id, &name, true).await?;
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
                let reuse = existing
                    .iter()
                    .find(|w| w.state == WorkspaceState::Running)
                    .or_else(|| existing.iter().find(|w| w.state == WorkspaceState::Stopped));
                if let Some(w) = reuse {
                    if w.state == WorkspaceState::Stopped {
                        c.start_workspace(&w.id).await?;
                    }
                    self.log
                        .system(&format!("using the shared workspace {} ({})", w.id, w.container_name));
                    return Ok(Some(Lease {
                        record: self.workspace_record(&w.id)?,
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
            ..Default::default()
        };
        let info = c.create_workspace(req, progress).await?;
        self.log
            .system(&format!("workspace {} ({}) is running", info.id, info.container_name));
        Ok(Some(Lease {
            record: self.workspace_record(&info.id)?,
            sandbox,
            _turn: turn,
        }))
    }

    fn workspace_record(&self, id: &str) -> Result<WorkspaceRecord> {
        self.c
            .store
            .get_workspace(id)?
            .ok_or_else(|| ServiceError::not_found(format!("workspace '{id}'")))
    }

    /// Records the workspace, starts the sidecars and places the source.
    async fn prepare(&mut self, lease: &Lease) -> Result<()> {
        let c = self.c;
        if !c.store.set_task_workspace(&self.task.id, &lease.record.id)? {
            return Err(ServiceError::Conflict(format!(
                "task '{}' is no longer running",
                self.task.id
            )));
        }
        if !self.spec.services.is_empty() {
            c.start_services(&lease.record, &self.task.id, &self.spec.services, &self.log)
                .await?;
        }
        if self.stopped().is_none() {
            self.place_source(&lease.record).await?;
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
                ending = match end {
                    CommandEnd::Exited(0) => continue,
                    CommandEnd::Exited(code) => Ending::Failed {
                        exit_code: Some(code),
                        error: format!("{what} ({command:?}) exited with code {code}"),
                    },
                    CommandEnd::TimedOut => Ending::TimedOut {
                        error: format!("timed out after {} s (during {what})", timeout.as_secs()),
                    },
                    CommandEnd::Stopped(reason) => Ending::Stopped(reason),
                };
                break 'phases;
            }
        }
        let container = lease.container();
        if matches!(ending, Ending::TimedOut { .. }) {
            // Background processes of earlier commands outlive the killed one.
            if let Err(e) = kill_task_processes(self.c, &lease.record.id, &container, &self.task.id).await {
                self.log
                    .system(&format!("could not kill the task's remaining processes: {e}"));
            }
        }
        if !matches!(ending, Ending::Stopped(_)) {
            // A command's own result counts only from a workspace that is still whole.
            match self.c.check_container(&lease.record).await {
                Ok(Some(fault)) => {
                    let error = format!(
                        "workspace {} failed during the task: {}",
                        lease.record.id,
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
        let container = lease.container();
        let begin = Instant::now();
        let exec = c.exec(&lease.record.id, req, tx);
        let collect = collect_output(rx, &self.log, &mut self.log_bytes);
        let work = async { tokio::join!(exec, collect) };
        tokio::pin!(work);
        let mut stop = self.stop.clone();
        let (finished, stopped) = tokio::select! {
            done = &mut work => (Some(done), None),
            reason = stop_requested(&mut stop) => {
                if let Err(e) = kill_task_processes(c, &lease.record.id, &container, &id).await {
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

    /// Copies `source` into the workspace's `/workspace/src`, or creates that directory
    /// empty; on the host, straight into the workspace's volume (never a mount).
    async fn place_source(&self, ws: &WorkspaceRecord) -> Result<()> {
        let vol = DataVolume::at(Path::new(&ws.volume_dir));
        let env_volumes = self
            .c
            .catalog
            .get(&ws.environment)
            .map(|e| e.volumes.clone())
            .unwrap_or_default();
        let target = match source_location(&env_volumes, SOURCE_TARGET) {
            Some((v, rest)) if rest.is_empty() => SourceTarget {
                base: vol.sub_volume(&v.name),
                sub: None,
            },
            Some((v, rest)) => SourceTarget {
                base: vol.sub_volume(&v.name),
                sub: Some(rest),
            },
            None => SourceTarget {
                base: vol.workspace_dir(),
                sub: Some(SOURCE_TARGET.trim_start_matches("/workspace/").to_string()),
            },
        };
        let source = self.spec.source.clone().map(PathBuf::from);
        let free = host::disk_usage(&vol.mountpoint()).map(|(used, total)| total.saturating_sub(used));
        if let Some(s) = &source {
            self.log
                .system(&format!("copying {} into {SOURCE_TARGET}", s.display()));
        }
        tokio::task::spawn_blocking(move || place_source_blocking(source.as_deref(), &target, free))
            .await
            .map_err(|e| ServiceError::host("copy the task's source", e))?
    }

    /// Releases the workspace per mode: a sandbox is removed (or kept after a failure when
    /// configured), a shared workspace stays and loses the task's sidecars, processes and
    /// shell state.
    async fn release(&mut self, lease: Lease, ending: &Ending, snapshot: Option<&str>) {
        let c = self.c;
        let result = if lease.sandbox {
            let failed = matches!(ending, Ending::Failed { .. } | Ending::TimedOut { .. });
            if failed && c.config.preserve_failed_workspaces() {
                self.log.system(&format!(
                    "workspace {} ({}) kept for debugging",
                    lease.record.id, lease.record.container_name
                ));
                Ok(())
            } else {
                // The task's outcome is recorded before the container goes (it costs ~130 ms
                // of Podman work the caller need not wait for); `removing` makes it survive
                // a crash in between.
                match c.begin_removal(&lease.record.id) {
                    Ok(_) => {
                        self.removal = Some(lease.record.id.clone());
                        Ok(())
                    }
                    Err(_) => c.remove_workspace(&lease.record.id, Some(false)).await.map(|_| ()),
                }
            }
        } else {
            let released = match c.remove_task_services(&self.task.id).await {
                Ok(()) => end_session(c, &lease.record.id, &lease.container(), &self.task.id).await,
                Err(e) => Err(e),
            };
            let failed = matches!(ending, Ending::Failed { .. } | Ending::TimedOut { .. });
            match snapshot {
                Some(name) if failed && c.config.task_execution.isolation.restore_on_error => {
                    let note = match c.restore_snapshot_for_task(&lease.record.id, name, &self.task.id).await {
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
                .system(&format!("releasing workspace {} failed: {e}", lease.record.id));
        }
    }
}

/// Streams a command's output into the task log (within the log budget) and returns the
/// captured stdout and stderr (their last [`MAX_CAPTURE`] bytes each).
async fn collect_output(mut rx: mpsc::Receiver<OutputChunk>, log: &TaskLog, log_bytes: &mut usize) -> (String, String) {
    let mut out = Capture::default();
    let mut err = Capture::default();
    let (mut out_text, mut err_text) = (Utf8Stream::default(), Utf8Stream::default());
    let write = |stream: &str, text: String, log_bytes: &mut usize| {
        if text.is_empty() {
            return;
        }
        if *log_bytes >= MAX_LOG_BYTES {
            return;
        }
        *log_bytes += text.len();
        if let Err(error) = log.write(stream, &text) {
            tracing::warn!(%error, "cannot write the task log");
        }
        if *log_bytes >= MAX_LOG_BYTES {
            log.system(&format!(
                "log limit of {} MiB reached; further output is not logged (each command keeps the end of its own)",
                MAX_LOG_BYTES >> 20
            ));
        }
    };
    while let Some(chunk) = rx.recv().await {
        match chunk {
            OutputChunk::Stdout(b) => {
                out.push(&b);
                write("stdout", out_text.push(&b), log_bytes);
            }
            OutputChunk::Stderr(b) => {
                err.push(&b);
                write("stderr", err_text.push(&b), log_bytes);
            }
        }
    }
    write("stdout", out_text.finish(), log_bytes);
    write("stderr", err_text.finish(), log_bytes);
    (out.into_string(), err.into_string())
}

/// The end of a byte stream, at most [`MAX_CAPTURE`] bytes.
#[derive(Default)]
struct Capture {
    buf: Vec<u8>,
    dropped: u64,
}

impl Capture {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > 2 * MAX_CAPTURE {
            let cut = self.buf.len() - MAX_CAPTURE;
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    fn into_string(mut self) -> String {
        if self.buf.len() > MAX_CAPTURE {
            let cut = self.buf.len() - MAX_CAPTURE;
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        if self.dropped > 0 {
            format!("[... {} bytes not kept; see the task log ...]\n{text}", self.dropped)
        } else {
            text
        }
    }
}

/// Decodes a byte stream as UTF-8 chunk by chunk without splitting a character that
/// straddles two chunks (invalid bytes become U+FFFD).
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete character at the end: keep it for the next chunk.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => {
                // Invalid bytes somewhere: keep only a possibly incomplete tail.
                let tail = self.pending.len().saturating_sub(3);
                (tail..self.pending.len())
                    .find(|&i| std::str::from_utf8(&self.pending[i..]).is_err_and(|e| e.error_len().is_none()))
                    .map_or(0, |i| self.pending.len() - i)
            }
        };
        let rest = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

/// Where `/workspace/src` lives on the host: `base` is a directory conductor made that a
/// workspace cannot rename or replace (it is a mount point inside the container); `sub`,
/// when set, is the name of the source directory inside it, which the workspace owns.
struct SourceTarget {
    base: PathBuf,
    sub: Option<String>,
}

impl SourceTarget {
    fn path(&self) -> PathBuf {
        match &self.sub {
            Some(sub) => self.base.join(sub),
            None => self.base.clone(),
        }
    }
}

/// Flags for opening a directory without following a link a workspace may have put there.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn owner() -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(WORKSPACE_UID)), Some(Gid::from_raw(WORKSPACE_UID)))
}

/// Removes a file, link or directory tree without following links.
fn remove_entry(path: &Path) -> std::io::Result<()> {
    match path.symlink_metadata() {
        // `remove_dir_all` never follows links, even ones swapped in while it runs.
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes the target hold a copy of `source` (or exist, empty, without one), owned by the
/// workspace user. Refuses a source larger than the volume's free space. Inside the
/// workspace's own directories everything goes through directory file descriptors with
/// `O_NOFOLLOW`/`O_EXCL`, so a process in a shared workspace that swaps in symlinks cannot
/// make conductor (root) write or change anything outside the volume.
fn place_source_blocking(source: Option<&Path>, target: &SourceTarget, free: Option<u64>) -> Result<()> {
    let invalid = |m: String| ServiceError::invalid("source", m);
    let host_err = |what: &str, e: std::io::Error| ServiceError::host(format!("{what} {}", target.path().display()), e);
    if let Some(source) = source {
        let size = tree_size(source).map_err(|e| invalid(format!("{} cannot be read: {e}", source.display())))?;
        // The previous contents (shared workspaces) are replaced, so their space counts as free.
        let reclaimed = match target.path().symlink_metadata() {
            Ok(meta) if meta.is_dir() => tree_size(&target.path()).unwrap_or(0),
            _ => 0,
        };
        if let Some(free) = free {
            if size > free + reclaimed {
                return Err(invalid(format!(
                    "{} needs about {size} bytes, but the workspace volume has {} bytes free",
                    source.display(),
                    free + reclaimed
                )));
            }
        }
        match &target.sub {
            Some(_) => remove_entry(&target.path()).map_err(|e| host_err("remove", e))?,
            None => {
                let entries = std::fs::read_dir(&target.base).map_err(|e| host_err("read", e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| host_err("read", e))?;
                    remove_entry(&entry.path()).map_err(|e| host_err("clear", e))?;
                }
            }
        }
    }
    if source.is_none() {
        // Only make the directory when missing; whatever a shared workspace put there is its own.
        match target.path().symlink_metadata() {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(host_err("inspect", e)),
        }
    }
    let base = std::fs::File::open(&target.base).map_err(|e| host_err("open", e))?;
    let dir: OwnedFd = match &target.sub {
        Some(sub) => {
            match mkdirat(&base, sub.as_str(), FileMode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(host_err("create", e.into())),
            }
            openat(&base, sub.as_str(), dir_flags(), FileMode::empty()).map_err(|e| host_err("open", e.into()))?
        }
        None => base.into(),
    };
    let as_root = host::is_root();
    if as_root {
        let (uid, gid) = owner();
        fchown(&dir, uid, gid).map_err(|e| host_err("chown", e.into()))?;
    }
    match source {
        Some(source) => {
            copy_into(source, &dir, as_root).map_err(|e| invalid(format!("copying {} failed: {e}", source.display())))
        }
        None => Ok(()),
    }
}

/// Bytes a tree takes, each entry rounded up to a 4 KiB block; links are not followed.
fn tree_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        total += meta.len().div_ceil(4096).max(1) * 4096;
        if meta.is_dir() {
            total += tree_size(&entry.path())?;
        }
    }
    Ok(total)
}

/// Copies the contents of the host directory `from` into the directory open as `to`:
/// directories, regular files (with their permission bits) and symlinks (as links, never
/// followed); other file types are skipped. With `chown`, everything becomes the
/// workspace user's.
fn copy_into(from: &Path, to: &OwnedFd, chown: bool) -> std::io::Result<()> {
    let (uid, gid) = owner();
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let name = entry.file_name();
        let kind = entry.file_type()?;
        let mode = || -> std::io::Result<FileMode> {
            Ok(FileMode::from_bits_truncate(
                src.symlink_metadata()?.permissions().mode() & 0o777,
            ))
        };
        if kind.is_dir() {
            mkdirat(to, name.as_os_str(), FileMode::from_bits_truncate(0o700))?;
            let sub = openat(to, name.as_os_str(), dir_flags(), FileMode::empty())?;
            copy_into(&src, &sub, chown)?;
            fchmod(&sub, mode()?)?;
            if chown {
                fchown(&sub, uid, gid)?;
            }
        } else if kind.is_file() {
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut out = std::fs::File::from(openat(
                to,
                name.as_os_str(),
                flags,
                FileMode::from_bits_truncate(0o600),
            )?);
            std::io::copy(&mut std::fs::File::open(&src)?, &mut out)?;
            fchmod(&out, mode()?)?;
            if chown {
                fchown(&out, uid, gid)?;
            }
        } else if kind.is_symlink() {
            symlinkat(&std::fs::read_link(&src)?, to, name.as_os_str())?;
            if chown {
                fchownat(to, name.as_os_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_characters_split_across_chunks_survive() {
        let mut s = Utf8Stream::default();
        let bytes = "héllo ✓".as_bytes();
        let mut text = String::new();
        for b in bytes {
            text.push_str(&s.push(std::slice::from_ref(b)));
        }
        text.push_str(&s.finish());
        assert_eq!(text, "héllo ✓");
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(s.push(&[0xe2, 0x9c]), "");
        assert_eq!(s.push(&[0x93]), "✓");
    }

    #[test]
    fn captures_keep_the_end() {
        let mut c = Capture::default();
        c.push(b"start\n");
        c.push(&vec![b'x'; 2 * MAX_CAPTURE]);
        c.push(b"\nend\n");
        let s = c.into_string();
        assert!(s.starts_with("[... "), "{}", &s[..40]);
        assert!(s.ends_with("x\nend\n"));
        assert!(s.len() < MAX_CAPTURE + 100);
        let mut small = Capture::default();
        small.push(b"ok\n");
        assert_eq!(small.into_string(), "ok\n");
    }

    #[test]
    fn sources_are_copied_with_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("tests")).unwrap();
        std::fs::write(src.join("tests/test_a.py"), "def test_a(): pass\n").unwrap();
        std::fs::write(src.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("link")).unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("src")).unwrap();
        std::fs::write(ws.join("src/old"), "stale").unwrap();
        let target = SourceTarget {
            base: ws.clone(),
            sub: Some("src".into()),
        };

        place_source_blocking(Some(&src), &target, Some(1 << 30)).unwrap();
        let copied = ws.join("src");
        assert_eq!(
            std::fs::read_to_string(copied.join("tests/test_a.py")).unwrap(),
            "def test_a(): pass\n"
        );
        let mode = std::fs::metadata(copied.join("run.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(copied.join("link")).unwrap(),
            Path::new("/etc/shadow"),
            "links are copied, not followed"
        );
        assert!(!copied.join("old").exists(), "previous contents are replaced");

        let fresh = SourceTarget {
            base: ws.clone(),
            sub: Some("other".into()),
        };
        match place_source_blocking(Some(&src), &fresh, Some(100)) {
            Err(ServiceError::Invalid { field, message }) => {
                assert_eq!(field, "source");
                assert!(message.contains("bytes free"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let empty = SourceTarget {
            base: dir.path().join("ws2"),
            sub: Some("src".into()),
        };
        std::fs::create_dir_all(&empty.base).unwrap();
        place_source_blocking(None, &empty, None).unwrap();
        assert!(empty.path().is_dir());
    }

    #[test]
    fn a_symlink_planted_by_the_workspace_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "keep").unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a"), "new").unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("src")).unwrap();
        let target = SourceTarget {
            base: ws.clone(),
            sub: Some("src".into()),
        };
        place_source_blocking(Some(&src), &target, None).unwrap();
        assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep");
        assert!(!outside.join("a").exists());
        assert!(!ws.join("src").is_symlink());
        assert_eq!(std::fs::read_to_string(ws.join("src/a")).unwrap(), "new");
        // Without a source, whatever is there stays untouched.
        std::fs::remove_dir_all(ws.join("src")).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("src")).unwrap();
        place_source_blocking(None, &target, None).unwrap();
        assert!(ws.join("src").is_symlink());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }
}
