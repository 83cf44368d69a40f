//! `conductor serve`: the HTTP API and the task orchestrator in one process, and
//! `conductor paths`, which tells scripts where this configuration keeps its files.
//!
//! Start-up: bind the port first (a taken port fails before Podman is touched), open the
//! conductor, reconcile what a previous run left, start the orchestrator, then serve.
//! The only line on stdout is `conductor listening on http://ADDR` (tests read the port
//! from it). On SIGINT or SIGTERM the orchestrator gets `shutdown_grace_period` seconds
//! to let running tasks finish (the API keeps answering meanwhile, so followers and
//! waiters see the outcome), then the server stops and the conductor, with its private
//! Podman service, is dropped.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use conductor_service::instance_lock::InstanceLock;
use conductor_service::tasks::Orchestrator;
use conductor_service::{home_dir, Conductor, ServiceError, ServiceRole};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use super::{load_config, Cli};

/// How long in-flight HTTP requests get once the orchestrator has stopped.
const HTTP_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default network.bind_address).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one (default network.api_port).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
}

pub async fn run(cli: &Cli, args: &ServeArgs) -> Result<ExitCode, ServiceError> {
    let config = load_config(cli)?;
    let bind = match args.bind {
        Some(ip) => ip,
        None => config
            .network
            .bind_address
            .parse()
            .map_err(|_| ServiceError::invalid("network.bind_address", "is not an IP address"))?,
    };
    let addr = SocketAddr::new(bind, args.port.unwrap_or(config.network.api_port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServiceError::host(format!("listen on {addr}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServiceError::host("read the listening address", e))?;
    let grace = Duration::from_secs(config.task_execution.shutdown_grace_period);

    let base = config.storage.resolve(&home_dir()).base;
    std::fs::create_dir_all(&base).map_err(|e| ServiceError::host(format!("create {}", base.display()), e))?;
    let _lock = InstanceLock::acquire(&base)?;
    let conductor = Arc::new(Conductor::open_as(config, ServiceRole::Owner).await?);
    let report = conductor.reconcile().await?;
    tracing::info!("reconciled: {}", serde_json::to_string(&report).unwrap_or_default());
    for (image, why) in conductor.preload_images().await {
        tracing::warn!("podman_config.preload_images: {image}: {why}");
    }
    let orchestrator = Orchestrator::start(conductor.clone());
    let cleanup = conductor_service::maintenance::spawn_cleanup(conductor.clone());
    let watch = conductor_service::liveness::spawn_watch(conductor.clone());
    let idle = conductor_service::pause::spawn_idle_check(conductor.clone());

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Built before the line below: the API key file exists when scripts read it.
    let server = conductor_api::Server::new(conductor.clone(), listener)?;
    let mcp = server.mcp();
    let mut server = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    // Before the line below: a SIGTERM sent as soon as it is read must find the handler.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| ServiceError::host("install a SIGTERM handler", e))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| ServiceError::host("install a SIGINT handler", e))?;
    println!("conductor listening on http://{addr}");

    let failed = tokio::select! {
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
        r = &mut server => Some(r),
    };
    if let Some(r) = failed {
        // The server ended by itself: stop the tasks and report why.
        watch.abort();
        if let Some(idle) = &idle {
            idle.abort();
        }
        orchestrator.shutdown(grace).await;
        mcp.drain().await;
        return match r {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(ExitCode::SUCCESS),
            Err(e) => Err(ServiceError::host("run the HTTP server", e)),
        };
    }
    cleanup.abort();
    watch.abort();
    if let Some(idle) = &idle {
        idle.abort();
    }
    tracing::warn!("shutting down: running tasks get {}s to finish", grace.as_secs());
    orchestrator.shutdown(grace).await;
    let _ = stop.send(());
    match tokio::time::timeout(HTTP_DRAIN, &mut server).await {
        Ok(Ok(Err(e))) => tracing::warn!("HTTP server: {e}"),
        Err(_) => {
            tracing::warn!("HTTP requests still open after {}s; closing them", HTTP_DRAIN.as_secs());
            server.abort();
        }
        _ => {}
    }
    // MCP tool operations detached from their requests (a workspace being created) get
    // their own time to finish, outside the HTTP drain.
    mcp.close();
    mcp.drain().await;
    if Arc::strong_count(&conductor) > 1 {
        tracing::info!("background work still holds the conductor; it ends with the process");
    }
    drop(conductor);
    Ok(ExitCode::SUCCESS)
}

/// What `conductor paths` prints.
#[derive(Debug, Serialize)]
struct Paths {
    base: String,
    workspaces: String,
    snapshots: String,
    logs: String,
    database: String,
    pid_file: String,
    log_file: String,
    api_key_file: String,
    api_key_required: bool,
    api_url: String,
    shutdown_grace_period: u64,
}

/// `conductor paths`: the resolved locations and API address as JSON, for scripts.
pub fn paths(cli: &Cli) -> Result<ExitCode, ServiceError> {
    let config = load_config(cli)?;
    let p = config.storage.resolve(&home_dir());
    let show = |p: &std::path::Path| p.display().to_string();
    let host = match config.network.bind_address.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => config.network.bind_address.clone(),
    };
    let out = Paths {
        base: show(&p.base),
        workspaces: show(&p.workspaces),
        snapshots: show(&p.snapshots),
        logs: show(&p.logs),
        database: show(&p.database),
        pid_file: show(&p.base.join("conductor.pid")),
        log_file: show(&p.logs.join("conductor.log")),
        api_key_file: show(&conductor_api::auth::key_path(&config, &p)),
        api_key_required: config.security.api_key_required,
        api_url: format!("http://{host}:{}", config.network.api_port),
        shutdown_grace_period: config.task_execution.shutdown_grace_period,
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
