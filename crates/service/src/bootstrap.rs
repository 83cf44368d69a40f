//! Making the base image without a registry: `debootstrap --variant=minbase` of Debian
//! bookworm from the mirror the host's apt already uses, packed with `tar` and imported into
//! the engine. About 30 s and 200 MB; done once, every preset builds on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use conductor_core::engine::{ImageInfo, Progress, ProgressSink};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::{Conductor, Result, ServiceError};

const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The Debian mirror of the host's apt configuration (deb822 `URIs:` or one-line `deb`),
/// so the bootstrap works wherever `apt-get` does.
pub fn host_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut extra: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sources" || x == "list"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|t| mirror_from(&t))
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// Picks the first Debian main-archive URI (not security, not a third-party repository).
fn mirror_from(text: &str) -> Option<String> {
    let is_debian = |u: &str| u.trim_end_matches('/').ends_with("/debian") && u.starts_with("http");
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("URIs:") {
            if let Some(u) = rest.split_whitespace().find(|u| is_debian(u)) {
                return Some(u.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("deb ") {
            let uri = rest.split_whitespace().find(|w| !w.starts_with('['))?;
            if is_debian(uri) {
                return Some(uri.to_string());
            }
        }
    }
    None
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

/// Runs a host command, streaming its output lines to `progress`; returns the last lines
/// in the error when it fails.
pub(crate) async fn run_streamed(mut cmd: Command, what: &str, progress: &ProgressSink) -> Result<()> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| ServiceError::host(what, e))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let (_, _, status) = tokio::join!(
        pump_lines(child.stdout.take(), progress.clone(), tail.clone()),
        pump_lines(child.stderr.take(), progress.clone(), tail.clone()),
        child.wait()
    );
    let status = status.map_err(|e| ServiceError::host(what, e))?;
    if !status.success() {
        let lines: Vec<String> = tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
        return Err(ServiceError::host(
            what,
            format!("exited with {status}\n{}", lines.join("\n")),
        ));
    }
    Ok(())
}

/// Forwards each line to `progress` and keeps the last 20 in `tail` for error messages.
async fn pump_lines<R: AsyncRead + Unpin>(
    reader: Option<R>,
    progress: ProgressSink,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let Some(reader) = reader else { return };
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(mut t) = tail.lock() {
            if t.len() == 20 {
                t.pop_front();
            }
            t.push_back(line.clone());
        }
        progress(Progress::Line(line));
    }
}

/// Copies the host's locally added CA certificates (`/usr/local/share/ca-certificates`)
/// into the rootfs, so that image builds behind a TLS-intercepting proxy (corporate or
/// sandbox egress proxies) trust what the host trusts. Presets install `ca-certificates`,
/// whose trigger adds them to the system bundle.
fn trust_host_cas(rootfs: &Path) -> Result<()> {
    let src = Path::new("/usr/local/share/ca-certificates");
    let Ok(entries) = std::fs::read_dir(src) else {
        return Ok(());
    };
    let dst = rootfs.join("usr/local/share/ca-certificates");
    std::fs::create_dir_all(&dst).map_err(|e| ServiceError::host("copy host CA certificates", e))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "crt") && p.is_file() {
            std::fs::copy(&p, dst.join(e.file_name()))
                .map_err(|e| ServiceError::host("copy host CA certificates", e))?;
        }
    }
    Ok(())
}

impl Conductor {
    /// Creates `reference` (normally `localhost/conductor/base:bookworm`) with debootstrap.
    pub async fn bootstrap_base(&self, reference: &str, progress: ProgressSink) -> Result<ImageInfo> {
        if !which("debootstrap") {
            return Err(ServiceError::host(
                "bootstrap the base image",
                "debootstrap is not installed: run scripts/setup.sh or apt-get install debootstrap",
            ));
        }
        let work = self.paths.base.join("tmp");
        std::fs::create_dir_all(&work).map_err(|e| ServiceError::host("create the bootstrap directory", e))?;
        let dir = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(&work)
            .map_err(|e| ServiceError::host("create the bootstrap directory", e))?;
        let rootfs = dir.path().join("rootfs");
        let mirror = host_mirror();
        progress(Progress::Step {
            index: 1,
            total: 3,
            text: format!("debootstrap --variant=minbase {SUITE} from {mirror}"),
        });
        let mut cmd = Command::new("debootstrap");
        cmd.args(["--variant=minbase", SUITE]).arg(&rootfs).arg(&mirror);
        run_streamed(cmd, "debootstrap of the base image", &progress).await?;
        // Keep the image small: no package lists or downloaded archives.
        for sub in ["var/lib/apt/lists", "var/cache/apt/archives"] {
            let d = rootfs.join(sub);
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.path().is_file() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        trust_host_cas(&rootfs)?;
        progress(Progress::Step {
            index: 2,
            total: 3,
            text: "pack the root file system".into(),
        });
        let tarball = dir.path().join("rootfs.tar");
        let mut tar = Command::new("tar");
        tar.arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "-cf"])
            .arg(&tarball)
            .arg(".");
        run_streamed(tar, "pack the base root file system", &progress).await?;
        progress(Progress::Step {
            index: 3,
            total: 3,
            text: format!("import as {reference}"),
        });
        let info = self.engine.image_import(tarball, reference, progress.clone()).await?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_formats() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(mirror_from(deb822).as_deref(), Some("http://deb.debian.org/debian"));
        let one = "deb [arch=amd64] http://mirror.example/debian bookworm main\n";
        assert_eq!(mirror_from(one).as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(
            mirror_from("deb https://packages.cloud.google.com/apt cloud-sdk main\n"),
            None
        );
    }
}
