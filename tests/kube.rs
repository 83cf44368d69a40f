//! The Kubernetes backend's rendered objects, proved without a cluster (issue 17):
//!
//! - every object conductor renders (each preset in both modes and each network mode, a
//!   workspace's Pod, the RBAC, snapshots) reads back through the k8s-openapi types of the
//!   targeted API (and the agent-sandbox and VolumeSnapshot types) with no field unknown to
//!   them and nothing changed (`strict::check_object`);
//! - the rendered Pod, played by Podman's own Kubernetes implementation (`podman kube play`),
//!   runs with the hardening conductor's Podman workspaces have, checked from inside with
//!   real processes through the agent it starts as PID 1.
//!
//! The cluster suite (tests/kube_cluster.rs) runs when `KUBECONFIG` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{agent_workspace, cli, config_dir, TestEnv};
use conductor_core::config::KubeMode;
use conductor_core::engine::OutputChunk;
use conductor_core::Config;
use conductor_engine_kube::k8s_openapi::api::core::v1::PersistentVolumeClaim;
use conductor_engine_kube::{render, sandbox, snapshot, strict};
use conductor_service::agent_client::{self, AgentConn};
use conductor_service::kube::{self, PresetOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const PRESETS: [&str; 6] = [
    "minimal",
    "python-dev",
    "nodejs-dev",
    "fullstack",
    "python-ml",
    "security-tools",
];

fn check_all(docs: &[Value], what: &str) -> Vec<String> {
    docs.iter()
        .map(|d| strict::check_object(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .collect()
}

fn config(extra: &str) -> Config {
    Config::parse(extra).expect("test config").config
}

#[test]
fn every_rendered_object_reads_back_through_the_api_types() {
    let mut kinds = std::collections::BTreeSet::new();
    for network in ["isolated", "proxy", "egress"] {
        for readonly in [false, true] {
            let c = config(&format!(
                "isolated_workspace:\n  agent_containers:\n    network: {network}\n    readonly_rootfs: {readonly}\n\
                 engine:\n  backend: podman\n  kubernetes:\n    storage_class: fast\n    snapshot_class: csi-snap\n    image_registry: registry.example/conductor\n"
            ));
            let kube_cfg = &c.engine.kubernetes;
            for preset in PRESETS {
                for mode in [KubeMode::Pod, KubeMode::AgentSandbox] {
                    for services in [vec![], vec!["redis:7".to_string(), "postgres:14".to_string()]] {
                        let opts = PresetOptions {
                            services,
                            agent_id: Some("a1".into()),
                            mode: Some(mode),
                        };
                        let plan = kube::preset_plan(&c, preset, &opts, "i1").unwrap();
                        let what = format!("{preset} {mode:?} {network} readonly={readonly}");
                        let docs = kube::manifests(&plan, kube_cfg, 2);
                        kinds.extend(check_all(&docs, &what));
                        // The cold-start Sandbox, the snapshot of the PVC and the PVC made
                        // again from it.
                        let extra = vec![
                            serde_json::to_value(sandbox::sandbox(&plan)).unwrap(),
                            serde_json::to_value(snapshot::volume_snapshot(
                                &plan.name,
                                "s1",
                                &plan.namespace,
                                kube_cfg.snapshot_class.as_deref(),
                            ))
                            .unwrap(),
                        ];
                        kinds.extend(check_all(&extra, &what));
                        if let Some(pvc) = render::pvc(&plan) {
                            let back = serde_json::to_value(snapshot::restored_claim(&pvc, "s1")).unwrap();
                            kinds.extend(check_all(&[back], &what));
                        }
                    }
                }
            }
            kinds.extend(check_all(&kube::rbac_manifests(kube_cfg), "rbac"));
        }
    }
    let expected = [
        "v1/Pod",
        "v1/PersistentVolumeClaim",
        "v1/ServiceAccount",
        "networking.k8s.io/v1/NetworkPolicy",
        "rbac.authorization.k8s.io/v1/Role",
        "rbac.authorization.k8s.io/v1/RoleBinding",
        "rbac.authorization.k8s.io/v1/ClusterRole",
        "rbac.authorization.k8s.io/v1/ClusterRoleBinding",
        "agents.x-k8s.io/v1beta1/Sandbox",
        "extensions.agents.x-k8s.io/v1beta1/SandboxTemplate",
        "extensions.agents.x-k8s.io/v1beta1/SandboxWarmPool",
        "extensions.agents.x-k8s.io/v1beta1/SandboxClaim",
        "snapshot.storage.k8s.io/v1/VolumeSnapshot",
    ];
    let got: Vec<&str> = kinds.iter().map(String::as_str).collect();
    for k in expected {
        assert!(got.contains(&k), "{k} never rendered: {got:?}");
    }
    // The checker itself refuses what the API does not know.
    let mut pod = kube::manifests(
        &kube::preset_plan(&config(""), "minimal", &PresetOptions::default(), "i1").unwrap(),
        &config("").engine.kubernetes,
        0,
    )
    .pop()
    .unwrap();
    pod["spec"]["containers"][0]["securityContext"]["noNewPrivileges"] = json!(true);
    let e = strict::check_object(&pod).unwrap_err();
    assert!(e.contains("noNewPrivileges"), "{e}");
}

#[test]
fn the_network_policy_of_each_mode_never_allows_private_ranges() {
    for network in ["isolated", "proxy", "egress"] {
        let c = config(&format!(
            "isolated_workspace:\n  agent_containers:\n    network: {network}\n"
        ));
        let plan = kube::preset_plan(&c, "minimal", &PresetOptions::default(), "i1").unwrap();
        let docs = kube::manifests(&plan, &c.engine.kubernetes, 0);
        let policy = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
        let pod = docs.iter().find(|d| d["kind"] == "Pod").unwrap();
        let spec = &policy["spec"];
        assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]), "{network}");
        assert!(spec.get("ingress").is_none(), "{network}: no ingress at all");
        // The policy selects this Pod.
        for (k, v) in spec["podSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&pod["metadata"]["labels"][k], v, "{network}: selector {k}");
        }
        let egress = spec
            .get("egress")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match network {
            "isolated" => assert!(egress.is_empty(), "isolated allows nothing: {egress:?}"),
            "proxy" => {
                // Only the proxy's Pods (and DNS to kube-dns for its name), never an ipBlock.
                assert!(!egress.is_empty());
                for rule in &egress {
                    for to in rule["to"].as_array().unwrap() {
                        assert!(to.get("ipBlock").is_none(), "proxy: {rule}");
                    }
                }
            }
            _ => {
                let text = serde_json::to_string(&egress).unwrap();
                for private in [
                    "10.0.0.0/8",
                    "172.16.0.0/12",
                    "192.168.0.0/16",
                    "169.254.0.0/16",
                    "100.64.0.0/10",
                    "127.0.0.0/8",
                    "fc00::/7",
                    "fe80::/10",
                ] {
                    assert!(text.contains(private), "egress must except {private}: {text}");
                }
                for rule in &egress {
                    for to in rule["to"].as_array().unwrap() {
                        match to["ipBlock"]["cidr"].as_str() {
                            Some(cidr) => {
                                assert!(cidr == "0.0.0.0/0" || cidr == "::/0", "{cidr}");
                                assert!(!to["ipBlock"]["except"].as_array().unwrap().is_empty());
                            }
                            // DNS, to the cluster's resolver only.
                            None => assert_eq!(to["podSelector"]["matchLabels"]["k8s-app"], "kube-dns", "{rule}"),
                        }
                    }
                }
            }
        }
    }
}

/// The Pod of a workspace conductor created on Podman, rendered from its container spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_podman_workspace_renders_as_an_equivalent_pod() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "kube-ws1", None).await;
    let record = &w;
    for mode in [KubeMode::Pod, KubeMode::AgentSandbox] {
        let plan = c.kube_workspace_plan(&w.id, Some(mode)).unwrap();
        let docs = kube::manifests(&plan, &c.config.engine.kubernetes, 0);
        check_all(&docs, &format!("workspace {mode:?}"));
        if mode == KubeMode::Pod {
            let pod = docs.iter().find(|d| d["kind"] == "Pod").unwrap();
            let ws = &pod["spec"]["containers"][0];
            assert_eq!(ws["name"], "workspace");
            assert_eq!(ws["image"].as_str(), Some(record.image.as_str()));
            assert_eq!(
                ws["resources"]["limits"]["memory"].as_str(),
                Some(record.limits.memory.bytes().to_string().as_str())
            );
            assert_eq!(ws["command"], json!(["/.conductor/agent"]));
            assert_eq!(
                pod["metadata"]["labels"]["io.conductor.workspace"].as_str(),
                Some(w.id.as_str())
            );
            let pvc = docs.iter().find(|d| d["kind"] == "PersistentVolumeClaim").unwrap();
            assert_eq!(
                pvc["spec"]["resources"]["requests"]["storage"].as_str(),
                Some(record.limits.volume_size.bytes().to_string().as_str())
            );
        }
    }
    // Through the CLI as a user runs it.
    let (ok, out, err) = cli(
        &t.config_path(),
        &["kube", "render", "workspace", &w.id, "--json"],
        None,
    );
    assert!(ok, "{err}");
    let docs: Vec<Value> = serde_json::from_slice(&out).unwrap();
    check_all(&docs, "cli workspace");
    let (ok, _, err) = cli(&t.config_path(), &["kube", "render", "workspace", "nope"], None);
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
}

// ---- podman kube play ----

/// Runs `cmd` with `/bin/sh -c` through the agent in `dir`: (exit code, stdout, stderr).
async fn agent_sh(dir: &Path, cmd: &str) -> (i32, String, String) {
    let conn = AgentConn::connect(dir).await.expect("agent connection");
    let (tx, mut rx) = mpsc::channel(64);
    let req = conductor_agent_protocol::ExecRequest {
        shell: Some(cmd.into()),
        ..Default::default()
    };
    let run = tokio::spawn(conn.exec(req, None, tx));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(chunk) = rx.recv().await {
        match chunk {
            OutputChunk::Stdout(b) => out.extend_from_slice(&b),
            OutputChunk::Stderr(b) => err.extend_from_slice(&b),
        }
    }
    let exit = run.await.unwrap().expect("exec through the agent");
    (
        exit.code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Removes the played pod and its volume, also when the test fails.
struct Played {
    file: PathBuf,
    volume: String,
    network: String,
    env: Vec<(String, String)>,
}

impl Drop for Played {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .envs(self.env.clone())
            .args(["kube", "down"])
            .arg(&self.file)
            .output();
        let _ = Command::new("podman")
            .args(["volume", "rm", "-f", &self.volume])
            .output();
        let _ = Command::new("podman")
            .args(["network", "rm", "-f", &self.network])
            .output();
    }
}

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_pod_runs_hardened_under_podman_kube_play() {
    let agent_id = format!("kp{}", std::process::id());
    let extra = "isolated_workspace:\n  agent_containers:\n    readonly_rootfs: true\n\
                 engine:\n  backend: podman\n  kubernetes:\n    agent_image: localhost/conductor/agent:kube-test\n    seccomp_profile: conductor-seccomp.json\n";
    let (dir, config_path) = config_dir("conductor-kubeplay-", extra);

    // The agent image, built as a user builds it for a cluster.
    let (ok, out, err) = cli(&config_path, &["kube", "agent-image"], None);
    assert!(ok, "kube agent-image: {err}");
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        "localhost/conductor/agent:kube-test"
    );

    // The manifests, as `conductor kube render` prints them.
    let (ok, out, err) = cli(
        &config_path,
        &[
            "kube",
            "render",
            "preset",
            "minimal",
            "--service",
            "redis:7",
            "--agent-id",
            &agent_id,
            "--json",
        ],
        None,
    );
    assert!(ok, "kube render: {err}");
    let docs: Vec<Value> = serde_json::from_slice(&out).unwrap();
    check_all(&docs, "played preset");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["NetworkPolicy", "PersistentVolumeClaim", "Pod"]);
    let text = std::fs::read_to_string(&config_path).unwrap();
    let cfg = Config::parse(&text).unwrap().config;
    let plan = kube::preset_plan(
        &cfg,
        "minimal",
        &PresetOptions {
            services: vec!["redis:7".into()],
            agent_id: Some(agent_id.clone()),
            mode: Some(KubeMode::Pod),
        },
        "rendered",
    )
    .unwrap();

    // What `podman kube play` (4.3) does not implement is checked in the objects instead:
    // - NetworkPolicy: kube play has no network policies; the policy's content is checked.
    //   The Pod is played on an `--internal` Podman network the test makes (no route out:
    //   what `isolated` gives); `--network none` would do too, but kube play then ignores
    //   `hostAliases`, which name the sidecars.
    let policy = &docs[0];
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert!(policy["spec"].get("egress").is_none() && policy["spec"].get("ingress").is_none());
    // - PVC size and storage class: kube play makes a named volume without a quota.
    let pvc: PersistentVolumeClaim = serde_json::from_value(docs[1].clone()).unwrap();
    let requested = pvc
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["storage"]
        .0
        .clone();
    assert_eq!(requested, plan.volume.as_ref().unwrap().size_bytes.to_string());
    assert_eq!(
        pvc.spec.as_ref().unwrap().access_modes,
        Some(vec!["ReadWriteOnce".to_string()])
    );
    // - emptyDir `medium: Memory` and `sizeLimit`: kube play makes plain volumes; checked here.
    let mut pod = docs[2].clone();
    for v in pod["spec"]["volumes"].as_array().unwrap() {
        if v.get("emptyDir").is_some() {
            assert_eq!(v["emptyDir"]["medium"], "Memory", "{v}");
            assert!(v["emptyDir"]["sizeLimit"].as_str().is_some(), "{v}");
        }
    }
    // - seccompProfile in the securityContext: kube play reads only the older annotation
    //   (and a flat file name under --seccomp-profile-root); the annotation is added with the
    //   same profile, after checking what the securityContext asks for.
    assert_eq!(
        pod["spec"]["securityContext"]["seccompProfile"],
        json!({"type": "Localhost", "localhostProfile": "conductor-seccomp.json"})
    );
    pod["metadata"]["annotations"] =
        json!({"seccomp.security.alpha.kubernetes.io/pod": "localhost/conductor-seccomp.json"});
    // - The agent's socket directory is an emptyDir; for this host to reach the agent it is
    //   a hostPath here (the cluster reaches it through the exec subresource).
    let sock_dir = dir.path().join("agent-run");
    std::fs::create_dir_all(&sock_dir).unwrap();
    std::os::unix::fs::chown(&sock_dir, Some(1000), Some(1000)).unwrap();
    let mut swapped = false;
    for v in pod["spec"]["volumes"].as_array_mut().unwrap() {
        if v["name"] == "conductor-run" {
            *v = json!({"name": "conductor-run", "hostPath": {"path": sock_dir, "type": "Directory"}});
            swapped = true;
        }
    }
    assert!(swapped, "the Pod has the agent's socket volume");

    let profiles = dir.path().join("seccomp");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(
        profiles.join("conductor-seccomp.json"),
        conductor_service::SECCOMP_PROFILE,
    )
    .unwrap();
    // Podman's default ulimits exceed this machine's hard limits (FACTS.md), and crun does
    // not run on cgroups v1.
    let conf = dir.path().join("containers.conf");
    let runtime = if cgroup_v2() {
        ""
    } else {
        "[engine]\nruntime = \"runc\"\n"
    };
    std::fs::write(
        &conf,
        format!("[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n{runtime}"),
    )
    .unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, kube::to_yaml(&[docs[1].clone(), pod.clone()])).unwrap();
    let env = vec![("CONTAINERS_CONF".to_string(), conf.display().to_string())];
    let network = format!("conductor-kubeplay-{}", std::process::id());
    let _played = Played {
        file: file.clone(),
        volume: plan.volume.as_ref().unwrap().claim.clone(),
        network: network.clone(),
        env: env.clone(),
    };
    let made = Command::new("podman")
        .args(["network", "create", "--internal", &network])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let play = Command::new("podman")
        .envs(env.clone())
        .args(["kube", "play", "--network", &network, "--seccomp-profile-root"])
        .arg(&profiles)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        play.status.success(),
        "podman kube play: {}{}",
        String::from_utf8_lossy(&play.stdout),
        String::from_utf8_lossy(&play.stderr)
    );

    // The agent, installed by the init container, answers as PID 1 of the workspace.
    assert!(
        agent_client::wait_ready(&sock_dir).await,
        "the agent did not answer on {}",
        sock_dir.display()
    );
    let sh = |cmd: &'static str| agent_sh(&sock_dir, cmd);
    let (code, out, err) = sh("tr '\\0' ' ' < /proc/1/cmdline").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("/.conductor/agent init"), "PID 1: {out}");

    // uid/gid 1000, no capabilities, no new privileges, seccomp filtering.
    let (_, out, _) = sh("id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["1000", "1000"], "{out}");
    for l in &lines[2..] {
        let (k, v) = l.split_once(':').unwrap();
        match k {
            "CapEff" | "CapPrm" | "CapBnd" => assert_eq!(v.trim(), "0000000000000000", "{l}"),
            "NoNewPrivs" => assert_eq!(v.trim(), "1", "{l}"),
            "Seccomp" => assert_eq!(v.trim(), "2", "{l}"),
            _ => {}
        }
    }
    assert_eq!(lines.len(), 7, "{out}");
    // conductor's profile, not the runtime's default: that one lets an unprivileged process
    // make a user namespace, ours refuses it.
    let (code, _, err) = sh("unshare -U true").await;
    assert_ne!(code, 0, "unshare -U must fail under conductor's profile");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Limits from the configuration.
    let (_, out, _) =
        sh("cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes").await;
    assert_eq!(
        out.trim(),
        plan.workspace.limits.memory_bytes.to_string(),
        "memory limit"
    );
    let (_, out, _) = sh("cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo \"$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)\"").await;
    let mut it = out.split_whitespace().map(|n| n.parse::<i64>().unwrap());
    let (quota, period) = (it.next().unwrap(), it.next().unwrap());
    assert_eq!(
        quota * 1_000_000_000 / period,
        plan.workspace.limits.nano_cpus,
        "cpu limit: {out}"
    );

    // Read-only root, writable /workspace (the PVC) and /tmp, the agent read-only.
    let (code, _, _) = sh("touch /etc/conductor-test").await;
    assert_ne!(code, 0, "the root file system is read-only");
    let (code, out, err) = sh("touch /workspace/f /tmp/f && stat -c '%u %a' /workspace && stat -c '%u %a' /.conductor/agent && (touch /.conductor/x 2>/dev/null && echo writable || echo ro)").await;
    assert_eq!(code, 0, "{err}");
    let stats: Vec<&str> = out.lines().collect();
    assert_eq!(stats[0].split(' ').next(), Some("1000"), "/workspace owner: {out}");
    assert!(["1000 555", "1000 755"].contains(&stats[1]), "agent mode: {out}");
    assert_eq!(stats[2], "ro", "the agent's volume is read-only in the workspace");

    // No route out (the internal network has no gateway).
    let (_, out, _) = sh("tail -n +2 /proc/net/route | awk '{print $2}'").await;
    assert!(!out.lines().any(|d| d == "00000000"), "a default route: {out}");

    // The sidecar by its name, sharing the Pod's loopback.
    let (code, out, err) = sh("getent hosts redis; bash -c 'for i in $(seq 50); do \
         exec 3<>/dev/tcp/redis/6379 2>/dev/null && break; sleep 0.2; done; \
         printf \"PING\\r\\n\" >&3; head -c 7 <&3'")
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("127.0.0.1"), "{out}");
    assert!(out.contains("+PONG"), "redis by name: {out}");

    // The workspace's environment and files through the agent.
    let (_, out, _) = sh("echo $CONDUCTOR_AGENT_ID; hostname").await;
    assert_eq!(out, format!("{agent_id}\nminimal\n"));
    let mut a = AgentConn::connect(&sock_dir).await.unwrap();
    assert_eq!(a.write_file("/workspace/k.txt", b"kube", None, true).await.unwrap(), 4);
    assert_eq!(a.read_file("k.txt").await.unwrap(), b"kube");
    let (_, out, _) = sh("stat -c '%u %s' /workspace/k.txt").await;
    assert_eq!(out.trim(), "1000 4");
}
