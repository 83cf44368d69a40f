//! The Kubernetes backend against a real cluster: runs only when `KUBECONFIG` is set (and
//! says so when it is skipped). No cluster runs on our machines or CI; tests/kube.rs proves
//! the rendered objects offline.
//!
//! Knobs: `KUBECONFIG` (the cluster), `CONDUCTOR_KUBE_NAMESPACE` (default `conductor`, must
//! exist, with `conductor kube render rbac` applied), `CONDUCTOR_KUBE_IMAGE` (a workspace
//! image the nodes can pull, with `sh`, `tar` and `coreutils`; default `debian:bookworm-slim`),
//! `CONDUCTOR_KUBE_AGENT_IMAGE` (`conductor kube agent-image`, pushed where the nodes pull),
//! `CONDUCTOR_KUBE_STORAGE_CLASS` and `CONDUCTOR_KUBE_SNAPSHOT_CLASS` (snapshots are tested
//! when a snapshot class is given, and the "not supported" answer when none is).
//!
//! It covers create, exec, files (copy in and out), snapshot (create, restore, delete),
//! remove, and reconcile from the cluster alone (a fresh engine, with no memory of the
//! workspace, finds it by its `io.conductor.*` labels and removes it).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use conductor_core::config::KubernetesConfig;
use conductor_core::engine::{
    ContainerSpec, ContainerStatus, Engine, ExecSpec, Mount, NetworkAttachment, OutputChunk, ResourceLimits,
    SecurityOptions,
};
use conductor_core::naming;
use conductor_engine_kube::plan::{AGENT_PATH, SOCKET_DIR};
use conductor_engine_kube::KubeEngine;
use futures_util::StreamExt;
use tokio::sync::mpsc;

fn cluster_config() -> Option<KubernetesConfig> {
    let kubeconfig = std::env::var("KUBECONFIG").ok().filter(|s| !s.is_empty())?;
    let var = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    let mut c = KubernetesConfig {
        kubeconfig: Some(kubeconfig),
        namespace: var("CONDUCTOR_KUBE_NAMESPACE").unwrap_or_else(|| "conductor".into()),
        storage_class: var("CONDUCTOR_KUBE_STORAGE_CLASS"),
        snapshot_class: var("CONDUCTOR_KUBE_SNAPSHOT_CLASS"),
        ..Default::default()
    };
    if let Some(a) = var("CONDUCTOR_KUBE_AGENT_IMAGE") {
        c.agent_image = a;
    }
    Some(c)
}

fn skip() {
    eprintln!(
        "SKIPPED: KUBECONFIG is not set, so the Kubernetes cluster suite (create, exec, files, snapshot, \
         remove, reconcile) did not run; set KUBECONFIG to a cluster to run it (tests/kube_cluster.rs)"
    );
}

fn spec(instance: &str, id: &str) -> ContainerSpec {
    let image = std::env::var("CONDUCTOR_KUBE_IMAGE").unwrap_or_else(|_| "debian:bookworm-slim".into());
    ContainerSpec {
        name: id.into(),
        image,
        labels: naming::workspace_labels(instance, id, "kube-suite", "minimal"),
        env: vec![("CONDUCTOR_AGENT_ID".into(), "kube-suite".into())],
        entrypoint: Some(vec![AGENT_PATH.into(), "init".into()]),
        cmd: Some(Vec::new()),
        user: Some("1000".into()),
        workdir: Some("/workspace".into()),
        hostname: Some("kube-suite".into()),
        mounts: vec![
            Mount::Bind {
                source: PathBuf::from("/unused/workspace"),
                target: "/workspace".into(),
                readonly: false,
            },
            Mount::Bind {
                source: PathBuf::from("/unused/agent"),
                target: AGENT_PATH.into(),
                readonly: true,
            },
            Mount::Bind {
                source: PathBuf::from("/unused/run"),
                target: SOCKET_DIR.into(),
                readonly: false,
            },
            Mount::Tmpfs {
                target: "/tmp".into(),
                size_bytes: 64 << 20,
                options: vec![],
            },
        ],
        network: NetworkAttachment::None,
        extra_hosts: vec![],
        published_ports: vec![],
        limits: ResourceLimits {
            memory_bytes: 512 << 20,
            nano_cpus: 1_000_000_000,
            pids: 256,
            nofile: 1024,
            nproc: 512,
        },
        security: SecurityOptions {
            cap_drop_all: true,
            no_new_privileges: true,
            seccomp_profile: Some(PathBuf::from("seccomp.json")),
            readonly_rootfs: true,
        },
    }
}

async fn sh(engine: &KubeEngine, id: &str, cmd: &str) -> (i64, String) {
    let (tx, mut rx) = mpsc::channel(64);
    let spec = ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        ..Default::default()
    };
    let collect = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            let (OutputChunk::Stdout(b) | OutputChunk::Stderr(b)) = c;
            out.extend_from_slice(&b);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let code = engine.exec(id, spec, tx).await.expect("exec");
    (code, collect.await.unwrap())
}

fn tar_of(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_on_a_real_cluster() {
    let Some(kube) = cluster_config() else {
        skip();
        return;
    };
    let engine = KubeEngine::connect(&kube, 1 << 30)
        .await
        .expect("connect to the cluster");
    engine.ping().await.expect("the API server answers");
    let instance = format!("kube-suite-{}", std::process::id());
    let id = format!("ws-kube-suite-{}", std::process::id());

    // create
    let created = engine.container_create(&spec(&instance, &id)).await.expect("create");
    engine.container_start(&created).await.expect("start");
    let info = engine.container_inspect(&created).await.unwrap().expect("inspect");
    assert_eq!(info.status, ContainerStatus::Running);

    // exec: the hardening, from inside
    let (code, out) = sh(
        &engine,
        &created,
        "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; tr '\\0' ' ' < /proc/1/cmdline",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("1000\n"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("/.conductor/agent init"), "the agent is PID 1: {out}");
    let (code, _) = sh(&engine, &created, "exit 7").await;
    assert_eq!(code, 7);

    // files
    let archive = tar_of("in.txt", b"from the host");
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(archive))]).boxed();
    engine.copy_in(&created, "/workspace", stream).await.expect("copy in");
    let (_, out) = sh(&engine, &created, "cat /workspace/in.txt; stat -c %u /workspace/in.txt").await;
    assert_eq!(out, "from the host1000\n");
    let mut back = Vec::new();
    let mut s = engine.copy_out(&created, "/workspace/in.txt").await.expect("copy out");
    while let Some(chunk) = s.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    let mut a = tar::Archive::new(back.as_slice());
    let mut entry = a.entries().unwrap().next().unwrap().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
    assert_eq!(text, "from the host");

    // snapshot
    let snap = format!("{id}-s1");
    if kube.snapshot_class.is_some() {
        engine.snapshot_create(&created, &snap).await.expect("snapshot");
        sh(&engine, &created, "echo changed > /workspace/in.txt").await;
        engine.snapshot_restore(&created, &snap).await.expect("restore");
        let (_, out) = sh(&engine, &created, "cat /workspace/in.txt").await;
        assert_eq!(out, "from the host", "the snapshot's data is back");
        engine.snapshot_delete(&snap).await.expect("delete snapshot");
    } else {
        let e = engine.snapshot_create(&created, &snap).await.unwrap_err().to_string();
        assert!(e.contains("not supported") || e.contains("snapshot class"), "{e}");
        eprintln!("note: CONDUCTOR_KUBE_SNAPSHOT_CLASS is not set; only the 'not supported' answer was tested");
    }

    // reconcile from the cluster alone: a fresh engine finds it by its labels
    drop(engine);
    let fresh = KubeEngine::connect(&kube, 1 << 30).await.unwrap();
    let found = fresh
        .container_list(&[(naming::LABEL_INSTANCE, Some(instance.as_str()))])
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].labels.get(naming::LABEL_WORKSPACE).map(String::as_str),
        Some(id.as_str())
    );

    // remove
    fresh.container_remove(&found[0].id).await.expect("remove");
    for _ in 0..120 {
        if fresh.container_inspect(&created).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(fresh.container_inspect(&created).await.unwrap().is_none(), "removed");
    assert!(fresh
        .container_list(&[(naming::LABEL_INSTANCE, Some(instance.as_str()))])
        .await
        .unwrap()
        .is_empty());
}
