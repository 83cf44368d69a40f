//! Container lifecycle over the Docker-compatible API: create, start, stop, remove, pause,
//! inspect, list and stats.
//!
//! [`create_body`] is the one place where a [`ContainerSpec`] becomes Podman's create
//! request, so every hardening rule lives here: explicit ulimits (Podman's defaults exceed
//! the hard limits of some hosts and the start would fail), no swap, the OCI runtime picked
//! at connect time, published ports bound to 127.0.0.1 only, and never privileged mode, host
//! namespaces or devices.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerStatsResponse, HostConfig, Mount as ApiMount, MountType, PortBinding,
    ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, RenameContainerOptions, StatsOptions, StopContainerOptions,
};
use bollard::Docker;
use conductor_core::engine::{
    ContainerInfo, ContainerSpec, ContainerStats, ContainerStatus, ContainerSummary, EngineError, EngineResult, Labels,
    Mount, NetworkAttachment,
};

use hyper::Method;

use crate::error::api_error;
use crate::libpod::{encode_query_value, Libpod};

/// Interval between the two stats readings CPU use is computed from.
const CPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

fn object(id: &str) -> String {
    format!("container '{id}'")
}

/// Checks a seccomp profile and returns the `security_opt` entry Podman expects.
///
/// Docker's API takes the profile's JSON *content* after `seccomp=`; Podman 4.3's compat
/// API takes a *path* on the service's host and fails with "file name too long" given JSON.
/// The file is read and parsed here so that a broken profile fails with a clear message.
pub(crate) async fn seccomp_option(profile: &std::path::Path) -> EngineResult<String> {
    let op = || format!("load seccomp profile {}", profile.display());
    let content = tokio::fs::read(profile)
        .await
        .map_err(|e| EngineError::failed(op(), e))?;
    serde_json::from_slice::<serde_json::Value>(&content).map_err(|e| EngineError::failed(op(), e))?;
    let absolute = tokio::fs::canonicalize(profile)
        .await
        .map_err(|e| EngineError::failed(op(), e))?;
    Ok(format!("seccomp={}", absolute.display()))
}

/// Translates a spec into Podman's create request. `seccomp` is the entry from
/// [`seccomp_option`] when the spec names a profile.
pub(crate) fn create_body(spec: &ContainerSpec, runtime: &str, seccomp: Option<String>) -> ContainerCreateBody {
    let limits = &spec.limits;
    let ulimit = |name: &str, value: i64| ResourcesUlimits {
        name: Some(name.into()),
        soft: Some(value),
        hard: Some(value),
    };
    let mut security_opt = Vec::new();
    if spec.security.no_new_privileges {
        security_opt.push("no-new-privileges".to_string());
    }
    security_opt.extend(seccomp);

    let mut mounts = Vec::new();
    let mut tmpfs = HashMap::new();
    for mount in &spec.mounts {
        match mount {
            Mount::Bind {
                source,
                target,
                readonly,
            } => mounts.push(ApiMount {
                typ: Some(MountType::BIND),
                source: Some(source.display().to_string()),
                target: Some(target.clone()),
                read_only: Some(*readonly),
                ..Default::default()
            }),
            // HostConfig.Tmpfs takes mount options verbatim (noexec, …); Mount's
            // TmpfsOptions cannot express them.
            Mount::Tmpfs {
                target,
                size_bytes,
                options,
            } => {
                let mut all = vec![format!("size={size_bytes}")];
                all.extend(options.iter().cloned());
                tmpfs.insert(target.clone(), all.join(","));
            }
        }
    }

    let network_mode = match &spec.network {
        NetworkAttachment::None => "none".to_string(),
        NetworkAttachment::Network(name) => name.clone(),
        NetworkAttachment::Container(id) => format!("container:{id}"),
    };
    let ports: Vec<(String, String)> = spec
        .published_ports
        .iter()
        .map(|(container, host)| (format!("{container}/tcp"), host.to_string()))
        .collect();
    let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = ports
        .iter()
        .map(|(port, host)| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(host.clone()),
            };
            (port.clone(), Some(vec![binding]))
        })
        .collect();

    let positive = |value: i64| (value > 0).then_some(value);
    let memory = positive(i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        runtime: Some(runtime.to_string()),
        // Podman's default nofile/nproc exceed some hosts' hard limits; core=0 keeps crash
        // dumps of agent tools from filling the workspace.
        ulimits: Some(vec![
            ulimit("nofile", i64::from(limits.nofile)),
            ulimit("nproc", i64::from(limits.nproc)),
            ulimit("core", 0),
        ]),
        memory,
        // Equal to memory: no swap on top of the limit.
        memory_swap: memory,
        nano_cpus: positive(limits.nano_cpus),
        pids_limit: positive(i64::from(limits.pids)),
        cap_drop: spec.security.cap_drop_all.then(|| vec!["ALL".to_string()]),
        security_opt: (!security_opt.is_empty()).then_some(security_opt),
        readonly_rootfs: Some(spec.security.readonly_rootfs),
        privileged: Some(false),
        mounts: (!mounts.is_empty()).then_some(mounts),
        tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
        network_mode: Some(network_mode),
        extra_hosts: (!spec.extra_hosts.is_empty()).then(|| {
            spec.extra_hosts
                .iter()
                .map(|(name, address)| format!("{name}:{address}"))
                .collect()
        }),
        port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        labels: Some(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        env: Some(spec.env.iter().map(|(name, value)| format!("{name}={value}")).collect()),
        entrypoint: spec.entrypoint.clone(),
        cmd: spec.cmd.clone(),
        user: spec.user.clone(),
        working_dir: spec.workdir.clone(),
        hostname: spec.hostname.clone(),
        exposed_ports: (!ports.is_empty()).then(|| ports.into_iter().map(|(port, _)| port).collect()),
        host_config: Some(host_config),
        ..Default::default()
    }
}

pub(crate) async fn create(docker: &Docker, runtime: &str, spec: &ContainerSpec) -> EngineResult<String> {
    let seccomp = match &spec.security.seccomp_profile {
        Some(profile) => Some(seccomp_option(profile).await?),
        None => None,
    };
    let body = create_body(spec, runtime, seccomp);
    let options = CreateContainerOptions {
        name: Some(spec.name.clone()),
        ..Default::default()
    };
    let op = format!("create container '{}' from image '{}'", spec.name, spec.image);
    // A 404 here means the image is missing.
    let image = format!("image '{}'", spec.image);
    let created = docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| api_error(op, Some(&image), e))?;
    Ok(created.id)
}

pub(crate) async fn start(docker: &Docker, id: &str) -> EngineResult<()> {
    docker
        .start_container(id, None)
        .await
        .map_err(|e| api_error(format!("start container '{id}'"), Some(&object(id)), e))
}

pub(crate) async fn stop(docker: &Docker, id: &str, timeout_secs: u32) -> EngineResult<()> {
    let options = StopContainerOptions {
        t: Some(i32::try_from(timeout_secs).unwrap_or(i32::MAX)),
        signal: None,
    };
    docker
        .stop_container(id, Some(options))
        .await
        .map_err(|e| api_error(format!("stop container '{id}'"), Some(&object(id)), e))
}

pub(crate) async fn remove(docker: &Docker, id: &str) -> EngineResult<()> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    // A container whose conmon died cannot be stopped on the first try ("could not be
    // stopped: … container state improper"): Podman then learns from the runtime that it is
    // stopped, and a second removal succeeds.
    let mut tries = 0;
    loop {
        tries += 1;
        match docker.remove_container(id, Some(options.clone())).await {
            Ok(()) => return Ok(()),
            Err(e) => match api_error(format!("remove container '{id}'"), Some(&object(id)), e) {
                EngineError::NotFound { .. } => return Ok(()),
                EngineError::Failed { message, .. } if tries < 3 && message.contains("could not be stopped") => {
                    tracing::debug!(container = id, "removal failed ({message}); trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                other => return Err(other),
            },
        }
    }
}

pub(crate) async fn rename(docker: &Docker, id: &str, name: &str) -> EngineResult<()> {
    let options = RenameContainerOptions { name: name.to_string() };
    docker
        .rename_container(id, options)
        .await
        .map_err(|e| api_error(format!("rename container '{id}' to '{name}'"), Some(&object(id)), e))
}

pub(crate) async fn pause(docker: &Docker, id: &str) -> EngineResult<()> {
    docker
        .pause_container(id)
        .await
        .map_err(|e| api_error(format!("pause container '{id}'"), Some(&object(id)), e))
}

pub(crate) async fn unpause(docker: &Docker, id: &str) -> EngineResult<()> {
    docker
        .unpause_container(id)
        .await
        .map_err(|e| api_error(format!("unpause container '{id}'"), Some(&object(id)), e))
}

/// Inspects through libpod's endpoint, for the reason [`list`] does: the Docker-compatible
/// one answers a container in Podman's own `stopped` state (its main process just died)
/// with a state the Docker model cannot decode. Libpod also names the container's conmon.
pub(crate) async fn inspect(libpod: &Libpod, id: &str) -> EngineResult<Option<ContainerInfo>> {
    let path = format!("/containers/{}/json", encode_query_value(id));
    let c: LibpodInspected = match libpod.call(Method::GET, &path, None).await {
        Ok(c) => c,
        Err(e) => {
            return match api_error(format!("inspect container '{id}'"), Some(&object(id)), e) {
                EngineError::NotFound { .. } => Ok(None),
                other => Err(other),
            }
        }
    };
    let status = libpod_status(&c.state.status);
    let live = matches!(status, ContainerStatus::Running | ContainerStatus::Paused);
    let pid = u32::try_from(c.state.pid).ok().filter(|pid| *pid > 0);
    let conmon = u32::try_from(c.state.conmon_pid).ok().filter(|pid| *pid > 0);
    Ok(Some(ContainerInfo {
        id: c.id,
        name: c.name.trim_start_matches('/').to_string(),
        image: c.config.image.or(c.image_name).unwrap_or_default(),
        status,
        pid,
        exit_code: matches!(status, ContainerStatus::Exited).then_some(c.state.exit_code),
        oom_killed: c.state.oom_killed,
        labels: to_labels(c.config.labels),
        supervised: match (live, conmon) {
            (true, Some(conmon)) => Some(is_conmon(conmon)),
            _ => None,
        },
    }))
}

/// The answer of libpod's inspect, as far as conductor reads it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LibpodInspected {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    image_name: Option<String>,
    #[serde(default)]
    state: LibpodState,
    #[serde(default)]
    config: LibpodConfig,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct LibpodState {
    #[serde(default)]
    status: String,
    #[serde(default)]
    pid: i64,
    #[serde(default)]
    conmon_pid: i64,
    #[serde(default)]
    exit_code: i64,
    #[serde(default, rename = "OOMKilled")]
    oom_killed: bool,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct LibpodConfig {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
}

/// Whether host process `pid` is a live conmon (Podman's per-container monitor). When it
/// is gone, Podman records neither the container's exit nor its output any more.
fn is_conmon(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| live_conmon(&stat))
}

/// Reads a `/proc/<pid>/stat` line: the command is `conmon` and the process is not a
/// zombie (a killed conmon stays one until its parent reaps it).
fn live_conmon(stat: &str) -> bool {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let state = stat[close + 1..].split_whitespace().next();
    &stat[open + 1..close] == "conmon" && !matches!(state, Some("Z" | "X" | "x"))
}

fn to_labels(labels: Option<HashMap<String, String>>) -> Labels {
    labels.unwrap_or_default().into_iter().collect()
}

/// Podman's (and Docker's) `label` filter values: `key=value`, or `key` for any value.
pub(crate) fn label_filters(labels: &[(&str, Option<&str>)]) -> Vec<String> {
    labels
        .iter()
        .map(|(key, value)| match value {
            Some(value) => format!("{key}={value}"),
            None => key.to_string(),
        })
        .collect()
}

/// One container in libpod's list.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LibpodListed {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
}

/// Maps libpod's state names, a superset of Docker's (`configured`, `stopped`, `stopping`…).
fn libpod_status(state: &str) -> ContainerStatus {
    match state {
        "created" | "configured" => ContainerStatus::Created,
        "running" => ContainerStatus::Running,
        "paused" => ContainerStatus::Paused,
        "exited" | "stopped" => ContainerStatus::Exited,
        _ => ContainerStatus::Other,
    }
}

/// Lists containers through libpod's endpoint: the Docker-compatible one reports Podman's
/// own states (e.g. `stopped` while a container is being removed), which the Docker
/// model cannot decode, so one container in that state would fail the whole list.
pub(crate) async fn list(libpod: &Libpod, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<ContainerSummary>> {
    let filters = serde_json::json!({ "label": label_filters(labels) }).to_string();
    let path = format!("/containers/json?all=true&filters={}", encode_query_value(&filters));
    let op = || format!("list containers with labels {:?}", label_filters(labels));
    let listed: Vec<LibpodListed> = libpod
        .call(Method::GET, &path, None)
        .await
        .map_err(|e| api_error(op(), None, e))?;
    Ok(listed
        .into_iter()
        .map(|c| ContainerSummary {
            id: c.id,
            name: c
                .names
                .into_iter()
                .next()
                .unwrap_or_default()
                .trim_start_matches('/')
                .into(),
            status: libpod_status(&c.state),
            labels: to_labels(c.labels),
        })
        .collect())
}

/// One reading of the stats endpoint.
async fn read_stats(docker: &Docker, id: &str) -> EngineResult<ContainerStatsResponse> {
    use futures_util::StreamExt;
    let options = StatsOptions {
        stream: false,
        one_shot: true,
    };
    let mut stream = docker.stats(id, Some(options));
    let op = || format!("read stats of container '{id}'");
    match stream.next().await {
        Some(Ok(stats)) => Ok(stats),
        Some(Err(e)) => Err(api_error(op(), Some(&object(id)), e)),
        None => Err(EngineError::failed(op(), "Podman returned no stats")),
    }
}

/// Takes two readings [`CPU_SAMPLE_INTERVAL`] apart.
///
/// Podman 4.3 answers `stream=false` with a zero `precpu_stats`, so one reading cannot give
/// a CPU rate; it also reports no pids limit, which comes from the container's HostConfig.
pub(crate) async fn stats(docker: &Docker, id: &str) -> EngineResult<ContainerStats> {
    let first = read_stats(docker, id).await?;
    tokio::time::sleep(CPU_SAMPLE_INTERVAL).await;
    let second = read_stats(docker, id).await?;
    let pids_limit = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| api_error(format!("inspect container '{id}'"), Some(&object(id)), e))?
        .host_config
        .and_then(|host| host.pids_limit)
        .and_then(|limit| u64::try_from(limit).ok())
        .unwrap_or(0);
    let memory = second.memory_stats.clone().unwrap_or_default();
    Ok(ContainerStats {
        cpu_percent: cpu_percent(&first, &second),
        memory_bytes: memory.usage.unwrap_or(0),
        memory_limit_bytes: memory.limit.unwrap_or(0),
        pids: second.pids_stats.and_then(|pids| pids.current).unwrap_or(0),
        pids_limit,
    })
}

/// The container's total CPU time (ns) in one stats reading.
pub(crate) async fn cpu_ns(docker: &Docker, id: &str) -> EngineResult<u64> {
    let stats = read_stats(docker, id).await?;
    Ok(stats
        .cpu_stats
        .and_then(|cpu| cpu.cpu_usage)
        .and_then(|usage| usage.total_usage)
        .unwrap_or(0))
}

/// CPU use between two readings in percent of one CPU: the container's CPU time over the
/// host's (all CPUs), scaled by the number of CPUs.
fn cpu_percent(first: &ContainerStatsResponse, second: &ContainerStatsResponse) -> f64 {
    let sample = |stats: &ContainerStatsResponse| {
        let cpu = stats.cpu_stats.clone().unwrap_or_default();
        let total = cpu.cpu_usage.and_then(|usage| usage.total_usage).unwrap_or(0);
        (total, cpu.system_cpu_usage.unwrap_or(0), cpu.online_cpus.unwrap_or(1))
    };
    let (total_1, system_1, _) = sample(first);
    let (total_2, system_2, cpus) = sample(second);
    let container = total_2.saturating_sub(total_1) as f64;
    let system = system_2.saturating_sub(system_1) as f64;
    if system <= 0.0 {
        return 0.0;
    }
    container / system * f64::from(cpus.max(1)) * 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_zombie_conmon_is_no_monitor() {
        assert!(super::live_conmon("812 (conmon) S 1 811 811 0 -1 4194368"));
        assert!(!super::live_conmon("812 (conmon) Z 1 811 811 0 -1 4194368"));
        assert!(!super::live_conmon("812 (sleep) S 1 811 811 0 -1 4194368"));
        assert!(!super::live_conmon(""));
    }

    #[test]
    fn libpod_states_map_onto_ours() {
        use super::libpod_status;
        assert_eq!(libpod_status("running"), ContainerStatus::Running);
        assert_eq!(libpod_status("configured"), ContainerStatus::Created);
        assert_eq!(libpod_status("stopped"), ContainerStatus::Exited);
        assert_eq!(libpod_status("stopping"), ContainerStatus::Other);
        assert_eq!(libpod_status("something new"), ContainerStatus::Other);
    }

    use std::path::PathBuf;

    use bollard::models::{ContainerCpuStats, ContainerCpuUsage};
    use conductor_core::engine::{ResourceLimits, SecurityOptions};

    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "ws-1".into(),
            image: "localhost/img:1".into(),
            labels: Labels::from([("io.conductor.ws".into(), "1".into())]),
            env: vec![("A".into(), "b c".into())],
            entrypoint: None,
            cmd: Some(vec!["sleep".into(), "infinity".into()]),
            user: Some("1000".into()),
            workdir: Some("/workspace".into()),
            hostname: Some("ws".into()),
            mounts: vec![
                Mount::Bind {
                    source: PathBuf::from("/data/ws-1"),
                    target: "/workspace".into(),
                    readonly: false,
                },
                Mount::Tmpfs {
                    target: "/tmp".into(),
                    size_bytes: 1 << 20,
                    options: vec!["noexec".into(), "nosuid".into()],
                },
            ],
            network: NetworkAttachment::Container("holder".into()),
            extra_hosts: vec![("redis".into(), "127.0.0.1".into())],
            published_ports: vec![(8080, 18080)],
            limits: ResourceLimits {
                memory_bytes: 256 << 20,
                nano_cpus: 1_000_000_000,
                pids: 64,
                nofile: 2048,
                nproc: 512,
            },
            security: SecurityOptions {
                cap_drop_all: true,
                no_new_privileges: true,
                seccomp_profile: None,
                readonly_rootfs: true,
            },
        }
    }

    #[test]
    fn the_create_request_carries_every_limit_and_hardening_option() {
        let body = create_body(&spec(), "runc", Some("seccomp=/p.json".into()));
        let host = body.host_config.unwrap();
        assert_eq!(host.runtime.as_deref(), Some("runc"));
        let ulimits: Vec<(String, i64, i64)> = host
            .ulimits
            .unwrap()
            .into_iter()
            .map(|u| (u.name.unwrap(), u.soft.unwrap(), u.hard.unwrap()))
            .collect();
        assert_eq!(
            ulimits,
            vec![
                ("nofile".into(), 2048, 2048),
                ("nproc".into(), 512, 512),
                ("core".into(), 0, 0)
            ]
        );
        assert_eq!(host.memory, Some(256 << 20));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, Some(1_000_000_000));
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_string(), "seccomp=/p.json".to_string()])
        );
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.network_mode.as_deref(), Some("container:holder"));
        assert_eq!(host.extra_hosts, Some(vec!["redis:127.0.0.1".to_string()]));
        assert_eq!(host.tmpfs.unwrap()["/tmp"], "size=1048576,noexec,nosuid");
        let bind = &host.mounts.unwrap()[0];
        assert_eq!(
            (bind.typ, bind.source.as_deref(), bind.read_only),
            (Some(MountType::BIND), Some("/data/ws-1"), Some(false))
        );
        let binding = &host.port_bindings.unwrap()["8080/tcp"].clone().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(binding.host_port.as_deref(), Some("18080"));
        assert!(host.devices.is_none() && host.pid_mode.is_none() && host.ipc_mode.is_none());
        assert_eq!(body.env, Some(vec!["A=b c".to_string()]));
        assert_eq!(body.user.as_deref(), Some("1000"));
        assert_eq!(body.exposed_ports, Some(vec!["8080/tcp".to_string()]));
    }

    #[test]
    fn zero_limits_are_left_unset_and_network_modes_map() {
        let mut spec = spec();
        spec.limits.memory_bytes = 0;
        spec.limits.nano_cpus = 0;
        spec.limits.pids = 0;
        spec.network = NetworkAttachment::None;
        let host = create_body(&spec, "crun", None).host_config.unwrap();
        assert_eq!(
            (host.memory, host.memory_swap, host.nano_cpus, host.pids_limit),
            (None, None, None, None)
        );
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_string()]));
        spec.network = NetworkAttachment::Network("net-1".into());
        assert_eq!(
            create_body(&spec, "crun", None)
                .host_config
                .unwrap()
                .network_mode
                .as_deref(),
            Some("net-1")
        );
    }

    #[test]
    fn cpu_percent_is_relative_to_one_cpu() {
        let reading = |total: u64, system: u64| ContainerStatsResponse {
            cpu_stats: Some(ContainerCpuStats {
                cpu_usage: Some(ContainerCpuUsage {
                    total_usage: Some(total),
                    ..Default::default()
                }),
                system_cpu_usage: Some(system),
                online_cpus: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        // One CPU busy out of two: half the host's CPU time, i.e. 100 % of one CPU.
        let percent = cpu_percent(&reading(0, 0), &reading(500, 1000));
        assert!((percent - 100.0).abs() < 1e-9, "{percent}");
        assert_eq!(cpu_percent(&reading(5, 7), &reading(5, 7)), 0.0);
    }

    #[test]
    fn label_filters_match_values_or_presence() {
        assert_eq!(
            label_filters(&[("a", Some("1")), ("b", None)]),
            vec!["a=1".to_string(), "b".to_string()]
        );
    }
}
