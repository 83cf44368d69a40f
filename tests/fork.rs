//! Forks against real Podman: a copy's files (hashes, modes, owners, in /workspace and the
//! root file system) equal its source's at fork time; each copy has its own identity,
//! network namespace, agent and quota, and its writes are its own; forks from a snapshot;
//! a failing copy leaves no copy behind (all or nothing); a `kill -9` in the middle of a
//! fork leaves nothing after reconcile; bad requests get a 4xx naming the field or state.
//!
//! Needs the static agent (`RUSTFLAGS="-C target-feature=+crt-static" cargo build --release
//! --target x86_64-unknown-linux-gnu -p conductor-agent`) and the `minimal` environment.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{quiet, TestEnv};
use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_core::resources::LimitOverrides;
use conductor_core::size::ByteSize;
use conductor_service::exec::ExecPath;
use conductor_service::fork::ForkRequest;
use conductor_service::snapshots::SNAPSHOT_REPOSITORY;
use conductor_service::workspaces::{CreateRequest, ListFilter, WorkspaceInfo};
use conductor_service::{agent_client, host, Conductor, ServiceError};
use conductor_store::{EgressDecision, EgressFilter};
use serde_json::{json, Value};

fn request(agent: &str) -> CreateRequest {
    CreateRequest {
        agent_id: agent.into(),
        environment: "minimal".into(),
        ..Default::default()
    }
}

async fn create(c: &Conductor, req: CreateRequest) -> WorkspaceInfo {
    assert!(
        agent_client::binary(&c.config).is_some(),
        "the static conductor-agent is not built (see the header of this file)"
    );
    c.create_workspace(req, quiet()).await.expect("create workspace")
}

fn copies(n: u32) -> ForkRequest {
    ForkRequest {
        count: n,
        ..Default::default()
    }
}

/// Runs a shell command (60 s at most).
async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let mut req = conductor_service::exec::ExecRequest::new(cmd);
    req.timeout = Some(Duration::from_secs(60));
    let (o, out, err) = c.exec_collect(id, req).await.expect("exec");
    (o.exit_code, out, err)
}

async fn ok(c: &Conductor, id: &str, cmd: &str) -> String {
    let (code, out, err) = sh(c, id, cmd).await;
    assert_eq!(code, 0, "{cmd}: {err}");
    out
}

/// Every path of the root file system and of /workspace with type, owner, group, mode, size
/// and link target, plus a hash of every file in the places the tests change (as in
/// tests/snapshots.rs). Podman's per-container files are left out.
const LISTING: &str = r#"{ find / /workspace -xdev -type d -printf '%p d %U %G %m\n'; find / /workspace -xdev ! -type d -printf '%p %y %U %G %m %s %l\n'; } 2>/dev/null | grep -v -E '^/(etc/hosts|etc/hostname|etc/resolv\.conf|run/\.containerenv) ' | LC_ALL=C sort; find /workspace /home/agent /tmp -xdev -type f -exec sha256sum {} + 2>/dev/null | LC_ALL=C sort"#;

async fn listing(c: &Conductor, id: &str) -> String {
    let out = ok(c, id, LISTING).await;
    assert!(out.contains("/workspace/src/a.txt"), "{out}");
    out
}

fn assert_same(expected: &str, got: &str) {
    if expected != got {
        let e: Vec<&str> = expected.lines().collect();
        let g: Vec<&str> = got.lines().collect();
        let missing: Vec<&&str> = e.iter().filter(|l| !g.contains(l)).take(20).collect();
        let extra: Vec<&&str> = g.iter().filter(|l| !e.contains(l)).take(20).collect();
        panic!("listings differ\nmissing: {missing:#?}\nextra: {extra:#?}");
    }
}

/// Changes in /workspace (modes, a link, a binary file) and in the root file system
/// (a file removed from the image, files added under /home and /tmp), and a process.
const SETUP: &str = r#"set -e
cd /workspace
mkdir -p src/pkg docs
printf 'alpha\n' > src/a.txt
printf 'beta\n' > src/b.txt
head -c 300000 /dev/urandom > docs/blob.bin
chmod 600 src/a.txt
chmod 751 src/pkg
ln -s a.txt src/link
printf 'secret\n' > /home/agent/.tool-config
mkdir -p /home/agent/.local/bin /home/agent/.local/share
cp -r /usr/share/doc/coreutils /home/agent/.local/share/installed-pkg
printf '#!/bin/sh\necho tool\n' > /home/agent/.local/bin/tool
chmod 755 /home/agent/.local/bin/tool
rm -f /home/agent/.bash_logout
printf 'tmp\n' > /tmp/outside.txt
setsid sleep 1234 </dev/null >/dev/null 2>&1 &
"#;

fn pool_used(c: &Conductor) -> u64 {
    host::disk_usage(&c.paths.workspaces).expect("statvfs").0
}

/// The network namespace of a workspace's PID 1, as the kernel names it.
async fn netns(c: &Conductor, w: &WorkspaceInfo) -> PathBuf {
    let pid = common::init_pid(c, w).await;
    std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("read the network namespace")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_starts_with_the_sources_files_and_its_own_identity() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, request("fork1")).await;
    ok(c, &w.id, SETUP).await;
    let before = listing(c, &w.id).await;

    let begin = Instant::now();
    let out = c.fork_workspace(&w.id, copies(2)).await.expect("fork");
    eprintln!(
        "fork of 2: {:?} (reported {} ms), source paused {:?} ms",
        begin.elapsed(),
        out.took_ms,
        out.paused_ms
    );
    assert_eq!((out.source_id.as_str(), out.snapshot.as_deref()), (w.id.as_str(), None));
    assert!(out.paused_ms.is_some_and(|ms| ms < 5_000), "{:?}", out.paused_ms);
    assert_eq!(out.workspaces.len(), 2);
    // The source runs on, unchanged, its process still there.
    assert_eq!(c.get_workspace(&w.id).unwrap().state, WorkspaceState::Running);
    assert_eq!(ok(c, &w.id, "ps -eo args | grep -c '^sleep 1234'").await.trim(), "1");
    assert_same(&before, &listing(c, &w.id).await);

    let mut namespaces = vec![netns(c, &w).await];
    for f in &out.workspaces {
        assert_eq!(f.state, WorkspaceState::Running);
        assert_ne!(f.id, w.id);
        assert_eq!((f.agent_id.as_str(), f.environment.as_str()), ("fork1", "minimal"));
        assert_eq!(f.container_name, naming::workspace_container("fork1", &f.id));
        assert_eq!(f.image, format!("{SNAPSHOT_REPOSITORY}/{}:fork", f.id));
        assert_eq!(f.limits, w.limits);
        assert_eq!(f.network_policy, w.network_policy);
        assert_ne!(f.volume_dir, w.volume_dir);
        assert_same(&before, &listing(c, &f.id).await);
        // Its own identity, the same hardening; processes are not copied.
        let id = ok(
            c,
            &f.id,
            "id -u; hostname; echo $CONDUCTOR_WORKSPACE_ID; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; ps -eo args | grep -c '^sleep 1234' || true",
        )
        .await;
        let lines: Vec<&str> = id.lines().collect();
        assert_eq!(lines[0], "1000", "{id}");
        assert_eq!(lines[1], naming::short_id(&f.id), "{id}");
        assert_eq!(lines[2], f.id, "{id}");
        assert!(
            lines[3].ends_with("0000000000000000") && lines[4].ends_with('1'),
            "{id}"
        );
        assert_eq!(lines[5], "0", "the source's process is not in the copy: {id}");
        // Its own agent.
        let (_, usage) = c.inspect_workspace(&f.id).await.unwrap();
        assert_eq!(usage.expect("usage").exec_path, Some(ExecPath::Agent));
        let labels = c
            .engine
            .container_inspect(&f.container_name)
            .await
            .unwrap()
            .expect("the copy's container")
            .labels;
        assert_eq!(labels[naming::LABEL_FORK_OF], w.id);
        assert_eq!(labels[naming::LABEL_WORKSPACE], f.id);
        namespaces.push(netns(c, f).await);
    }
    namespaces.sort();
    namespaces.dedup();
    assert_eq!(namespaces.len(), 3, "one network namespace each: {namespaces:?}");

    // Removing a copy removes its image name; the others and the source are untouched.
    let gone = &out.workspaces[0];
    c.remove_workspace(&gone.id, None).await.unwrap();
    assert!(c.engine.image_inspect(&gone.image).await.unwrap().is_none());
    assert!(!Path::new(&gone.volume_dir).exists(), "a copy's volume goes with it");
    assert_same(&before, &listing(c, &out.workspaces[1].id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_a_fork_are_its_own() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, request("fork2")).await;
    ok(c, &w.id, "echo base > /workspace/f && echo base > /home/agent/f").await;
    let out = c.fork_workspace(&w.id, copies(2)).await.expect("fork");
    let all: Vec<&str> = std::iter::once(w.id.as_str())
        .chain(out.workspaces.iter().map(|f| f.id.as_str()))
        .collect();
    for (i, id) in all.iter().enumerate() {
        ok(
            c,
            id,
            &format!("echo {i} > /workspace/f && echo {i} > /home/agent/f && touch /workspace/only-{i} /home/agent/only-{i} && rm /workspace/f.none 2>/dev/null; true"),
        )
        .await;
    }
    for (i, id) in all.iter().enumerate() {
        assert_eq!(
            ok(
                c,
                id,
                "cat /workspace/f /home/agent/f; ls /workspace /home/agent | grep only- | sort"
            )
            .await,
            format!("{i}\n{i}\nonly-{i}\nonly-{i}\n"),
            "workspace {i} ({id}) sees another's writes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fork_has_its_own_quota_and_shares_blocks_until_it_writes() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let mut req = request("fork3");
    req.limits.volume_size = Some(ByteSize::mib(64));
    let w = create(c, req).await;
    ok(c, &w.id, "head -c 20M /dev/urandom > /workspace/seed && sync").await;

    let used = pool_used(c);
    let out = c.fork_workspace(&w.id, copies(2)).await.expect("fork");
    let grew = pool_used(c).saturating_sub(used);
    eprintln!("the pool grew by {grew} bytes for 2 copies of a volume holding 20 MiB");
    assert!(
        grew < 10_000_000,
        "copies share the source's blocks: the pool grew by {grew} bytes"
    );

    let (a, b) = (&out.workspaces[0], &out.workspaces[1]);
    let (code, _, err) = sh(c, &a.id, "dd if=/dev/zero of=/workspace/fill bs=1M status=none").await;
    assert_ne!(code, 0, "a copy writes past its quota");
    assert!(err.contains("No space left on device"), "{err}");
    let disk = |id: String| async move {
        let (_, u) = c.inspect_workspace(&id).await.unwrap();
        let u = u.expect("usage");
        (u.disk_used_bytes.unwrap(), u.disk_limit_bytes.unwrap())
    };
    let (a_used, a_limit) = disk(a.id.clone()).await;
    assert!(
        a_limit < 64 << 20 && a_used * 100 / a_limit >= 95,
        "{a_used} of {a_limit}"
    );
    // The source and the other copy still have their room.
    for id in [&w.id, &b.id] {
        ok(c, id, "head -c 20M /dev/urandom > /workspace/more && sync").await;
        let (used, limit) = disk(id.to_string()).await;
        assert_eq!(limit, a_limit, "the same size of quota");
        assert!(used * 100 / limit < 85, "{id}: {used} of {limit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_from_a_snapshot_outlives_the_snapshot_and_its_source() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, request("fork4")).await;
    let read = "cat /workspace/v /home/agent/v";
    ok(c, &w.id, "echo one > /workspace/v && echo one > /home/agent/v").await;
    c.create_snapshot(&w.id, "s1", false).await.unwrap();
    ok(c, &w.id, "echo two > /workspace/v && echo two > /home/agent/v").await;

    let req = ForkRequest {
        count: 1,
        snapshot: Some("s1".into()),
        agent_id: Some("fork4b".into()),
        env: BTreeMap::from([("EXTRA".to_string(), "set".to_string())]),
        limits: LimitOverrides {
            memory: Some(ByteSize::mib(256)),
            ..Default::default()
        },
    };
    let out = c.fork_workspace(&w.id, req).await.expect("fork from s1");
    assert_eq!((out.snapshot.as_deref(), out.paused_ms), (Some("s1"), None));
    let f = &out.workspaces[0];
    assert_eq!(f.agent_id, "fork4b");
    assert_eq!(f.container_name, naming::workspace_container("fork4b", &f.id));
    assert_eq!(f.limits.memory, ByteSize::mib(256));
    assert_eq!(ok(c, &f.id, read).await, "one\none\n");
    assert_eq!(ok(c, &f.id, "echo $EXTRA $CONDUCTOR_AGENT_ID").await, "set fork4b\n");
    let (_, usage) = c.inspect_workspace(&f.id).await.unwrap();
    assert_eq!(usage.unwrap().memory_limit_bytes, 256 << 20);
    assert_eq!(ok(c, &w.id, read).await, "two\ntwo\n", "the source is untouched");

    // The snapshot and then the source go; the copy runs on, and starts again.
    let snapshot_image = c
        .store
        .get_snapshot_by_name(&w.id, "s1")
        .unwrap()
        .unwrap()
        .rootfs_image
        .unwrap();
    c.delete_snapshot(&w.id, "s1").await.unwrap();
    c.remove_workspace(&w.id, Some(false)).await.unwrap();
    assert_eq!(ok(c, &f.id, read).await, "one\none\n");
    c.stop_workspace(&f.id).await.unwrap();
    c.start_workspace(&f.id).await.unwrap();
    assert_eq!(ok(c, &f.id, read).await, "one\none\n");
    c.remove_workspace(&f.id, None).await.unwrap();
    for image in [&f.image, &snapshot_image] {
        assert!(
            c.engine.image_inspect(image).await.unwrap().is_none(),
            "{image} is left"
        );
    }
}

/// A proxy-mode copy gets its own egress socket and gate: its requests are decided by the
/// source's policy and audited under the copy's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_mode_fork_has_its_own_proxy_and_audit() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let mut req = request("fork6");
    req.environment = "python-dev".into();
    req.network = Some(NetworkPolicy {
        mode: Some(NetworkMode::Proxy),
        allow: Some(vec!["allowed.test".into()]),
        deny: Vec::new(),
    });
    let w = create(c, req).await;
    let out = c.fork_workspace(&w.id, copies(1)).await.expect("fork");
    let f = &out.workspaces[0];
    assert_eq!(f.network_policy, w.network_policy);
    // Refused by the proxy: nothing leaves the machine.
    let got = ok(
        c,
        &f.id,
        "echo $HTTP_PROXY; curl -s -m 10 -o /dev/null -w '%{http_code}' http://denied.test/",
    )
    .await;
    assert_eq!(got, "http://127.0.0.1:3128\n403");
    let rows = |id: String| {
        c.egress_events(
            &id,
            EgressFilter {
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap()
        .into_iter()
        .filter(|r| r.host == "denied.test")
        .collect::<Vec<_>>()
    };
    let begin = Instant::now();
    while rows(f.id.clone()).is_empty() && begin.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mine = rows(f.id.clone());
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].decision, EgressDecision::Denied);
    assert!(rows(w.id.clone()).is_empty(), "audited under the source");
}

/// The containers, networks and volume directories a fork of `source` may have left.
async fn leftovers(c: &Conductor, source: &WorkspaceInfo) -> Vec<String> {
    let mut left: Vec<String> = c
        .engine
        .container_list(&[(naming::LABEL_FORK_OF, Some(source.id.as_str()))])
        .await
        .unwrap()
        .into_iter()
        .map(|ct| format!("container {}", ct.name))
        .collect();
    let agent_dir = Path::new(&source.volume_dir).parent().unwrap().to_path_buf();
    for e in std::fs::read_dir(&agent_dir).unwrap().flatten() {
        if e.path() != Path::new(&source.volume_dir) {
            left.push(format!("volume {}", e.path().display()));
        }
    }
    for w in c
        .list_workspaces(&ListFilter {
            all: true,
            ..Default::default()
        })
        .unwrap()
    {
        if w.id != source.id && w.state != WorkspaceState::Failed {
            left.push(format!("workspace {} {}", w.id, w.state));
        }
        if w.id != source.id && c.engine.image_inspect(&w.image).await.unwrap().is_some() {
            left.push(format!("image {}", w.image));
        }
    }
    left
}

/// A copy that cannot be made (the second of two finds no free network block) takes the
/// first one with it: nothing of the fork is left, and the source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_copy_leaves_no_copy_behind() {
    // Two /29 blocks: one for the source, one for the first copy, none for the second.
    let t = TestEnv::new("podman_config:\n  network:\n    subnet: 10.89.252.0/28\n").await;
    let c = t.c();
    let mut req = request("fork5");
    req.network = Some(NetworkPolicy::mode(NetworkMode::Egress));
    let w = create(c, req).await;
    ok(c, &w.id, "echo data > /workspace/f").await;
    match c.fork_workspace(&w.id, copies(2)).await {
        Err(ServiceError::Exhausted(m)) => assert!(m.contains("no free /29"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(leftovers(c, &w).await, Vec::<String>::new());
    let failed = c
        .list_workspaces(&ListFilter {
            state: Some(WorkspaceState::Failed),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(failed.len(), 2, "{failed:?}");
    for f in &failed {
        assert!(f.error.as_deref().unwrap_or("").contains("the fork failed"), "{f:?}");
    }
    let nets = c
        .engine
        .network_list(&[(naming::LABEL_INSTANCE, Some(c.instance.as_str()))])
        .await
        .unwrap();
    assert_eq!(nets.len(), 1, "only the source's network: {nets:?}");
    assert_eq!(ok(c, &w.id, "cat /workspace/f").await, "data\n");
    // With room for it, one copy works.
    let out = c.fork_workspace(&w.id, copies(1)).await.expect("one copy fits");
    assert_eq!(ok(c, &out.workspaces[0].id, "cat /workspace/f").await, "data\n");
    assert!(out.workspaces[0].network.is_some());
}

/// Runs the conductor binary with `config`; its stdout, asserting success.
fn output(config: &Path, args: &[&str]) -> String {
    let (ok, out, err) = common::cli(config, args, None);
    assert!(ok, "conductor {args:?}: {err}");
    String::from_utf8_lossy(&out).into_owned()
}

fn conductor(config: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CONDUCTOR_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd
}

/// Starts `conductor ws fork`, waits until `reached` says it got there, and kills it (-9).
fn kill_fork_when(config: &Path, id: &str, count: &str, reached: impl Fn() -> bool) {
    let mut child = conductor(config, &["ws", "fork", id, "--count", count])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let begin = Instant::now();
    while !reached() {
        assert!(begin.elapsed() < Duration::from_secs(120), "the fork never got there");
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("conductor ws fork ended ({status}) before it was killed: {err}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    // Its private Podman service dies with it (PR_SET_PDEATHSIG), a moment later: a restart
    // comes after that.
    let socket = format!("podman-{pid}.sock");
    let begin = Instant::now();
    while processes_with(&socket) && begin.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!processes_with(&socket), "the killed fork's Podman service lives on");
}

/// Whether a process's command line mentions `needle`.
fn processes_with(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(needle))
}

/// `repo:tag` of every image. Listing works: a commit cut short left no image without a
/// manifest. (A listing also fails, for a moment, when another process removes an image
/// meanwhile: that is tried again.)
fn list_images(stage: &str) -> String {
    let mut last = String::new();
    for _ in 0..5 {
        let out = std::process::Command::new("podman")
            .args(["images", "-a", "--format", "{{.Repository}}:{{.Tag}}"])
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !last.contains(r#"named "manifest""#),
            "{stage}: an unreadable image is left: {last}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{stage}: podman images fails: {last}");
}

/// Files under `dir` whose name satisfies `f`.
fn any_file(dir: &Path, f: impl Fn(&str) -> bool) -> bool {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().any(|e| f(&e.file_name().to_string_lossy())))
        .unwrap_or(false)
}

/// `conductor ws fork` is killed (SIGKILL) during the capture (the source paused, its
/// volume frozen), then while its copies are made: after `conductor reconcile` nothing of
/// either fork is left, and the source runs unchanged and writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_killed_midway_leaves_nothing_after_reconcile() {
    let (dir, config) = common::config_dir("conductor-test-", "");
    let id = output(&config, &["ws", "create", "--agent", "forkkill", "--env", "minimal"])
        .trim()
        .to_string();
    let _cleanup = RemoveOnDrop(config.clone(), id.clone());
    let run = |cmd: &str| output(&config, &["ws", "exec", &id, "--timeout", "60", "--", cmd]);
    run("head -c 50000000 /dev/urandom > /workspace/data && sha256sum /workspace/data > /home/agent/sum");
    let store = conductor_store::Store::open(&dir.path().join("conductor.db")).unwrap();
    let source = store.get_workspace(&id).unwrap().unwrap();
    let copies_dir = dir.path().join("isolated/.snapshots").join(&id);
    let agent_dir = Path::new(&source.volume_dir).parent().unwrap().to_path_buf();
    let copy_volume = || {
        std::fs::read_dir(&agent_dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path() != Path::new(&source.volume_dir) && e.path().join("data.img").exists())
            })
            .unwrap_or(false)
    };

    for (stage, reached) in [
        (
            "capture",
            Box::new(|| any_file(&copies_dir, |n| n.ends_with(".partial"))) as Box<dyn Fn() -> bool>,
        ),
        ("copies", Box::new(copy_volume)),
    ] {
        kill_fork_when(&config, &id, "6", reached);
        let creating: Vec<String> = store
            .list_workspaces(&Default::default())
            .unwrap()
            .into_iter()
            .filter(|w| w.state == WorkspaceState::Creating)
            .map(|w| w.id)
            .collect();
        assert_eq!(creating.len(), 6, "{stage}: killed mid-way, every copy recorded");

        let report = output(&config, &["reconcile"]);
        eprintln!("{stage}: {report}");
        for c in &creating {
            assert!(report.contains(c), "{stage}: {c} is not in the report {report}");
        }
        for w in store.list_workspaces(&Default::default()).unwrap() {
            if w.id == id {
                assert_eq!(w.state, WorkspaceState::Running, "{stage}: the source");
                continue;
            }
            assert_eq!(w.state, WorkspaceState::Failed, "{stage}: {}", w.id);
            assert!(!Path::new(&w.volume_dir).exists(), "{stage}: {} is left", w.volume_dir);
            let image = std::process::Command::new("podman")
                .args(["image", "exists", &w.image])
                .status()
                .unwrap();
            assert!(!image.success(), "{stage}: image {} is left", w.image);
        }
        assert_eq!(
            common::leftover_containers(&dir.path().join("conductor.db")),
            source.container_name,
            "{stage}: only the source's container is left"
        );
        assert!(
            store.list_snapshots(&id, false).unwrap().is_empty(),
            "{stage}: the capture is discarded"
        );
        assert!(
            !any_file(&copies_dir, |_| true),
            "{stage}: files left in {}",
            copies_dir.display()
        );
        let images = list_images(stage);
        assert!(
            !images.contains(&format!("{SNAPSHOT_REPOSITORY}/{id}:")),
            "{stage}: a capture image is left: {images}"
        );
        // Not frozen, not paused, unchanged.
        assert_eq!(
            run("sha256sum -c /home/agent/sum >/dev/null && echo written > /workspace/after && cat /workspace/after"),
            "written\n",
            "{stage}"
        );
    }
    // A fork now works.
    let forked = output(&config, &["ws", "fork", &id, "--count", "2"]);
    let ids: Vec<&str> = forked.lines().collect();
    assert_eq!(ids.len(), 2, "{forked}");
    for f in ids {
        assert_eq!(
            output(
                &config,
                &[
                    "ws",
                    "exec",
                    f,
                    "--",
                    "sha256sum -c /home/agent/sum >/dev/null && echo same"
                ]
            ),
            "same\n"
        );
        output(&config, &["ws", "rm", f]);
    }
}

/// Removes a workspace made through the binary, also when the test fails.
struct RemoveOnDrop(PathBuf, String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = conductor(&self.0, &["ws", "rm", &self.1, "--purge"]).status();
        let _ = conductor(&self.0, &["reconcile"]).status();
        common::unmount_under(self.0.parent().unwrap());
    }
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Bad requests over HTTP: a 4xx whose JSON body names the field (or the state), and no
/// workspace recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fork_requests_get_a_4xx_naming_the_field_or_state() {
    let (dir, config) = common::config_dir(
        "conductor-fork-api-",
        "isolated_workspace:\n  fork:\n    max_count: 3\n  cleanup:\n    max_containers: 3\n",
    );
    let served = common::serve(&config);
    let base = served.base.clone();
    let http = reqwest::Client::new();
    let (s, w) = post(
        &http,
        format!("{base}/workspaces"),
        json!({"agent_id": "forkbad", "environment": "minimal"}),
    )
    .await;
    assert_eq!(s, 201, "{w}");
    let id = w["id"].as_str().unwrap().to_string();
    let fork = format!("{base}/workspaces/{id}/fork");

    for (body, status, field, says) in [
        (json!({"count": 0}), 400, Some("count"), "at least 1"),
        (
            json!({"count": 4}),
            400,
            Some("count"),
            "isolated_workspace.fork.max_count",
        ),
        (json!({"count": "two"}), 400, Some("count"), ""),
        (json!({"count": 3}), 429, None, "count 3"),
        (json!({"snapshot": "never-taken"}), 400, Some("snapshot"), "never-taken"),
        (json!({"snapshot": "Bad Name"}), 400, Some("snapshot"), ""),
        (json!({"agent_id": "Not An Agent"}), 400, Some("agent_id"), ""),
        (json!({"env": {"BAD-NAME": "x"}}), 400, Some("env.BAD-NAME"), ""),
        (
            json!({"env": {"CONDUCTOR_X": "1"}}),
            400,
            Some("env.CONDUCTOR_X"),
            "reserved",
        ),
        (
            json!({"limits": {"volume_size": "1Gi"}}),
            400,
            Some("limits.volume_size"),
            "cannot change",
        ),
        (
            json!({"limits": {"memory": "64Gi"}}),
            400,
            Some("limits.memory"),
            "maximum",
        ),
        (json!({"privileged": true}), 400, Some("privileged"), ""),
    ] {
        let (s, e) = post(&http, fork.clone(), body.clone()).await;
        assert_eq!(s, status, "{body}: {e}");
        assert_eq!(e["error"]["field"].as_str(), field, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap_or("").contains(says),
            "{body}: {e}"
        );
    }
    let (s, e) = post(&http, format!("{base}/workspaces/ws-0000nosuch00/fork"), json!({})).await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")), "{e}");

    // A workspace still being created, then a removed one: 409 naming the state.
    let store = conductor_store::Store::open(&dir.path().join("conductor.db")).unwrap();
    store.set_workspace_state(&id, WorkspaceState::Creating, None).unwrap();
    let (s, e) = post(&http, fork.clone(), json!({})).await;
    store.set_workspace_state(&id, WorkspaceState::Running, None).unwrap();
    assert_eq!(s, 409, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("is creating"), "{e}");
    let r = http.delete(format!("{base}/workspaces/{id}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, e) = post(&http, fork.clone(), json!({})).await;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("is removed"), "{e}");

    // Refused before anything was recorded.
    let all: Value = http
        .get(format!("{base}/workspaces?all=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = all["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()], "{all}");
    assert!(served.stop().success());
    assert_eq!(common::leftover_containers(&dir.path().join("conductor.db")), "");
}
