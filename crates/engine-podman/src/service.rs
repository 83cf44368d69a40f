//! The supervisor of conductor's private `podman system service`.
//!
//! When no usable API socket is found, conductor starts
//! `podman [--runtime R] system service --time=0 unix://<socket>` itself (the socket is
//! `<data_dir>/podman.sock` for `conductor serve`, `<data_dir>/podman-<pid>.sock` for other
//! processes: see [`crate::ServiceRole`]), with its output in `<data_dir>/podman-service.log`,
//! and waits until the socket answers a ping.
//!
//! The service must never outlive conductor, even after `kill -9`. The child therefore asks
//! the kernel for `SIGKILL` when its parent dies (`PR_SET_PDEATHSIG`). The kernel's "parent"
//! is the *thread* that forked, not the process, and Tokio retires idle threads; so the
//! child is forked from a dedicated thread that lives exactly as long as the supervisor.
//! The service gets its own process group, so a Ctrl-C meant for conductor does not stop it
//! before conductor has cleaned up. [`ManagedService::stop`] sends `SIGTERM`, waits, then
//! kills; dropping the supervisor kills at once.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bollard::Docker;
use conductor_core::engine::{EngineError, EngineResult};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// How long the service may take to answer its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a `SIGTERM`ed service may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the service log an error quotes.
const LOG_TAIL_LINES: usize = 15;

/// A running `podman system service` owned by this process.
#[derive(Debug)]
pub(crate) struct ManagedService {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// Dropping this ends the forking thread (see the module docs).
    _fork_thread: std::sync::mpsc::Sender<()>,
}

impl ManagedService {
    /// Starts the service on `socket` (in `data_dir`, beside its log) and returns it with a
    /// client once the socket answers.
    pub(crate) async fn start(
        podman: &Path,
        runtime: &str,
        data_dir: &Path,
        socket: &Path,
    ) -> EngineResult<(Self, Docker)> {
        let unavailable = |what: String| EngineError::Unavailable(what);
        std::fs::create_dir_all(data_dir)
            .map_err(|e| unavailable(format!("cannot create data directory {}: {e}", data_dir.display())))?;
        let socket = socket.to_path_buf();
        let log = data_dir.join("podman-service.log");
        match std::fs::remove_file(&socket) {
            Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale podman socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(unavailable(format!(
                    "cannot remove stale socket {}: {e}",
                    socket.display()
                )))
            }
        }
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", log.display())))?;
        let log_file_err = log_file
            .try_clone()
            .map_err(|e| unavailable(format!("cannot open {}: {e}", log.display())))?;

        let mut command = Command::new(podman);
        command
            .arg("--runtime")
            .arg(runtime)
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file_err)
            .process_group(0)
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe functions may be called: it makes two raw syscalls (prctl,
        // getppid) and builds io::Errors from errno values, none of which allocate or lock.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }

        let (child, fork_thread) = spawn_from_dedicated_thread(command)
            .await
            .map_err(|e| unavailable(format!("cannot start `{} system service`: {e}", podman.display())))?;
        let mut service = ManagedService {
            child,
            socket,
            log,
            _fork_thread: fork_thread,
        };
        let docker = service.wait_until_ready().await?;
        tracing::info!(socket = %service.socket.display(), runtime, pid = ?service.child.id(), "started podman system service");
        Ok((service, docker))
    }

    /// The socket the service listens on.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    async fn wait_until_ready(&mut self) -> EngineResult<Docker> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EngineError::Unavailable(format!(
                    "podman system service exited during start-up ({status}); last lines of {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                )));
            }
            if let Some(docker) = crate::ping(&self.socket).await {
                return Ok(docker);
            }
            if Instant::now() >= deadline {
                let _ = self.child.start_kill();
                return Err(EngineError::Unavailable(format!(
                    "podman system service did not answer on {} within {} s; last lines of {}:\n{}",
                    self.socket.display(),
                    START_TIMEOUT.as_secs(),
                    self.log.display(),
                    log_tail(&self.log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the service: `SIGTERM`, then `SIGKILL` if it has not exited after a while.
    pub(crate) async fn stop(mut self) -> EngineResult<()> {
        // `id()` is `None` once the child is reaped, so the pid cannot name another process.
        if let Some(pid) = self.child.id() {
            send_sigterm(pid);
        }
        let result = match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(EngineError::failed("stop podman system service", e)),
            Err(_) => {
                tracing::warn!(
                    "podman system service ignored SIGTERM for {} s; killing it",
                    STOP_TIMEOUT.as_secs()
                );
                self.child
                    .kill()
                    .await
                    .map_err(|e| EngineError::failed("kill podman system service", e))
            }
        };
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

impl Drop for ManagedService {
    fn drop(&mut self) {
        // kill_on_drop also does this, but only once the Child itself is dropped.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn send_sigterm(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our unreaped child.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SIGTERM to podman system service failed");
    }
}

/// Spawns `command` from a new thread that then waits until the returned sender is
/// dropped, so the child's parent-death signal is tied to the supervisor's lifetime.
async fn spawn_from_dedicated_thread(mut command: Command) -> std::io::Result<(Child, std::sync::mpsc::Sender<()>)> {
    let runtime = tokio::runtime::Handle::current();
    let (spawned_tx, spawned_rx) = oneshot::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("podman-service".into())
        .spawn(move || {
            // Spawning registers the child with the runtime's process driver.
            let _runtime = runtime.enter();
            let spawned = command.spawn();
            let ok = spawned.is_ok();
            let _ = spawned_tx.send(spawned);
            if ok {
                // Returns when the supervisor drops its sender.
                let _ = release_rx.recv();
            }
        })?;
    let child = spawned_rx
        .await
        .map_err(|_| std::io::Error::other("the spawning thread died"))??;
    Ok((child, release_tx))
}

/// The last lines of the service log, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    // The log is append-only across runs; the end is enough.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.starts_with(&format!("line {}", 40 - LOG_TAIL_LINES)), "{tail}");
        assert!(tail.ends_with("line 39"), "{tail}");
        assert_eq!(log_tail(&dir.path().join("missing")), "(no log)");
    }
}
