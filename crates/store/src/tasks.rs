//! The persistent task queue (`tasks`), per-command results (`task_commands`) and the
//! combined output log (`task_logs`).
//!
//! A task is `queued` from the moment [`Store::insert_tasks`] commits; the API answers 202
//! only after that. Workers take tasks with [`Store::claim_next_task`]: one
//! `BEGIN IMMEDIATE` transaction that selects the best eligible task (highest priority, then
//! lowest `seq`, i.e. FIFO, among those whose `not_before` has passed) and marks it `running`.
//! The write lock taken at `BEGIN` makes the claim exclusive between threads and processes.
//!
//! Every other transition reads the current state and checks it against the lifecycle in the
//! same immediate transaction, so a finished task never changes again: late updates from a
//! worker that lost a race (timeout, cancel) are refused with `Ok(false)` rather than
//! overwriting the outcome.

use conductor_core::lifecycle::TaskState;
use rusqlite::{params, Params, Row, TransactionBehavior};

use crate::{parent_missing, query_all, query_opt, Decoder, Result, Store, StoreError, Where};

const COLUMNS: &str = "id, seq, batch_id, agent_id, environment, spec_json, priority, state, \
     attempt, workspace_id, exit_code, error, result_json, created_at, started_at, \
     finished_at, not_before, commands_started";

/// A task as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// Public id.
    pub id: String,
    /// Insertion order, assigned by the store; only ever grows. FIFO order within a priority.
    pub seq: i64,
    /// The batch this task was submitted in, if any.
    pub batch_id: Option<String>,
    /// The agent the task runs for, if any.
    pub agent_id: Option<String>,
    /// Environment to run in.
    pub environment: String,
    /// The validated task spec, serialised by the service.
    pub spec_json: String,
    /// 1..=10; higher runs first.
    pub priority: u8,
    /// Lifecycle state.
    pub state: TaskState,
    /// How many times the task has been claimed (1 on its first run).
    pub attempt: u32,
    /// Workspace used by the current (or last) attempt.
    pub workspace_id: Option<String>,
    /// Exit code of the failing or last command, once finished.
    pub exit_code: Option<i64>,
    /// Why the task failed, or why its last attempt was retried.
    pub error: Option<String>,
    /// Result document, once finished.
    pub result_json: Option<String>,
    /// Submission time, unix milliseconds.
    pub created_at: i64,
    /// When the current attempt was claimed; `None` while queued.
    pub started_at: Option<i64>,
    /// When the task reached a final state.
    pub finished_at: Option<i64>,
    /// The task is not claimed before this time (unix milliseconds); used for retry delays.
    pub not_before: i64,
    /// How many commands have been started over all attempts. After a crash, a running task
    /// with 0 here never ran anything and can safely be retried.
    pub commands_started: u32,
}

/// The caller-provided fields of a new task; the store fills in the rest (`seq`, state
/// `queued`, attempt 0, `not_before = created_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    /// Public id; must be unique.
    pub id: String,
    /// Batch it belongs to, if any.
    pub batch_id: Option<String>,
    /// Agent it runs for, if any.
    pub agent_id: Option<String>,
    /// Environment to run in.
    pub environment: String,
    /// The validated task spec.
    pub spec_json: String,
    /// 1..=10; anything else is rejected by a `CHECK` constraint.
    pub priority: u8,
    /// Submission time, unix milliseconds.
    pub created_at: i64,
}

/// Which tasks [`Store::list_tasks`] and [`Store::count_tasks`] return. The default matches
/// all tasks, without a limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only tasks in one of these states; empty means any state.
    pub states: Vec<TaskState>,
    /// Only this agent's tasks.
    pub agent_id: Option<String>,
    /// Only tasks of this environment.
    pub environment: Option<String>,
    /// Only tasks of this batch.
    pub batch_id: Option<String>,
    /// Page size; 0 means no limit. Ignored by `count_tasks`.
    pub limit: u32,
    /// Rows to skip. Ignored by `count_tasks`.
    pub offset: u32,
}

/// The outcome of one command of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// The task it belongs to.
    pub task_id: String,
    /// Position within its phase, from 0.
    pub idx: u32,
    /// `"pre"`, `"main"` or `"post"`; anything else is rejected by a `CHECK` constraint.
    pub phase: String,
    /// The command line.
    pub command: String,
    /// Exit code; `None` if it never exited (killed, timed out).
    pub exit_code: Option<i64>,
    /// Captured standard output (possibly truncated by the service).
    pub stdout: String,
    /// Captured standard error (possibly truncated by the service).
    pub stderr: String,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Start time, unix milliseconds.
    pub started_at: i64,
}

/// One chunk of a task's combined log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Position in the log; increases across all tasks, so it doubles as a resume cursor.
    pub seq: i64,
    /// `"stdout"`, `"stderr"` or `"system"`.
    pub stream: String,
    /// The text.
    pub data: String,
    /// When it was written, unix milliseconds.
    pub at: i64,
}

fn decode_task(row: &Row<'_>) -> Result<TaskRecord> {
    let id: String = row.get("id")?;
    let d = Decoder::new(row, format!("tasks row '{id}'"));
    Ok(TaskRecord {
        seq: d.get("seq")?,
        batch_id: d.get("batch_id")?,
        agent_id: d.get("agent_id")?,
        environment: d.get("environment")?,
        spec_json: d.get("spec_json")?,
        priority: d.get("priority")?,
        state: d.parse("state")?,
        attempt: d.get("attempt")?,
        workspace_id: d.get("workspace_id")?,
        exit_code: d.get("exit_code")?,
        error: d.get("error")?,
        result_json: d.get("result_json")?,
        created_at: d.get("created_at")?,
        started_at: d.get("started_at")?,
        finished_at: d.get("finished_at")?,
        not_before: d.get("not_before")?,
        commands_started: d.get("commands_started")?,
        id,
    })
}

fn decode_command(row: &Row<'_>) -> Result<CommandResult> {
    let task_id: String = row.get("task_id")?;
    let d = Decoder::new(row, format!("task_commands row of task '{task_id}'"));
    Ok(CommandResult {
        idx: d.get("idx")?,
        phase: d.get("phase")?,
        command: d.get("command")?,
        exit_code: d.get("exit_code")?,
        stdout: d.get("stdout")?,
        stderr: d.get("stderr")?,
        duration_ms: d.get("duration_ms")?,
        started_at: d.get("started_at")?,
        task_id,
    })
}

fn decode_log(row: &Row<'_>) -> Result<LogChunk> {
    let seq: i64 = row.get("seq")?;
    let d = Decoder::new(row, format!("task_logs row {seq}"));
    Ok(LogChunk {
        stream: d.get("stream")?,
        data: d.get("data")?,
        at: d.get("at")?,
        seq,
    })
}

fn task_not_found(id: &str) -> impl FnOnce() -> String + '_ {
    move || format!("task '{id}'")
}

/// SQLite's "no limit" for a `limit` of 0.
fn sql_limit(limit: u32) -> i64 {
    if limit == 0 {
        -1
    } else {
        i64::from(limit)
    }
}

fn task_filter(filter: &TaskFilter) -> Where {
    let mut w = Where::default();
    w.any_of("state", filter.states.iter().map(|s| s.as_str()));
    w.eq("agent_id", filter.agent_id.as_deref());
    w.eq("environment", filter.environment.as_deref());
    w.eq("batch_id", filter.batch_id.as_deref());
    w
}

impl Store {
    /// Enqueues `tasks` in one transaction: either all are inserted (and durable when this
    /// returns) or none is. Returns the stored records, with `seq` assigned in slice order.
    /// A duplicate id, within the batch or against an existing task, fails the whole batch
    /// with a uniqueness violation ([`StoreError::is_conflict`]).
    pub fn insert_tasks(&self, tasks: &[NewTask]) -> Result<Vec<TaskRecord>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let sql = format!(
            "INSERT INTO tasks (id, batch_id, agent_id, environment, spec_json, priority, \
             state, attempt, created_at, not_before, commands_started) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?8, 0) RETURNING {COLUMNS}"
        );
        let mut records = Vec::with_capacity(tasks.len());
        for t in tasks {
            let record = query_opt(
                &tx,
                &sql,
                params![
                    t.id,
                    t.batch_id,
                    t.agent_id,
                    t.environment,
                    t.spec_json,
                    t.priority,
                    TaskState::Queued.as_str(),
                    t.created_at,
                ],
                decode_task,
            )?;
            records.extend(record);
        }
        tx.commit()?;
        Ok(records)
    }

    /// The task with this id, if any.
    pub fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        query_opt(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
            [id],
            decode_task,
        )
    }

    /// One page of tasks matching `filter`, newest (highest `seq`) first.
    pub fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        let mut w = task_filter(filter);
        let clause = w.sql();
        let limit = w.param(sql_limit(filter.limit));
        let offset = w.param(i64::from(filter.offset));
        query_all(
            &self.conn(),
            &format!(
                "SELECT {COLUMNS} FROM tasks{clause} ORDER BY seq DESC \
                 LIMIT {limit} OFFSET {offset}"
            ),
            w.params(),
            decode_task,
        )
    }

    /// How many tasks match `filter` (ignoring its `limit` and `offset`), for paging.
    pub fn count_tasks(&self, filter: &TaskFilter) -> Result<u64> {
        let w = task_filter(filter);
        let count = self
            .conn()
            .prepare_cached(&format!("SELECT COUNT(*) FROM tasks{}", w.sql()))?
            .query_row(w.params(), |row| row.get(0))?;
        Ok(count)
    }

    /// Claims the next task to run, if any is eligible at `now_ms`: the queued task with
    /// `not_before <= now_ms`, the highest priority, and the lowest `seq` within that
    /// priority. It becomes `running` with `started_at = now_ms` and `attempt + 1`.
    /// Exclusive: concurrent callers (threads or processes) never get the same task.
    pub fn claim_next_task(&self, now_ms: i64) -> Result<Option<TaskRecord>> {
        self.claim(
            &format!(
                "UPDATE tasks SET state = ?1, started_at = ?3, attempt = attempt + 1 \
                 WHERE seq = (SELECT seq FROM tasks WHERE state = ?2 AND not_before <= ?3 \
                              ORDER BY priority DESC, seq LIMIT 1) \
                 RETURNING {COLUMNS}"
            ),
            params![TaskState::Running.as_str(), TaskState::Queued.as_str(), now_ms],
        )
    }

    /// Claims task `id` like [`Store::claim_next_task`] does, but only if it is still queued
    /// (regardless of `not_before`); `None` if it is not queued or does not exist.
    pub fn claim_task(&self, id: &str, now_ms: i64) -> Result<Option<TaskRecord>> {
        self.claim(
            &format!(
                "UPDATE tasks SET state = ?1, started_at = ?3, attempt = attempt + 1 \
                 WHERE id = ?4 AND state = ?2 \
                 RETURNING {COLUMNS}"
            ),
            params![TaskState::Running.as_str(), TaskState::Queued.as_str(), now_ms, id],
        )
    }

    fn claim(&self, sql: &str, params: impl Params) -> Result<Option<TaskRecord>> {
        let mut conn = self.conn();
        // IMMEDIATE takes the write lock before reading, so no other connection can claim
        // between our SELECT and UPDATE (and WAL cannot hand us a stale snapshot to upgrade).
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let claimed = query_opt(&tx, sql, params, decode_task)?;
        tx.commit()?;
        Ok(claimed)
    }

    /// Records the final outcome of a task and sets `finished_at = now_ms`. Returns
    /// `Ok(false)` and changes nothing if the task had already finished: the first outcome
    /// wins. `NotFound` if there is no such task.
    ///
    /// # Panics
    ///
    /// If `state` is not a finished state (use [`Store::requeue_task`] to go back to queued).
    pub fn finish_task(
        &self,
        id: &str,
        state: TaskState,
        exit_code: Option<i64>,
        error: Option<&str>,
        result_json: Option<&str>,
        now_ms: i64,
    ) -> Result<bool> {
        assert!(state.is_finished(), "finish_task({id}) with unfinished state {state}");
        self.update_task_if(
            id,
            |current| !current.is_finished(),
            "UPDATE tasks SET state = ?2, exit_code = ?3, error = ?4, result_json = ?5, \
             finished_at = ?6 WHERE id = ?1",
            params![id, state.as_str(), exit_code, error, result_json, now_ms],
        )
    }

    /// Puts a running task back in the queue for an infrastructure retry, eligible again at
    /// `not_before`. Clears `started_at` and `workspace_id` (they describe an attempt) and
    /// records `error` as the reason; `attempt` and `commands_started` are kept. Returns
    /// `Ok(false)` if the task is not running. `NotFound` if there is no such task.
    pub fn requeue_task(&self, id: &str, not_before: i64, error: Option<&str>) -> Result<bool> {
        self.update_task_if(
            id,
            |current| current == TaskState::Running,
            "UPDATE tasks SET state = ?2, not_before = ?3, error = ?4, started_at = NULL, \
             workspace_id = NULL WHERE id = ?1",
            params![id, TaskState::Queued.as_str(), not_before, error],
        )
    }

    /// Records the workspace the running attempt uses. Returns `Ok(false)` if the task is
    /// not running (e.g. it was cancelled meanwhile). `NotFound` if there is no such task.
    pub fn set_task_workspace(&self, id: &str, workspace_id: &str) -> Result<bool> {
        self.update_task_if(
            id,
            |current| current == TaskState::Running,
            "UPDATE tasks SET workspace_id = ?2 WHERE id = ?1",
            params![id, workspace_id],
        )
    }

    /// Counts a command as started; call it before the command is sent to the workspace, so
    /// crash recovery knows whether anything may have run. Returns `Ok(false)` if the task is
    /// not running (the caller should not start the command). `NotFound` if there is no such
    /// task.
    pub fn mark_command_started(&self, id: &str) -> Result<bool> {
        self.update_task_if(
            id,
            |current| current == TaskState::Running,
            "UPDATE tasks SET commands_started = commands_started + 1 WHERE id = ?1",
            [id],
        )
    }

    /// Cancels a task that has not started: `queued` → `cancelled` with `finished_at =
    /// now_ms`, atomically with respect to claims. Returns `Ok(false)` if it was not queued
    /// (a running task must be stopped by its worker). `NotFound` if there is no such task.
    pub fn cancel_queued_task(&self, id: &str, now_ms: i64) -> Result<bool> {
        self.update_task_if(
            id,
            |current| current == TaskState::Queued,
            "UPDATE tasks SET state = ?2, finished_at = ?3 WHERE id = ?1",
            params![id, TaskState::Cancelled.as_str(), now_ms],
        )
    }

    /// Runs `sql` (an `UPDATE ... WHERE id = ?1`) only if the task's current state passes
    /// `allowed`, in one immediate transaction. `Ok(false)` if refused.
    fn update_task_if(
        &self,
        id: &str,
        allowed: impl FnOnce(TaskState) -> bool,
        sql: &str,
        params: impl Params,
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = query_opt(&tx, "SELECT state FROM tasks WHERE id = ?1", [id], |row| {
            Decoder::new(row, format!("tasks row '{id}'")).parse::<TaskState>("state")
        })?
        .ok_or_else(|| StoreError::NotFound {
            what: task_not_found(id)(),
        })?;
        if !allowed(current) {
            return Ok(false);
        }
        tx.prepare_cached(sql)?.execute(params)?;
        tx.commit()?;
        Ok(true)
    }

    /// All running tasks, oldest first: after a restart these are the ones whose worker died.
    pub fn running_tasks(&self) -> Result<Vec<TaskRecord>> {
        query_all(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM tasks WHERE state = ?1 ORDER BY seq"),
            [TaskState::Running.as_str()],
            decode_task,
        )
    }

    /// Number of queued tasks, including those waiting for a retry delay.
    pub fn queue_depth(&self) -> Result<u64> {
        let depth = self
            .conn()
            .prepare_cached("SELECT COUNT(*) FROM tasks WHERE state = ?1")?
            .query_row([TaskState::Queued.as_str()], |row| row.get(0))?;
        Ok(depth)
    }

    /// The number of tasks in every state, in [`TaskState::ALL`] order, zeros included.
    pub fn count_tasks_by_state(&self) -> Result<Vec<(TaskState, u64)>> {
        let counts = query_all(
            &self.conn(),
            "SELECT state, COUNT(*) AS n FROM tasks GROUP BY state",
            [],
            |row| {
                let d = Decoder::new(row, "tasks".to_owned());
                Ok((d.parse::<TaskState>("state")?, d.get::<u64>("n")?))
            },
        )?;
        Ok(TaskState::ALL
            .iter()
            .map(|&state| {
                let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |c| c.1);
                (state, n)
            })
            .collect())
    }

    /// Stores the result of one command, replacing an earlier result for the same task,
    /// phase and index. `NotFound` if the task does not exist.
    pub fn put_command_result(&self, result: &CommandResult) -> Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO task_commands (task_id, phase, idx, command, exit_code, stdout, \
                 stderr, duration_ms, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (task_id, phase, idx) DO UPDATE SET command = excluded.command, \
                 exit_code = excluded.exit_code, stdout = excluded.stdout, \
                 stderr = excluded.stderr, duration_ms = excluded.duration_ms, \
                 started_at = excluded.started_at",
            )?
            .execute(params![
                result.task_id,
                result.phase,
                result.idx,
                result.command,
                result.exit_code,
                result.stdout,
                result.stderr,
                result.duration_ms,
                result.started_at,
            ])
            .map_err(|e| parent_missing(e, task_not_found(&result.task_id)))?;
        Ok(())
    }

    /// The task's command results in execution order: `pre`, `main`, `post`, then index.
    pub fn command_results(&self, task_id: &str) -> Result<Vec<CommandResult>> {
        query_all(
            &self.conn(),
            "SELECT task_id, phase, idx, command, exit_code, stdout, stderr, duration_ms, \
             started_at FROM task_commands WHERE task_id = ?1 \
             ORDER BY CASE phase WHEN 'pre' THEN 0 WHEN 'main' THEN 1 ELSE 2 END, idx",
            [task_id],
            decode_command,
        )
    }

    /// Appends a chunk to the task's log and returns its `seq`. `stream` must be `stdout`,
    /// `stderr` or `system` (a `CHECK` constraint). `NotFound` if the task does not exist.
    pub fn append_log(&self, task_id: &str, stream: &str, data: &str, now_ms: i64) -> Result<i64> {
        let conn = self.conn();
        conn.prepare_cached("INSERT INTO task_logs (task_id, stream, data, at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![task_id, stream, data, now_ms])
            .map_err(|e| parent_missing(e, task_not_found(task_id)))?;
        Ok(conn.last_insert_rowid())
    }

    /// Up to `limit` (0 = all) chunks of the task's log with `seq > after_seq`, in order.
    /// Start with `after_seq = 0`; continue from the last chunk's `seq`.
    pub fn read_log(&self, task_id: &str, after_seq: i64, limit: u32) -> Result<Vec<LogChunk>> {
        query_all(
            &self.conn(),
            "SELECT seq, stream, data, at FROM task_logs WHERE task_id = ?1 AND seq > ?2 \
             ORDER BY seq LIMIT ?3",
            params![task_id, after_seq, sql_limit(limit)],
            decode_log,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Barrier;

    use super::*;
    use crate::test_util::file_store;

    fn new_task(id: &str, priority: u8, created_at: i64) -> NewTask {
        NewTask {
            id: id.to_owned(),
            batch_id: None,
            agent_id: None,
            environment: "python".to_owned(),
            spec_json: format!(r#"{{"commands":["echo {id}"]}}"#),
            priority,
            created_at,
        }
    }

    fn claim_ids(store: &Store, now_ms: i64) -> Vec<String> {
        std::iter::from_fn(|| store.claim_next_task(now_ms).unwrap())
            .map(|t| t.id)
            .collect()
    }

    fn expect_not_found<T: std::fmt::Debug>(r: Result<T>, id: &str) {
        match r {
            Err(StoreError::NotFound { what }) => assert_eq!(what, format!("task '{id}'")),
            other => panic!("expected NotFound for {id}, got {other:?}"),
        }
    }

    #[test]
    fn insert_assigns_increasing_seq_and_queued_defaults() {
        let (_dir, store) = file_store();
        let mut t = new_task("t1", 5, 1_000);
        t.batch_id = Some("b1".into());
        t.agent_id = Some("a1".into());
        let inserted = store.insert_tasks(&[t.clone(), new_task("t2", 5, 1_001)]).unwrap();
        assert_eq!(inserted.len(), 2);
        assert!(inserted[0].seq < inserted[1].seq);
        let first = &inserted[0];
        assert_eq!(
            first,
            &TaskRecord {
                id: "t1".into(),
                seq: first.seq,
                batch_id: Some("b1".into()),
                agent_id: Some("a1".into()),
                environment: "python".into(),
                spec_json: t.spec_json.clone(),
                priority: 5,
                state: TaskState::Queued,
                attempt: 0,
                workspace_id: None,
                exit_code: None,
                error: None,
                result_json: None,
                created_at: 1_000,
                started_at: None,
                finished_at: None,
                not_before: 1_000,
                commands_started: 0,
            }
        );
        assert_eq!(store.get_task("t1").unwrap().as_ref(), Some(first));
        assert_eq!(store.get_task("missing").unwrap(), None);
        assert_eq!(store.insert_tasks(&[]).unwrap(), vec![]);
    }

    #[test]
    fn claims_by_priority_then_fifo() {
        let (_dir, store) = file_store();
        store
            .insert_tasks(&[
                new_task("low", 1, 1),
                new_task("mid-a", 5, 2),
                new_task("high-a", 9, 3),
                new_task("mid-b", 5, 4),
                new_task("high-b", 9, 5),
                new_task("top", 10, 6),
            ])
            .unwrap();
        assert_eq!(
            claim_ids(&store, 100),
            ["top", "high-a", "high-b", "mid-a", "mid-b", "low"]
        );
    }

    #[test]
    fn claim_marks_running_and_counts_the_attempt() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("t1", 5, 10)]).unwrap();
        let claimed = store.claim_next_task(50).unwrap().unwrap();
        assert_eq!(claimed.id, "t1");
        assert_eq!(claimed.state, TaskState::Running);
        assert_eq!(claimed.started_at, Some(50));
        assert_eq!(claimed.attempt, 1);
        assert_eq!(store.get_task("t1").unwrap(), Some(claimed));
        assert_eq!(store.claim_next_task(60).unwrap(), None);
    }

    #[test]
    fn not_before_is_respected() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_tasks(&[new_task("urgent", 10, 100), new_task("normal", 5, 100)])
            .unwrap();
        // A fresh task is eligible from its creation time on.
        assert_eq!(store.claim_next_task(99).unwrap(), None);
        assert_eq!(store.claim_next_task(100).unwrap().unwrap().id, "urgent");
        assert!(store.requeue_task("urgent", 5_000, Some("engine unavailable")).unwrap());
        // The delayed high-priority task is skipped, not waited for.
        assert_eq!(store.claim_next_task(4_999).unwrap().unwrap().id, "normal");
        assert_eq!(store.claim_next_task(4_999).unwrap(), None);
        assert_eq!(store.claim_next_task(5_000).unwrap().unwrap().id, "urgent");
    }

    #[test]
    fn claim_task_takes_only_a_queued_task() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_tasks(&[new_task("t1", 1, 10), new_task("t2", 9, 10)])
            .unwrap();
        // Ignores priority order and not_before: it is about this one task.
        let claimed = store.claim_task("t1", 5).unwrap().unwrap();
        assert_eq!(
            (claimed.id.as_str(), claimed.state, claimed.attempt),
            ("t1", TaskState::Running, 1)
        );
        assert_eq!(store.claim_task("t1", 6).unwrap(), None);
        assert_eq!(store.claim_task("missing", 6).unwrap(), None);
        assert_eq!(claim_ids(&store, 10), ["t2"]);
    }

    fn insert_many(store: &Store, n: usize) -> HashSet<String> {
        let tasks: Vec<NewTask> = (0..n)
            .map(|i| new_task(&format!("t{i:03}"), (i % 10 + 1) as u8, 1))
            .collect();
        store.insert_tasks(&tasks).unwrap();
        tasks.into_iter().map(|t| t.id).collect()
    }

    fn assert_disjoint_cover(per_worker: Vec<Vec<String>>, expected: &HashSet<String>) {
        let total: usize = per_worker.iter().map(Vec::len).sum();
        let unique: HashSet<String> = per_worker.into_iter().flatten().collect();
        assert_eq!(total, expected.len(), "a task was claimed twice");
        assert_eq!(&unique, expected);
    }

    #[test]
    fn concurrent_claims_on_one_store_are_exclusive() {
        let (_dir, store) = file_store();
        let expected = insert_many(&store, 200);
        let barrier = Barrier::new(8);
        let per_worker = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        claim_ids(&store, 10)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
        });
        assert_disjoint_cover(per_worker, &expected);
        assert_eq!(store.running_tasks().unwrap().len(), 200);
        assert!(store.running_tasks().unwrap().iter().all(|t| t.attempt == 1));
    }

    #[test]
    fn concurrent_claims_from_two_connections_are_exclusive() {
        let (dir, store) = file_store();
        let expected = insert_many(&store, 300);
        let path = dir.path().join("conductor.db");
        let other = Store::open(&path).unwrap();
        let barrier = Barrier::new(2);
        let per_worker = std::thread::scope(|s| {
            let a = s.spawn(|| {
                barrier.wait();
                claim_ids(&store, 10)
            });
            let b = s.spawn(|| {
                barrier.wait();
                claim_ids(&other, 10)
            });
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        assert_disjoint_cover(per_worker, &expected);
    }

    #[test]
    fn finish_is_final() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        store.claim_next_task(2).unwrap().unwrap();
        assert!(store.set_task_workspace("t1", "ws-1").unwrap());
        assert!(store.mark_command_started("t1").unwrap());
        assert!(store
            .finish_task("t1", TaskState::Succeeded, Some(0), None, Some(r#"{"ok":true}"#), 9)
            .unwrap());
        let done = store.get_task("t1").unwrap().unwrap();
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(done.exit_code, Some(0));
        assert_eq!(done.result_json.as_deref(), Some(r#"{"ok":true}"#));
        assert_eq!(done.finished_at, Some(9));
        assert_eq!(done.workspace_id.as_deref(), Some("ws-1"));
        assert_eq!(done.commands_started, 1);

        // Nothing can change it any more.
        assert!(!store
            .finish_task("t1", TaskState::TimedOut, None, Some("late timeout"), None, 20)
            .unwrap());
        assert!(!store.requeue_task("t1", 30, Some("retry")).unwrap());
        assert!(!store.cancel_queued_task("t1", 40).unwrap());
        assert!(!store.set_task_workspace("t1", "ws-2").unwrap());
        assert!(!store.mark_command_started("t1").unwrap());
        assert_eq!(store.claim_task("t1", 50).unwrap(), None);
        assert_eq!(store.get_task("t1").unwrap().unwrap(), done);

        expect_not_found(
            store.finish_task("ghost", TaskState::Failed, None, None, None, 1),
            "ghost",
        );
    }

    #[test]
    #[should_panic(expected = "unfinished state running")]
    fn finish_with_an_unfinished_state_panics() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        let _ = store.finish_task("t1", TaskState::Running, None, None, None, 2);
    }

    #[test]
    fn requeue_returns_a_running_task_to_the_queue() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        assert!(!store.requeue_task("t1", 10, None).unwrap(), "not running yet");
        store.claim_next_task(2).unwrap().unwrap();
        store.set_task_workspace("t1", "ws-1").unwrap();
        assert!(store.requeue_task("t1", 10, Some("podman restarted")).unwrap());
        let queued = store.get_task("t1").unwrap().unwrap();
        assert_eq!(queued.state, TaskState::Queued);
        assert_eq!(queued.attempt, 1);
        assert_eq!(queued.not_before, 10);
        assert_eq!(queued.started_at, None);
        assert_eq!(queued.workspace_id, None);
        assert_eq!(queued.error.as_deref(), Some("podman restarted"));

        let again = store.claim_next_task(10).unwrap().unwrap();
        assert_eq!((again.attempt, again.started_at), (2, Some(10)));
        expect_not_found(store.requeue_task("ghost", 1, None), "ghost");
    }

    #[test]
    fn cancel_only_affects_queued_tasks() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("q", 5, 1), new_task("r", 9, 1)]).unwrap();
        assert_eq!(store.claim_next_task(2).unwrap().unwrap().id, "r");

        assert!(store.cancel_queued_task("q", 7).unwrap());
        let cancelled = store.get_task("q").unwrap().unwrap();
        assert_eq!(cancelled.state, TaskState::Cancelled);
        assert_eq!(cancelled.finished_at, Some(7));
        assert!(!store.cancel_queued_task("q", 8).unwrap());
        assert_eq!(store.claim_next_task(9).unwrap(), None);

        assert!(!store.cancel_queued_task("r", 8).unwrap());
        assert_eq!(store.get_task("r").unwrap().unwrap().state, TaskState::Running);
        expect_not_found(store.cancel_queued_task("ghost", 1), "ghost");
    }

    #[test]
    fn task_updates_of_missing_rows_are_not_found() {
        let store = Store::open_in_memory().unwrap();
        expect_not_found(store.set_task_workspace("ghost", "ws"), "ghost");
        expect_not_found(store.mark_command_started("ghost"), "ghost");
    }

    #[test]
    fn batch_insert_is_all_or_nothing() {
        let (_dir, store) = file_store();
        let err = store
            .insert_tasks(&[new_task("a", 5, 1), new_task("b", 5, 1), new_task("a", 5, 1)])
            .unwrap_err();
        assert!(err.is_conflict(), "{err:?}");
        assert_eq!(store.count_tasks(&TaskFilter::default()).unwrap(), 0);
        assert_eq!(store.get_task("b").unwrap(), None);

        store.insert_tasks(&[new_task("a", 5, 1)]).unwrap();
        let err = store
            .insert_tasks(&[new_task("c", 5, 1), new_task("a", 5, 1)])
            .unwrap_err();
        assert!(err.is_conflict(), "{err:?}");
        assert_eq!(store.get_task("c").unwrap(), None);

        let err = store.insert_tasks(&[new_task("d", 11, 1)]).unwrap_err();
        assert!(
            matches!(&err, StoreError::Sqlite(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)),
            "{err:?}"
        );
        assert!(!err.is_conflict());
        assert_eq!(store.count_tasks(&TaskFilter::default()).unwrap(), 1);
    }

    #[test]
    fn tasks_survive_a_crash_without_shutdown() {
        let (dir, store) = file_store();
        let path = dir.path().join("conductor.db");
        let instance = store.instance_id().unwrap();
        let inserted = store
            .insert_tasks(&[new_task("t1", 5, 1), new_task("t2", 5, 2)])
            .unwrap();
        store.claim_next_task(3).unwrap().unwrap();
        store.append_log("t1", "stdout", "hello\n", 4).unwrap();
        // Leak the connection: it is never closed, so SQLite gets no chance to checkpoint
        // the WAL into the main file, as after a `kill -9`.
        std::mem::forget(store);
        assert!(dir.path().join("conductor.db-wal").exists());

        let reopened = Store::open(&path).unwrap();
        assert_eq!(reopened.instance_id().unwrap(), instance);
        let t1 = reopened.get_task("t1").unwrap().unwrap();
        assert_eq!((t1.state, t1.attempt), (TaskState::Running, 1));
        assert_eq!(reopened.running_tasks().unwrap(), vec![t1]);
        assert_eq!(reopened.get_task("t2").unwrap().unwrap(), inserted[1].clone());
        assert_eq!(reopened.read_log("t1", 0, 0).unwrap().len(), 1);
        // seq keeps growing after a restart.
        let t3 = reopened.insert_tasks(&[new_task("t3", 5, 5)]).unwrap();
        assert!(t3[0].seq > inserted[1].seq);
    }

    #[test]
    fn unknown_state_is_corrupt_naming_the_table_and_row() {
        let (_dir, store) = file_store();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        store
            .conn()
            .execute("UPDATE tasks SET state = 'paused' WHERE id = 't1'", [])
            .unwrap();
        let check = |err: StoreError| match err {
            StoreError::Corrupt { what, detail } => {
                assert_eq!(what, "tasks row 't1', column state");
                assert!(detail.contains("\"paused\""), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        };
        check(store.get_task("t1").unwrap_err());
        check(store.list_tasks(&TaskFilter::default()).unwrap_err());
        check(
            store
                .finish_task("t1", TaskState::Failed, None, None, None, 2)
                .unwrap_err(),
        );
        assert!(matches!(
            store.count_tasks_by_state(),
            Err(StoreError::Corrupt { what, .. }) if what == "tasks, column state"
        ));
    }

    #[test]
    fn out_of_range_integer_is_corrupt() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        store
            .conn()
            .execute("UPDATE tasks SET attempt = -1 WHERE id = 't1'", [])
            .unwrap();
        match store.get_task("t1").unwrap_err() {
            StoreError::Corrupt { what, .. } => assert_eq!(what, "tasks row 't1', column attempt"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn list_filters_pages_newest_first_and_counts() {
        let store = Store::open_in_memory().unwrap();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let mut t = new_task(&format!("t{i}"), 5, i);
            t.agent_id = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
            t.batch_id = (i < 3).then(|| "b1".to_owned());
            if i == 5 {
                t.environment = "node".into();
            }
            tasks.push(t);
        }
        store.insert_tasks(&tasks).unwrap();
        store.claim_task("t4", 10).unwrap().unwrap();

        let ids = |f: &TaskFilter| -> Vec<String> { store.list_tasks(f).unwrap().into_iter().map(|t| t.id).collect() };
        let all = TaskFilter::default();
        assert_eq!(ids(&all), ["t5", "t4", "t3", "t2", "t1", "t0"]);
        assert_eq!(store.count_tasks(&all).unwrap(), 6);

        let page = TaskFilter {
            limit: 2,
            offset: 1,
            ..Default::default()
        };
        assert_eq!(ids(&page), ["t4", "t3"]);
        assert_eq!(store.count_tasks(&page).unwrap(), 6, "paging ignored");

        let even = TaskFilter {
            agent_id: Some("even".into()),
            ..Default::default()
        };
        assert_eq!(ids(&even), ["t4", "t2", "t0"]);
        let batch = TaskFilter {
            batch_id: Some("b1".into()),
            ..Default::default()
        };
        assert_eq!(ids(&batch), ["t2", "t1", "t0"]);
        let node = TaskFilter {
            environment: Some("node".into()),
            ..Default::default()
        };
        assert_eq!(ids(&node), ["t5"]);
        let running_even = TaskFilter {
            states: vec![TaskState::Running],
            agent_id: Some("even".into()),
            ..Default::default()
        };
        assert_eq!(ids(&running_even), ["t4"]);
        assert_eq!(store.count_tasks(&running_even).unwrap(), 1);
        let queued_or_running = TaskFilter {
            states: vec![TaskState::Queued, TaskState::Running],
            batch_id: Some("b1".into()),
            ..Default::default()
        };
        assert_eq!(store.count_tasks(&queued_or_running).unwrap(), 3);
    }

    #[test]
    fn state_counts_queue_depth_and_running_tasks() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_tasks(&[
                new_task("a", 9, 1),
                new_task("b", 8, 1),
                new_task("c", 7, 1),
                new_task("d", 6, 1),
            ])
            .unwrap();
        store.claim_next_task(2).unwrap();
        store.claim_next_task(2).unwrap();
        store
            .finish_task("b", TaskState::Failed, Some(1), Some("exit 1"), None, 3)
            .unwrap();
        store.cancel_queued_task("d", 3).unwrap();

        assert_eq!(store.queue_depth().unwrap(), 1);
        let running: Vec<String> = store.running_tasks().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(running, ["a"]);
        assert_eq!(
            store.count_tasks_by_state().unwrap(),
            vec![
                (TaskState::Queued, 1),
                (TaskState::Running, 1),
                (TaskState::Succeeded, 0),
                (TaskState::Failed, 1),
                (TaskState::TimedOut, 0),
                (TaskState::Cancelled, 1),
            ]
        );
    }

    fn command(task_id: &str, phase: &str, idx: u32, exit_code: Option<i64>) -> CommandResult {
        CommandResult {
            task_id: task_id.to_owned(),
            idx,
            phase: phase.to_owned(),
            command: format!("{phase}-{idx}"),
            exit_code,
            stdout: "out".to_owned(),
            stderr: String::new(),
            duration_ms: 12,
            started_at: 100,
        }
    }

    #[test]
    fn command_results_are_ordered_by_phase_then_index_and_upserted() {
        let (_dir, store) = file_store();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        for (phase, idx) in [("post", 0), ("main", 1), ("pre", 0), ("main", 0), ("pre", 1)] {
            store.put_command_result(&command("t1", phase, idx, None)).unwrap();
        }
        // Upsert: the final result replaces the in-progress one.
        let mut done = command("t1", "main", 1, Some(3));
        done.stderr = "boom".into();
        done.duration_ms = 4_000;
        store.put_command_result(&done).unwrap();

        let results = store.command_results("t1").unwrap();
        let order: Vec<String> = results.iter().map(|r| r.command.clone()).collect();
        assert_eq!(order, ["pre-0", "pre-1", "main-0", "main-1", "post-0"]);
        assert_eq!(results[3], done);
        assert_eq!(store.command_results("other").unwrap(), vec![]);

        let err = store.put_command_result(&command("t1", "during", 0, None)).unwrap_err();
        assert!(
            matches!(&err, StoreError::Sqlite(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)),
            "{err:?}"
        );
        expect_not_found(store.put_command_result(&command("ghost", "main", 0, None)), "ghost");
    }

    #[test]
    fn log_is_read_in_order_after_a_cursor() {
        let (_dir, store) = file_store();
        store
            .insert_tasks(&[new_task("t1", 5, 1), new_task("t2", 5, 1)])
            .unwrap();
        let s1 = store.append_log("t1", "system", "starting\n", 10).unwrap();
        let other = store.append_log("t2", "stdout", "not mine\n", 11).unwrap();
        let s2 = store.append_log("t1", "stdout", "hello\n", 12).unwrap();
        let s3 = store.append_log("t1", "stderr", "oops\n", 13).unwrap();
        assert!(s1 < other && other < s2 && s2 < s3);

        let all = store.read_log("t1", 0, 0).unwrap();
        assert_eq!(
            all,
            vec![
                LogChunk {
                    seq: s1,
                    stream: "system".into(),
                    data: "starting\n".into(),
                    at: 10
                },
                LogChunk {
                    seq: s2,
                    stream: "stdout".into(),
                    data: "hello\n".into(),
                    at: 12
                },
                LogChunk {
                    seq: s3,
                    stream: "stderr".into(),
                    data: "oops\n".into(),
                    at: 13
                },
            ]
        );
        let after_first: Vec<i64> = store.read_log("t1", s1, 0).unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(after_first, [s2, s3]);
        let one: Vec<i64> = store.read_log("t1", s1, 1).unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(one, [s2]);
        assert_eq!(store.read_log("t1", s3, 0).unwrap(), vec![]);

        let err = store.append_log("t1", "stdin", "x", 14).unwrap_err();
        assert!(
            matches!(&err, StoreError::Sqlite(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)),
            "{err:?}"
        );
        expect_not_found(store.append_log("ghost", "stdout", "x", 14), "ghost");
    }

    #[test]
    fn deleting_a_task_cascades_to_its_commands_and_log() {
        let store = Store::open_in_memory().unwrap();
        store.insert_tasks(&[new_task("t1", 5, 1)]).unwrap();
        store.put_command_result(&command("t1", "main", 0, Some(0))).unwrap();
        store.append_log("t1", "stdout", "x", 2).unwrap();
        store.conn().execute("DELETE FROM tasks WHERE id = 't1'", []).unwrap();
        assert_eq!(store.command_results("t1").unwrap(), vec![]);
        assert_eq!(store.read_log("t1", 0, 0).unwrap(), vec![]);
    }
}
