//! `kill -9` of `conductor serve` with a running and queued tasks, then a restart: nothing
//! accepted is lost, nothing runs twice, the private Podman service dies with conductor,
//! and no container is leaked.

mod common;

use std::time::{Duration, Instant};

use common::{leftover_containers, serve};
use serde_json::{json, Value};

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_and_runs_nothing_twice() {
    let (dir, config) = common::config_dir(
        "conductor-crash-",
        "task_execution:\n  max_workers: 1\n  shutdown_grace_period: 5\n",
    );
    let served = serve(&config);
    let base = served.base.clone();
    let http = reqwest::Client::new();
    let tasks = json!([
        {"task_type": "isolated_execution", "environment": "minimal", "priority": 9,
         "commands": ["echo running-marker", "sleep 300"]},
        {"task_type": "isolated_execution", "environment": "minimal", "commands": ["echo queued-marker-1"]},
        {"task_type": "isolated_execution", "environment": "minimal", "commands": ["echo queued-marker-2"]}
    ]);
    let resp: Value = http
        .post(format!("{base}/tasks"))
        .json(&tasks)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<String> = resp["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{resp}");

    // Wait until the first task runs its first command, then kill -9 the service.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let logs = common::task_log(&http, &base, &ids[0]).await;
        if logs.contains("running-marker") {
            break;
        }
        assert!(Instant::now() < deadline, "the first task never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sock = dir.path().join("podman.sock").display().to_string();
    assert!(
        !processes_with(&sock).is_empty(),
        "the private podman service should be running"
    );
    served.kill_9();
    let gone_by = Instant::now() + Duration::from_secs(10);
    while !processes_with(&sock).is_empty() && Instant::now() < gone_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        processes_with(&sock).is_empty(),
        "podman service outlived a killed conductor"
    );

    // Restart: the interrupted task fails with a clear reason, the queued ones run once.
    let served = serve(&config);
    let base = served.base.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut views = Vec::new();
    for id in &ids {
        loop {
            let v = get(&http, format!("{base}/tasks/{id}")).await;
            let status = v["status"].as_str().unwrap_or("").to_string();
            if !matches!(status.as_str(), "queued" | "running") {
                views.push(v);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} did not finish after the restart: {v}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(views[0]["status"], "failed", "{}", views[0]);
    assert!(
        views[0]["error"].as_str().unwrap_or("").contains("restart"),
        "{}",
        views[0]
    );
    for (i, v) in views.iter().enumerate().skip(1) {
        assert_eq!(v["status"], "succeeded", "{v}");
        let logs = common::task_log(&http, &base, &ids[i]).await;
        let marker = format!("queued-marker-{i}");
        assert_eq!(
            logs.lines().filter(|l| *l == marker).count(),
            1,
            "ran more than once: {logs}"
        );
        assert_eq!(v["attempt"], 1, "{v}");
    }
    let list = get(&http, format!("{base}/tasks")).await;
    assert_eq!(list["total"], 3, "no task lost or duplicated: {list}");

    // Graceful stop; nothing of this instance is left in Podman.
    assert!(served.stop().success());
    assert_eq!(
        leftover_containers(&dir.path().join("conductor.db")),
        "",
        "leaked containers"
    );
}
