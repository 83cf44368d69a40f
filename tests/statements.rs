//! How much the store is on the hot path: SQL statements per exec and per task command,
//! counted by the store itself, against real Podman. The bounds are today's figures; a
//! change that adds reads or writes to these paths shows up here (and the printed figures
//! are the ones docs/performance.md quotes).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{agent_workspace, TestEnv};
use conductor_core::lifecycle::TaskState;
use conductor_core::task::TaskSpec;
use conductor_service::exec::ExecRequest;
use conductor_service::tasks::Orchestrator;
use conductor_service::workspaces::ListFilter;
use conductor_service::Conductor;

/// Most statements one exec may run (its row read with its `last_used_at` written).
const EXEC_BOUND: u64 = 1;
/// Most statements one more command of a task may run: 8 measured (its start, result and
/// log), plus slack for the background polling that a run may catch (the figure was 10
/// before tasks reused their workspace handle).
const TASK_COMMAND_BOUND: f64 = 9.0;

fn task(agent: &str, commands: usize) -> TaskSpec {
    TaskSpec {
        agent_id: Some(agent.into()),
        ..TaskSpec::new("minimal", vec!["true".into(); commands])
    }
}

async fn run_task(c: &Conductor, commands: usize) -> u64 {
    let before = c.store.statements();
    let id = c.submit_tasks(vec![task("stmts", commands)]).unwrap().remove(0).id;
    let v = c.wait_task(&id).await.unwrap();
    assert_eq!(v.status, TaskState::Succeeded, "{v:?}");
    c.store.statements() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_per_exec_and_per_task_command() {
    // One worker: no idle worker polls the queue while the measured task runs.
    let mut env = TestEnv::new("isolated_workspace:\n  mode: shared\ntask_execution:\n  max_workers: 1\n").await;
    let w = agent_workspace(env.c(), "stmts", None).await;
    let c = env.c();
    c.exec_collect(&w.id, ExecRequest::new("true")).await.unwrap();
    let n = 20;
    let before = c.store.statements();
    for _ in 0..n {
        let (o, _, _) = c.exec_collect(&w.id, ExecRequest::new("true")).await.unwrap();
        assert_eq!(o.exit_code, 0);
    }
    let per_exec = (c.store.statements() - before) as f64 / n as f64;
    println!("store statements per exec: {per_exec:.1}");

    let conductor = Arc::new(env.conductor.take().expect("conductor"));
    let orchestrator = Orchestrator::start(conductor.clone());
    // The first task makes the shared workspace; later ones reuse it.
    // The least of five runs: what the task itself costs.
    run_task(&conductor, 1).await;
    let (mut one, mut eleven) = (u64::MAX, u64::MAX);
    for _ in 0..5 {
        one = one.min(run_task(&conductor, 1).await);
        eleven = eleven.min(run_task(&conductor, 11).await);
    }
    let per_command = (eleven - one) as f64 / 10.0;
    println!("store statements per one-command task: {one}; per further command: {per_command:.1}");

    orchestrator.shutdown(Duration::from_secs(5)).await;
    for w in conductor.list_workspaces(&ListFilter::default()).unwrap() {
        conductor.remove_workspace(&w.id, Some(false)).await.unwrap();
    }
    conductor.reconcile().await.unwrap();
    // Asserted after the clean-up, so that a failure leaves no workspace behind.
    assert!(per_exec <= EXEC_BOUND as f64, "{per_exec} statements per exec");
    assert!(
        per_command <= TASK_COMMAND_BOUND,
        "{per_command} statements per command"
    );
}
