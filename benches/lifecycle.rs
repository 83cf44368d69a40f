//! Workspace lifecycle benchmark against raw Podman on the same machine, interleaved:
//! create (+start), exec `true`, pause, resume, suspend then the first command (`exec true`
//! resuming it), destroy through conductor, next to `podman run -d`, `podman exec`,
//! `podman pause`, `podman unpause`, `podman stop` + `start` + `exec`, `podman rm -f` from
//! the CLI. Prints medians, p95 and ratios.
//!
//! Run: `cargo bench --bench lifecycle` (env `BENCH_N`, default 20). Needs root, Podman and
//! the `minimal` environment (`conductor env build minimal`).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::engine::Progress;
use conductor_core::Config;
use conductor_service::exec::ExecRequest;
use conductor_service::workspaces::CreateRequest;
use conductor_service::Conductor;

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    (p(0.5), p(0.95))
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&format!("storage:\n  base_path: {}\n", dir.path().display()))
        .unwrap()
        .config;
    rt.block_on(async {
        let c = Conductor::open(config).await.expect("open conductor");
        let quiet = Arc::new(|_: Progress| {});
        let image = c
            .ensure_environment("minimal", quiet.clone(), false)
            .await
            .expect("minimal image")
            .reference;
        let runtime = c.engine.info().await.unwrap().runtime;
        let ul = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];
        let (mut cc, mut ce, mut cd, mut pc, mut pe, mut pd) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut cp, mut cr, mut cs, mut pp, mut pr, mut ps) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut cf, mut pf) = (vec![], vec![]);
        for i in 0..n {
            // conductor
            let t = Instant::now();
            let req = CreateRequest {
                agent_id: "bench".into(),
                environment: "minimal".into(),
                ephemeral: true,
                ..Default::default()
            };
            let w = c.create_workspace(req, quiet.clone()).await.expect("create");
            cc.push(t.elapsed());
            let t = Instant::now();
            let (o, _, _) = c.exec_collect(&w.id, ExecRequest::new("true")).await.expect("exec");
            ce.push(t.elapsed());
            assert_eq!(o.exit_code, 0);
            let t = Instant::now();
            c.pause_workspace(&w.id).await.expect("pause");
            cp.push(t.elapsed());
            let t = Instant::now();
            c.resume_workspace(&w.id).await.expect("resume");
            cr.push(t.elapsed());
            let t = Instant::now();
            c.suspend_workspace(&w.id).await.expect("suspend");
            cs.push(t.elapsed());
            // The first command resumes it.
            let t = Instant::now();
            let (o, _, _) = c.exec_collect(&w.id, ExecRequest::new("true")).await.expect("exec");
            assert_eq!(o.exit_code, 0);
            cf.push(t.elapsed());
            let t = Instant::now();
            c.remove_workspace(&w.id, Some(false)).await.expect("remove");
            cd.push(t.elapsed());
            // raw podman CLI, same image, same runtime, network none
            let name = format!("bench-raw-{i}");
            let t = Instant::now();
            let mut args = vec![
                "--runtime",
                runtime.as_str(),
                "run",
                "-d",
                "--name",
                name.as_str(),
                "--network",
                "none",
            ];
            args.extend(ul);
            args.extend([image.as_str(), "sleep", "600"]);
            podman(&args);
            pc.push(t.elapsed());
            let t = Instant::now();
            podman(&["exec", &name, "true"]);
            pe.push(t.elapsed());
            let t = Instant::now();
            podman(&["pause", &name]);
            pp.push(t.elapsed());
            let t = Instant::now();
            podman(&["unpause", &name]);
            pr.push(t.elapsed());
            let t = Instant::now();
            podman(&["stop", "-t", "0", &name]);
            ps.push(t.elapsed());
            let t = Instant::now();
            podman(&["start", &name]);
            podman(&["exec", &name, "true"]);
            pf.push(t.elapsed());
            let t = Instant::now();
            podman(&["rm", "-f", "-t", "0", &name]);
            pd.push(t.elapsed());
        }
        println!("workspace lifecycle, n={n}, runtime={runtime} (medians and p95 in ms)");
        println!(
            "{:<28} {:>10} {:>10} {:>12} {:>10} {:>8}",
            "operation", "conductor", "p95", "raw podman", "p95", "ratio"
        );
        for (name, a, b) in [
            ("create+start (vs run -d)", cc, pc),
            ("exec true (vs podman exec)", ce, pe),
            ("pause (vs podman pause)", cp, pp),
            ("resume (vs podman unpause)", cr, pr),
            ("suspend (vs stop -t 0)", cs, ps),
            ("resumed to 1st command", cf, pf),
            ("destroy (vs rm -f)", cd, pd),
        ] {
            let ((am, ap), (bm, bp)) = (stats(a), stats(b));
            println!(
                "{name:<28} {am:>10.1} {ap:>10.1} {bm:>12.1} {bp:>10.1} {:>7.2}x",
                am / bm
            );
        }
    });
}
