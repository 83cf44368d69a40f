//! Speed benchmark: the in-workspace agent and warm pools against raw Podman, on the same
//! machine in one run, interleaved. Prints medians, p95 and ratios as a Markdown table
//! (docs/performance.md holds the last one).
//!
//! 1. time to first command: new workspace + `true` + result, from the warm pool and
//!    without it, vs `podman run --rm <image> true`;
//! 2. exec latency in an existing workspace: through the agent, through the REST API
//!    (conductor's Podman path), `podman exec` (CLI), and the `nsenter` floor;
//! 3. one task end to end (submit → result) with and without the pool vs `podman run --rm`;
//!    throughput: 200 one-command sandbox tasks through the orchestrator with 8 workers,
//!    with and without a warm pool, and in shared mode (`BENCH_THROUGHPUT_EXTRA`: YAML lines
//!    under `isolated_workspace` to measure only the throughput of that configuration);
//! 4. idle memory per workspace with 50 idle workspaces (conmon + agent, RSS and PSS from
//!    /proc), with the agent and with the former `sh` loop as PID 1.
//!
//! Run: `cargo bench --bench speed` (`BENCH_N` iterations, default 30; `BENCH_TASKS`,
//! default 200; `BENCH_IDLE`, default 50). Needs root, Podman, the `minimal` environment
//! and the static agent (`scripts/setup.sh` builds both).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::engine::Progress;
use conductor_core::task::TaskSpec;
use conductor_core::Config;
use conductor_service::exec::{self, ExecRequest};
use conductor_service::tasks::Orchestrator;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::{agent_client, Conductor};
use tokio::sync::mpsc;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, p95) in ms.
fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    (p(0.5), p(0.95))
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

async fn open(dir: &std::path::Path, extra: &str) -> Arc<Conductor> {
    let text = format!("storage:\n  base_path: {}\n{extra}", dir.display());
    let config = Config::parse(&text).expect("config").config;
    Arc::new(Conductor::open(config).await.expect("open conductor"))
}

fn quiet() -> conductor_core::engine::ProgressSink {
    Arc::new(|_: Progress| {})
}

fn ephemeral(agent: &str) -> CreateRequest {
    CreateRequest {
        agent_id: agent.into(),
        environment: "minimal".into(),
        ephemeral: true,
        ..Default::default()
    }
}

async fn first_command(c: &Conductor, req: CreateRequest) -> (Duration, WorkspaceInfo) {
    let t = Instant::now();
    let w = c.create_workspace(req, quiet()).await.expect("create");
    let (o, _, _) = c.exec_collect(&w.id, ExecRequest::new("true")).await.expect("exec");
    assert_eq!(o.exit_code, 0);
    (t.elapsed(), w)
}

struct Row {
    name: &'static str,
    ours: Vec<Duration>,
    baseline_name: &'static str,
    baseline: Option<(f64, f64)>,
}

fn print_rows(title: &str, rows: Vec<Row>) {
    println!("\n{title}\n");
    println!("| measurement | median ms | p95 ms | baseline | median ms | p95 ms | ratio |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in rows {
        let (m, p) = stats(r.ours);
        match r.baseline {
            Some((bm, bp)) => println!(
                "| {} | {m:.1} | {p:.1} | {} | {bm:.1} | {bp:.1} | {:.3} |",
                r.name,
                r.baseline_name,
                m / bm
            ),
            None => println!("| {} | {m:.1} | {p:.1} | | | | |", r.name),
        }
    }
}

fn kib(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                all.extend(kids.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
            }
        }
        i += 1;
    }
    all
}

fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Mean (conmon RSS, container RSS, conmon+container PSS) in KiB over `ws`.
async fn idle_memory(c: &Conductor, ws: &[WorkspaceInfo]) -> (f64, f64, f64) {
    let (mut conmon, mut inside, mut pss) = (0u64, 0u64, 0u64);
    for w in ws {
        let init = c
            .engine
            .container_inspect(&w.container_name)
            .await
            .unwrap()
            .unwrap()
            .pid
            .unwrap();
        let cm = ppid(init);
        conmon += kib(cm, "status", "VmRSS:");
        pss += kib(cm, "smaps_rollup", "Pss:");
        for p in tree(init) {
            inside += kib(p, "status", "VmRSS:");
            pss += kib(p, "smaps_rollup", "Pss:");
        }
    }
    let n = ws.len() as f64;
    (conmon as f64 / n, inside as f64 / n, pss as f64 / n)
}

/// A one-command (`true`) task of agent `agent` in the minimal environment.
fn true_task(agent: &str) -> TaskSpec {
    TaskSpec {
        agent_id: Some(agent.into()),
        ..TaskSpec::new("minimal", vec!["true".into()])
    }
}

/// Time from submitting one `true` task to its recorded success (the orchestrator runs).
async fn one_task(c: &Conductor, agent: &str) -> Duration {
    let spec = true_task(agent);
    let t = Instant::now();
    let id = c.submit_tasks(vec![spec]).unwrap().remove(0).id;
    let v = c.wait_task(&id).await.unwrap();
    let d = t.elapsed();
    assert_eq!(v.status, conductor_core::lifecycle::TaskState::Succeeded, "{v:?}");
    d
}

/// Tasks per second for `tasks` one-command tasks of `agents` agents (round robin).
async fn throughput(c: Arc<Conductor>, tasks: usize, agents: usize) -> f64 {
    let orchestrator = Orchestrator::start(c.clone());
    // Let recovery and (with a pool) the first fill happen before the clock starts.
    let pool_size: u32 = c.config.isolated_workspace.warm_pool.values().sum();
    let t = Instant::now();
    while (c
        .list_workspaces(&Default::default())
        .unwrap()
        .iter()
        .filter(|w| w.agent_id == conductor_service::warm_pool::POOL_AGENT)
        .count() as u32)
        < pool_size
    {
        assert!(t.elapsed() < Duration::from_secs(300), "the pool did not fill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let specs: Vec<TaskSpec> = (0..tasks).map(|i| true_task(&format!("tp{}", i % agents))).collect();
    let start = Instant::now();
    let ids: Vec<String> = c.submit_tasks(specs).unwrap().into_iter().map(|t| t.id).collect();
    for id in &ids {
        let v = c.wait_task(id).await.unwrap();
        assert_eq!(v.status, conductor_core::lifecycle::TaskState::Succeeded, "{v:?}");
    }
    let rate = tasks as f64 / start.elapsed().as_secs_f64();
    orchestrator.shutdown(Duration::from_secs(30)).await;
    rate
}

/// CPU time (user + system, all processes) since boot in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    cpu.split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// The benchmark's configuration with `isolated` extra lines under `isolated_workspace`.
fn config(isolated: &str) -> String {
    format!(
        "isolated_workspace:\n  cleanup:\n    max_containers: 200\n{isolated}task_execution:\n  max_workers: 8\n  retry_delay: 0\n"
    )
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let n = env_usize("BENCH_N", 30);
    let n_tasks = env_usize("BENCH_TASKS", 200);
    let n_idle = env_usize("BENCH_IDLE", 50);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-speed");
    std::fs::create_dir_all(&root).unwrap();
    let dir = tempfile::tempdir_in(&root).unwrap();
    rt.block_on(async {
        let c = open(&dir.path().join("pool"), &config("  warm_pool:\n    minimal: 1\n")).await;
        let plain = open(&dir.path().join("plain"), &config("")).await;
        assert!(
            agent_client::binary(&c.config).is_some(),
            "build the static agent first (scripts/setup.sh)"
        );
        let image = c
            .ensure_environment("minimal", quiet(), false)
            .await
            .expect("minimal image")
            .reference;
        let runtime = c.engine.info().await.unwrap().runtime;
        let ul = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];
        println!(
            "conductor speed benchmark: n={n}, runtime={runtime}, {} cores, image {image}",
            std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
        );

        if let Ok(extra) = std::env::var("BENCH_THROUGHPUT_EXTRA") {
            let x = open(&dir.path().join("x"), &config(&extra)).await;
            let t0 = cpu_ticks();
            let rate = throughput(x.clone(), n_tasks, n_tasks).await;
            println!(
                "extra config {extra:?}: {rate:.1} tasks/s, {:.0} ms CPU per task",
                (cpu_ticks() - t0) as f64 * 10.0 / n_tasks as f64
            );
            return;
        }
        // 1. Time to first command, interleaved.
        let (mut pool_on, mut pool_off, mut raw) = (vec![], vec![], vec![]);
        for i in 0..n {
            c.refill_warm_pool(true).await.unwrap();
            let (d, w) = first_command(&c, ephemeral(&format!("b{i}"))).await;
            assert!(w.volume_dir.contains("agent_warm-pool"), "not from the pool: {w:?}");
            pool_on.push(d);
            c.remove_workspace(&w.id, None).await.unwrap();

            let (d, w) = first_command(&plain, ephemeral(&format!("b{i}"))).await;
            pool_off.push(d);
            plain.remove_workspace(&w.id, None).await.unwrap();

            let mut args = vec!["--runtime", runtime.as_str(), "run", "--rm", "--network", "none"];
            args.extend(ul);
            args.extend([image.as_str(), "true"]);
            raw.push(timed(|| {
                run("podman", &args);
            }));
        }
        let raw_stats = stats(raw.clone());
        print_rows(
            "### Time to first command (new workspace + `true` + result)",
            vec![
                Row {
                    name: "conductor, warm pool",
                    ours: pool_on,
                    baseline_name: "`podman run --rm`",
                    baseline: Some(raw_stats),
                },
                Row {
                    name: "conductor, no pool (isolated network)",
                    ours: pool_off,
                    baseline_name: "`podman run --rm`",
                    baseline: Some(raw_stats),
                },
                Row {
                    name: "`podman run --rm … true` (network none)",
                    ours: raw,
                    baseline_name: "",
                    baseline: None,
                },
            ],
        );

        // 2. Exec latency in one running workspace, interleaved.
        let w = plain.create_workspace(ephemeral("exec"), quiet()).await.unwrap();
        let container = w.container_name.clone();
        let init_pid = plain
            .engine
            .container_inspect(&container)
            .await
            .unwrap()
            .unwrap()
            .pid
            .unwrap()
            .to_string();
        let (mut agent, mut rest, mut cli, mut nsenter) = (vec![], vec![], vec![], vec![]);
        for _ in 0..n {
            let t = Instant::now();
            let (o, _, _) = plain.exec_collect(&w.id, ExecRequest::new("true")).await.unwrap();
            agent.push(t.elapsed());
            assert_eq!(o.exit_code, 0);

            let t = Instant::now();
            let (tx, mut rx) = mpsc::channel(16);
            let drain = async move { while rx.recv().await.is_some() {} };
            let (o, ()) = tokio::join!(
                exec::run(plain.engine.as_ref(), &container, ExecRequest::new("true"), tx),
                drain
            );
            rest.push(t.elapsed());
            assert_eq!(o.unwrap().exit_code, 0);

            cli.push(timed(|| {
                run("podman", &["exec", "--user", "1000:1000", &container, "true"]);
            }));
            nsenter.push(timed(|| {
                run("nsenter", &["-t", &init_pid, "-m", "-u", "-i", "-n", "-p", "true"]);
            }));
        }
        let cli_stats = stats(cli.clone());
        print_rows(
            "### Exec latency in a running workspace (`true`)",
            vec![
                Row {
                    name: "conductor exec via the agent",
                    ours: agent,
                    baseline_name: "`podman exec` CLI",
                    baseline: Some(cli_stats),
                },
                Row {
                    name: "conductor exec via REST (Podman path)",
                    ours: rest,
                    baseline_name: "`podman exec` CLI",
                    baseline: Some(cli_stats),
                },
                Row {
                    name: "`podman exec` CLI",
                    ours: cli,
                    baseline_name: "",
                    baseline: None,
                },
                Row {
                    name: "`nsenter … true` (floor, no isolation set-up)",
                    ours: nsenter,
                    baseline_name: "",
                    baseline: None,
                },
            ],
        );
        plain.remove_workspace(&w.id, None).await.unwrap();

        // 3a. One task end to end (submit, a sandbox workspace, `true`, its result), interleaved.
        let (mut t_pool, mut t_plain, mut t_raw) = (vec![], vec![], vec![]);
        let orchestrators = [Orchestrator::start(c.clone()), Orchestrator::start(plain.clone())];
        for i in 0..n {
            c.refill_warm_pool(true).await.unwrap();
            t_pool.push(one_task(&c, &format!("lat{i}")).await);
            t_plain.push(one_task(&plain, &format!("lat{i}")).await);
            let mut args = vec!["--runtime", runtime.as_str(), "run", "--rm", "--network", "none"];
            args.extend(ul);
            args.extend([image.as_str(), "true"]);
            t_raw.push(timed(|| {
                run("podman", &args);
            }));
        }
        for o in orchestrators {
            o.shutdown(Duration::from_secs(30)).await;
        }
        let raw_stats = stats(t_raw.clone());
        print_rows(
            "### One task end to end (submit, sandbox workspace, `true`, result)",
            vec![
                Row {
                    name: "task, warm pool",
                    ours: t_pool,
                    baseline_name: "`podman run --rm`",
                    baseline: Some(raw_stats),
                },
                Row {
                    name: "task, no pool",
                    ours: t_plain,
                    baseline_name: "`podman run --rm`",
                    baseline: Some(raw_stats),
                },
            ],
        );

        // 3. Throughput of one-command sandbox tasks.
        let without = throughput(plain.clone(), n_tasks, n_tasks).await;
        let pool8 = open(&dir.path().join("pool8"), &config("  warm_pool:\n    minimal: 8\n")).await;
        let with = throughput(pool8.clone(), n_tasks, n_tasks).await;
        let shared = open(&dir.path().join("shared"), &config("  mode: shared\n")).await;
        let shared_rate = throughput(shared.clone(), n_tasks, 8).await;
        println!("\n### Throughput: {n_tasks} one-command tasks, max_workers 8\n");
        println!("| configuration | tasks/s |");
        println!("| --- | ---: |");
        println!("| sandbox (a workspace per task), no pool | {without:.1} |");
        println!("| sandbox, warm pool of 8 | {with:.1} |");
        println!("| shared (8 agents, one workspace each) | {shared_rate:.1} |");
        for w in pool8.list_workspaces(&Default::default()).unwrap() {
            let _ = pool8.remove_workspace(&w.id, None).await;
        }

        // 4. Idle memory per workspace.
        let no_agent = open(
            &dir.path().join("noagent"),
            &config("  agent_containers:\n    agent_binary: \"\"\n"),
        )
        .await;
        println!("\n### Idle memory per workspace ({n_idle} idle workspaces)\n");
        println!("| PID 1 | conmon RSS KiB | container RSS KiB | conmon + container PSS KiB |");
        println!("| --- | ---: | ---: | ---: |");
        for (label, cc) in [("conductor-agent", &plain), ("`sh` loop (no agent)", &no_agent)] {
            let mut ws = Vec::new();
            for i in 0..n_idle {
                ws.push(
                    cc.create_workspace(ephemeral(&format!("idle{i}")), quiet())
                        .await
                        .unwrap(),
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (conmon, inside, pss) = idle_memory(cc, &ws).await;
            println!("| {label} | {conmon:.0} | {inside:.0} | {pss:.0} |");
            for w in ws {
                cc.remove_workspace(&w.id, None).await.unwrap();
            }
        }
        for cc in [&c, &plain, &no_agent, &pool8, &shared] {
            for w in cc.list_workspaces(&Default::default()).unwrap() {
                let _ = cc.remove_workspace(&w.id, None).await;
            }
            let _ = cc.reconcile().await;
        }
    });
}
