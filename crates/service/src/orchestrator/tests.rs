//! Unit tests of the orchestrator's decisions on the in-memory backend
//! (`backend::memory`): which workspace a task gets and what happens to it afterwards, per
//! isolation mode, and how a failing command or a missing image ends a task. Every
//! behaviour here is also proven against real Podman in `tests/tasks.rs`; these tests pin the
//! decisions down without an engine.

use std::time::Duration;

use conductor_core::engine::ContainerStatus;
use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_core::task::TaskSpec;

use crate::backend::memory::{env, Env, MemoryEngine};
use crate::tasks::{Orchestrator, TaskView};

async fn run(e: &Env, spec: TaskSpec) -> TaskView {
    let orchestrator = Orchestrator::start(e.c.clone());
    let id = e.c.submit_tasks(vec![spec]).unwrap().remove(0).id;
    let done = tokio::time::timeout(Duration::from_secs(30), e.c.wait_task(&id))
        .await
        .expect("the task ends")
        .unwrap();
    orchestrator.shutdown(Duration::from_secs(5)).await;
    done
}

fn workspaces(e: &Env) -> Vec<(String, WorkspaceState)> {
    e.c.store
        .list_workspaces(&Default::default())
        .unwrap()
        .into_iter()
        .map(|w| (w.id, w.state))
        .collect()
}

#[tokio::test]
async fn a_sandbox_task_gets_a_fresh_workspace_that_is_removed_after() {
    let e = env("", MemoryEngine::default());
    let t = run(&e, TaskSpec::new("minimal", vec!["true".into(), "echo hi".into()])).await;
    assert_eq!(t.status, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.commands.len(), 2);
    assert!(
        e.engine.execs().len() >= 2,
        "each command went through the engine's exec"
    );
    assert!(e.engine.containers().is_empty(), "the sandbox's container is removed");
    assert!(
        workspaces(&e).iter().all(|(_, s)| *s == WorkspaceState::Removed),
        "{:?}",
        workspaces(&e)
    );
}

#[tokio::test]
async fn a_failing_command_fails_the_task_and_still_releases_the_sandbox() {
    let e = env("", MemoryEngine::default());
    e.engine.script(|_, spec| {
        let script = spec.argv.join(" ");
        (if script.contains("exit 3") { 3 } else { 0 }, String::new())
    });
    let t = run(&e, TaskSpec::new("minimal", vec!["exit 3".into(), "echo never".into()])).await;
    assert_eq!(t.status, TaskState::Failed, "{t:?}");
    assert_eq!(t.exit_code, Some(3));
    assert_eq!(t.commands.len(), 1, "the task stops at the failing command");
    assert!(e.engine.containers().is_empty(), "the failed sandbox is removed too");
}

#[tokio::test]
async fn a_shared_task_reuses_the_agents_workspace_and_leaves_it_running() {
    let e = env("isolated_workspace:\n  mode: shared\n", MemoryEngine::default());
    let mut spec = TaskSpec::new("minimal", vec!["true".into()]);
    spec.agent_id = Some("a1".into());
    let first = run(&e, spec.clone()).await;
    let second = run(&e, spec).await;
    assert_eq!(first.status, TaskState::Succeeded, "{first:?}");
    assert_eq!(second.status, TaskState::Succeeded, "{second:?}");
    assert_eq!(first.workspace_id, second.workspace_id, "one workspace for the agent");
    let containers = e.engine.containers();
    assert_eq!(containers.len(), 1, "the shared workspace stays");
    assert_eq!(containers[0].status, ContainerStatus::Running);
    assert!(
        containers[0].spec.name.starts_with("claude-agent-a1-"),
        "{}",
        containers[0].spec.name
    );
}

#[tokio::test]
async fn an_engine_failure_before_the_first_command_is_retried_then_fails_the_task() {
    let e = env(
        "task_execution:\n  max_retries: 2\n  retry_delay: 0\n",
        MemoryEngine::default(),
    );
    e.engine.refuse_creates(Some("out of disk"));
    let t = run(&e, TaskSpec::new("minimal", vec!["true".into()])).await;
    assert_eq!(t.status, TaskState::Failed, "{t:?}");
    assert_eq!(t.attempt, 3, "one attempt and two retries: {t:?}");
    assert!(t.error.as_deref().unwrap_or("").contains("out of disk"), "{t:?}");
    assert!(t.commands.is_empty(), "no command ran: {t:?}");
    assert!(e.engine.execs().is_empty());
    assert!(e.engine.containers().is_empty(), "nothing is left behind");
}

#[tokio::test]
async fn an_engine_failure_that_clears_is_retried_and_the_task_succeeds() {
    let e = env(
        "task_execution:\n  max_retries: 2\n  retry_delay: 1\n",
        MemoryEngine::default(),
    );
    e.engine.refuse_creates(Some("engine busy"));
    let engine = e.engine.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        engine.refuse_creates(None);
    });
    let t = run(&e, TaskSpec::new("minimal", vec!["true".into()])).await;
    assert_eq!(t.status, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempt, 2, "{t:?}");
}
