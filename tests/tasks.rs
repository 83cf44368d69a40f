//! Tasks against real Podman: the orchestrator's queue, priorities, parallelism, timeouts,
//! cancellation, retries, crash recovery, isolation modes, `source`, hooks, live logs and
//! sidecar services.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{quiet, TestEnv};
use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_core::naming;
use conductor_core::task::TaskSpec;
use conductor_service::exec::ExecRequest;
use conductor_service::tasks::{LogEvent, Orchestrator, TaskListFilter, TaskView};
use conductor_service::workspaces::CreateRequest;
use conductor_service::{Conductor, ServiceError};
use conductor_store::NewTask;

/// A conductor shared with an orchestrator; cleans up like [`TestEnv`] after stopping it.
struct TaskEnv {
    orchestrator: Option<Orchestrator>,
    c: Arc<Conductor>,
    _t: TestEnv,
}

impl TaskEnv {
    /// A conductor with small volumes, no retry delay, `workers` workers, isolation `mode`
    /// and `extra` top-level YAML.
    async fn new(mode: &str, workers: u32, extra: &str) -> TaskEnv {
        Self::with_config(&format!(
            "isolated_workspace:\n  mode: {mode}\n  agent_containers:\n    volume_size: 256Mi\ntask_execution:\n  max_workers: {workers}\n  retry_delay: 0\n  max_retries: 2\n{extra}"
        ))
        .await
    }

    async fn with_config(yaml: &str) -> TaskEnv {
        let mut t = TestEnv::new(yaml).await;
        let c = Arc::new(t.conductor.take().expect("conductor"));
        TaskEnv {
            orchestrator: None,
            c,
            _t: t,
        }
    }

    fn start(&mut self) {
        self.orchestrator = Some(Orchestrator::start(self.c.clone()));
    }

    async fn submit(&self, specs: Vec<TaskSpec>) -> Vec<TaskView> {
        self.c.submit_tasks(specs).expect("submit")
    }

    async fn run(&self, spec: TaskSpec) -> TaskView {
        let id = self.submit(vec![spec]).await.remove(0).id;
        self.wait(&id).await
    }

    async fn wait(&self, id: &str) -> TaskView {
        tokio::time::timeout(Duration::from_secs(600), self.c.wait_task(id))
            .await
            .expect("task did not finish in 10 minutes")
            .expect("wait")
    }

    /// Waits until the task has started a main command.
    async fn wait_running(&self, id: &str) -> TaskView {
        let begin = Instant::now();
        loop {
            let v = self.c.get_task(id).unwrap();
            if v.status == TaskState::Running && v.commands.iter().any(|c| c.phase == "main") {
                return v;
            }
            assert!(!v.status.is_finished(), "{v:?}");
            assert!(begin.elapsed() < Duration::from_secs(300), "never ran: {v:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Containers of this conductor carrying the task's label.
    async fn task_containers(&self, task_id: &str) -> Vec<String> {
        self.c
            .engine
            .container_list(&[
                (naming::LABEL_INSTANCE, Some(self.c.instance.as_str())),
                (naming::LABEL_TASK, Some(task_id)),
            ])
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }
}

impl Drop for TaskEnv {
    fn drop(&mut self) {
        let orchestrator = self.orchestrator.take();
        let c = self.c.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                if let Some(o) = orchestrator {
                    o.shutdown(Duration::from_secs(5)).await;
                }
                let all = c
                    .list_workspaces(&conductor_service::workspaces::ListFilter::default())
                    .unwrap_or_default();
                for w in all {
                    let _ = c.remove_workspace(&w.id, Some(false)).await;
                }
                let _ = c.reconcile().await;
            })
        });
    }
}

fn spec(environment: &str, commands: &[&str]) -> TaskSpec {
    TaskSpec::new(environment, commands.iter().map(|c| c.to_string()).collect())
}

async fn sh(c: &Conductor, workspace: &str, cmd: &str) -> String {
    let (o, out, err) = c.exec_collect(workspace, ExecRequest::new(cmd)).await.expect("exec");
    assert_eq!(o.exit_code, 0, "{cmd}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_tests_run_on_a_copied_source() {
    let mut env = TaskEnv::new("sandbox", 2, "").await;
    env.start();
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir(project.path().join("tests")).unwrap();
    std::fs::write(project.path().join("calc.py"), "def add(a, b):\n    return a + b\n").unwrap();
    std::fs::write(
        project.path().join("tests/test_calc.py"),
        "import sys, os\nsys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))\nfrom calc import add\n\ndef test_add():\n    assert add(2, 3) == 5\n",
    )
    .unwrap();

    // The spec's example, with a project, and as written (no source: nothing to test).
    let mut with_source = spec("python-dev", &["cd /workspace/src", "python -m pytest tests/"]);
    with_source.description = Some("Run Python tests".into());
    with_source.source = Some(project.path().display().to_string());
    let without = spec("python-dev", &["cd /workspace/src", "python -m pytest tests/"]);
    let queued = env.submit(vec![with_source, without]).await;
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|t| t.status == TaskState::Queued));
    assert!(queued[0].batch_id.is_some() && queued[0].batch_id == queued[1].batch_id);

    let ok = env.wait(&queued[0].id).await;
    assert_eq!(ok.status, TaskState::Succeeded, "{ok:#?}");
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.commands.len(), 2);
    assert_eq!(ok.commands[1].command, "python -m pytest tests/");
    assert_eq!(ok.commands[1].exit_code, Some(0));
    assert!(ok.commands[1].stdout.contains("1 passed"), "{}", ok.commands[1].stdout);
    assert!(ok.duration_ms.is_some() && ok.started_at.is_some() && ok.finished_at.is_some());
    assert_eq!(ok.description.as_deref(), Some("Run Python tests"));
    let ws = ok.workspace_id.clone().unwrap();
    // Sandbox workspaces are destroyed (just after the outcome is recorded).
    common::wait_removed(&env.c, &ws).await;
    let log: String = env
        .c
        .read_task_log(&ok.id, 0)
        .unwrap()
        .into_iter()
        .map(|(_, _, data)| data)
        .collect();
    assert!(log.contains("$ python -m pytest tests/"), "{log}");
    assert!(log.contains("1 passed"), "{log}");

    let empty = env.wait(&queued[1].id).await;
    assert_eq!(empty.status, TaskState::Failed, "{empty:#?}");
    assert_eq!(
        empty.commands[0].exit_code,
        Some(0),
        "/workspace/src exists without a source"
    );
    assert_eq!(empty.exit_code, Some(4), "pytest: the tests/ directory is not there");
    assert!(
        empty.error.as_deref().unwrap().contains("commands[1]"),
        "{:?}",
        empty.error
    );

    // Validation names the field, with the position in a batch.
    let mut bad = spec("python-dev", &["true"]);
    bad.env.insert("BAD-NAME".into(), "x".into());
    match env.c.submit_tasks(vec![bad.clone()]) {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "env.BAD-NAME"),
        other => panic!("{other:?}"),
    }
    match env.c.submit_tasks(vec![spec("minimal", &["true"]), bad]) {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "tasks[1].env.BAD-NAME"),
        other => panic!("{other:?}"),
    }
    let mut missing = spec("python-dev", &["true"]);
    missing.source = Some("/nonexistent/project".into());
    match env.c.submit_tasks(vec![missing]) {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "source"),
        other => panic!("{other:?}"),
    }
    let (all, total) = env.c.list_tasks(&TaskListFilter::default()).unwrap();
    assert_eq!((all.len(), total), (2, 2), "rejected submissions leave nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_share_one_shell_session_and_stop_at_the_first_failure() {
    let mut env = TaskEnv::new(
        "sandbox",
        1,
        "container_lifecycle:\n  pre_task: [\"export FROM_PRE=pre\"]\n  post_task: [\"echo post ran\"]\n",
    )
    .await;
    env.start();
    let mut s = spec(
        "minimal",
        &[
            "cd /tmp",
            "export X=1",
            "pwd; echo $X; echo $FROM_PRE $GREETING",
            "echo to stderr >&2; false",
            "echo never",
        ],
    );
    s.env.insert("GREETING".into(), "hi there".into());
    let id = env.submit(vec![s]).await.remove(0).id;
    let mut follow = env.c.follow_task_log(&id, 0).unwrap();
    let mut live = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(300), follow.recv())
        .await
        .expect("log stream stalled")
    {
        live.push(ev);
    }
    let v = env.c.get_task(&id).unwrap();
    assert_eq!(v.status, TaskState::Failed, "{v:#?}");
    assert_eq!(v.exit_code, Some(1));
    let phases: Vec<(&str, u32)> = v.commands.iter().map(|c| (c.phase.as_str(), c.index)).collect();
    assert_eq!(
        phases,
        [
            ("pre", 0),
            ("main", 0),
            ("main", 1),
            ("main", 2),
            ("main", 3),
            ("post", 0)
        ],
        "the fifth command never runs; the post hook does"
    );
    assert_eq!(v.commands[3].stdout, "/tmp\n1\npre hi there\n");
    assert_eq!(v.commands[4].stderr, "to stderr\n");
    assert_eq!(v.commands[4].exit_code, Some(1));
    assert_eq!(v.commands[5].stdout, "post ran\n");
    assert!(v.error.as_deref().unwrap().contains("commands[3]"), "{:?}", v.error);

    // The live stream carried the output and ended with the outcome.
    assert_eq!(
        live.last(),
        Some(&LogEvent::End {
            status: TaskState::Failed
        })
    );
    let text: String = live
        .iter()
        .filter_map(|e| match e {
            LogEvent::Output { stream, data, .. } if stream == "stdout" => Some(data.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "/tmp\n1\npre hi there\npost ran\n");
    // A replay from a cursor gives what follows it.
    let all = env.c.read_task_log(&id, 0).unwrap();
    let mid = all[all.len() / 2].0;
    let rest = env.c.read_task_log(&id, mid).unwrap();
    assert_eq!(rest.len(), all.len() - all.len() / 2 - 1);

    let m = env.c.task_metrics().unwrap();
    assert!(m.tasks_by_state.contains(&(TaskState::Failed, 1)), "{m:?}");
    assert_eq!(m.durations.count, 1);
    assert_eq!(m.queue_depth, 0);
}

/// Through the agent a task's commands run in one long-lived shell: `cd`, exports,
/// functions carry over and no shell is spawned between commands (`$$` stays the same; the
/// Podman fallback would show a new one per command). The session ends with the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_in_one_long_lived_shell_through_the_agent() {
    let mut env = TaskEnv::new("shared", 1, "").await;
    env.start();
    let mut s = spec(
        "minimal",
        &[
            "cd /tmp",
            "export X=1",
            "pwd",
            "echo $X",
            "greet() { echo hi $1; }; echo $$",
            "greet you; echo $$",
            "sleep 305 &",
        ],
    );
    s.agent_id = Some("sess".into());
    let v = env.run(s).await;
    assert_eq!(v.status, TaskState::Succeeded, "{v:#?}");
    let out: Vec<&str> = v.commands.iter().map(|c| c.stdout.as_str()).collect();
    assert_eq!(out[2..4], ["/tmp\n", "1\n"]);
    let pid = out[4].trim();
    assert!(pid.parse::<u32>().is_ok(), "{out:?}");
    assert_eq!(out[5], format!("hi you\n{pid}\n"), "the same shell ran both commands");

    // The task's session ended with it: its background job is gone, and so are its files.
    let ws = v.workspace_id.clone().unwrap();
    assert_eq!(env.c.get_workspace(&ws).unwrap().state, WorkspaceState::Running);
    let left = sh(
        &env.c,
        &ws,
        "ps -eo args | grep -c '^sleep 305' || true; ls -A /run/conductor/sessions",
    )
    .await;
    assert_eq!(left, "0\n", "left behind by the task");

    // The next task in the same workspace starts with a fresh shell.
    let mut next = spec(
        "minimal",
        &["pwd; echo \"[$X]\"; type greet >/dev/null 2>&1 || echo no greet"],
    );
    next.agent_id = Some("sess".into());
    let n = env.run(next).await;
    assert_eq!(n.status, TaskState::Succeeded, "{n:#?}");
    assert_eq!(n.workspace_id.as_deref(), Some(ws.as_str()));
    assert_eq!(n.commands[0].stdout, "/workspace\n[]\nno greet\n");
}

/// Without the agent (Podman exec) commands still share `cd` and exports through saved
/// state, each in a fresh shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_commands_share_saved_state() {
    let mut env = TaskEnv::with_config(
        "isolated_workspace:\n  mode: sandbox\n  agent_containers:\n    volume_size: 256Mi\n    agent_binary: \"\"\ntask_execution:\n  max_workers: 1\n",
    )
    .await;
    env.start();
    let v = env
        .run(spec(
            "minimal",
            &["cd /tmp", "export X=1", "pwd; echo $X; echo $$", "echo $$"],
        ))
        .await;
    assert_eq!(v.status, TaskState::Succeeded, "{v:#?}");
    let lines: Vec<&str> = v.commands[2].stdout.lines().collect();
    assert_eq!(lines[..2], ["/tmp", "1"]);
    assert_ne!(lines[2], v.commands[3].stdout.trim(), "a fresh shell per command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_reuses_the_workspace_and_a_timeout_kills_every_process() {
    let mut env = TaskEnv::new("hybrid", 2, "").await;
    env.start();
    let mut first = spec("minimal", &["echo kept > /workspace/kept"]);
    first.agent_id = Some("ag1".into());
    let first = env.run(first).await;
    assert_eq!(first.status, TaskState::Succeeded, "{first:#?}");
    assert!(first.snapshot.as_deref().unwrap().contains("ran as shared"));

    let mut slow = spec(
        "minimal",
        &["cat /workspace/kept", "sleep 301 & (setsid sleep 302 &); sleep 303"],
    );
    slow.agent_id = Some("ag1".into());
    slow.timeout = Some(3);
    let begin = Instant::now();
    let v = env.run(slow).await;
    assert_eq!(v.status, TaskState::TimedOut, "{v:#?}");
    assert_eq!(v.exit_code, Some(124));
    assert!(begin.elapsed() < Duration::from_secs(60), "{:?}", begin.elapsed());
    assert_eq!(v.commands[0].stdout, "kept\n", "same workspace, same files");
    assert_eq!(v.commands[1].exit_code, None);
    assert_eq!(v.workspace_id, first.workspace_id);
    let ws = v.workspace_id.unwrap();
    assert_eq!(env.c.get_workspace(&ws).unwrap().state, WorkspaceState::Running);
    let left = sh(&env.c, &ws, "ps -eo args | grep -c '^sleep 30[1-3]' || true").await;
    assert_eq!(left.trim(), "0", "left-over processes");
    let state = sh(&env.c, &ws, &format!("ls /tmp/.conductor/{} 2>&1 || true", v.id)).await;
    assert!(state.contains("No such file"), "{state}");
}

/// Hybrid mode with snapshot_before_task and restore_on_error: a failing task's changes are
/// rolled back, a succeeding task's are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_restores_the_workspace_after_a_failing_task() {
    let mut env = TaskEnv::new(
        "hybrid",
        1,
        "  isolation:\n    snapshot_before_task: true\n    restore_on_error: true\n",
    )
    .await;
    env.start();
    let mut good = spec("minimal", &["echo v1 > /workspace/state"]);
    good.agent_id = Some("hy1".into());
    let good = env.run(good).await;
    assert_eq!(good.status, TaskState::Succeeded, "{good:#?}");
    assert!(
        good.snapshot.as_deref().unwrap().contains("taken before the task"),
        "{good:?}"
    );

    let mut bad = spec(
        "minimal",
        &[
            "echo broken > /workspace/state && rm -f /workspace/state2 && touch /workspace/junk",
            "exit 3",
        ],
    );
    bad.agent_id = Some("hy1".into());
    let bad = env.run(bad).await;
    assert_eq!(bad.status, TaskState::Failed, "{bad:#?}");
    let note = bad.snapshot.clone().unwrap();
    assert!(note.contains("restored after the failure"), "{note}");

    let mut check = spec("minimal", &["cat /workspace/state", "test ! -e /workspace/junk"]);
    check.agent_id = Some("hy1".into());
    let check = env.run(check).await;
    assert_eq!(check.status, TaskState::Succeeded, "{check:#?}");
    assert_eq!(
        check.commands[0].stdout, "v1\n",
        "the failing task's write was rolled back"
    );
    assert_eq!(check.workspace_id, good.workspace_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_priorities_with_one_worker() {
    let mut env = TaskEnv::new("sandbox", 1, "").await;
    env.start();
    let mut blocker = spec("minimal", &["sleep 300"]);
    blocker.priority = Some(10);
    let blocker = env.submit(vec![blocker]).await.remove(0).id;
    env.wait_running(&blocker).await;

    let mut low = spec("minimal", &["true"]);
    low.priority = Some(1);
    let mut high = spec("minimal", &["true"]);
    high.priority = Some(9);
    let doomed = spec("minimal", &["echo never"]);
    let low = env.submit(vec![low]).await.remove(0).id;
    let high = env.submit(vec![high]).await.remove(0).id;
    let doomed = env.submit(vec![doomed]).await.remove(0).id;

    // Queued: cancelled at once, never runs.
    let c = env.c.cancel_task(&doomed).await.unwrap();
    assert_eq!((c.status, c.attempt), (TaskState::Cancelled, 0));
    // Running: its processes are killed and its workspace removed.
    let begin = Instant::now();
    let b = env.c.cancel_task(&blocker).await.unwrap();
    assert_eq!(b.status, TaskState::Cancelled, "{b:#?}");
    assert!(begin.elapsed() < Duration::from_secs(30), "{:?}", begin.elapsed());
    assert_eq!(b.commands[0].exit_code, None);
    let ws = b.workspace_id.unwrap();
    common::wait_removed(&env.c, &ws).await;
    assert!(env.task_containers(&blocker).await.is_empty());
    match env.c.cancel_task(&blocker).await {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("already finished"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        env.c.cancel_task("task-nope").await,
        Err(ServiceError::NotFound { .. })
    ));

    let (low, high) = (env.wait(&low).await, env.wait(&high).await);
    assert_eq!((low.status, high.status), (TaskState::Succeeded, TaskState::Succeeded));
    assert!(
        high.started_at < low.started_at,
        "higher priority first: high {:?}, low {:?}",
        high.started_at,
        low.started_at
    );
    assert_eq!(env.c.get_task(&doomed).unwrap().commands.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_different_environments_runs_in_parallel() {
    let mut env = TaskEnv::new("sandbox", 2, "").await;
    // Build the images first so that both tasks spend their time in their commands.
    for e in ["minimal", "python-dev"] {
        env.c.ensure_environment(e, quiet(), false).await.unwrap();
    }
    env.start();
    let batch = env
        .submit(vec![
            spec("python-dev", &["sleep 3", "python --version"]),
            spec("minimal", &["sleep 3", "git --version"]),
        ])
        .await;
    let a = env.wait(&batch[0].id).await;
    let b = env.wait(&batch[1].id).await;
    assert_eq!((a.status, b.status), (TaskState::Succeeded, TaskState::Succeeded));
    let (a0, a1) = (a.started_at.unwrap(), a.finished_at.unwrap());
    let (b0, b1) = (b.started_at.unwrap(), b.finished_at.unwrap());
    assert!(a0 < b1 && b0 < a1, "no overlap: a {a0}..{a1}, b {b0}..{b1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infrastructure_failures_are_retried_then_fail() {
    let mut env = TaskEnv::with_config(
        "isolated_workspace:\n  agent_containers:\n    volume_size: 256Mi\n    environments:\n      - name: broken\n        image: localhost/does-not-exist:1\ntask_execution:\n  max_workers: 1\n  retry_delay: 0\n  max_retries: 2\n",
    )
    .await;
    env.start();
    let v = env.run(spec("broken", &["true"])).await;
    assert_eq!(v.status, TaskState::Failed, "{v:#?}");
    assert_eq!(v.attempt, 3, "max_retries + 1 attempts");
    let error = v.error.unwrap();
    assert!(error.contains("localhost/does-not-exist:1"), "{error}");
    assert!(v.commands.is_empty());
    let log: String = env
        .c
        .read_task_log(&v.id, 0)
        .unwrap()
        .into_iter()
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(log.matches("retrying in 0 s").count(), 2, "{log}");
    // A command failing on its own is never retried.
    let failed = env.run(spec("minimal", &["exit 3"])).await;
    assert_eq!(
        (failed.status, failed.attempt, failed.exit_code),
        (TaskState::Failed, 1, Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_requeues_unstarted_tasks_and_fails_interrupted_ones() {
    let mut env = TaskEnv::new("sandbox", 2, "").await;
    let c = env.c.clone();
    let json = |s: &TaskSpec| serde_json::to_string(s).unwrap();
    let new = |id: &str, s: &TaskSpec| NewTask {
        id: id.into(),
        batch_id: None,
        agent_id: None,
        environment: s.environment.clone(),
        spec_json: json(s),
        priority: 5,
        created_at: conductor_service::now_ms(),
    };
    let unstarted = spec("minimal", &["echo recovered"]);
    let interrupted = spec("minimal", &["echo must not run twice"]);
    c.store
        .insert_tasks(&[
            new("task-unstarted01", &unstarted),
            new("task-interrupt01", &interrupted),
        ])
        .unwrap();
    // As a crashed process leaves them: claimed, the second with a command started and
    // its sandbox workspace still running.
    c.store.claim_task("task-unstarted01", 1).unwrap().unwrap();
    c.store.claim_task("task-interrupt01", 1).unwrap().unwrap();
    c.store.mark_command_started("task-interrupt01").unwrap();
    let ws = c
        .create_workspace(
            CreateRequest {
                agent_id: "task-interrupt".into(),
                environment: "minimal".into(),
                ephemeral: true,
                labels: [(naming::LABEL_TASK.to_string(), "task-interrupt01".to_string())].into(),
                ..Default::default()
            },
            quiet(),
        )
        .await
        .unwrap();
    c.store.set_task_workspace("task-interrupt01", &ws.id).unwrap();

    env.start();
    let again = env.wait("task-unstarted01").await;
    assert_eq!(again.status, TaskState::Succeeded, "{again:#?}");
    assert_eq!(again.attempt, 2);
    assert_eq!(again.commands[0].stdout, "recovered\n");
    let failed = env.wait("task-interrupt01").await;
    assert_eq!(failed.status, TaskState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("conductor restarted while the task was running")
    );
    assert!(failed.commands.is_empty(), "nothing ran twice");
    assert_eq!(c.get_workspace(&ws.id).unwrap().state, WorkspaceState::Removed);
    assert!(env.task_containers("task-interrupt01").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fullstack_commands_reach_postgres_and_redis() {
    let mut env = TaskEnv::new("sandbox", 1, "").await;
    env.c.build_service_images(quiet()).await.expect("service images");
    env.start();
    let mut s = spec(
        "fullstack",
        &[
            "cd /workspace",
            "redis-cli -h redis ping",
            "redis-cli -h localhost set k v >/dev/null && redis-cli -h localhost get k",
            "PGPASSWORD=postgres psql -h postgres -U postgres -tAc 'select 1'",
            "PGPASSWORD=postgres psql -h localhost -U postgres -tAc 'select 2'",
            "getent hosts deb.debian.org || echo isolated",
        ],
    );
    s.description = Some("Run integration tests".into());
    s.services = vec!["postgres:14".into(), "redis:7".into()];
    let v = env.run(s).await;
    assert_eq!(v.status, TaskState::Succeeded, "{v:#?}");
    let out: Vec<&str> = v.commands.iter().map(|c| c.stdout.trim()).collect();
    assert_eq!(out[1..], ["PONG", "v", "1", "2", "isolated"]);
    assert_eq!(v.services, ["postgres:14", "redis:7"]);
    let ws = v.workspace_id.unwrap();
    common::wait_removed(&env.c, &ws).await;
    assert!(
        env.task_containers(&v.id).await.is_empty(),
        "sidecars removed with the task"
    );
    let left = env
        .c
        .engine
        .container_list(&[(naming::LABEL_WORKSPACE, Some(ws.as_str()))])
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_images_are_built_when_no_registry_has_them() {
    let env = TaskEnv::new("sandbox", 1, "").await;
    // A tag nobody has: the pull fails (no registry) and conductor builds it.
    let tag = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let image = format!("redis:{tag}");
    let built = env.c.ensure_service_image(&image, quiet()).await.expect("build");
    assert_eq!(built, format!("localhost/redis:{tag}"));
    let again = env.c.ensure_service_image(&image, quiet()).await.unwrap();
    assert_eq!(again, built, "found locally the second time");
    env.c.engine.image_remove(&built).await.unwrap();

    match env.c.ensure_service_image("quay.io/nobody/unknown:1", quiet()).await {
        Err(ServiceError::Engine(e)) => assert!(e.to_string().contains("quay.io/nobody/unknown:1"), "{e}"),
        other => panic!("an unknown image cannot be built: {other:?}"),
    }
    match env.c.ensure_service_image("-v", quiet()).await {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "services"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_grace_period() {
    let mut env = TaskEnv::new("sandbox", 1, "").await;
    env.start();
    let running = env.submit(vec![spec("minimal", &["sleep 300"])]).await.remove(0).id;
    env.wait_running(&running).await;
    let queued = env.submit(vec![spec("minimal", &["true"])]).await.remove(0).id;

    let begin = Instant::now();
    env.orchestrator.take().unwrap().shutdown(Duration::from_secs(1)).await;
    assert!(begin.elapsed() < Duration::from_secs(20), "{:?}", begin.elapsed());
    let v = env.c.get_task(&running).unwrap();
    assert_eq!(v.status, TaskState::Cancelled, "{v:#?}");
    assert_eq!(v.error.as_deref(), Some("conductor stopped before the task finished"));
    let ws = v.workspace_id.unwrap();
    assert_eq!(env.c.get_workspace(&ws).unwrap().state, WorkspaceState::Removed);
    assert_eq!(
        env.c.get_task(&queued).unwrap().status,
        TaskState::Queued,
        "queued tasks wait for the next start"
    );
}
