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
//!
//! The module is cut along those steps: this file holds the workers, the queue loop and
//! how an outcome is recorded; [`attempt`] runs one attempt (acquire, prepare, commands,
//! release per mode); [`output`] turns a command's output into the task log and its
//! captured result; [`source`] copies `source` into the workspace's volume on the host.

mod attempt;
mod output;
mod source;

pub(crate) use source::place_source_on_host;

use std::sync::Arc;
use std::time::Duration;

use conductor_core::config::Mode;
use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_core::naming;
use conductor_core::task::{state_dir, TaskSpec};
use conductor_store::TaskRecord;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::channel::Channel;
use crate::exec::{kill_script, TIMEOUT_EXIT_CODE};
use crate::tasks::{ResultDoc, StopReason, TaskLog};
use crate::{now_ms, Conductor, Result, ServiceError};

use attempt::Attempt;

/// How often an idle worker looks for eligible tasks without being woken (retry delays).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// After the shutdown grace period, how long cancelled tasks get to clean up.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
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
                end_session(&c.handle_of(w).channel, &t.id).await?;
            }
        }
    }
    Ok(())
}

/// Kills the task's processes in `container`: the whole tree of every command of the task,
/// background ones included, and its shell session in the agent.
async fn kill_task_processes(channel: &Channel, task_id: &str) -> Result<()> {
    channel
        .run_quiet(kill_script(TASK_MARKER, task_id), Some(task_id))
        .await
}

/// Kills the task's processes in the workspace and removes its shell state (the agent's
/// session, the state directory of the fallback): what a shared workspace keeps of a task
/// is its files.
async fn end_session(channel: &Channel, task_id: &str) -> Result<()> {
    let script = format!("{}; rm -rf '{}'", kill_script(TASK_MARKER, task_id), state_dir(task_id));
    channel.run_quiet(script, Some(task_id)).await
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
            let mut attempt = Attempt::new(c, task, spec, stop, log.clone());
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

#[cfg(test)]
mod tests;
