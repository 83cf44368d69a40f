//! Fork benchmark: a workspace holding 1 GiB in `/workspace` forked into 1 and into 8
//! copies, each figure next to a plain copy of the same data (`cp -a` of the volume's
//! `/workspace` to the host's disk, synced).
//!
//! Per round: fork 1 copy (time, the source's pause), remove it; fork 8 copies (time, the
//! pause, what the storage pool's used blocks grew by before any copy writes), remove them;
//! `cp -a` the data once. The 8-copy baseline is eight `cp -a` one after the other, made
//! once, with the disk they take. Medians of `BENCH_N` rounds (default 3), as Markdown.
//!
//! Run: `cargo bench --bench fork`. Needs root, Podman, `mkfs.xfs`, the static agent and the
//! `minimal` environment (`conductor env build minimal`).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::engine::Progress;
use conductor_core::Config;
use conductor_service::exec::ExecRequest;
use conductor_service::fork::{ForkOutcome, ForkRequest};
use conductor_service::workspaces::CreateRequest;
use conductor_service::{host, Conductor};

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn mb(bytes: u64) -> String {
    if bytes < 1_000_000 {
        format!("{:.0} kB", bytes as f64 / 1e3)
    } else if bytes < 1_000_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.2} GB", bytes as f64 / 1e9)
    }
}

fn pool_used(c: &Conductor) -> u64 {
    host::disk_usage(&c.paths.workspaces).expect("statvfs").0
}

fn sh(cmd: &str) {
    assert!(
        Command::new("sh").arg("-c").arg(cmd).status().expect("sh").success(),
        "{cmd}"
    );
}

/// Allocated bytes under `dir` (`du`).
fn du(dir: &Path) -> u64 {
    let out = Command::new("du").arg("-sB1").arg(dir).output().expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Forks `n` copies: (time, source paused, pool growth), then removes them.
async fn fork(c: &Conductor, id: &str, n: u32) -> (Duration, Duration, u64) {
    let before = pool_used(c);
    let begin = Instant::now();
    let out: ForkOutcome = c
        .fork_workspace(
            id,
            ForkRequest {
                count: n,
                ..Default::default()
            },
        )
        .await
        .expect("fork");
    let took = begin.elapsed();
    let grew = pool_used(c).saturating_sub(before);
    for w in &out.workspaces {
        c.remove_workspace(&w.id, Some(false)).await.expect("remove a copy");
    }
    (took, Duration::from_millis(out.paused_ms.unwrap_or(0)), grew)
}

/// `cp -a` of `src` into `dst` (which must not exist), synced; its time.
fn cp_a(src: &Path, dst: &Path) -> Duration {
    let begin = Instant::now();
    sh(&format!(
        "cp -a '{}' '{}' && sync -f '{}'",
        src.display(),
        dst.display(),
        dst.display()
    ));
    begin.elapsed()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("run it with: cargo bench --bench fork");
        return;
    }
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).unwrap();
    let dir = tempfile::Builder::new().prefix("bench-fork-").tempdir_in(root).unwrap();
    let yaml = format!(
        "storage:\n  base_path: {}\nisolated_workspace:\n  agent_containers:\n    volume_size: 4Gi\n  cleanup:\n    max_containers: 40\n",
        dir.path().display()
    );
    let config = Config::parse(&yaml).unwrap().config;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Conductor::open(config).await.expect("open conductor");
        let quiet = Arc::new(|_: Progress| {});
        let req = CreateRequest {
            agent_id: "bench".into(),
            environment: "minimal".into(),
            ephemeral: true,
            ..Default::default()
        };
        let w = c.create_workspace(req, quiet).await.expect("create");
        let (o, _, err) = c
            .exec_collect(
                &w.id,
                ExecRequest::new("head -c 1024M /dev/urandom > /workspace/data && echo x > /home/agent/note && sync"),
            )
            .await
            .expect("exec");
        assert_eq!(o.exit_code, 0, "{err}");
        let data = Path::new(&w.volume_dir).join("mnt/workspace");
        let copies = c.paths.base.join("bench-copies");
        std::fs::create_dir_all(&copies).unwrap();

        let (mut one, mut eight) = (Vec::new(), Vec::new());
        let (mut paused, mut grew, mut cp) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let (t, p, _) = fork(&c, &w.id, 1).await;
            one.push(t);
            paused.push(p);
            let (t, p, g) = fork(&c, &w.id, 8).await;
            eight.push(t);
            paused.push(p);
            grew.push(g);
            let dst = copies.join("one");
            cp.push(cp_a(&data, &dst));
            std::fs::remove_dir_all(&dst).unwrap();
        }
        let begin = Instant::now();
        for i in 0..8 {
            cp_a(&data, &copies.join(format!("c{i}")));
        }
        let cp8 = begin.elapsed();
        let cp8_bytes = du(&copies);
        std::fs::remove_dir_all(&copies).unwrap();
        c.remove_workspace(&w.id, Some(false)).await.expect("remove");

        let max_pause = paused.iter().max().copied().unwrap_or_default();
        println!(
            "{n} rounds, medians; source: 1 GiB in /workspace; workspaces path on the pool: {}",
            host::is_mounted(&c.paths.workspaces)
        );
        println!();
        println!("| measurement | fork | `cp -a` of the same data | goal |");
        println!("| --- | ---: | ---: | --- |");
        println!("| 1 copy | {} | {} | ≤ 300 ms |", ms(median(one)), ms(median(cp)));
        println!(
            "| 8 copies | {} | {} (8 × `cp -a`) | ≤ 2 s |",
            ms(median(eight)),
            ms(cp8)
        );
        println!(
            "| extra disk, 8 copies before they write | {} | {} | ≤ 10 MB |",
            mb(median(grew)),
            mb(cp8_bytes)
        );
        println!(
            "| source paused per fork | {} (max {}) | none | |",
            ms(median(paused)),
            ms(max_pause)
        );
        drop(c);
    });
}
