//! Environments, images, configuration errors and the engine supervisor, against real
//! Podman and the real `conductor` binary.

mod common;

use std::process::Command;

use common::{quiet, TestEnv};
use conductor_service::exec::ExecRequest;
use conductor_service::host;
use conductor_service::workspaces::CreateRequest;
use conductor_service::ServiceError;

fn conductor(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_conductor"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CONDUCTOR_CONFIG")
        .output()
        .expect("run conductor")
}

/// Each preset's tools run as uid 1000 at their installed versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_preset_runs_its_tools_as_uid_1000() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let checks: [(&str, &str); 6] = [
        ("minimal", "git --version && curl --version | head -1 && bash --version | head -1"),
        ("python-dev", "python --version && pip --version && python3 -m venv /tmp/v && pytest --version && black --version && flake8 --version"),
        ("nodejs-dev", "node --version && npm --version && jest --version && eslint --version && prettier --version && git --version"),
        ("fullstack", "python3 --version && node --version && npm --version && gcc --version | head -1 && psql --version && redis-cli --version && wget --version | head -1"),
        ("python-ml", "python3 -c 'import numpy, pandas, sklearn; print(numpy.__version__, pandas.__version__, sklearn.__version__)' && jupyter --version | head -3"),
        ("security-tools", "bandit --version && shellcheck --version && npm --version && pip-audit --version && safety --version"),
    ];
    for (env, cmd) in checks {
        let w = c
            .create_workspace(
                CreateRequest {
                    agent_id: "tools".into(),
                    environment: env.into(),
                    ephemeral: true,
                    ..Default::default()
                },
                quiet(),
            )
            .await
            .unwrap_or_else(|e| panic!("{env}: {e}"));
        let (o, out, err) = c
            .exec_collect(&w.id, ExecRequest::new(format!("test $(id -u) = 1000 && {cmd}")))
            .await
            .unwrap();
        assert_eq!(o.exit_code, 0, "{env}: {out}\n{err}");
        assert!(!out.trim().is_empty(), "{env} printed no versions");
        c.remove_workspace(&w.id, Some(false)).await.unwrap();
    }
}

/// A custom `dockerfile:` environment builds once, is not rebuilt when unchanged, and is
/// rebuilt when edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_dockerfile_builds_once_and_rebuilds_on_change() {
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let cfg = |extra: &str| {
        format!(
            "isolated_workspace:\n  agent_containers:\n    environments:\n      - name: custom-{m}\n        dockerfile: |\n          FROM localhost/conductor/base:bookworm\n          RUN echo {m} > /marker{extra}\n",
            m = &marker[..8]
        )
    };
    let name = format!("custom-{}", &marker[..8]);
    let t = TestEnv::new(&cfg("")).await;
    let first = t.c().ensure_environment(&name, quiet(), false).await.unwrap();
    assert!(first.made_now);
    assert_eq!(first.info.labels.get("io.conductor.environment"), Some(&name));
    let second = t.c().ensure_environment(&name, quiet(), false).await.unwrap();
    assert!(!second.made_now, "an unchanged definition must not rebuild");
    assert_eq!(second.info.id, first.info.id);
    drop(t);

    let t2 = TestEnv::new(&cfg("\n          RUN echo edited >> /marker")).await;
    let third = t2.c().ensure_environment(&name, quiet(), false).await.unwrap();
    assert!(third.made_now, "an edited definition must rebuild");
    assert_ne!(third.reference, first.reference);
    for r in [&first.reference, &third.reference] {
        t2.c().engine.image_remove(r).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_build_names_the_environment_and_the_step() {
    let t = TestEnv::new(
        "isolated_workspace:\n  agent_containers:\n    environments:\n      - name: broken\n        dockerfile: |\n          FROM localhost/conductor/base:bookworm\n          RUN echo about to fail && exit 3\n",
    )
    .await;
    match t.c().ensure_environment("broken", quiet(), false).await {
        Err(ServiceError::Environment { name, message }) => {
            assert_eq!(name, "broken");
            assert!(message.contains("exit 3"), "{message}");
        }
        other => panic!("expected a build failure, got {other:?}"),
    }
    match t.c().ensure_environment("nope", quiet(), false).await {
        Err(ServiceError::Invalid { field, message }) => {
            assert_eq!(field, "environment");
            assert!(message.contains("unknown environment \"nope\""), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_errors_name_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(
        &p,
        "isolated_workspace:\n  agent_containers:\n    resources:\n      limits:\n        memory: 2Qi\n",
    )
    .unwrap();
    let out = conductor(&p, &["env", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "isolated_workspace.agent_containers.resources.limits.memory: \"2Qi\" is not a size (examples: 512Mi, 2Gi)"
        ),
        "{err}"
    );

    std::fs::write(&p, "isolated_workspace:\n  mode: [unclosed\n").unwrap();
    let out = conductor(&p, &["env", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("invalid YAML") && err.contains("line"), "{err}");

    std::fs::write(
        &p,
        format!(
            "storage:\n  base_path: {}\nisolated_workspace:\n  enabledd: true\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = conductor(&p, &["env", "build", "no-such-env"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("warning:") && err.contains("isolated_workspace.enabledd"),
        "unknown key warning: {err}"
    );
    assert!(err.contains("unknown environment \"no-such-env\""), "{err}");
}

/// On a cgroups v1 host crun is rejected and runc chosen; on v2 crun is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_detection_falls_back_to_runc() {
    let t = TestEnv::new("").await;
    let info = t.c().engine.info().await.unwrap();
    if host::cgroup_version().is_v2() {
        assert_eq!(info.runtime, "crun", "{}", info.runtime_reason);
    } else {
        assert_eq!(info.runtime, "runc", "{}", info.runtime_reason);
        assert!(info.runtime_reason.contains("crun"), "{}", info.runtime_reason);
    }
    assert!(info.managed);
}

/// The private `podman system service` ends with conductor.
#[test]
fn managed_podman_service_is_gone_after_exit() {
    let dir = tempfile::Builder::new()
        .prefix("conductor-test-")
        .tempdir_in(common::test_root())
        .unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(&p, common::config_text(dir.path(), "")).unwrap();
    let out = conductor(&p, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("OCI runtime") && text.contains("podman version"),
        "{text}"
    );
    let sock = dir.path().join("podman.sock").display().to_string();
    let alive: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&sock))
        .collect();
    assert!(alive.is_empty(), "podman service still running: {alive:?}");
}

/// The base image is made from nothing: debootstrap from the host's Debian mirror, then
/// imported; a container of it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_image_bootstraps_from_nothing() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let reference = format!(
        "localhost/conductor-test/base:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = lines.clone();
    let progress: conductor_core::engine::ProgressSink = std::sync::Arc::new(move |_| {
        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let info = c.bootstrap_base(&reference, progress).await.expect("bootstrap");
    assert!(info.size_bytes > 50_000_000, "{}", info.size_bytes);
    assert!(
        lines.load(std::sync::atomic::Ordering::Relaxed) > 10,
        "progress was reported"
    );
    let runtime = c.engine.info().await.unwrap().runtime;
    let out = Command::new("podman")
        .args(["run", "--rm", "--runtime", runtime.as_str(), "--network", "none"])
        .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
        .args([
            reference.as_str(),
            "sh",
            "-c",
            ". /etc/os-release && echo $VERSION_CODENAME",
        ])
        .output()
        .unwrap();
    c.engine.image_remove(&reference).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "bookworm",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
