//! Tasks: submission, views, cancellation, waiting, logs and metrics.
//!
//! A task is durable from the moment [`Conductor::submit_tasks`] returns: all tasks of a
//! request are validated first, then inserted in one store transaction. The
//! [`Orchestrator`] runs them. Everything that is only needed while this process runs lives
//! in [`TaskRuntime`]: a [`Notify`] that wakes idle workers, one broadcast channel carrying
//! every task's live log and end events (followers and waiters filter by task id and fall
//! back to the store whenever they lag behind), the stop signals of running tasks, one lock
//! per shared workspace, and the lock that keeps two tasks from building the same service
//! image at once.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_core::task::{batch_field, rfc3339, DurationHistogram, TaskSpec};
use conductor_store::{CommandResult, NewTask, Store, TaskFilter, TaskRecord, WorkspaceFilter};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch, Notify};

pub use crate::orchestrator::Orchestrator;
use crate::{now_ms, Conductor, Result, ServiceError};

/// Most tasks accepted in one submission.
pub const MAX_BATCH: usize = 1000;
/// How long a cancel waits for a worker of this process to take a running task before it
/// concludes that no worker runs it (its process died) and records the cancel itself.
const ORPHAN_CANCEL_GRACE: Duration = Duration::from_secs(3);
/// How often waiters look at the store even without an event (another process may finish
/// a task).
const WAIT_RECHECK: Duration = Duration::from_secs(2);
/// Live events kept for slow subscribers before they lag (and re-read the store).
const EVENT_CAPACITY: usize = 4096;

/// A task as shown to callers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskView {
    pub id: String,
    /// Set when the task was submitted with others in one request.
    pub batch_id: Option<String>,
    pub status: TaskState,
    pub task_type: String,
    pub description: Option<String>,
    pub environment: String,
    pub agent_id: Option<String>,
    pub priority: u8,
    /// How many times the task was started (retries after infrastructure failures count).
    pub attempt: u32,
    /// Workspace of the current or last attempt.
    pub workspace_id: Option<String>,
    /// Exit code of the failing command, or of the last command when all succeeded; 124
    /// when the task timed out.
    pub exit_code: Option<i64>,
    /// Why the task failed, timed out or was cancelled (or why its last attempt is retried).
    pub error: Option<String>,
    /// Pre-task hooks, commands and post-task hooks, in the order they ran.
    pub commands: Vec<CommandView>,
    /// Sidecar images of the task.
    pub services: Vec<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Start of the current or last attempt.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// `finished_at - started_at`.
    pub duration_ms: Option<u64>,
    /// Note about snapshots in hybrid mode.
    pub snapshot: Option<String>,
    /// What the task's workspace tried to reach through the egress proxy (proxy mode;
    /// only in `GET /tasks/{id}`, not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<conductor_store::EgressSummary>,
}

/// One command of a task and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandView {
    /// `pre` (container_lifecycle.pre_task), `main` (the task's commands) or `post`.
    pub phase: String,
    /// Position within its phase, from 0.
    pub index: u32,
    pub command: String,
    /// `None` while running, and for a command killed by a timeout or a cancel.
    pub exit_code: Option<i64>,
    /// Captured output; very long output keeps its end (the full output is in the log).
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
}

/// Which tasks [`Conductor::list_tasks`] returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskListFilter {
    pub status: Option<TaskState>,
    pub agent_id: Option<String>,
    pub environment: Option<String>,
    /// Page size; 0 means all.
    pub limit: u32,
    pub offset: u32,
}

/// An event of a task's log stream ([`Conductor::follow_task_log`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LogEvent {
    /// A chunk of output; `seq` is the resume cursor (`after_seq`).
    Output { seq: i64, stream: String, data: String },
    /// The task finished; the last event of a stream.
    End { status: TaskState },
}

/// Figures for `GET /metrics`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskMetrics {
    /// Number of tasks in every state, zeros included.
    pub tasks_by_state: Vec<(TaskState, u64)>,
    /// Queued tasks, including those waiting for a retry delay.
    pub queue_depth: u64,
    /// Durations (start of the last attempt to the end) of finished tasks that ran.
    pub durations: DurationHistogram,
    /// Number of workspaces in every state, zeros included.
    pub workspaces_by_state: Vec<(WorkspaceState, u64)>,
}

/// Why a running task is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// `cancel_task`.
    Cancel,
    /// The orchestrator shuts down and the grace period is over.
    Shutdown,
}

/// A log or end event of one task, as broadcast to followers and waiters.
#[derive(Debug, Clone)]
pub(crate) struct TaskEvent {
    task_id: Arc<str>,
    event: LogEvent,
}

#[derive(Default)]
struct StopSignals {
    /// Stop senders of the tasks workers of this process are running.
    running: HashMap<String, watch::Sender<Option<StopReason>>>,
    /// Stops requested for running tasks no worker has registered (yet).
    pending: HashMap<String, StopReason>,
}

/// In-memory state of the orchestrator, owned by [`Conductor`].
pub(crate) struct TaskRuntime {
    events: broadcast::Sender<TaskEvent>,
    /// Wakes idle workers when tasks are submitted.
    pub(crate) wake: Notify,
    stops: Mutex<StopSignals>,
    /// One lock per shared workspace (`agent/environment`): one task at a time.
    shared: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises service image resolution, so concurrent tasks build an image once.
    pub(crate) images: tokio::sync::Mutex<()>,
}

impl TaskRuntime {
    pub(crate) fn new() -> Self {
        TaskRuntime {
            events: broadcast::channel(EVENT_CAPACITY).0,
            wake: Notify::new(),
            stops: Mutex::default(),
            shared: Mutex::default(),
            images: tokio::sync::Mutex::new(()),
        }
    }

    fn stops(&self) -> std::sync::MutexGuard<'_, StopSignals> {
        self.stops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a task a worker starts running; the receiver reports a stop request
    /// (including one made before the registration).
    pub(crate) fn register(&self, task_id: &str) -> watch::Receiver<Option<StopReason>> {
        let mut stops = self.stops();
        let (tx, rx) = watch::channel(stops.pending.remove(task_id));
        stops.running.insert(task_id.to_string(), tx);
        rx
    }

    pub(crate) fn unregister(&self, task_id: &str) {
        self.stops().running.remove(task_id);
    }

    /// Asks the worker running `task_id` to stop. Returns false when no worker of this
    /// process runs it; the request then waits for one to register it.
    fn request_stop(&self, task_id: &str, reason: StopReason) -> bool {
        let mut stops = self.stops();
        match stops.running.get(task_id) {
            Some(tx) => {
                tx.send_replace(Some(reason));
                true
            }
            None => {
                stops.pending.insert(task_id.to_string(), reason);
                false
            }
        }
    }

    fn forget_pending(&self, task_id: &str) {
        self.stops().pending.remove(task_id);
    }

    /// Asks every running task to stop (shutdown).
    pub(crate) fn stop_all(&self, reason: StopReason) {
        for tx in self.stops().running.values() {
            tx.send_replace(Some(reason));
        }
    }

    /// The lock of the shared workspace of `key`.
    pub(crate) fn shared_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_string()).or_default().clone()
    }

    fn publish(&self, task_id: Arc<str>, event: LogEvent) {
        // No subscriber is not an error.
        let _ = self.events.send(TaskEvent { task_id, event });
    }
}

/// Writes one task's log: into the store (durable, resumable) and to live followers.
#[derive(Clone)]
pub(crate) struct TaskLog {
    store: Arc<Store>,
    events: broadcast::Sender<TaskEvent>,
    task_id: Arc<str>,
}

impl TaskLog {
    /// Appends `data` to the `stream` (`stdout`, `stderr` or `system`) of the task.
    pub(crate) fn write(&self, stream: &str, data: &str) -> Result<()> {
        let seq = self.store.append_log(&self.task_id, stream, data, now_ms())?;
        let _ = self.events.send(TaskEvent {
            task_id: self.task_id.clone(),
            event: LogEvent::Output {
                seq,
                stream: stream.to_string(),
                data: data.to_string(),
            },
        });
        Ok(())
    }

    /// Appends a line of conductor's own to the log; a failure is only traced.
    pub(crate) fn system(&self, line: &str) {
        if let Err(error) = self.write("system", &format!("{line}\n")) {
            tracing::warn!(task = %self.task_id, %error, "cannot write the task log");
        }
    }
}

/// The live log of one task: the stored log after a cursor, then new output as it is
/// written, then [`LogEvent::End`]. Made by [`Conductor::follow_task_log`].
pub struct TaskLogStream {
    rx: mpsc::Receiver<LogEvent>,
}

impl TaskLogStream {
    /// The next event; `None` after [`LogEvent::End`] (or if the log cannot be read).
    pub async fn recv(&mut self) -> Option<LogEvent> {
        self.rx.recv().await
    }
}

impl Stream for TaskLogStream {
    type Item = LogEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LogEvent>> {
        self.rx.poll_recv(cx)
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn command_view(r: CommandResult) -> CommandView {
    CommandView {
        phase: r.phase,
        index: r.idx,
        command: r.command,
        exit_code: r.exit_code,
        stdout: r.stdout,
        stderr: r.stderr,
        duration_ms: r.duration_ms,
    }
}

/// The stored result document of a finished task.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct ResultDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot: Option<String>,
}

/// Checks that `source` names an existing host directory.
fn check_source(path: &str) -> Result<()> {
    let meta = std::fs::metadata(Path::new(path))
        .map_err(|e| ServiceError::invalid("source", format!("{path:?} cannot be read: {e}")))?;
    if !meta.is_dir() {
        return Err(ServiceError::invalid("source", format!("{path:?} is not a directory")));
    }
    Ok(())
}

impl Conductor {
    /// The log writer of a task.
    pub(crate) fn task_log(&self, task_id: &str) -> TaskLog {
        TaskLog {
            store: self.store.clone(),
            events: self.tasks.events.clone(),
            task_id: Arc::from(task_id),
        }
    }

    /// Records the final outcome of a task and tells waiters and followers. Returns false
    /// when the task had already finished (the first outcome wins).
    pub(crate) fn conclude_task(
        &self,
        id: &str,
        state: TaskState,
        exit_code: Option<i64>,
        error: Option<&str>,
        result: Option<&ResultDoc>,
    ) -> Result<bool> {
        let result_json = result
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| ServiceError::host("encode task result", e))?;
        let done = self
            .store
            .finish_task(id, state, exit_code, error, result_json.as_deref(), now_ms())?;
        if done {
            self.tasks.publish(Arc::from(id), LogEvent::End { status: state });
        }
        Ok(done)
    }

    /// Validates every spec, then queues them all in one transaction (all or none) and
    /// wakes the workers. Errors name the field; when more than one spec is submitted the
    /// field carries the spec's position: `tasks[2].commands[0]`.
    pub fn submit_tasks(&self, specs: Vec<TaskSpec>) -> Result<Vec<TaskView>> {
        if !self.config.isolated_workspace.enabled {
            return Err(ServiceError::Conflict(
                "isolated workspaces are disabled (isolated_workspace.enabled: false)".into(),
            ));
        }
        if specs.is_empty() {
            return Err(ServiceError::invalid("tasks", "must contain at least one task"));
        }
        if specs.len() > MAX_BATCH {
            return Err(ServiceError::invalid(
                "tasks",
                format!("has {} tasks; at most {MAX_BATCH} are accepted at once", specs.len()),
            ));
        }
        let batch = specs.len() > 1;
        for (i, spec) in specs.iter().enumerate() {
            let named = |e: ServiceError| match e {
                ServiceError::Invalid { field, message } if batch => {
                    ServiceError::invalid(batch_field(i, &field), message)
                }
                other => other,
            };
            spec.validate(&self.catalog)
                .map_err(|e| ServiceError::invalid(e.field, e.message))
                .map_err(named)?;
            if let Some(source) = &spec.source {
                check_source(source).map_err(named)?;
            }
            if let Some(network) = &spec.network {
                self.config
                    .network
                    .egress
                    .check("network", network)
                    .map_err(|(field, message)| ServiceError::invalid(field, message))
                    .map_err(named)?;
            }
            self.check_secret_names("secrets", &spec.secrets).map_err(named)?;
        }
        let batch_id = batch.then(|| new_id("batch"));
        let now = now_ms();
        let mut new = Vec::with_capacity(specs.len());
        for spec in &specs {
            new.push(NewTask {
                id: new_id("task"),
                batch_id: batch_id.clone(),
                agent_id: spec.agent_id.clone(),
                environment: spec.environment.clone(),
                spec_json: serde_json::to_string(spec).map_err(|e| ServiceError::host("encode task spec", e))?,
                priority: spec.priority.unwrap_or(self.config.task_execution.default_priority),
                created_at: now,
            });
        }
        let records = self.store.insert_tasks(&new)?;
        self.tasks.wake.notify_waiters();
        records.into_iter().map(|r| self.task_view(r)).collect()
    }

    fn task_view(&self, r: TaskRecord) -> Result<TaskView> {
        let spec: TaskSpec = serde_json::from_str(&r.spec_json)
            .map_err(|e| ServiceError::host(format!("decode the stored spec of task '{}'", r.id), e))?;
        let result: ResultDoc = match &r.result_json {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| ServiceError::host(format!("decode the stored result of task '{}'", r.id), e))?,
            None => ResultDoc::default(),
        };
        let commands = self
            .store
            .command_results(&r.id)?
            .into_iter()
            .map(command_view)
            .collect();
        let duration_ms = match (r.started_at, r.finished_at) {
            (Some(s), Some(f)) => Some(u64::try_from(f - s).unwrap_or(0)),
            _ => None,
        };
        Ok(TaskView {
            id: r.id,
            batch_id: r.batch_id,
            status: r.state,
            task_type: spec.task_type,
            description: spec.description,
            environment: r.environment,
            agent_id: r.agent_id,
            priority: r.priority,
            attempt: r.attempt,
            workspace_id: r.workspace_id,
            exit_code: r.exit_code,
            error: r.error,
            commands,
            services: spec.services,
            created_at: rfc3339(r.created_at),
            started_at: r.started_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
            duration_ms,
            snapshot: result.snapshot,
            egress: None,
        })
    }

    fn task_record(&self, id: &str) -> Result<TaskRecord> {
        self.store
            .get_task(id)?
            .ok_or_else(|| ServiceError::not_found(format!("task '{id}'")))
    }

    /// One task with its command results.
    pub fn get_task(&self, id: &str) -> Result<TaskView> {
        let r = self.task_record(id)?;
        let mut view = self.task_view(r)?;
        let summary = self.store.egress_summary(&view.id)?;
        if summary.allowed + summary.denied > 0 {
            view.egress = Some(summary);
        }
        Ok(view)
    }

    /// A page of tasks, newest first, and the number of all tasks matching the filter.
    pub fn list_tasks(&self, f: &TaskListFilter) -> Result<(Vec<TaskView>, u64)> {
        let filter = TaskFilter {
            states: f.status.into_iter().collect(),
            agent_id: f.agent_id.clone(),
            environment: f.environment.clone(),
            batch_id: None,
            limit: f.limit,
            offset: f.offset,
        };
        let total = self.store.count_tasks(&filter)?;
        let views = self
            .store
            .list_tasks(&filter)?
            .into_iter()
            .map(|r| self.task_view(r))
            .collect::<Result<Vec<_>>>()?;
        Ok((views, total))
    }

    /// Cancels a task: a queued one never runs; a running one has its processes killed, its
    /// workspace released and ends `cancelled`. A finished task is a `Conflict`.
    pub async fn cancel_task(&self, id: &str) -> Result<TaskView> {
        let r = self.task_record(id)?;
        if r.state.is_finished() {
            return Err(ServiceError::Conflict(format!(
                "task '{id}' already finished ({})",
                r.state
            )));
        }
        if r.state == TaskState::Queued && self.store.cancel_queued_task(id, now_ms())? {
            self.task_log(id).system("cancelled before it started");
            self.tasks.publish(
                Arc::from(id),
                LogEvent::End {
                    status: TaskState::Cancelled,
                },
            );
            return self.get_task(id);
        }
        // Running (or claimed just now).
        if self.tasks.request_stop(id, StopReason::Cancel) {
            return self.wait_task(id).await;
        }
        let waited = tokio::time::timeout(ORPHAN_CANCEL_GRACE, self.wait_task(id)).await;
        self.tasks.forget_pending(id);
        match waited {
            Ok(view) => view,
            Err(_) => {
                // No worker of this process runs it: its process died before recording an
                // outcome. Recording the cancel is all that is left to do.
                self.conclude_task(
                    id,
                    TaskState::Cancelled,
                    None,
                    Some("cancelled by request (no worker was running it)"),
                    None,
                )?;
                self.get_task(id)
            }
        }
    }

    /// Submits a finished task's spec again as a new task (the dashboard's retry); the
    /// new task goes through the same validation as any submission. A task that has not
    /// finished is a `Conflict`.
    pub fn retry_task(&self, id: &str) -> Result<TaskView> {
        let r = self.task_record(id)?;
        if !r.state.is_finished() {
            return Err(ServiceError::Conflict(format!(
                "task '{id}' has not finished ({}); cancel it first",
                r.state
            )));
        }
        let spec: TaskSpec = serde_json::from_str(&r.spec_json)
            .map_err(|e| ServiceError::host(format!("decode the stored spec of task '{id}'"), e))?;
        let mut views = self.submit_tasks(vec![spec])?;
        views
            .pop()
            .ok_or_else(|| ServiceError::host("retry a task", std::io::Error::other("nothing was queued")))
    }

    /// Resolves when the task has finished, with its final view.
    pub async fn wait_task(&self, id: &str) -> Result<TaskView> {
        let mut events = self.tasks.events.subscribe();
        loop {
            let view = self.get_task(id)?;
            if view.status.is_finished() {
                return Ok(view);
            }
            let ended = async {
                loop {
                    match events.recv().await {
                        Ok(TaskEvent {
                            task_id,
                            event: LogEvent::End { .. },
                        }) if &*task_id == id => return,
                        Ok(_) => {}
                        // Missed events, or no sender left: look at the store.
                        Err(_) => return,
                    }
                }
            };
            let _ = tokio::time::timeout(WAIT_RECHECK, ended).await;
        }
    }

    /// The stored log of a task after `after_seq` (0 for all): `(seq, stream, data)`.
    pub fn read_task_log(&self, id: &str, after_seq: i64) -> Result<Vec<(i64, String, String)>> {
        self.task_record(id)?;
        Ok(self
            .store
            .read_log(id, after_seq, 0)?
            .into_iter()
            .map(|c| (c.seq, c.stream, c.data))
            .collect())
    }

    /// Follows a task's log: replays what is stored after `after_seq`, then streams new
    /// output live, then ends with [`LogEvent::End`]. `NotFound` for an unknown task.
    /// Must be called within a Tokio runtime.
    pub fn follow_task_log(&self, id: &str, after_seq: i64) -> Result<TaskLogStream> {
        self.task_record(id)?;
        // Subscribe before reading the store, so nothing falls between the two.
        let events = self.tasks.events.subscribe();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(forward_log(self.store.clone(), id.to_string(), after_seq, events, tx));
        Ok(TaskLogStream { rx })
    }

    /// Counts and the duration histogram for `GET /metrics`.
    pub fn task_metrics(&self) -> Result<TaskMetrics> {
        let finished = self.store.list_tasks(&TaskFilter {
            states: TaskState::ALL.into_iter().filter(|s| s.is_finished()).collect(),
            ..Default::default()
        })?;
        let durations = DurationHistogram::from_millis(finished.iter().filter_map(|t| {
            let (s, f) = (t.started_at?, t.finished_at?);
            u64::try_from(f - s).ok()
        }));
        let workspaces = self.store.list_workspaces(&WorkspaceFilter::default())?;
        Ok(TaskMetrics {
            tasks_by_state: self.store.count_tasks_by_state()?,
            queue_depth: self.store.queue_depth()?,
            durations,
            workspaces_by_state: WorkspaceState::ALL
                .into_iter()
                .map(|s| (s, workspaces.iter().filter(|w| w.state == s).count() as u64))
                .collect(),
        })
    }
}

/// Feeds a [`TaskLogStream`]: stored chunks after the cursor, then live ones (deduplicated
/// by `seq`), re-reading the store after a lag, until the task ends or the reader leaves.
async fn forward_log(
    store: Arc<Store>,
    id: String,
    after_seq: i64,
    mut events: broadcast::Receiver<TaskEvent>,
    tx: mpsc::Sender<LogEvent>,
) {
    let mut last = after_seq;
    'catch_up: loop {
        let (chunks, state) = match (store.read_log(&id, last, 0), store.get_task(&id)) {
            (Ok(chunks), Ok(Some(task))) => (chunks, task.state),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(task = %id, %error, "cannot read the task log");
                return;
            }
            (_, Ok(None)) => return,
        };
        for c in chunks {
            last = c.seq;
            let event = LogEvent::Output {
                seq: c.seq,
                stream: c.stream,
                data: c.data,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if state.is_finished() {
            // Output written between the two reads above.
            if let Ok(rest) = store.read_log(&id, last, 0) {
                for c in rest {
                    let event = LogEvent::Output {
                        seq: c.seq,
                        stream: c.stream,
                        data: c.data,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(LogEvent::End { status: state }).await;
            return;
        }
        loop {
            let received = tokio::select! {
                received = events.recv() => received,
                // The reader left: stop following.
                () = tx.closed() => return,
            };
            match received {
                Ok(ev) if *ev.task_id == *id => match ev.event {
                    LogEvent::Output { seq, .. } if seq <= last => {}
                    LogEvent::Output { seq, stream, data } => {
                        last = seq;
                        if tx.send(LogEvent::Output { seq, stream, data }).await.is_err() {
                            return;
                        }
                    }
                    // Let the catch-up read the final state and any remaining output.
                    LogEvent::End { .. } => continue 'catch_up,
                },
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => continue 'catch_up,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_requests_reach_running_and_later_registered_tasks() {
        let rt = TaskRuntime::new();
        let rx = rt.register("t1");
        assert_eq!(*rx.borrow(), None);
        assert!(rt.request_stop("t1", StopReason::Cancel));
        assert_eq!(*rx.borrow(), Some(StopReason::Cancel));
        rt.unregister("t1");

        assert!(!rt.request_stop("t2", StopReason::Cancel), "nobody runs t2 yet");
        let rx = rt.register("t2");
        assert_eq!(*rx.borrow(), Some(StopReason::Cancel), "pending stop delivered");
        let other = rt.register("t3");
        rt.stop_all(StopReason::Shutdown);
        assert_eq!(*other.borrow(), Some(StopReason::Shutdown));
    }

    #[test]
    fn shared_locks_are_per_key() {
        let rt = TaskRuntime::new();
        let a = rt.shared_lock("a/python-dev");
        let again = rt.shared_lock("a/python-dev");
        let b = rt.shared_lock("b/python-dev");
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn sources_must_be_existing_directories() {
        let dir = tempfile::tempdir().unwrap();
        check_source(dir.path().to_str().unwrap()).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        for bad in [file, dir.path().join("missing")] {
            match check_source(bad.to_str().unwrap()) {
                Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "source"),
                other => panic!("{other:?}"),
            }
        }
    }
}
