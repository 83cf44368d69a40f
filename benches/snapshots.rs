//! Snapshot benchmark: time to take and restore a snapshot and the disk each snapshot uses,
//! for workspaces holding 10 MiB, 100 MiB and 1 GiB of data in `/workspace`.
//!
//! For each size: write the data (random, synced) and take snapshot `s1`; overwrite 1 MiB in
//! the middle of the data and write a file in /home/agent (a small change), take `s2`;
//! restore `s1`. Disk columns: what the pool file system gained while a snapshot was taken
//! plus the root file system layer Podman stored, and what it gained during the change (a
//! 1 MiB overwrite in place costs nothing without a snapshot, so this is what keeping `s1`
//! costs once the workspace diverges). The last column is what a snapshot costs where the
//! workspaces path cannot reflink: a full copy of the volume image on the host's ext4
//! (`cp --sparse=always` + fsync). Medians of `BENCH_N` runs (default 3), as a Markdown table.
//!
//! Run: `cargo bench --bench snapshots`. Needs root, Podman, `mkfs.xfs` and the `minimal`
//! environment (`conductor env build minimal`).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::engine::Progress;
use conductor_core::Config;
use conductor_service::exec::ExecRequest;
use conductor_service::workspaces::CreateRequest;
use conductor_service::{host, Conductor};

/// One measured round.
#[derive(Default)]
struct Round {
    first: Duration,
    second: Duration,
    restore: Duration,
    disk_first: u64,
    disk_second: u64,
    diverged: u64,
    full_copy: Duration,
    full_bytes: u64,
}

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
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

async fn sh(c: &Conductor, id: &str, cmd: &str) {
    let (o, _, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    assert_eq!(o.exit_code, 0, "{cmd}: {err}");
}

fn pool_used(c: &Conductor) -> u64 {
    host::disk_usage(&c.paths.workspaces).expect("statvfs").0
}

/// Times a snapshot and returns (duration, disk it took).
async fn snapshot(c: &Conductor, ws: &str, image: &str, name: &str) -> (Duration, u64) {
    let before = pool_used(c);
    let t = Instant::now();
    c.create_snapshot(ws, name, false).await.expect("snapshot");
    let took = t.elapsed();
    let volume = pool_used(c).saturating_sub(before);
    let snap = c.store.get_snapshot_by_name(ws, name).unwrap().unwrap();
    let size = |r: String| async move { c.engine.image_inspect(&r).await.unwrap().map_or(0, |i| i.size_bytes) };
    let layer = size(snap.rootfs_image.unwrap())
        .await
        .saturating_sub(size(image.to_string()).await);
    (took, volume + layer)
}

async fn round(c: &Conductor, mib: u64) -> Round {
    let quiet = Arc::new(|_: Progress| {});
    let req = CreateRequest {
        agent_id: "bench".into(),
        environment: "minimal".into(),
        ephemeral: true,
        ..Default::default()
    };
    let w = c.create_workspace(req, quiet).await.expect("create");
    sh(
        c,
        &w.id,
        &format!("head -c {mib}M /dev/urandom > /workspace/data && sync"),
    )
    .await;
    let (first, disk_first) = snapshot(c, &w.id, &w.image, "s1").await;
    let before = pool_used(c);
    let change = format!(
        "dd if=/dev/urandom of=/workspace/data bs=1M count=1 seek={} conv=notrunc status=none && echo changed > /home/agent/note && sync",
        mib / 2
    );
    sh(c, &w.id, &change).await;
    let diverged = pool_used(c).saturating_sub(before);
    let (second, disk_second) = snapshot(c, &w.id, &w.image, "s2").await;
    let t = Instant::now();
    c.restore_snapshot(&w.id, "s1").await.expect("restore");
    let restore = t.elapsed();

    // The fallback: an ext4 image copied on the host's ext4 (cp in the pool would clone).
    let image = Path::new(&w.volume_dir).join("data.img");
    let host_dir = c.paths.base.join("bench-copies");
    std::fs::create_dir_all(&host_dir).unwrap();
    let (src, dst) = (host_dir.join("src.img"), host_dir.join("dst.img"));
    let run = |cmd: String| assert!(Command::new("sh").arg("-c").arg(cmd).status().expect("sh").success());
    run(format!("cp --sparse=always '{}' '{}'", image.display(), src.display()));
    let t = Instant::now();
    run(format!(
        "cp --sparse=always '{}' '{}' && sync '{}'",
        src.display(),
        dst.display(),
        dst.display()
    ));
    let full_copy = t.elapsed();
    let full_bytes = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).unwrap()) * 512;
    std::fs::remove_dir_all(&host_dir).unwrap();
    c.remove_workspace(&w.id, Some(false)).await.expect("remove");
    Round {
        first,
        second,
        restore,
        disk_first,
        disk_second,
        diverged,
        full_copy,
        full_bytes,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("run it with: cargo bench --bench snapshots");
        return;
    }
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("bench-snapshots-")
        .tempdir_in(root)
        .unwrap();
    let yaml = format!(
        "storage:\n  base_path: {}\nisolated_workspace:\n  agent_containers:\n    volume_size: 4Gi\n  snapshots:\n    max_total_size: 1Ti\n",
        dir.path().display()
    );
    let config = Config::parse(&yaml).unwrap().config;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Conductor::open(config).await.expect("open conductor");
        println!(
            "{n} runs per size, medians; workspaces path on the pool: {}",
            host::is_mounted(&c.paths.workspaces)
        );
        println!();
        println!(
            "| data in /workspace | snapshot | disk per snapshot | disk kept by it after a 1 MiB overwrite | snapshot after the change | its disk | restore | full copy without reflink |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        for mib in [10u64, 100, 1024] {
            let mut rounds = Vec::new();
            for _ in 0..n {
                rounds.push(round(&c, mib).await);
            }
            let pick = |f: fn(&Round) -> Duration| median(rounds.iter().map(f).collect());
            let pick_bytes = |f: fn(&Round) -> u64| median(rounds.iter().map(f).collect());
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} ({}) |",
                if mib < 1024 { format!("{mib} MiB") } else { "1 GiB".to_string() },
                ms(pick(|r| r.first)),
                mb(pick_bytes(|r| r.disk_first)),
                mb(pick_bytes(|r| r.diverged)),
                ms(pick(|r| r.second)),
                mb(pick_bytes(|r| r.disk_second)),
                ms(pick(|r| r.restore)),
                ms(pick(|r| r.full_copy)),
                mb(pick_bytes(|r| r.full_bytes)),
            );
        }
        drop(c);
    });
}
