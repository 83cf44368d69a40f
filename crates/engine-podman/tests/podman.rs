//! Integration tests of `PodmanEngine` against the real Podman of this machine.
//!
//! Every test starts its own private `podman system service` in a temporary data directory,
//! names what it creates after a fresh test id, labels it `io.conductor.test=<id>`, and
//! removes it through a [`Cleanup`] guard that also runs when the test fails. Tests needing
//! an image use conductor's base image (`localhost/conductor/base:bookworm`, made by
//! `conductor env build` / the test script) and fail clearly when it is missing. No traffic
//! leaves the machine: containers run without network or on internal networks the tests
//! create, and the failing pull targets a closed port on loopback.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use conductor_core::config::{RuntimeChoice, LOCAL_BASE_IMAGE};
use conductor_core::engine::{
    BuildSpec, ContainerSpec, ContainerStatus, Engine, EngineError, ExecSpec, Labels, Mount, NetworkAttachment,
    NetworkSpec, OutputChunk, Progress, ProgressSink, ResourceLimits, SecurityOptions,
};
use conductor_engine_podman::{PodmanEngine, PodmanOptions, ServiceRole};
use tokio::sync::mpsc;

const TEST_LABEL: &str = "io.conductor.test";
/// Set in the environment of the child process of `service_dies_with_a_killed_conductor`.
const HELPER_ENV: &str = "CONDUCTOR_ENGINE_PODMAN_DEATH_HELPER";

/// One test's engine, ids and clean-up.
struct TestContext {
    engine: PodmanEngine,
    id: String,
    cleanup: Cleanup,
    _data_dir: tempfile::TempDir,
}

impl TestContext {
    async fn new() -> Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let engine = PodmanEngine::connect(PodmanOptions {
            socket_path: None,
            data_dir: data_dir.path().to_path_buf(),
            runtime: RuntimeChoice::Auto,
            role: ServiceRole::Guest,
        })
        .await?;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        Ok(Self {
            engine,
            cleanup: Cleanup {
                id: id.clone(),
                images: Mutex::default(),
            },
            id,
            _data_dir: data_dir,
        })
    }

    fn name(&self, what: &str) -> String {
        format!("ct-{what}-{}", self.id)
    }

    fn labels(&self) -> Labels {
        Labels::from([(TEST_LABEL.to_string(), self.id.clone())])
    }

    /// A plain long-running container from the base image, with limits the host accepts.
    fn container_spec(&self, what: &str) -> ContainerSpec {
        ContainerSpec {
            name: self.name(what),
            image: LOCAL_BASE_IMAGE.into(),
            labels: self.labels(),
            env: vec![("CONDUCTOR_TEST".into(), "1".into())],
            entrypoint: None,
            cmd: Some(vec!["sleep".into(), "infinity".into()]),
            user: None,
            workdir: None,
            hostname: None,
            mounts: Vec::new(),
            network: NetworkAttachment::None,
            extra_hosts: Vec::new(),
            published_ports: Vec::new(),
            limits: ResourceLimits {
                memory_bytes: 0,
                nano_cpus: 0,
                pids: 0,
                nofile: 1024,
                nproc: 1024,
            },
            security: SecurityOptions {
                cap_drop_all: false,
                no_new_privileges: false,
                seccomp_profile: None,
                readonly_rootfs: false,
            },
        }
    }

    async fn run_container(&self, spec: &ContainerSpec) -> Result<String> {
        require_base_image(&self.engine).await?;
        let id = self.engine.container_create(spec).await?;
        self.engine.container_start(&id).await?;
        Ok(id)
    }

    /// Runs a command to completion; returns (exit code, stdout, stderr).
    async fn exec(&self, container: &str, argv: &[&str], stdin: Option<&str>) -> Result<(i64, String, String)> {
        let spec = ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: stdin.map(|s| Bytes::from(s.to_string())),
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(16);
        let collect = tokio::spawn(async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(chunk) = rx.recv().await {
                match chunk {
                    OutputChunk::Stdout(b) => out.extend_from_slice(&b),
                    OutputChunk::Stderr(b) => err.extend_from_slice(&b),
                }
            }
            (
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
            )
        });
        let code = self.engine.exec(container, spec, tx).await?;
        let (out, err) = collect.await?;
        Ok((code, out, err))
    }

    /// Runs a command that must succeed and returns its trimmed stdout.
    async fn sh(&self, container: &str, script: &str) -> Result<String> {
        let (code, out, err) = self.exec(container, &["sh", "-c", script], None).await?;
        ensure!(code == 0, "`{script}` exited with {code}: {err}");
        Ok(out.trim().to_string())
    }

    fn remember_image(&self, reference: &str) {
        self.cleanup.images.lock().unwrap().push(reference.to_string());
    }
}

/// Removes everything a test made, by label and by name, with the podman CLI (it works
/// even when the engine under test is broken, and from a synchronous Drop).
struct Cleanup {
    id: String,
    images: Mutex<Vec<String>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={TEST_LABEL}={}", self.id);
        let list = |args: &[&str]| -> Vec<String> {
            std::process::Command::new("podman")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let remove = |args: &[&str], names: Vec<String>| {
            if !names.is_empty() {
                let _ = std::process::Command::new("podman").args(args).args(&names).output();
            }
        };
        remove(&["rm", "-f"], list(&["ps", "-a", "-q", "--filter", &filter]));
        remove(
            &["network", "rm", "-f"],
            list(&["network", "ls", "-q", "--filter", &filter]),
        );
        let mut images = list(&["images", "-q", "--filter", &filter]);
        images.extend(self.images.lock().unwrap().drain(..));
        remove(&["rmi", "-f"], images);
    }
}

async fn require_base_image(engine: &PodmanEngine) -> Result<()> {
    if engine.image_inspect(LOCAL_BASE_IMAGE).await?.is_none() {
        bail!("the base image {LOCAL_BASE_IMAGE} is missing: build it first (scripts/test.sh does, or `conductor env build`)");
    }
    Ok(())
}

fn seccomp_profile() -> (PathBuf, bool) {
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/seccomp.json");
    if ours.exists() {
        (ours, true)
    } else {
        (PathBuf::from("/usr/share/containers/seccomp.json"), false)
    }
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline).contains(needle).then_some(pid)
        })
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn collecting_sink() -> (ProgressSink, Arc<Mutex<Vec<Progress>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = events.clone();
    (Arc::new(move |p| sink_events.lock().unwrap().push(p)), events)
}

#[tokio::test]
async fn managed_service_uses_runc_here_and_stops_on_shutdown() -> Result<()> {
    let ctx = TestContext::new().await?;
    let info = ctx.engine.info().await?;
    assert!(info.version.starts_with("podman 4."), "{info:?}");
    assert!(info.managed, "{info:?}");
    assert_eq!(info.runtime, "runc", "{info:?}");
    assert_eq!(ctx.engine.runtime(), "runc");
    assert!(info.runtime_reason.contains("crun"), "{}", info.runtime_reason);
    assert_eq!(info.cgroup_version, "v1 (hybrid)");
    let socket = info.endpoint.clone();
    // A guest's private service listens on a socket of its own, never the instance's.
    assert!(
        socket.ends_with(&format!("/podman-{}.sock", std::process::id())),
        "{socket}"
    );
    assert!(!processes_mentioning(&socket).is_empty(), "no process serves {socket}");

    let TestContext {
        engine,
        cleanup: _cleanup,
        _data_dir,
        ..
    } = ctx;
    engine.shutdown().await?;
    assert!(
        processes_mentioning(&socket).is_empty(),
        "the service outlived shutdown()"
    );
    assert!(!Path::new(&socket).exists(), "the socket file was left behind");
    Ok(())
}

#[tokio::test]
async fn an_answering_socket_is_used_and_a_dead_one_replaced() -> Result<()> {
    let ctx = TestContext::new().await?;
    let socket = PathBuf::from(ctx.engine.info().await?.endpoint);

    let other_dir = tempfile::tempdir()?;
    let external = PodmanEngine::connect(PodmanOptions {
        socket_path: Some(socket.clone()),
        data_dir: other_dir.path().to_path_buf(),
        runtime: RuntimeChoice::Runc,
        role: ServiceRole::Guest,
    })
    .await?;
    let info = external.info().await?;
    assert!(
        !info.managed && info.endpoint == socket.display().to_string(),
        "{info:?}"
    );
    assert!(info.runtime_reason.contains("configured"), "{}", info.runtime_reason);
    external.shutdown().await?;
    // Shutting down a client of an external socket leaves the service alone.
    assert!(ctx.engine.info().await.is_ok());

    let dead = other_dir.path().join("nobody.sock");
    let replaced = PodmanEngine::connect(PodmanOptions {
        socket_path: Some(dead),
        data_dir: other_dir.path().to_path_buf(),
        runtime: RuntimeChoice::Runc,
        role: ServiceRole::Guest,
    })
    .await?;
    let info = replaced.info().await?;
    assert!(
        info.managed && info.endpoint.starts_with(&other_dir.path().display().to_string()),
        "{info:?}"
    );
    // Dropping the engine (no shutdown) stops its service too.
    drop(replaced);
    wait_until("the dropped engine's service is gone", Duration::from_secs(10), || {
        processes_mentioning(&info.endpoint).is_empty()
    })
    .await
}

/// Not a test on its own: with `HELPER_ENV` set it is the "conductor" that
/// `service_dies_with_a_killed_conductor` starts and kills.
#[tokio::test]
async fn death_helper() -> Result<()> {
    let Some(data_dir) = std::env::var_os(HELPER_ENV) else {
        return Ok(());
    };
    let engine = PodmanEngine::connect(PodmanOptions {
        socket_path: None,
        data_dir: PathBuf::from(data_dir),
        runtime: RuntimeChoice::Runc,
        role: ServiceRole::Guest,
    })
    .await?;
    println!("READY {}", engine.info().await?.endpoint);
    // Spawned worker threads come and go; the service must survive them while we live.
    for _ in 0..4 {
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(10))).await?;
    }
    tokio::time::sleep(Duration::from_secs(120)).await;
    Ok(())
}

#[tokio::test]
async fn service_dies_with_a_killed_conductor() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let data_dir = tempfile::tempdir()?;
    let mut helper = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "death_helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, data_dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(helper.stdout.take().context("helper stdout")?).lines();
    let socket = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            // libtest prints "test death_helper ... " on the same line.
            if let Some((_, socket)) = line.split_once("READY ") {
                return Ok(socket.trim().to_string());
            }
        }
        Err(anyhow!("the helper ended without connecting"))
    })
    .await??;
    // Outlives the spawning thread's siblings, as it should.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!processes_mentioning(&socket).is_empty(), "no process serves {socket}");

    helper.start_kill()?; // SIGKILL: no destructor runs in the helper.
    helper.wait().await?;
    wait_until(
        "the service of the killed helper is gone",
        Duration::from_secs(10),
        || processes_mentioning(&socket).is_empty(),
    )
    .await
}

#[tokio::test]
async fn hardened_container_is_confined_as_specified() -> Result<()> {
    let ctx = TestContext::new().await?;
    let (profile, our_profile) = seccomp_profile();
    let shared = tempfile::tempdir()?;
    std::fs::write(shared.path().join("hello.txt"), "from the host")?;
    std::fs::set_permissions(shared.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let mut spec = ctx.container_spec("hard");
    spec.user = Some("1000:1000".into());
    spec.workdir = Some("/workspace".into());
    spec.hostname = Some("hardened".into());
    spec.extra_hosts = vec![("redis".into(), "127.0.0.1".into())];
    spec.limits = ResourceLimits {
        memory_bytes: 256 << 20,
        nano_cpus: 1_000_000_000,
        pids: 64,
        nofile: 1536,
        nproc: 512,
    };
    spec.security = SecurityOptions {
        cap_drop_all: true,
        no_new_privileges: true,
        seccomp_profile: Some(profile),
        readonly_rootfs: true,
    };
    spec.mounts = vec![
        Mount::Tmpfs {
            target: "/tmp".into(),
            size_bytes: 16 << 20,
            options: vec!["noexec".into(), "nosuid".into(), "nodev".into()],
        },
        Mount::Bind {
            source: shared.path().to_path_buf(),
            target: "/workspace".into(),
            readonly: false,
        },
    ];

    let started = Instant::now();
    let id = ctx.run_container(&spec).await?;
    let create_start = started.elapsed();

    let started = Instant::now();
    let uid = ctx.sh(&id, "id -u").await?;
    let exec_latency = started.elapsed();
    assert_eq!(uid, "1000");
    let status = ctx
        .sh(&id, "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status")
        .await?;
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let limits = ctx.sh(&id, "cat /proc/self/limits").await?;
    for (limit, value) in [
        ("Max open files", "1536"),
        ("Max processes", "512"),
        ("Max core file size", "0"),
    ] {
        let line = limits.lines().find(|line| line.starts_with(limit)).context(limit)?;
        let fields: Vec<&str> = line[limit.len()..].split_whitespace().collect();
        assert_eq!(&fields[..2], &[value, value], "{line}");
    }
    assert_eq!(ctx.sh(&id, "ulimit -n").await?, "1536");
    assert_eq!(
        ctx.sh(&id, "pwd; hostname; grep -c redis /etc/hosts").await?,
        "/workspace\nhardened\n1"
    );
    // Loopback only.
    assert_eq!(ctx.sh(&id, "ls /sys/class/net").await?, "lo");
    // Read-only root, writable tmpfs with the requested size and options, writable bind.
    let (code, _, _) = ctx.exec(&id, &["touch", "/etc/x"], None).await?;
    assert_ne!(code, 0, "the root file system is writable");
    let tmp = ctx.sh(&id, "touch /tmp/x && grep ' /tmp ' /proc/mounts").await?;
    assert!(
        tmp.contains("size=16384k") && tmp.contains("noexec") && tmp.contains("nosuid"),
        "{tmp}"
    );
    assert_eq!(
        ctx.sh(&id, "cat hello.txt && echo back > reply.txt").await?,
        "from the host"
    );
    assert_eq!(std::fs::read_to_string(shared.path().join("reply.txt"))?, "back\n");
    if our_profile {
        // conductor's profile denies unshare (Podman's default allows it for this user).
        let (code, _, err) = ctx.exec(&id, &["unshare", "-U", "true"], None).await?;
        assert_ne!(code, 0, "unshare was allowed");
        assert!(err.contains("Operation not permitted"), "{err}");
    } else {
        eprintln!("profiles/seccomp.json is missing: checked Podman's default profile only");
    }

    // Busy loop in the background for the CPU reading; its output must not hold the exec.
    ctx.sh(&id, "(timeout 5 sh -c 'while :; do :; done' >/dev/null 2>&1 &)")
        .await?;
    let stats = ctx.engine.container_stats(&id).await?;
    // One busy process, capped at one CPU; the host (2 CPUs) may be busy with other work.
    assert!(stats.cpu_percent > 5.0 && stats.cpu_percent < 130.0, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, 256 << 20, "{stats:?}");
    assert!(stats.memory_bytes > 0 && stats.memory_bytes < 256 << 20, "{stats:?}");
    assert!(stats.pids >= 2, "{stats:?}");
    assert_eq!(stats.pids_limit, 64, "{stats:?}");

    let info = ctx.engine.container_inspect(&id).await?.context("inspect")?;
    assert_eq!(
        (info.status, info.name.as_str(), info.image.as_str()),
        (ContainerStatus::Running, spec.name.as_str(), LOCAL_BASE_IMAGE)
    );
    assert!(
        info.pid.is_some_and(|pid| pid > 1) && info.exit_code.is_none() && !info.oom_killed,
        "{info:?}"
    );
    assert_eq!(info.labels.get(TEST_LABEL), Some(&ctx.id));

    let started = Instant::now();
    ctx.engine.container_remove(&id).await?;
    let remove = started.elapsed();
    assert!(ctx.engine.container_inspect(&id).await?.is_none());
    eprintln!("stats: {stats:?}");
    eprintln!("latency: create+start {create_start:?}, exec {exec_latency:?}, force remove {remove:?}");
    Ok(())
}

#[tokio::test]
async fn containers_list_stop_pause_and_disappear() -> Result<()> {
    let ctx = TestContext::new().await?;
    let id = ctx.run_container(&ctx.container_spec("life")).await?;
    let mut other = ctx.container_spec("other");
    other.labels.insert("io.conductor.role".into(), "sidecar".into());
    other.network = NetworkAttachment::Container(id.clone());
    let sidecar = ctx.engine.container_create(&other).await?;

    let all = ctx.engine.container_list(&[(TEST_LABEL, Some(&ctx.id))]).await?;
    let mut names: Vec<_> = all.iter().map(|c| (c.name.clone(), c.status)).collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        names,
        vec![
            (ctx.name("life"), ContainerStatus::Running),
            (ctx.name("other"), ContainerStatus::Created)
        ]
    );
    let sidecars = ctx
        .engine
        .container_list(&[(TEST_LABEL, Some(&ctx.id)), ("io.conductor.role", None)])
        .await?;
    assert_eq!(sidecars.len(), 1);
    assert_eq!(sidecars[0].id, sidecar);

    // The sidecar shares the first container's network namespace.
    ctx.engine.container_start(&sidecar).await?;
    let (_, ns_a, _) = ctx.exec(&id, &["readlink", "/proc/self/ns/net"], None).await?;
    let (_, ns_b, _) = ctx.exec(&sidecar, &["readlink", "/proc/self/ns/net"], None).await?;
    assert_eq!(ns_a, ns_b);
    ctx.engine.container_remove(&sidecar).await?;

    ctx.engine.container_pause(&id).await?;
    assert_eq!(
        ctx.engine.container_inspect(&id).await?.context("inspect")?.status,
        ContainerStatus::Paused
    );
    ctx.engine.container_unpause(&id).await?;
    ctx.engine.container_stop(&id, 1).await?;
    let stopped = ctx.engine.container_inspect(&id).await?.context("inspect")?;
    assert_eq!(stopped.status, ContainerStatus::Exited);
    assert!(stopped.exit_code.is_some() && stopped.pid.is_none(), "{stopped:?}");

    ctx.engine.container_remove(&id).await?;
    ctx.engine.container_remove(&id).await?; // idempotent
    assert!(ctx.engine.container_inspect(&id).await?.is_none());
    assert!(ctx
        .engine
        .container_list(&[(TEST_LABEL, Some(&ctx.id))])
        .await?
        .is_empty());
    match ctx.engine.container_start(&id).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains(&id), "{what}"),
        other => panic!("start of a removed container: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn exec_streams_output_codes_and_stdin() -> Result<()> {
    let ctx = TestContext::new().await?;
    let id = ctx.run_container(&ctx.container_spec("exec")).await?;

    let mut latencies = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(ctx.exec(&id, &["true"], None).await?.0, 0);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    eprintln!("latency: exec of `true`, median of 5: {:?}", latencies[2]);

    let (code, out, err) = ctx
        .exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"], None)
        .await?;
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));

    let (code, out, _) = ctx
        .exec(&id, &["sh", "-c", "cat; echo done"], Some("hello\nworld\n"))
        .await?;
    assert_eq!((code, out.as_str()), (0, "hello\nworld\ndone\n"));

    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), "echo \"$A $(pwd) $(id -u)\"".into()],
        user: Some("1000".into()),
        workdir: Some("/tmp".into()),
        env: vec![("A".into(), "x y".into())],
        stdin: None,
    };
    let (tx, mut rx) = mpsc::channel(4);
    assert_eq!(ctx.engine.exec(&id, spec, tx).await?, 0);
    assert_eq!(
        rx.recv().await,
        Some(OutputChunk::Stdout(Bytes::from("x y /tmp 1000\n")))
    );

    // 8 MiB through a channel of one chunk: arrives in pieces, complete, while we consume.
    let (tx, mut rx) = mpsc::channel(1);
    let consumer = tokio::spawn(async move {
        let (mut total, mut chunks) = (0usize, 0usize);
        while let Some(OutputChunk::Stdout(bytes)) = rx.recv().await {
            total += bytes.len();
            chunks += 1;
        }
        (total, chunks)
    });
    let big = ExecSpec {
        argv: vec!["head".into(), "-c".into(), "8388608".into(), "/dev/zero".into()],
        ..Default::default()
    };
    assert_eq!(ctx.engine.exec(&id, big, tx).await?, 0);
    let (total, chunks) = consumer.await?;
    assert_eq!(total, 8 << 20);
    assert!(chunks > 8, "output came in {chunks} chunks");

    // A dropped receiver does not fail the exec.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), "head -c 100000 /dev/zero; exit 5".into()],
        ..Default::default()
    };
    assert_eq!(ctx.engine.exec(&id, spec, tx).await?, 5);

    let (tx, _rx) = mpsc::channel(1);
    let missing = ExecSpec {
        argv: vec!["true".into()],
        ..Default::default()
    };
    match ctx.engine.exec(&ctx.name("missing"), missing, tx).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains("missing"), "{what}"),
        other => panic!("exec in a missing container: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn images_build_commit_import_and_remove() -> Result<()> {
    let ctx = TestContext::new().await?;
    require_base_image(&ctx.engine).await?;
    let tag = format!("localhost/conductor-test/build:{}", ctx.id);
    ctx.remember_image(&tag);
    let mut labels = ctx.labels();
    labels.insert("io.conductor.env".into(), "tiny".into());
    let spec = BuildSpec {
        tag: tag.clone(),
        containerfile: format!(
            "FROM {LOCAL_BASE_IMAGE}\nARG GREETING\nCOPY greet.sh /usr/local/bin/greet\nRUN echo \"$GREETING\" > /greeting\n"
        ),
        context_files: vec![("greet.sh".into(), b"#!/bin/sh\ncat /greeting\n".to_vec(), 0o755)],
        build_args: [("GREETING".to_string(), "hi there".to_string())].into(),
        labels: labels.clone(),
        host_network: false,
    };
    let (sink, events) = collecting_sink();
    let started = Instant::now();
    let built = ctx.engine.image_build(spec, sink).await?;
    eprintln!("latency: build {:?}", started.elapsed());
    let events = events.lock().unwrap().clone();
    // Four instructions, then Podman adds one LABEL step per label.
    let total = 4 + labels.len() as u32;
    assert!(
        events.contains(&Progress::Step {
            index: 1,
            total,
            text: format!("FROM {LOCAL_BASE_IMAGE}")
        }),
        "{events:?}"
    );
    assert!(
        events.contains(&Progress::Line(format!(
            "STEP 3/{total}: COPY greet.sh /usr/local/bin/greet"
        ))),
        "{events:?}"
    );
    let inspected = ctx.engine.image_inspect(&tag).await?.context("built image missing")?;
    assert_eq!(inspected.id, built.id);
    assert!(inspected.size_bytes > 0);
    assert_eq!(
        inspected.labels.get("io.conductor.env").map(String::as_str),
        Some("tiny")
    );

    // The built image runs, and a commit of its container keeps the change plus new labels.
    let mut spec = ctx.container_spec("built");
    spec.image = tag.clone();
    let id = ctx.run_container(&spec).await?;
    assert_eq!(ctx.sh(&id, "greet").await?, "hi there");
    ctx.sh(&id, "echo changed > /marker").await?;
    let committed_tag = format!("localhost/conductor-test/commit:{}", ctx.id);
    ctx.remember_image(&committed_tag);
    let commit_labels = Labels::from([("io.conductor.snapshot".to_string(), "a \"quoted\" value".to_string())]);
    let committed = ctx.engine.image_commit(&id, &committed_tag, commit_labels).await?;
    assert_eq!(
        committed.labels.get("io.conductor.snapshot").map(String::as_str),
        Some("a \"quoted\" value")
    );
    assert_eq!(
        committed.labels.get(TEST_LABEL),
        Some(&ctx.id),
        "labels of the parent image are kept"
    );
    ctx.engine.container_remove(&id).await?;
    let mut spec = ctx.container_spec("committed");
    spec.image = committed_tag.clone();
    let id = ctx.run_container(&spec).await?;
    assert_eq!(ctx.sh(&id, "cat /marker").await?, "changed");
    ctx.engine.container_remove(&id).await?;

    // Import of a (tiny, file-only) root file system tarball.
    let rootfs = tempfile::NamedTempFile::new()?;
    {
        let mut archive = tar::Builder::new(std::fs::File::create(rootfs.path())?);
        let mut header = tar::Header::new_gnu();
        header.set_size(6);
        header.set_mode(0o644);
        archive.append_data(&mut header, "etc/imported", &b"hello\n"[..])?;
        archive.finish()?;
    }
    let imported_tag = format!("localhost/conductor-test/import:{}", ctx.id);
    ctx.remember_image(&imported_tag);
    let (sink, events) = collecting_sink();
    let imported = ctx
        .engine
        .image_import(rootfs.path().to_path_buf(), &imported_tag, sink)
        .await?;
    assert!(!events.lock().unwrap().is_empty(), "no import progress");
    assert_eq!(
        ctx.engine
            .image_inspect(&imported_tag)
            .await?
            .context("imported image missing")?
            .id,
        imported.id
    );

    for reference in [&imported_tag, &committed_tag, &tag] {
        ctx.engine.image_remove(reference).await?;
        assert!(
            ctx.engine.image_inspect(reference).await?.is_none(),
            "{reference} survived removal"
        );
    }
    match ctx.engine.image_remove(&tag).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains(&tag), "{what}"),
        other => panic!("removal of a missing image: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn failing_build_names_the_step() -> Result<()> {
    let ctx = TestContext::new().await?;
    require_base_image(&ctx.engine).await?;
    let tag = format!("localhost/conductor-test/broken:{}", ctx.id);
    ctx.remember_image(&tag);
    let spec = BuildSpec {
        tag: tag.clone(),
        containerfile: format!("FROM {LOCAL_BASE_IMAGE}\nRUN echo before-failure\nRUN echo about to fail && exit 7\n"),
        labels: ctx.labels(),
        ..Default::default()
    };
    let (sink, _) = collecting_sink();
    match ctx.engine.image_build(spec, sink).await {
        Err(EngineError::BuildFailed { image, step, log_tail }) => {
            assert_eq!(image, tag);
            assert_eq!(step, "3/4: RUN echo about to fail && exit 7");
            assert!(log_tail.contains("about to fail"), "{log_tail}");
            assert!(log_tail.contains("exit status 7"), "{log_tail}");
        }
        other => panic!("expected BuildFailed, got {other:?}"),
    }
    assert!(ctx.engine.image_inspect(&tag).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn missing_objects_and_unreachable_registries() -> Result<()> {
    let ctx = TestContext::new().await?;
    assert!(ctx.engine.container_inspect(&ctx.name("nope")).await?.is_none());
    ctx.engine.container_remove(&ctx.name("nope")).await?;
    assert!(ctx
        .engine
        .image_inspect("localhost/conductor-test/none:nope")
        .await?
        .is_none());
    ctx.engine.network_remove(&ctx.name("nope")).await?;

    let mut spec = ctx.container_spec("noimage");
    spec.image = "localhost/conductor-test/none:nope".into();
    match ctx.engine.container_create(&spec).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains("conductor-test/none"), "{what}"),
        other => panic!("create from a missing image: {other:?}"),
    }

    // Port 1 on loopback: refused at once, and nothing leaves the machine.
    let reference = "localhost:1/conductor-test/none:nope";
    let (sink, _) = collecting_sink();
    match ctx.engine.image_pull(reference, sink).await {
        Err(error @ EngineError::Failed { .. }) => {
            let text = error.to_string();
            assert!(
                text.starts_with(&format!("failed to pull image '{reference}': ")),
                "{text}"
            );
        }
        other => panic!("pull from a closed port: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn internal_network_without_dns() -> Result<()> {
    let ctx = TestContext::new().await?;
    let name = ctx.name("net");
    let octet = u8::from_str_radix(&ctx.id[..2], 16)?;
    let subnet = format!("10.{}.{}.0/28", 200 + octet % 50, octet);
    let mut labels = ctx.labels();
    labels.insert("io.conductor.workspace".into(), "ws-1".into());
    let spec = NetworkSpec {
        name: name.clone(),
        internal: true,
        dns: false,
        subnet: Some(subnet.clone()),
        mtu: Some(1400),
        driver: "bridge".into(),
        labels: labels.clone(),
    };
    ctx.engine.network_create(&spec).await?;
    match ctx.engine.network_create(&spec).await {
        Err(EngineError::Failed { op, .. }) => assert_eq!(op, format!("create network '{name}'")),
        other => panic!("creating a network twice: {other:?}"),
    }

    let inspect = std::process::Command::new("podman")
        .args(["network", "inspect", &name])
        .output()?;
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    let network = &inspect[0];
    assert_eq!(network["internal"], true, "{network}");
    assert_eq!(network["dns_enabled"], false, "{network}");
    assert_eq!(network["options"]["mtu"], "1400", "{network}");
    assert_eq!(network["subnets"][0]["subnet"], subnet.as_str(), "{network}");

    let listed = ctx
        .engine
        .network_list(&[(TEST_LABEL, Some(&ctx.id)), ("io.conductor.workspace", None)])
        .await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].subnets.clone(), &listed[0].labels),
        (name.as_str(), vec![subnet], &labels)
    );

    // A container on it has an address but no default route.
    let mut container = ctx.container_spec("on-net");
    container.network = NetworkAttachment::Network(name.clone());
    let id = ctx.run_container(&container).await?;
    let routes = ctx.sh(&id, "cat /proc/net/route").await?;
    assert!(routes.lines().count() >= 2, "no route for the network: {routes}");
    assert!(
        !routes
            .lines()
            .skip(1)
            .any(|line| line.split_whitespace().nth(1) == Some("00000000")),
        "{routes}"
    );
    ctx.engine.container_remove(&id).await?;

    ctx.engine.network_remove(&name).await?;
    ctx.engine.network_remove(&name).await?; // idempotent
    assert!(ctx
        .engine
        .network_list(&[(TEST_LABEL, Some(&ctx.id))])
        .await?
        .is_empty());
    Ok(())
}

#[tokio::test]
async fn published_ports_answer_on_loopback() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let ctx = TestContext::new().await?;
    // Podman publishes no ports from internal networks, so this one routes (nothing uses it).
    let network = ctx.name("pub");
    ctx.engine
        .network_create(&NetworkSpec {
            name: network.clone(),
            internal: false,
            dns: false,
            subnet: None,
            mtu: None,
            driver: "bridge".into(),
            labels: ctx.labels(),
        })
        .await?;
    let host_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut spec = ctx.container_spec("pub");
    spec.network = NetworkAttachment::Network(network.clone());
    spec.published_ports = vec![(8080, host_port)];
    let server = r#"$s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die $!;
                    while ($c = $s->accept) { print $c "hello from the container\n"; close $c }"#;
    spec.cmd = Some(vec![
        "perl".into(),
        "-MIO::Socket::INET".into(),
        "-e".into(),
        server.into(),
    ]);
    let id = ctx.run_container(&spec).await?;

    let inspect = std::process::Command::new("podman").args(["inspect", &id]).output()?;
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    let binding = &inspect[0]["HostConfig"]["PortBindings"]["8080/tcp"][0];
    assert_eq!(binding["HostIp"], "127.0.0.1", "{binding}");
    assert_eq!(binding["HostPort"], host_port.to_string(), "{binding}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let greeting = loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        match attempt.await {
            Ok(text) if !text.is_empty() => break text,
            _ if Instant::now() > deadline => bail!("nothing answered on 127.0.0.1:{host_port}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(greeting, "hello from the container\n");
    ctx.engine.container_remove(&id).await?;
    ctx.engine.network_remove(&network).await?;
    Ok(())
}
