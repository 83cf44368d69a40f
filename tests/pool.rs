//! Warm pools against real Podman: filling, claiming (a rename, not a start), refilling
//! after claims and after a pool workspace dies, room at `max_containers`, and sandbox
//! tasks taking their workspace from the pool.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{quiet, TestEnv};
use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_core::naming;
use conductor_core::task::TaskSpec;
use conductor_service::exec::ExecRequest;
use conductor_service::tasks::Orchestrator;
use conductor_service::warm_pool::POOL_AGENT;
use conductor_service::workspaces::{CreateRequest, ListFilter, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};

const POOL2: &str = "isolated_workspace:\n  warm_pool:\n    minimal: 2\n";

fn pool(c: &Conductor) -> Vec<WorkspaceInfo> {
    c.list_workspaces(&ListFilter {
        agent_id: Some(POOL_AGENT.into()),
        state: Some(WorkspaceState::Running),
        ..Default::default()
    })
    .unwrap()
}

fn ephemeral(agent: &str) -> CreateRequest {
    CreateRequest {
        agent_id: agent.into(),
        environment: "minimal".into(),
        ephemeral: true,
        ..Default::default()
    }
}

async fn sh(c: &Conductor, id: &str, cmd: &str) -> String {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    assert_eq!(o.exit_code, 0, "{cmd}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_fills_a_claim_is_a_rename_and_the_pool_refills() {
    let t = TestEnv::new(POOL2).await;
    let c = t.c();
    let r = c.refill_warm_pool(true).await.unwrap();
    assert_eq!(r.created.len(), 2, "{r:?}");
    let members: Vec<String> = pool(c).into_iter().map(|w| w.id).collect();
    assert_eq!(members.len(), 2);
    assert!(
        c.refill_warm_pool(true).await.unwrap().created.is_empty(),
        "already full"
    );

    let start = Instant::now();
    let w = c.create_workspace(ephemeral("p1"), quiet()).await.unwrap();
    let (o, out, _) = c
        .exec_collect(&w.id, ExecRequest::new("echo $CONDUCTOR_AGENT_ID"))
        .await
        .unwrap();
    let first_command = start.elapsed();
    assert!(members.contains(&w.id), "{} is not from the pool {members:?}", w.id);
    assert_eq!((o.exit_code, out.as_str()), (0, "p1\n"));
    assert_eq!(w.agent_id, "p1");
    assert_eq!(w.container_name, naming::workspace_container("p1", &w.id));
    // The engine knows the container by its new name; its processes never stopped.
    let info = c
        .engine
        .container_inspect(&w.container_name)
        .await
        .unwrap()
        .expect("renamed");
    assert_eq!(info.name.trim_start_matches('/'), w.container_name);
    assert!(
        first_command < Duration::from_secs(1),
        "claim + first command took {first_command:?}"
    );
    println!("pool claim + first command: {first_command:?}");

    assert_eq!(pool(c).len(), 1);
    let r = c.refill_warm_pool(true).await.unwrap();
    assert_eq!(r.created.len(), 1, "{r:?}");
    assert_eq!(pool(c).len(), 2);

    // Requests a pool workspace does not satisfy exactly get a fresh one.
    let mut custom = ephemeral("p2");
    custom.env.insert("X".into(), "1".into());
    let fresh = c.create_workspace(custom, quiet()).await.unwrap();
    assert!(!pool(c).iter().any(|m| m.id == fresh.id));
    assert_eq!(pool(c).len(), 2, "nothing was claimed");
    let persistent = c
        .create_workspace(
            CreateRequest {
                ephemeral: false,
                ..ephemeral("p3")
            },
            quiet(),
        )
        .await
        .unwrap();
    assert_eq!(pool(c).len(), 2, "{} was claimed", persistent.id);

    // Nobody else may pose as the pool.
    match c.create_workspace(ephemeral(POOL_AGENT), quiet()).await {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "agent_id"),
        other => panic!("{other:?}"),
    }
    // The claimed workspace goes away like any ephemeral one.
    c.remove_workspace(&w.id, None).await.unwrap();
    assert!(!std::path::Path::new(&w.volume_dir).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pool_workspace_is_replaced_and_never_claimed() {
    let t = TestEnv::new(POOL2).await;
    let c = t.c();
    c.refill_warm_pool(true).await.unwrap();
    let members = pool(c);
    let victim = &members[0];
    // The container dies behind conductor's back.
    c.engine.container_stop(&victim.container_name, 0).await.unwrap();

    // A claim skips it.
    let w = c.create_workspace(ephemeral("d1"), quiet()).await.unwrap();
    assert_eq!(w.id, members[1].id);
    assert_eq!(sh(c, &w.id, "echo ok").await, "ok\n");

    let r = c.refill_warm_pool(true).await.unwrap();
    assert_eq!(r.replaced, vec![victim.id.clone()], "{r:?}");
    assert_eq!(r.created.len(), 2, "{r:?}");
    assert_eq!(c.get_workspace(&victim.id).unwrap().state, WorkspaceState::Removed);
    let now: Vec<String> = pool(c).into_iter().map(|w| w.id).collect();
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&victim.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_workspaces_count_against_max_containers_and_make_room() {
    let t =
        TestEnv::new("isolated_workspace:\n  warm_pool:\n    minimal: 2\n  cleanup:\n    max_containers: 2\n").await;
    let c = t.c();
    c.refill_warm_pool(true).await.unwrap();
    assert_eq!(pool(c).len(), 2);
    // A workspace the pool cannot serve takes the place of an idle pool one.
    let mut custom = ephemeral("m1");
    custom.env.insert("X".into(), "1".into());
    let w = c.create_workspace(custom, quiet()).await.unwrap();
    assert_eq!(pool(c).len(), 1);
    // The pool does not grow beyond the maximum.
    assert!(c.refill_warm_pool(true).await.unwrap().created.is_empty());
    c.remove_workspace(&w.id, None).await.unwrap();
    assert_eq!(c.refill_warm_pool(true).await.unwrap().created.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_keeps_the_pool_and_sandbox_tasks_use_it() {
    let mut t = TestEnv::new(&format!("{POOL2}task_execution:\n  max_workers: 2\n")).await;
    let c = Arc::new(t.conductor.take().unwrap());
    let orchestrator = Orchestrator::start(c.clone());
    let wait_full = |c: Arc<Conductor>| async move {
        let start = Instant::now();
        while pool(&c).len() < 2 {
            assert!(start.elapsed() < Duration::from_secs(120), "the pool did not fill");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pool(&c).into_iter().map(|w| w.id).collect::<Vec<_>>()
    };
    let members = wait_full(c.clone()).await;

    let mut spec = TaskSpec::new("minimal", vec!["echo from $CONDUCTOR_AGENT_ID".into()]);
    spec.agent_id = Some("tp1".into());
    let id = c.submit_tasks(vec![spec]).unwrap().remove(0).id;
    let done = tokio::time::timeout(Duration::from_secs(120), c.wait_task(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, TaskState::Succeeded, "{done:?}");
    let ws = done.workspace_id.clone().unwrap();
    assert!(members.contains(&ws), "{ws} is not from the pool {members:?}");
    assert_eq!(done.commands.last().unwrap().stdout, "from tp1\n");
    // The sandbox is removed after the task, and the pool refills by itself.
    common::wait_removed(&c, &ws).await;
    let again = wait_full(c.clone()).await;
    assert!(!again.contains(&ws));

    orchestrator.shutdown(Duration::from_secs(5)).await;
    t.conductor = Arc::into_inner(c);
    assert!(t.conductor.is_some(), "the orchestrator released the conductor");
}
