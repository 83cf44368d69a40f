//! Snapshots against real Podman: a restore brings back exactly the state at snapshot time
//! (contents, owners and modes, in /workspace and outside it), running workspaces keep
//! running, several snapshots, delete, retention, names, crash recovery (a killed
//! `conductor snapshot create`, an interrupted restore) and removal with the workspace.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{quiet, TestEnv};
use conductor_core::lifecycle::{SnapshotState, WorkspaceState};
use conductor_service::snapshots::{SnapshotInfo, SNAPSHOT_REPOSITORY};
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};
use conductor_store::NewTask;

async fn create(c: &Conductor, agent: &str) -> WorkspaceInfo {
    let req = CreateRequest {
        agent_id: agent.into(),
        environment: "minimal".into(),
        ..Default::default()
    };
    c.create_workspace(req, quiet()).await.expect("create workspace")
}

/// Runs a shell command (60 s at most: a frozen volume must not hang the test).
async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let mut req = conductor_service::exec::ExecRequest::new(cmd);
    req.timeout = Some(Duration::from_secs(60));
    let (o, out, err) = c.exec_collect(id, req).await.expect("exec");
    (o.exit_code, out, err)
}

/// Runs a command that must succeed and returns its output.
async fn ok(c: &Conductor, id: &str, cmd: &str) -> String {
    let (code, out, err) = sh(c, id, cmd).await;
    assert_eq!(code, 0, "{cmd}: {err}");
    out
}

/// Every path of the root file system and of /workspace with type, owner, group, mode, size
/// and link target, plus a hash of every file in the places the tests change. Podman's own
/// per-container files (hosts, hostname, resolv.conf, .containerenv) are left out.
const LISTING: &str = r#"{ find / /workspace -xdev -type d -printf '%p d %U %G %m\n'; find / /workspace -xdev ! -type d -printf '%p %y %U %G %m %s %l\n'; } 2>/dev/null | grep -v -E '^/(etc/hosts|etc/hostname|etc/resolv\.conf|run/\.containerenv) ' | LC_ALL=C sort; find /workspace /home/agent /tmp -xdev -type f -exec sha256sum {} + 2>/dev/null | LC_ALL=C sort"#;

async fn listing(c: &Conductor, id: &str) -> String {
    let out = ok(c, id, LISTING).await;
    assert!(out.contains("/workspace/src/a.txt"), "{out}");
    out
}

fn names(list: &[SnapshotInfo]) -> Vec<&str> {
    list.iter().map(|s| s.name.as_str()).collect()
}

/// Where the snapshot's volume copy is (the store's record of it).
fn copy_path(c: &Conductor, workspace_id: &str, name: &str) -> PathBuf {
    let r = c
        .store
        .get_snapshot_by_name(workspace_id, name)
        .unwrap()
        .expect("snapshot row");
    PathBuf::from(r.data_ref.expect("data_ref"))
}

fn image_of(c: &Conductor, workspace_id: &str, name: &str) -> String {
    let r = c
        .store
        .get_snapshot_by_name(workspace_id, name)
        .unwrap()
        .expect("snapshot row");
    r.rootfs_image.expect("rootfs_image")
}

/// Shows the first differing lines of two listings.
fn assert_same(expected: &str, got: &str) {
    if expected != got {
        let e: Vec<&str> = expected.lines().collect();
        let g: Vec<&str> = got.lines().collect();
        let missing: Vec<&&str> = e.iter().filter(|l| !g.contains(l)).take(20).collect();
        let extra: Vec<&&str> = g.iter().filter(|l| !e.contains(l)).take(20).collect();
        panic!("listings differ\nmissing: {missing:#?}\nextra: {extra:#?}");
    }
}

const SETUP: &str = r#"set -e
cd /workspace
mkdir -p src/pkg docs
printf 'alpha\n' > src/a.txt
printf 'beta\n' > src/b.txt
printf 'gamma\n' > src/pkg/c.py
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

const CHANGES: &str = r#"set -e
cd /workspace
printf 'changed\n' > src/a.txt
chmod 644 src/a.txt
rm src/b.txt
printf 'new\n' > src/new.txt
rm -r docs
chmod 700 src/pkg
rm /home/agent/.tool-config
rm -r /home/agent/.local/share/installed-pkg
printf 'x\n' > /home/agent/.bash_logout
chmod 700 /home/agent/.local/bin/tool
printf 'later\n' >> /tmp/outside.txt
touch /tmp/new-file
mkdir /home/agent/newdir
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_brings_back_exactly_the_snapshot() {
    let t = TestEnv::new("").await;
    let c = t.c();
    // The workspaces path is the reflink pool (XFS on a loop file).
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let pool = c.paths.workspaces.canonicalize().unwrap().display().to_string();
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(pool.as_str()) && l.contains(" xfs ")),
        "{pool} is not an XFS mount"
    );

    let w = create(c, "snap1").await;
    ok(c, &w.id, SETUP).await;
    let before = listing(c, &w.id).await;

    let begin = Instant::now();
    let s = c.create_snapshot(&w.id, "base", false).await.expect("snapshot");
    let took = begin.elapsed();
    assert_eq!((s.name.as_str(), s.workspace_id.as_str()), ("base", w.id.as_str()));
    assert_eq!(s.state, SnapshotState::Complete);
    assert!(s.size_bytes > 300_000, "size counts the volume copy: {s:?}");
    assert!(
        s.created_at.ends_with('Z') && s.created_at.len() == 24,
        "{}",
        s.created_at
    );
    eprintln!("snapshot of a running workspace took {took:?}, {} bytes", s.size_bytes);
    // Paused and resumed: the process started before is still there, the state unchanged.
    assert_eq!(c.get_workspace(&w.id).unwrap().state, WorkspaceState::Running);
    assert_eq!(ok(c, &w.id, "ps -eo args | grep -c '^sleep 1234'").await.trim(), "1");
    assert_same(&before, &listing(c, &w.id).await);
    assert!(copy_path(c, &w.id, "base").is_file());

    ok(c, &w.id, CHANGES).await;
    let changed = listing(c, &w.id).await;
    assert_ne!(before, changed);

    let begin = Instant::now();
    let r = c.restore_snapshot(&w.id, "base").await.expect("restore");
    eprintln!("restore took {:?}", begin.elapsed());
    assert_eq!(r.state, WorkspaceState::Running);
    assert_eq!(
        (r.id.as_str(), r.container_name.as_str()),
        (w.id.as_str(), w.container_name.as_str())
    );
    assert_eq!(r.image, image_of(c, &w.id, "base"));
    assert!(r.image.starts_with(SNAPSHOT_REPOSITORY), "{}", r.image);
    assert_same(&before, &listing(c, &w.id).await);
    // The same hardening and identity as before.
    let out = ok(
        c,
        &w.id,
        "id -u; hostname; echo $CONDUCTOR_WORKSPACE_ID; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[2], w.id);
    assert!(
        lines[3].ends_with("0000000000000000") && lines[4].ends_with('1'),
        "{out}"
    );

    // Restoring twice in a row is the same.
    ok(c, &w.id, CHANGES).await;
    c.restore_snapshot(&w.id, "base").await.expect("second restore");
    assert_same(&before, &listing(c, &w.id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_snapshots_older_restore_and_delete() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, "snap2").await;
    let step = |v: &str| format!("echo {v} > /workspace/v; echo {v} > /home/agent/v");
    let read = "cat /workspace/v /home/agent/v";
    ok(c, &w.id, &step("one")).await;
    c.create_snapshot(&w.id, "s1", false).await.unwrap();
    ok(c, &w.id, &step("two")).await;
    c.create_snapshot(&w.id, "s2", false).await.unwrap();
    ok(c, &w.id, &step("three")).await;
    // A stopped workspace is snapshotted too, and a restore starts it.
    c.stop_workspace(&w.id).await.unwrap();
    c.create_snapshot(&w.id, "s3", false).await.unwrap();
    assert_eq!(c.get_workspace(&w.id).unwrap().state, WorkspaceState::Stopped);
    assert_eq!(names(&c.list_snapshots(&w.id).unwrap()), ["s1", "s2", "s3"]);
    // By agent id (its only live workspace) too.
    assert_eq!(c.list_snapshots("snap2").unwrap().len(), 3);

    c.restore_snapshot(&w.id, "s1").await.unwrap();
    assert_eq!(ok(c, &w.id, read).await, "one\none\n");
    c.restore_snapshot("snap2", "s3").await.unwrap();
    assert_eq!(ok(c, &w.id, read).await, "three\nthree\n");
    c.restore_snapshot(&w.id, "s2").await.unwrap();
    assert_eq!(ok(c, &w.id, read).await, "two\ntwo\n");

    // Delete: gone from the list, its image and its copy are removed.
    let (s1_image, s1_copy) = (image_of(c, &w.id, "s1"), copy_path(c, &w.id, "s1"));
    c.delete_snapshot(&w.id, "s1").await.unwrap();
    assert_eq!(names(&c.list_snapshots(&w.id).unwrap()), ["s2", "s3"]);
    assert!(c.engine.image_inspect(&s1_image).await.unwrap().is_none());
    assert!(!s1_copy.exists());
    match c.delete_snapshot(&w.id, "s1").await {
        Err(ServiceError::NotFound { what }) => assert!(what.contains("'s1'"), "{what}"),
        other => panic!("{other:?}"),
    }
    match c.restore_snapshot(&w.id, "s1").await {
        Err(ServiceError::NotFound { what }) => assert!(what.contains("'s1'"), "{what}"),
        other => panic!("{other:?}"),
    }
    // The snapshot the container now runs on can be deleted; its image stays while used.
    let s2_image = image_of(c, &w.id, "s2");
    c.delete_snapshot(&w.id, "s2").await.unwrap();
    assert!(c.engine.image_inspect(&s2_image).await.unwrap().is_some());
    assert_eq!(ok(c, &w.id, read).await, "two\ntwo\n");
    // Restoring elsewhere releases it.
    c.restore_snapshot(&w.id, "s3").await.unwrap();
    assert!(c.engine.image_inspect(&s2_image).await.unwrap().is_none());
    assert_eq!(ok(c, &w.id, read).await, "three\nthree\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_overwrite_busy_and_retention() {
    let t = TestEnv::new("isolated_workspace:\n  snapshots:\n    max_per_workspace: 2\n").await;
    let c = t.c();
    let w = create(c, "snap3").await;
    for bad in ["", "Bad", "-x", "a/b", "../x", "a b", &"x".repeat(64)] {
        match c.create_snapshot(&w.id, bad, false).await {
            Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "name", "{bad:?}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    match c.restore_snapshot(&w.id, "../etc").await {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "name"),
        other => panic!("{other:?}"),
    }
    match c.create_snapshot("no-such-workspace", "x", false).await {
        Err(ServiceError::NotFound { what }) => assert!(what.contains("no-such-workspace"), "{what}"),
        other => panic!("{other:?}"),
    }

    ok(c, &w.id, "echo first > /workspace/f").await;
    let first = c.create_snapshot(&w.id, "dup", false).await.unwrap();
    match c.create_snapshot(&w.id, "dup", false).await {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("overwrite"), "{m}"),
        other => panic!("{other:?}"),
    }
    ok(c, &w.id, "echo second > /workspace/f").await;
    let first_image = image_of(c, &w.id, "dup");
    let second = c.create_snapshot(&w.id, "dup", true).await.unwrap();
    assert!(second.created_at >= first.created_at);
    assert_ne!(image_of(c, &w.id, "dup"), first_image);
    assert!(c.engine.image_inspect(&first_image).await.unwrap().is_none());
    assert_eq!(names(&c.list_snapshots(&w.id).unwrap()), ["dup"]);
    ok(c, &w.id, "echo third > /workspace/f").await;
    c.restore_snapshot(&w.id, "dup").await.unwrap();
    assert_eq!(ok(c, &w.id, "cat /workspace/f").await, "second\n");

    // A task running in the workspace blocks a restore, except by that task itself.
    let task = NewTask {
        id: "task-snapbusy0001".into(),
        batch_id: None,
        agent_id: Some("snap3".into()),
        environment: "minimal".into(),
        spec_json: "{}".into(),
        priority: 5,
        created_at: conductor_service::now_ms(),
    };
    c.store.insert_tasks(&[task]).unwrap();
    c.store
        .claim_task("task-snapbusy0001", conductor_service::now_ms())
        .unwrap();
    c.store.set_task_workspace("task-snapbusy0001", &w.id).unwrap();
    match c.restore_snapshot(&w.id, "dup").await {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("task-snapbusy0001"), "{m}"),
        other => panic!("{other:?}"),
    }
    c.restore_snapshot_for_task(&w.id, "dup", "task-snapbusy0001")
        .await
        .expect("the task itself may restore");
    c.store
        .finish_task(
            "task-snapbusy0001",
            conductor_core::lifecycle::TaskState::Failed,
            None,
            None,
            None,
            conductor_service::now_ms(),
        )
        .unwrap();

    // Retention: at most two per workspace, the oldest go first.
    c.create_snapshot(&w.id, "r1", false).await.unwrap();
    assert_eq!(names(&c.list_snapshots(&w.id).unwrap()), ["dup", "r1"]);
    let dup_copy = copy_path(c, &w.id, "dup");
    c.create_snapshot(&w.id, "r2", false).await.unwrap();
    assert_eq!(names(&c.list_snapshots(&w.id).unwrap()), ["r1", "r2"]);
    assert!(!dup_copy.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_size_retention_removes_the_oldest_anywhere() {
    // Every snapshot is larger than 1 MiB: only the newest one survives.
    let t = TestEnv::new("isolated_workspace:\n  snapshots:\n    max_total_size: 1Mi\n").await;
    let c = t.c();
    let a = create(c, "snap4a").await;
    let b = create(c, "snap4b").await;
    ok(c, &a.id, "head -c 2000000 /dev/urandom > /workspace/blob").await;
    let sa = c.create_snapshot(&a.id, "a1", false).await.unwrap();
    assert!(sa.size_bytes > 1 << 20, "{sa:?}");
    c.create_snapshot(&b.id, "b1", false).await.unwrap();
    assert!(c.list_snapshots(&a.id).unwrap().is_empty());
    assert_eq!(names(&c.list_snapshots(&b.id).unwrap()), ["b1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_workspace_deletes_or_keeps_its_snapshots() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let gone = create(c, "snap5a").await;
    c.create_snapshot(&gone.id, "s", false).await.unwrap();
    let (image, copy) = (image_of(c, &gone.id, "s"), copy_path(c, &gone.id, "s"));
    c.remove_workspace(&gone.id, Some(false)).await.unwrap();
    assert!(c.list_snapshots(&gone.id).unwrap().is_empty());
    assert!(c.engine.image_inspect(&image).await.unwrap().is_none());
    assert!(!copy.exists());

    let kept = create(c, "snap5b").await;
    c.create_snapshot(&kept.id, "s", false).await.unwrap();
    let image = image_of(c, &kept.id, "s");
    c.remove_workspace(&kept.id, Some(true)).await.unwrap();
    assert_eq!(names(&c.list_snapshots(&kept.id).unwrap()), ["s"]);
    assert!(c.engine.image_inspect(&image).await.unwrap().is_some());
    // It can no longer be restored (the workspace is gone), only deleted.
    assert!(matches!(
        c.restore_snapshot(&kept.id, "s").await,
        Err(ServiceError::Conflict(_))
    ));
    c.delete_snapshot(&kept.id, "s").await.unwrap();
    assert!(c.engine.image_inspect(&image).await.unwrap().is_none());
}

/// Runs the conductor binary with the test's configuration.
fn conductor(config: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CONDUCTOR_CONFIG");
    cmd
}

fn output(config: &Path, args: &[&str]) -> String {
    let out = conductor(config, args).output().expect("run conductor");
    assert!(
        out.status.success(),
        "conductor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `conductor snapshot create` is killed (SIGKILL) while it captures: after a restart
/// (`conductor reconcile`) no partial snapshot is listed, nothing partial is left, and the
/// workspace runs unchanged (not paused, its volume not frozen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_midway_leaves_nothing_behind() {
    let dir = tempfile::Builder::new()
        .prefix("conductor-test-")
        .tempdir_in(common::test_root())
        .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, common::config_text(dir.path(), "")).unwrap();
    let id = output(&config, &["ws", "create", "--agent", "snapkill", "--env", "minimal"])
        .trim()
        .to_string();
    let _cleanup = RemoveOnDrop(config.clone(), id.clone());
    let run = |cmd: &str| output(&config, &["ws", "exec", &id, "--timeout", "60", "--", cmd]);
    run("head -c 50000000 /dev/urandom > /workspace/data && sha256sum /workspace/data > /home/agent/sum");

    // Killed while the volume copy is written or the image committed (the copy is
    // `*.partial` until the commit is done).
    let copies = dir.path().join("isolated/.snapshots").join(&id);
    let mut child = conductor(&config, &["snapshot", "create", &id, "doomed"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let begin = Instant::now();
    loop {
        let partial = std::fs::read_dir(&copies)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            })
            .unwrap_or(false);
        if partial {
            break;
        }
        assert!(begin.elapsed() < Duration::from_secs(60), "the snapshot never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "conductor exited before it was killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let store = conductor_store::Store::open(&dir.path().join("conductor.db")).unwrap();
    assert_eq!(
        store.list_snapshots_in_state(SnapshotState::Creating).unwrap().len(),
        1,
        "killed mid-way"
    );

    let report = output(&config, &["reconcile"]);
    assert!(report.contains(&format!("{id}/doomed")), "{report}");
    assert!(output(&config, &["snapshot", "ls", &id, "--json"]).trim() == "[]");
    assert!(store.list_snapshots(&id, false).unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(&copies)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", copies.display());
    // Writable (not frozen, not paused) and unchanged.
    assert_eq!(
        run("sha256sum -c /home/agent/sum >/dev/null && echo written > /workspace/after && cat /workspace/after"),
        "written\n"
    );
    // A snapshot taken now works and survives a restart of conductor.
    output(&config, &["snapshot", "create", &id, "fine"]);
    output(&config, &["reconcile"]);
    assert!(output(&config, &["snapshot", "ls", &id]).contains("fine"));
}

/// Removes a workspace made through the binary, also when the test fails.
struct RemoveOnDrop(PathBuf, String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = conductor(&self.0, &["ws", "rm", &self.1, "--purge"]).output();
    }
}

/// A restore interrupted after the container was removed is finished by reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_is_finished_by_reconcile() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(c, "snap6").await;
    ok(
        c,
        &w.id,
        "echo snapshot > /workspace/v && echo snapshot > /home/agent/v",
    )
    .await;
    c.create_snapshot(&w.id, "s", false).await.unwrap();
    ok(c, &w.id, "echo later > /workspace/v && echo later > /home/agent/v").await;
    // What a crash in the middle of a restore leaves: its marker, and no container.
    let snapshot_id = c.store.get_snapshot_by_name(&w.id, "s").unwrap().unwrap().id;
    std::fs::write(
        c.paths.snapshots.join(&w.id).join("restore.json"),
        format!("{{\"snapshot_id\":\"{snapshot_id}\"}}"),
    )
    .unwrap();
    c.engine.container_remove(&w.container_name).await.unwrap();

    let report = c.reconcile().await.unwrap();
    assert_eq!(report.restores_finished, vec![format!("{}/s", w.id)]);
    assert!(report.lost.is_empty(), "{report:?}");
    assert_eq!(c.get_workspace(&w.id).unwrap().state, WorkspaceState::Running);
    assert_eq!(
        ok(c, &w.id, "cat /workspace/v /home/agent/v").await,
        "snapshot\nsnapshot\n"
    );
    assert!(!c.paths.snapshots.join(&w.id).join("restore.json").exists());
}
