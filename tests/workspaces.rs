//! Workspaces against real Podman: hardening, limits, storage quota, network isolation,
//! shell semantics, timeouts, persistence, reconcile and cleanup.

mod common;

use std::time::Duration;

use common::{quiet, TestEnv};
use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::resources::LimitOverrides;
use conductor_core::size::ByteSize;
use conductor_service::exec::ExecRequest;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};

fn req(agent: &str, env: &str) -> CreateRequest {
    CreateRequest {
        agent_id: agent.into(),
        environment: env.into(),
        ..Default::default()
    }
}

async fn create(c: &Conductor, r: CreateRequest) -> WorkspaceInfo {
    c.create_workspace(r, quiet()).await.expect("create workspace")
}

async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    (o.exit_code, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_is_hardened() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, req("sec1", "python-dev")).await;
    assert_eq!(w.state, WorkspaceState::Running);
    assert!(
        w.container_name.starts_with("claude-agent-sec1-"),
        "{}",
        w.container_name
    );

    let (code, out, _) = sh(
        c,
        &w.id,
        "id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    .await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    for l in &lines[2..] {
        let (k, v) = l.split_once(':').unwrap();
        let v = v.trim();
        match k {
            "CapEff" | "CapPrm" | "CapBnd" => assert_eq!(v, "0000000000000000", "{k}"),
            "NoNewPrivs" => assert_eq!(v, "1"),
            "Seccomp" => assert_eq!(v, "2"),
            _ => unreachable!(),
        }
    }
    // Denied by the seccomp profile (and the missing capabilities).
    let (code, _, err) = sh(c, &w.id, "unshare -U true").await;
    assert_ne!(code, 0, "unshare must fail: {err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _, err) = sh(c, &w.id, "unshare -r true").await;
    assert_ne!(code, 0, "{err}");
    let (code, _, err) = sh(c, &w.id, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m").await;
    assert_ne!(code, 0, "mount must fail: {err}");
    let (code, out, _) = sh(
        c,
        &w.id,
        "python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); r=l.ptrace(0,0,0,0); print(r, os.strerror(ctypes.get_errno()))'",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "-1 Operation not permitted");
    // No engine socket inside, not root, the workspace is owned by the user.
    let (_, out, _) = sh(
        c,
        &w.id,
        "ls /run/podman/podman.sock /var/run/docker.sock 2>&1; stat -c %u /workspace",
    )
    .await;
    assert_eq!(out.matches("No such file").count(), 2, "{out}");
    assert!(out.trim_end().ends_with("1000"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_semantics_env_cwd_stdin() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, req("sh1", "minimal")).await;
    let (code, out, _) = sh(
        c,
        &w.id,
        r#"cd /tmp && pwd && echo "a b  c" | wc -w && echo 'it'"'"'s' && false || echo fallback"#,
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out, "/tmp\n3\nit's\nfallback\n");
    let mut r = ExecRequest::new("echo $GREETING from $(pwd); cat");
    r.env.insert("GREETING".into(), "hi there".into());
    r.cwd = Some("/etc".into());
    r.stdin = Some(bytes::Bytes::from_static(b"piped input\n"));
    let (o, out, _) = c.exec_collect(&w.id, r).await.unwrap();
    assert_eq!(o.exit_code, 0);
    assert_eq!(out, "hi there from /etc\npiped input\n");
    let (code, out, err) = sh(c, &w.id, "echo out; echo err >&2; exit 7").await;
    assert_eq!((code, out.as_str(), err.as_str()), (7, "out\n", "err\n"));

    let mut bad = ExecRequest::new("true");
    bad.env.insert("BAD-NAME".into(), "x".into());
    match c.exec_collect(&w.id, bad).await {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "env.BAD-NAME"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_process_tree() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, req("to1", "minimal")).await;
    let mut r = ExecRequest::new("sleep 301 & (setsid sleep 302 &) ; bash -c 'sleep 303 & wait' & sleep 304");
    r.timeout = Some(Duration::from_secs(2));
    let (o, _, _) = c.exec_collect(&w.id, r).await.unwrap();
    assert!(o.timed_out);
    assert_eq!(o.exit_code, 124);
    assert!(o.duration_ms < 15_000, "{}", o.duration_ms);
    let (_, out, _) = sh(c, &w.id, "ps -eo args | grep -c '^sleep 30[1-4]' || true").await;
    assert_eq!(out.trim(), "0", "left-over sleeps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pids_and_storage_limits_hold() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let mut r = req("lim1", "minimal");
    r.limits = LimitOverrides {
        memory: Some(ByteSize::mib(64)),
        pids: Some(48),
        volume_size: Some(ByteSize::mib(64)),
        ..Default::default()
    };
    let w = create(c, r).await;
    assert_eq!(w.limits.memory, ByteSize::mib(64));

    // Memory hog: `tail` keeps a line-less stream in memory until the OOM killer stops it.
    let (code, _, _) = sh(c, &w.id, "head -c 400m /dev/zero | tail -n 1 >/dev/null").await;
    assert_eq!(code, 137, "memory hog must be OOM-killed");
    let (info, usage) = c.inspect_workspace(&w.id).await.unwrap();
    assert_eq!(info.state, WorkspaceState::Running, "the workspace survives its OOM");
    let usage = usage.unwrap();
    assert!(usage.oom_kills.unwrap_or(0) >= 1, "{usage:?}");
    assert_eq!(usage.memory_limit_bytes, 64 << 20);
    assert_eq!(usage.pids_limit, 48);

    // Fork bomb: forks until the kernel refuses, at the pids limit (children exit after 3 s).
    let bomb = r#"perl -e 'my $n = 0; while (1) { my $p = fork(); if (!defined $p) { print "$n $!\n"; last } if ($p == 0) { sleep 3; exit 0 } $n++; last if $n > 500 }'"#;
    let (code, out, err) = sh(c, &w.id, bomb).await;
    assert_eq!(code, 0, "{err}");
    let (n, why) = out
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("unexpected output {out:?}"));
    let n: u32 = n.parse().unwrap();
    assert!(n < 48, "{n} processes were forked with a pids limit of 48");
    assert_eq!(why, "Resource temporarily unavailable");
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Storage: dd stops at the volume size.
    let (code, _, err) = sh(c, &w.id, "dd if=/dev/zero of=/workspace/big bs=1M count=200").await;
    assert_ne!(code, 0);
    assert!(err.contains("No space left on device"), "{err}");
    let (_, out, _) = sh(c, &w.id, "stat -c %s /workspace/big").await;
    let written: u64 = out.trim().parse().unwrap();
    assert!(written < 64 << 20, "{written}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_network_reaches_nothing() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let a = create(c, req("neta", "minimal")).await;
    let b = create(c, req("netb", "python-dev")).await;
    // `isolated` (the default): a private network namespace with loopback only. No bridge,
    // so no route, no host address (not even an IPv6 link-local one) and no neighbour.
    assert!(a.network.is_none(), "no Podman network for an isolated workspace");
    let (_, out, _) = sh(c, &a.id, "ls /sys/class/net | sort | tr '\\n' ' '").await;
    assert_eq!(out.trim(), "lo");
    let (_, out, _) = sh(c, &a.id, "awk 'NR>1' /proc/net/route | wc -l; cat /proc/net/if_inet6").await;
    assert_eq!(out.trim(), "0\n00000000000000000000000000000001 01 80 10 80       lo");
    // B listens on its loopback; A's loopback is another one.
    let (code, _, err) = sh(c, &b.id, "nohup python3 -m http.server 8080 >/dev/null 2>&1 & sleep 1").await;
    assert_eq!(code, 0, "{err}");
    let to_b = "timeout 3 bash -c 'echo hi > /dev/tcp/127.0.0.1/8080'";
    let (code, _, err) = sh(c, &b.id, to_b).await;
    assert_eq!(code, 0, "control: B reaches its own listener: {err}");
    let (code, _, err) = sh(c, &a.id, to_b).await;
    assert_ne!(code, 0, "A reached B: {err}");

    // A listener on the host, on the gateway address of a network conductor made (an
    // egress workspace's bridge), answers the host but neither that workspace (its
    // firewall rejects the host) nor A.
    let e = create(
        c,
        CreateRequest {
            network: Some(NetworkPolicy::mode(NetworkMode::Egress)),
            ..req("netc", "minimal")
        },
    )
    .await;
    let nets = c
        .engine
        .network_list(&[("io.conductor.workspace", Some(e.id.as_str()))])
        .await
        .unwrap();
    let subnet = nets[0].subnets[0].clone();
    assert!(
        subnet.starts_with("10.89."),
        "{subnet} must come from the configured subnet"
    );
    let base: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let gateway = std::net::Ipv4Addr::from(u32::from(base) + 1);
    let listener = std::net::TcpListener::bind((gateway, 0)).expect("bind on the bridge gateway");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().take(4) {
            drop(s);
        }
    });
    std::net::TcpStream::connect((gateway, port)).expect("control: the listener answers the host");
    let probe = format!("timeout 3 bash -c 'echo hi > /dev/tcp/{gateway}/{port}'");
    let (code, _, err) = sh(c, &e.id, &probe).await;
    assert_ne!(
        code, 0,
        "the egress workspace reached a host listener at its gateway: {err}"
    );
    let (code, _, _) = sh(c, &a.id, &probe).await;
    assert_ne!(code, 0, "the isolated workspace reached a host listener");
    let (code, _, _) = sh(c, &a.id, "getent hosts deb.debian.org").await;
    assert_ne!(code, 0, "outside names must not resolve");

    // `none`: the same loopback-only namespace.
    let n = create(
        c,
        CreateRequest {
            network: Some(NetworkPolicy::mode(NetworkMode::Isolated)),
            ..req("netn", "minimal")
        },
    )
    .await;
    assert!(n.network.is_none());
    let (_, out, _) = sh(c, &n.id, "ls /sys/class/net | sort | tr '\\n' ' '").await;
    assert_eq!(out.trim(), "lo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_persist_across_restart_and_recreate() {
    let t = TestEnv::new(
        "isolated_workspace:\n  agent_containers:\n    volume_size: 64Mi\n    environments:\n      - name: withvols\n        packages: [jq]\n        volumes: [\"source:/workspace/src\", \"cache:/workspace/.cache\"]\n",
    )
    .await;
    let c = t.c();
    let w = create(c, req("per1", "withvols")).await;
    let (code, _, err) = sh(
        c,
        &w.id,
        "echo kept > /workspace/file && echo src > /workspace/src/a && jq --version",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    c.stop_workspace(&w.id).await.unwrap();
    c.start_workspace(&w.id).await.unwrap();
    let (_, out, _) = sh(c, &w.id, "cat /workspace/file /workspace/src/a").await;
    assert_eq!(out, "kept\nsrc\n");
    c.remove_workspace(&w.id, None).await.unwrap();
    let again = create(c, req("per1", "withvols")).await;
    assert_ne!(again.id, w.id);
    let (_, out, _) = sh(c, &again.id, "cat /workspace/file /workspace/src/a").await;
    assert_eq!(out, "kept\nsrc\n", "persistent volume must survive destroy/re-create");
    c.remove_workspace(&again.id, Some(false)).await.unwrap();
    let fresh = create(c, req("per1", "withvols")).await;
    let (code, _, _) = sh(c, &fresh.id, "test -e /workspace/file").await;
    assert_eq!(code, 1, "purged volume must be gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_removes_orphans_and_marks_vanished_lost() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, req("rec1", "minimal")).await;
    let gone = create(c, req("rec2", "minimal")).await;
    // Make an orphan: a container with our labels that the database does not know.
    let orphan = create(c, req("rec3", "minimal")).await;
    c.store.delete_workspace(&orphan.id).unwrap();
    // Make a vanished one: its container removed behind conductor's back.
    let rec = c.store.get_workspace(&gone.id).unwrap().unwrap();
    c.engine
        .container_remove(rec.container_id.as_deref().unwrap())
        .await
        .unwrap();
    // What a crash between recording a sandbox task's outcome and removing its workspace
    // leaves: a workspace marked `removing` whose container still runs.
    let half = create(c, req("rec4", "minimal")).await;
    c.store
        .set_workspace_state(&half.id, WorkspaceState::Removing, None)
        .unwrap();
    // What a crash between making the agent directory and recording the container leaves.
    let agents = c.paths.base.join("agents");
    std::fs::create_dir_all(agents.join("ws-crashedmid")).unwrap();

    let report = c.reconcile().await.unwrap();
    assert!(
        report.agent_dirs_removed.contains(&"ws-crashedmid".to_string()),
        "{report:?}"
    );
    assert!(report.agent_dirs_removed.contains(&orphan.id), "{report:?}");
    assert!(!agents.join("ws-crashedmid").exists() && !agents.join(&orphan.id).exists());
    assert!(
        agents.join(&w.id).is_dir(),
        "a live workspace keeps its agent directory"
    );
    assert!(report.orphans_removed.contains(&orphan.container_name), "{report:?}");
    assert_eq!(report.lost, vec![gone.id.clone()]);
    assert_eq!(
        report.volumes_unmounted,
        vec![orphan.volume_dir.clone()],
        "the orphan's volume is unmounted"
    );
    assert_eq!(c.get_workspace(&gone.id).unwrap().state, WorkspaceState::Lost);
    assert!(c
        .engine
        .container_inspect(&orphan.container_name)
        .await
        .unwrap()
        .is_none());
    assert_eq!(c.get_workspace(&w.id).unwrap().state, WorkspaceState::Running);
    assert_eq!(report.finished, vec![half.id.clone()], "{report:?}");
    assert_eq!(c.get_workspace(&half.id).unwrap().state, WorkspaceState::Removed);
    assert!(c
        .engine
        .container_inspect(&half.container_name)
        .await
        .unwrap()
        .is_none());
    let again = c.reconcile().await.unwrap();
    assert!(
        again.orphans_removed.is_empty() && again.lost.is_empty() && again.agent_dirs_removed.is_empty(),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_by_age_and_by_count() {
    let t = TestEnv::new("isolated_workspace:\n  cleanup:\n    max_age_hours: 1\n    max_containers: 2\n").await;
    let c = t.c();
    let old = create(c, req("cl1", "minimal")).await;
    let mid = create(c, req("cl2", "minimal")).await;
    match c.create_workspace(req("cl3", "minimal"), quiet()).await {
        Err(ServiceError::Exhausted(m)) => assert!(m.contains("max_containers"), "{m}"),
        other => panic!("expected the count limit, got {other:?}"),
    }
    c.store
        .touch_workspace(&old.id, conductor_service::now_ms() - 2 * 3_600_000)
        .unwrap();
    let r = c.cleanup(&[]).await.unwrap();
    assert_eq!(r.expired, vec![old.id.clone()]);
    assert_eq!(c.get_workspace(&old.id).unwrap().state, WorkspaceState::Removed);
    assert_eq!(c.get_workspace(&mid.id).unwrap().state, WorkspaceState::Running);
    let busy = c.cleanup(std::slice::from_ref(&mid.id)).await.unwrap();
    assert!(busy.expired.is_empty() && busy.over_count.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_root_with_a_noexec_tmp() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(
        c,
        CreateRequest {
            readonly_rootfs: true,
            ..req("ro1", "minimal")
        },
    )
    .await;
    let (code, _, err) = sh(c, &w.id, "touch /etc/x").await;
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    let (code, out, err) = sh(c, &w.id, "echo ok > /tmp/f && cat /tmp/f && grep ' /tmp ' /proc/mounts").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok\n"), "{out}");
    assert!(out.contains("noexec") && out.contains("nosuid"), "{out}");
    let (code, out, _) = sh(c, &w.id, "touch /workspace/ok && echo writable").await;
    assert_eq!((code, out.trim()), (0, "writable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_above_max_containers_removes_the_least_recently_used() {
    let t = TestEnv::new("isolated_workspace:\n  cleanup:\n    max_containers: 3\n").await;
    let c = t.c();
    let a = create(c, req("cnt1", "minimal")).await;
    let b = create(c, req("cnt2", "minimal")).await;
    let d = create(c, req("cnt3", "minimal")).await;
    c.store
        .touch_workspace(&b.id, conductor_service::now_ms() + 1000)
        .unwrap();
    c.store
        .touch_workspace(&d.id, conductor_service::now_ms() + 2000)
        .unwrap();
    // The same state seen by a conductor whose policy allows one workspace.
    let mut config = c.config.clone();
    config.isolated_workspace.cleanup.max_containers = 1;
    let strict = Conductor::with_parts(
        config,
        c.paths.clone(),
        c.engine.clone(),
        c.store.clone(),
        c.instance.clone(),
        c.seccomp_path().to_path_buf(),
    );
    let r = strict.cleanup(&[]).await.unwrap();
    assert_eq!(r.over_count, vec![a.id.clone(), b.id.clone()], "oldest first");
    assert_eq!(c.get_workspace(&d.id).unwrap().state, WorkspaceState::Running);
    assert_eq!(c.get_workspace(&a.id).unwrap().state, WorkspaceState::Removed);
}

/// Ports are published only when asked for, only on 127.0.0.1, from the configured range,
/// and only for `egress` workspaces (an `isolated` workspace has only loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_published_on_loopback_only_when_asked() {
    let t = TestEnv::new("podman_config:\n  container_port_range: \"21000-21999\"\n").await;
    let c = t.c();
    match c
        .create_workspace(
            CreateRequest {
                ports: vec![8000],
                ..req("port0", "python-dev")
            },
            quiet(),
        )
        .await
    {
        Err(ServiceError::Invalid { field, message }) => {
            assert_eq!(field, "ports");
            assert!(message.contains("egress"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let plain = create(c, req("port1", "minimal")).await;
    let (_, usage) = c.inspect_workspace(&plain.id).await.unwrap();
    assert!(
        usage.unwrap().published_ports.is_empty(),
        "nothing published unless asked"
    );

    let w = create(
        c,
        CreateRequest {
            ports: vec![8000],
            network: Some(NetworkPolicy::mode(NetworkMode::Egress)),
            ..req("port2", "python-dev")
        },
    )
    .await;
    let (_, usage) = c.inspect_workspace(&w.id).await.unwrap();
    let ports = usage.unwrap().published_ports;
    assert_eq!(ports.len(), 1, "{ports:?}");
    let (inner, host_port) = ports[0];
    assert_eq!(inner, 8000);
    assert!((21000..=21999).contains(&host_port), "{host_port}");
    let (code, _, err) = sh(
        c,
        &w.id,
        "mkdir -p /tmp/www && echo served > /tmp/www/index.html && cd /tmp/www && (nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && sleep 1",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let mut body = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", host_port)) {
            use std::io::{Read, Write};
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
            let _ = s.read_to_string(&mut body);
            if body.contains("served") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(body.contains("served"), "{body}");
    // Bound to loopback only: listening sockets on the host show 127.0.0.1:<port>.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let hex = format!(":{host_port:04X} ");
    let listeners: Vec<&str> = tcp
        .lines()
        .filter(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
        .collect();
    assert!(!listeners.is_empty(), "no listener for {host_port}");
    for l in listeners {
        let local = l.split_whitespace().nth(1).unwrap();
        assert!(
            local.starts_with("0100007F:"),
            "published on more than loopback: {local}"
        );
    }
}
