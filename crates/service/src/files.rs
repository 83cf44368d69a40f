//! Files of a running workspace: upload (a raw file, or a tar unpacked into a directory),
//! download (a raw file, or a tar of a directory), list, stat and delete.
//!
//! # Two ways in
//!
//! - **The agent** (`crates/agent`, when it answers): every path is opened with
//!   `openat2(RESOLVE_BENEATH)` below `/workspace`, as the workspace user; tars are made and
//!   unpacked by the agent (`archive`/`extract`), member by member, through the same checks.
//! - **Podman** (the agent does not answer, or is too old for `archive`): the path is first
//!   resolved by `realpath` run as the workspace user through Podman exec and refused when
//!   it leaves `/workspace`; then Podman's archive endpoints move the data (they unpack
//!   chrooted into the volume's directory, members owned by the workspace user), and list,
//!   stat and delete run `find`/`stat`/`rm` as the workspace user. Tars sent this way are
//!   checked and rewritten member by member first (the agent's rules, uid/gid 1000, no
//!   set-id bits). A path or member through an absolute symlink is resolved against the
//!   workspace's volume (Podman's chroot), so it may land elsewhere inside the workspace.
//!
//! # Limits
//!
//! Paths are checked by [`validate::workspace_path`] before the workspace is looked at.
//! Nothing is held whole in memory: bodies stream through in chunks (a raw upload through
//! the Podman fallback without a known size is spooled to a temporary file first: a tar
//! header needs the size); every tar parsed here goes through a [`TarGuard`], which refuses
//! a long-name or pax extension entry over 64 KiB before it is buffered. An upload larger than the workspace's `volume_size` is refused
//! (up front when its size is declared, else when it gets there): [`ServiceError::TooLarge`];
//! a full volume is [`ServiceError::NoSpace`]. A raw upload that fails midway leaves the
//! previous file, if any, untouched either way: the agent, and Podman's archive endpoint,
//! write a temporary file beside the target that is renamed over it only once complete
//! (through Podman the rename is a `mv` run as the workspace user) and removed on failure;
//! a tar that fails midway leaves the members unpacked so far.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use conductor_agent_protocol::{archive_member, ErrorCode, FileKind, FileStat, TarGuard, CHUNK, FEATURE_ARCHIVE};
use conductor_core::engine::{ByteStream, ExecSpec, OutputChunk};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::resources::WorkspaceLimits;
use conductor_core::validate::{self, WORKSPACE_ROOT};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::agent_client::{self, AgentConn, AgentError};
use crate::exec::{ExecPath, WORKSPACE_USER};
use crate::volumes::WORKSPACE_UID;
use crate::{now_ms, Conductor, Result, ServiceError};

/// One entry of a listing (or a `stat`): name, kind, size, mode, owner, mtime, link target.
pub type FileEntry = FileStat;

/// Options of a raw file upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// Permission bits of the file (at most 0o777; default 0644 for a new file).
    pub mode: Option<u32>,
    /// The body's size when the caller knows it (`Content-Length`): refused up front when
    /// above the storage limit.
    pub size: Option<u64>,
}

/// What an upload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The path, absolute in the workspace (`/workspace/…`).
    pub path: String,
    /// Bytes of file contents written.
    pub size: u64,
    /// Through the agent or through Podman.
    pub via: ExecPath,
}

/// What a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadKind {
    /// The raw contents of a regular file.
    File,
    /// A tar of a directory, entries named from its base name (`src/`, `src/a.py`).
    Archive,
}

/// A download: its kind, its size when known (a file's), and the bytes.
pub struct Download {
    pub kind: DownloadKind,
    pub size: Option<u64>,
    /// Base name of the path (`workspace` for the root), e.g. for a file name. For an
    /// archive, the top-level name of its entries: through Podman that of the path with
    /// its symlinks resolved (`real` for `link -> real`).
    pub name: String,
    pub via: ExecPath,
    /// The contents; an error ends it early (the workspace changed, the agent died).
    pub stream: ByteStream,
}

/// A checked path in a running workspace.
struct Target {
    workspace: String,
    container: String,
    agent_dir: PathBuf,
    /// Relative to `/workspace`, cleaned; `""` is `/workspace`.
    rel: String,
    /// The workspace's storage limit in bytes.
    limit: u64,
}

impl Target {
    fn abs(&self) -> String {
        absolute(&self.rel)
    }
    /// The path as sent to the agent (relative to its root; `.` for the root).
    fn agent_path(&self) -> &str {
        if self.rel.is_empty() {
            "."
        } else {
            &self.rel
        }
    }
    fn name(&self) -> String {
        match self.rel.rsplit('/').next() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => "workspace".to_string(),
        }
    }
}

fn absolute(rel: &str) -> String {
    if rel.is_empty() {
        WORKSPACE_ROOT.to_string()
    } else {
        format!("{WORKSPACE_ROOT}/{rel}")
    }
}

/// An agent failure as a service error; `field` names the request part at fault for
/// refused paths (`path`, or `body` for tar members).
fn agent_error(e: AgentError, field: &str) -> ServiceError {
    match e {
        AgentError::Refused { code, message } => match code {
            ErrorCode::InvalidPath | ErrorCode::OutsideRoot => ServiceError::invalid(field, message),
            ErrorCode::InvalidArchive => ServiceError::invalid("body", message),
            ErrorCode::NotFound => ServiceError::not_found(message.trim_end_matches(": No such file or directory")),
            ErrorCode::IsADirectory
            | ErrorCode::NotADirectory
            | ErrorCode::NotARegularFile
            | ErrorCode::DirectoryNotEmpty
            | ErrorCode::PermissionDenied => ServiceError::Conflict(message),
            ErrorCode::NoSpace => ServiceError::NoSpace(format!(
                "{message}: the workspace's volume is full (its limits.volume_size)"
            )),
            _ => ServiceError::host("workspace agent", message),
        },
        other => ServiceError::host("workspace agent", other),
    }
}

fn too_large(limit: u64) -> ServiceError {
    ServiceError::TooLarge(format!(
        "the upload is larger than the workspace's storage limit ({limit} bytes, limits.volume_size)"
    ))
}

/// Counts what passes and ends the stream with an error past `limit` bytes; `over` tells
/// afterwards why it ended.
fn limited(body: ByteStream, limit: u64, over: Arc<AtomicBool>) -> ByteStream {
    let mut seen = 0u64;
    Box::pin(body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit {
            over.store(true, Ordering::Relaxed);
            return Err(io::Error::other("the upload exceeds the storage limit"));
        }
        Ok(chunk)
    }))
}

impl Conductor {
    /// Checks `path` and finds the running workspace it is in.
    fn file_target(&self, id: &str, path: &str) -> Result<Target> {
        let rel = validate::workspace_path(path).map_err(|m| ServiceError::invalid("path", m))?;
        let info = self.get_workspace(id)?;
        let record = self
            .store
            .get_workspace(&info.id)?
            .ok_or_else(|| ServiceError::not_found(format!("workspace '{id}'")))?;
        if record.state != WorkspaceState::Running {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is {}; it must be running to reach its files",
                record.id, record.state
            )));
        }
        let limits: WorkspaceLimits = serde_json::from_str(&record.limits_json)
            .map_err(|e| ServiceError::host(format!("decode limits of workspace {}", record.id), e))?;
        self.store.touch_workspace(&record.id, now_ms())?;
        Ok(Target {
            container: record.container_id.clone().unwrap_or(record.container_name.clone()),
            agent_dir: agent_client::socket_dir(&self.paths, &record.id),
            workspace: record.id,
            rel,
            limit: limits.volume_size.bytes(),
        })
    }

    /// The workspace's agent when it answers (and, with `archive`, serves tars).
    async fn agent_for(&self, t: &Target, archive: bool) -> Option<AgentConn> {
        match AgentConn::connect(&t.agent_dir).await {
            Ok(conn) if !archive || conn.supports(FEATURE_ARCHIVE) => Some(conn),
            Ok(_) => {
                tracing::debug!(workspace = %t.workspace, "the agent is too old for archives; files through podman");
                None
            }
            Err(e) => {
                tracing::debug!(workspace = %t.workspace, "files through podman: {e}");
                None
            }
        }
    }

    /// Writes `body` to the file `path` (missing parent directories are made), as the
    /// workspace user; returns what was written.
    pub async fn put_file(&self, id: &str, path: &str, body: ByteStream, opts: PutOptions) -> Result<Written> {
        let t = self.file_target(id, path)?;
        if let Some(mode) = opts.mode {
            if mode > 0o777 {
                return Err(ServiceError::invalid(
                    "mode",
                    format!("{mode:o} is not a permission mode (octal, at most 777)"),
                ));
            }
        }
        if t.rel.is_empty() {
            return Err(ServiceError::Conflict(
                "/workspace is a directory; upload a tar with extract=true to fill it".into(),
            ));
        }
        if opts.size.is_some_and(|n| n > t.limit) {
            return Err(too_large(t.limit));
        }
        let over = Arc::new(AtomicBool::new(false));
        let body = limited(body, t.limit, over.clone());
        let result = match self.agent_for(&t, false).await {
            Some(conn) => conn
                .write_stream(t.agent_path(), opts.mode, true, body)
                .await
                .map(|size| (size, ExecPath::Agent))
                .map_err(|e| agent_error(e, "path")),
            None => self
                .podman_put_file(&t, body, opts)
                .await
                .map(|size| (size, ExecPath::Podman)),
        };
        // Both ways write a temporary file beside the target and rename it over the target
        // only at the end, removing it on failure: the previous file, if any, stays.
        written(&t, result, &over)
    }

    /// Unpacks the tar `body` into the directory `path` (made when missing), as the
    /// workspace user; returns the bytes of file contents written.
    pub async fn put_archive(&self, id: &str, path: &str, body: ByteStream, size: Option<u64>) -> Result<Written> {
        let t = self.file_target(id, path)?;
        if size.is_some_and(|n| n > t.limit) {
            return Err(too_large(t.limit));
        }
        let over = Arc::new(AtomicBool::new(false));
        let body = limited(body, t.limit, over.clone());
        let result = match self.agent_for(&t, true).await {
            Some(mut conn) => {
                conn.mkdir(t.agent_path(), None, true)
                    .await
                    .map_err(|e| agent_error(e, "path"))?;
                conn.extract_stream(t.agent_path(), body)
                    .await
                    .map(|size| (size, ExecPath::Agent))
                    .map_err(|e| agent_error(e, "body"))
            }
            None => self
                .podman_put_archive(&t, body)
                .await
                .map(|size| (size, ExecPath::Podman)),
        };
        written(&t, result, &over)
    }

    /// Downloads `path`: a regular file raw, a directory as a tar.
    pub async fn get_file(&self, id: &str, path: &str) -> Result<Download> {
        let t = self.file_target(id, path)?;
        if let Some(mut conn) = self.agent_for(&t, false).await {
            let st = conn.stat(t.agent_path()).await.map_err(|e| agent_error(e, "path"))?;
            match st.kind {
                FileKind::File => {
                    let stream = conn
                        .read_stream(t.agent_path())
                        .await
                        .map_err(|e| agent_error(e, "path"))?;
                    return Ok(Download {
                        kind: DownloadKind::File,
                        size: Some(st.size),
                        name: t.name(),
                        via: ExecPath::Agent,
                        stream,
                    });
                }
                FileKind::Dir if conn.supports(FEATURE_ARCHIVE) => {
                    let stream = conn
                        .archive_stream(t.agent_path())
                        .await
                        .map_err(|e| agent_error(e, "path"))?;
                    return Ok(Download {
                        kind: DownloadKind::Archive,
                        size: None,
                        name: t.name(),
                        via: ExecPath::Agent,
                        stream,
                    });
                }
                FileKind::Dir => {}
                _ => return Err(not_regular(&t.abs())),
            }
        }
        self.podman_get(&t).await
    }

    /// The entries of the directory `path`, sorted by name (links are not followed).
    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>> {
        let t = self.file_target(id, path)?;
        match self.agent_for(&t, false).await {
            Some(mut conn) => conn.list(t.agent_path()).await.map_err(|e| agent_error(e, "path")),
            None => self.podman_list(&t).await,
        }
    }

    /// Facts about `path` (a symlink inside the workspace is followed).
    pub async fn stat_file(&self, id: &str, path: &str) -> Result<FileEntry> {
        let t = self.file_target(id, path)?;
        match self.agent_for(&t, false).await {
            Some(mut conn) => conn.stat(t.agent_path()).await.map_err(|e| agent_error(e, "path")),
            None => {
                let r = self.resolve(&t, Resolve::Full).await?;
                r.stat(&t)
                    .ok_or_else(|| ServiceError::not_found(format!("{} in the workspace", t.abs())))
            }
        }
    }

    /// Deletes a file, a symlink (not its target) or a directory (with `recursive`, with
    /// its contents). `/workspace` itself is refused.
    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let t = self.file_target(id, path)?;
        if t.rel.is_empty() {
            return Err(ServiceError::invalid(
                "path",
                "/workspace itself cannot be deleted (delete what is in it)",
            ));
        }
        match self.agent_for(&t, false).await {
            Some(mut conn) => conn
                .delete(t.agent_path(), recursive)
                .await
                .map_err(|e| agent_error(e, "path")),
            None => self.podman_delete(&t, recursive).await,
        }
    }
}

fn not_regular(path: &str) -> ServiceError {
    ServiceError::Conflict(format!("{path} is neither a regular file nor a directory"))
}

// ---------------------------------------------------------------------------------------
// The Podman fallback.

/// How [`Conductor::resolve`] treats the last component.
#[derive(Clone, Copy)]
enum Resolve {
    /// Follow it when it is a symlink (read, write, list).
    Full,
    /// Resolve only the parent: the path names a link itself, not its target (delete).
    Parent,
}

/// A path resolved in the container as the workspace user.
#[derive(Debug)]
struct Resolved {
    /// `file`, `dir`, `symlink`, `other` or `missing`.
    kind: String,
    /// Absolute, symlinks resolved (but the last with [`Resolve::Parent`]).
    path: String,
    /// The deepest existing directory at or above `path`.
    base: String,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

impl Resolved {
    fn stat(&self, t: &Target) -> Option<FileStat> {
        let kind = match self.kind.as_str() {
            "file" => FileKind::File,
            "dir" => FileKind::Dir,
            "symlink" => FileKind::Symlink,
            "other" => FileKind::Other,
            _ => return None,
        };
        Some(FileStat {
            name: if t.rel.is_empty() { String::new() } else { t.name() },
            kind,
            size: self.size,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime_ms: self.mtime * 1000,
            link_target: None,
        })
    }
}

/// Resolves `$2` (relative to /workspace) as the user running it; prints NUL-separated
/// kind, resolved path, deepest existing directory and `size mode(octal) uid gid mtime`.
const RESOLVE_SCRIPT: &str = r#"t=/workspace${2:+/$2}
if [ "$1" = parent ]; then d=$(realpath -m -- "$(dirname -- "$t")") || exit 90; p="${d%/}/$(basename -- "$t")"
else p=$(realpath -m -- "$t") || exit 90; fi
case "$p" in /workspace|/workspace/*) ;; *) printf 'outside\0%s\0' "$p"; exit 0 ;; esac
if [ -L "$p" ]; then k=symlink; elif [ -d "$p" ]; then k=dir; elif [ -f "$p" ]; then k=file; elif [ -e "$p" ]; then k=other; else k=missing; fi
b=$p; while [ ! -d "$b" ] || [ -L "$b" ]; do b=$(dirname -- "$b"); done
m="0 0 0 0 0"; [ "$k" != missing ] && m=$(stat -c '%s %a %u %g %Y' -- "$p")
printf '%s\0%s\0%s\0%s\0' "$k" "$p" "$b" "$m""#;

/// Lists `$1` as the user running it: NUL-separated name, type, size, mode, uid, gid,
/// mtime and link target of each entry.
const LIST_SCRIPT: &str = r#"exec find "$1" -mindepth 1 -maxdepth 1 -printf '%f\0%y\0%s\0%m\0%U\0%G\0%T@\0%l\0'"#;

fn fallback_failed(what: &str, detail: impl std::fmt::Display) -> ServiceError {
    ServiceError::host(format!("{what} through podman"), detail)
}

impl Conductor {
    /// Runs `argv` in the container as the workspace user through Podman exec; returns the
    /// exit code, stdout and stderr.
    async fn exec_as_user(&self, t: &Target, argv: Vec<String>) -> Result<(i64, Vec<u8>, String)> {
        let spec = ExecSpec {
            argv,
            user: Some(WORKSPACE_USER.into()),
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(16);
        let collect = async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(chunk) = rx.recv().await {
                match chunk {
                    OutputChunk::Stdout(b) => out.extend_from_slice(&b),
                    OutputChunk::Stderr(b) => err.extend_from_slice(&b),
                }
            }
            (out, err)
        };
        let (code, (out, err)) = tokio::join!(self.engine.exec(&t.container, spec, tx), collect);
        Ok((code?, out, String::from_utf8_lossy(&err).trim().to_string()))
    }

    /// Resolves the target as the workspace user would see it; refuses a path that leads
    /// outside `/workspace` (through a symlink), as the agent does.
    async fn resolve(&self, t: &Target, how: Resolve) -> Result<Resolved> {
        let mode = match how {
            Resolve::Full => "full",
            Resolve::Parent => "parent",
        };
        let argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            RESOLVE_SCRIPT.into(),
            "sh".into(),
            mode.into(),
            t.rel.clone(),
        ];
        let (code, out, err) = self.exec_as_user(t, argv).await?;
        if code != 0 {
            return Err(fallback_failed(
                "resolve a path",
                format!("exit {code}: {err} (the fallback needs GNU realpath and stat in the image)"),
            ));
        }
        let fields: Vec<String> = out
            .split(|b| *b == 0)
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        if fields.first().map(String::as_str) == Some("outside") {
            return Err(ServiceError::invalid(
                "path",
                format!("{} leads outside {WORKSPACE_ROOT}", t.abs()),
            ));
        }
        let [kind, path, base, meta, ..] = fields.as_slice() else {
            return Err(fallback_failed("resolve a path", "unexpected output"));
        };
        let nums: Vec<&str> = meta.split_whitespace().collect();
        let num = |i: usize| nums.get(i).and_then(|n| n.parse::<i64>().ok()).unwrap_or(0);
        Ok(Resolved {
            kind: kind.clone(),
            path: path.clone(),
            base: base.clone(),
            size: u64::try_from(num(0)).unwrap_or(0),
            mode: nums.get(1).and_then(|m| u32::from_str_radix(m, 8).ok()).unwrap_or(0),
            uid: u32::try_from(num(2)).unwrap_or(0),
            gid: u32::try_from(num(3)).unwrap_or(0),
            mtime: num(4),
        })
    }

    /// Makes the missing directories between `r.base` and `dir` (owned by the workspace
    /// user): a tar of directory entries unpacked at `r.base`.
    async fn podman_mkdirs(&self, t: &Target, base: &str, dir: &str) -> Result<()> {
        let Some(rest) = dir.strip_prefix(base).map(|r| r.trim_start_matches('/')) else {
            return Err(fallback_failed(
                "make directories",
                format!("{dir} is not below {base}"),
            ));
        };
        if rest.is_empty() {
            return Ok(());
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut done = String::new();
        for part in rest.split('/') {
            if !done.is_empty() {
                done.push('/');
            }
            done.push_str(part);
            b.append_data(&mut dir_header(), format!("{done}/"), io::empty())
                .map_err(|e| fallback_failed("make directories", e))?;
        }
        let tar = b.into_inner().map_err(|e| fallback_failed("make directories", e))?;
        let stream: ByteStream = Box::pin(futures_util::stream::once(async move { Ok(Bytes::from(tar)) }));
        self.engine.copy_in(&t.container, base, stream).await?;
        Ok(())
    }

    async fn podman_put_file(&self, t: &Target, body: ByteStream, opts: PutOptions) -> Result<u64> {
        let r = self.resolve(t, Resolve::Full).await?;
        match r.kind.as_str() {
            "file" | "missing" => {}
            "dir" => return Err(ServiceError::Conflict(format!("{} is a directory", t.abs()))),
            _ => return Err(not_regular(&t.abs())),
        }
        let (parent, _) = r.path.rsplit_once('/').unwrap_or((WORKSPACE_ROOT, &r.path));
        let parent = if parent.is_empty() { "/" } else { parent };
        self.podman_mkdirs(t, &r.base, parent).await?;
        // A tar header needs the size: without one, spool the body to a temporary file.
        let (size, body) = match opts.size {
            Some(n) => (n, body),
            None => spool(body, &self.paths.base).await?,
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(
            opts.mode
                .unwrap_or(if r.kind == "file" { r.mode & 0o777 } else { 0o644 }),
        );
        owned_by_user(&mut header);
        // Podman writes as root: refuse what the workspace user could not write (as the
        // agent does), which also keeps the temporary file removable by that user.
        let (code, _, _) = self
            .exec_as_user(
                t,
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "[ -w \"$1\" ]".into(),
                    "sh".into(),
                    parent.into(),
                ],
            )
            .await?;
        if code != 0 {
            return Err(ServiceError::Conflict(format!("{}: permission denied", t.abs())));
        }
        // The contents go to a temporary file beside the target, renamed over it once
        // complete (a fixed-length name: the target's may already be at NAME_MAX).
        let temp_name = format!(".conductor-upload-{}", uuid::Uuid::new_v4().simple());
        let temp = format!("{}/{temp_name}", parent.trim_end_matches('/'));
        let mut cleanup = TempUpload {
            engine: self.engine.clone(),
            container: t.container.clone(),
            path: Some(temp.clone()),
        };
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header, &temp_name, io::empty())
            .map_err(|e| fallback_failed("write a file", e))?;
        // The builder wrote the header (and a long-name entry) and, on finishing, the
        // two end blocks: the contents go between.
        let mut head = b.into_inner().map_err(|e| fallback_failed("write a file", e))?;
        head.truncate(head.len().saturating_sub(1024));
        let pad = (512 - (size % 512) as usize) % 512;
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = seen.clone();
        let contents = body.map(move |chunk| {
            let chunk = chunk?;
            let total = counted.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            if total > size {
                return Err(io::Error::other("the body is longer than its declared size"));
            }
            Ok(chunk)
        });
        // The end blocks only follow a body of exactly the declared size; a shorter one
        // breaks the upload off instead of storing a corrupt file.
        let tail = futures_util::stream::once(async move {
            match seen.load(Ordering::Relaxed) {
                n if n == size => Ok(Bytes::from(vec![0u8; pad + 1024])),
                n => Err(io::Error::other(format!(
                    "the body has {n} bytes, {size} were declared"
                ))),
            }
        });
        let stream: ByteStream = Box::pin(
            futures_util::stream::once(async move { Ok(Bytes::from(head)) })
                .chain(contents)
                .chain(tail),
        );
        let copied = self
            .engine
            .copy_in(&t.container, parent, stream)
            .await
            .map_err(|e| podman_write_error(e, t));
        copied?;
        self.podman_sh(t, "mv -f -T -- \"$1\" \"$2\"", &[&temp, &r.path])
            .await?;
        cleanup.path = None;
        Ok(size)
    }

    /// Runs a `sh -c` script as the workspace user with `args` as `$1`…; an error
    /// unless it exits 0.
    async fn podman_sh(&self, t: &Target, script: &str, args: &[&str]) -> Result<()> {
        let mut argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let (code, _, err) = self.exec_as_user(t, argv).await?;
        match code {
            0 => Ok(()),
            _ => Err(fallback_failed("write a file", format!("exit {code}: {}", err.trim()))),
        }
    }

    async fn podman_put_archive(&self, t: &Target, body: ByteStream) -> Result<u64> {
        let r = self.resolve(t, Resolve::Full).await?;
        match r.kind.as_str() {
            "dir" => {}
            "missing" => self.podman_mkdirs(t, &r.base, &r.path).await?,
            _ => return Err(ServiceError::Conflict(format!("{} is not a directory", t.abs()))),
        }
        // Check and rewrite the members on a blocking thread, streaming into Podman.
        let input = blocking_reader(body);
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        let checker = tokio::task::spawn_blocking(move || {
            let mut out = ChannelWriter::new(tx.clone());
            let result = rewrite_archive(input, &mut out);
            if let Err(e) = &result {
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
            result
        });
        let stream: ByteStream = Box::pin(tokio_stream_from(rx));
        let copied = self.engine.copy_in(&t.container, &r.path, stream).await;
        let checked = checker.await.map_err(|e| fallback_failed("check the archive", e))?;
        match (checked, copied) {
            // A refused member stopped the upload: that is the error to report.
            (Err(e @ ServiceError::Invalid { .. }), _) => Err(e),
            (_, Err(e)) => Err(podman_write_error(e, t)),
            (Err(e), Ok(())) => Err(e),
            (Ok(size), Ok(())) => Ok(size),
        }
    }

    async fn podman_get(&self, t: &Target) -> Result<Download> {
        let r = self.resolve(t, Resolve::Full).await?;
        let archive = self.engine.copy_out(&t.container, &r.path);
        match r.kind.as_str() {
            "dir" => Ok(Download {
                kind: DownloadKind::Archive,
                size: None,
                // Podman names the entries after the path it was given: the resolved one.
                name: match r.path.rsplit('/').next() {
                    Some(n) if !n.is_empty() => n.to_string(),
                    _ => t.name(),
                },
                via: ExecPath::Podman,
                stream: archive.await?,
            }),
            "file" => {
                // A tar of one member: unwrap it on a blocking thread.
                let input = blocking_reader(archive.await?);
                let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
                tokio::task::spawn_blocking(move || {
                    let mut out = ChannelWriter::new(tx.clone());
                    let result = (|| {
                        let mut ar = tar::Archive::new(TarGuard::new(input));
                        let mut entry = ar
                            .entries()?
                            .next()
                            .ok_or_else(|| io::Error::other("the archive is empty"))??;
                        io::copy(&mut entry, &mut out)?;
                        out.flush()
                    })();
                    if let Err(e) = result {
                        let _ = tx.blocking_send(Err(e));
                    }
                });
                Ok(Download {
                    kind: DownloadKind::File,
                    size: Some(r.size),
                    name: t.name(),
                    via: ExecPath::Podman,
                    stream: Box::pin(tokio_stream_from(rx)),
                })
            }
            "missing" => Err(ServiceError::not_found(format!("{} in the workspace", t.abs()))),
            _ => Err(not_regular(&t.abs())),
        }
    }

    async fn podman_list(&self, t: &Target) -> Result<Vec<FileEntry>> {
        let r = self.resolve(t, Resolve::Full).await?;
        match r.kind.as_str() {
            "dir" => {}
            "missing" => return Err(ServiceError::not_found(format!("{} in the workspace", t.abs()))),
            _ => return Err(ServiceError::Conflict(format!("{} is not a directory", t.abs()))),
        }
        let argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            LIST_SCRIPT.into(),
            "sh".into(),
            r.path.clone(),
        ];
        let (code, out, err) = self.exec_as_user(t, argv).await?;
        if code != 0 {
            return Err(fallback_failed("list a directory", format!("exit {code}: {err}")));
        }
        let fields: Vec<String> = out
            .split(|b| *b == 0)
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        let mut entries: Vec<FileEntry> = fields
            .chunks_exact(8)
            .map(|f| {
                let kind = match f[1].as_str() {
                    "f" => FileKind::File,
                    "d" => FileKind::Dir,
                    "l" => FileKind::Symlink,
                    _ => FileKind::Other,
                };
                FileEntry {
                    name: f[0].clone(),
                    kind,
                    size: f[2].parse().unwrap_or(0),
                    mode: u32::from_str_radix(&f[3], 8).unwrap_or(0),
                    uid: f[4].parse().unwrap_or(0),
                    gid: f[5].parse().unwrap_or(0),
                    mtime_ms: f[6].parse::<f64>().map(|s| (s * 1000.0) as i64).unwrap_or(0),
                    link_target: (kind == FileKind::Symlink).then(|| f[7].clone()),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    async fn podman_delete(&self, t: &Target, recursive: bool) -> Result<()> {
        let r = self.resolve(t, Resolve::Parent).await?;
        let command = match r.kind.as_str() {
            "missing" => return Err(ServiceError::not_found(format!("{} in the workspace", t.abs()))),
            "dir" if recursive => "rm -rf -- \"$1\"",
            "dir" => "rmdir -- \"$1\"",
            _ => "rm -f -- \"$1\"",
        };
        let argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            command.into(),
            "sh".into(),
            r.path.clone(),
        ];
        let (code, _, err) = self.exec_as_user(t, argv).await?;
        match code {
            0 => Ok(()),
            _ if err.contains("not empty") => Err(ServiceError::Conflict(format!(
                "{} is a directory that is not empty (delete it with recursive)",
                t.abs()
            ))),
            _ if err.contains("ermission denied") => {
                Err(ServiceError::Conflict(format!("{}: permission denied", t.abs())))
            }
            _ => Err(fallback_failed("delete", format!("exit {code}: {err}"))),
        }
    }
}

/// What an upload reports: its size and path, or why it failed (too large when the body
/// went over the storage limit, whatever broke off the upload then).
fn written(t: &Target, result: Result<(u64, ExecPath)>, over: &AtomicBool) -> Result<Written> {
    match result {
        Ok((size, via)) => Ok(Written {
            path: t.abs(),
            size,
            via,
        }),
        Err(_) if over.load(Ordering::Relaxed) => Err(too_large(t.limit)),
        Err(e) => Err(e),
    }
}

/// The temporary file of an upload through Podman, removed (as the workspace user) unless
/// the upload completed: on its own task, so that a request dropped midway cleans up too,
/// and once more a second later, since Podman may still be writing the file when the
/// upload's stream has already failed. (A crash of conductor mid-upload leaves it.)
struct TempUpload {
    engine: Arc<dyn conductor_core::engine::Engine>,
    container: String,
    /// `None` once the file was renamed over its target.
    path: Option<String>,
}

impl Drop for TempUpload {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (engine, container) = (self.engine.clone(), self.container.clone());
        runtime.spawn(async move {
            for wait in [0, 1000] {
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                let spec = ExecSpec {
                    argv: vec!["rm".into(), "-f".into(), "--".into(), path.clone()],
                    user: Some(WORKSPACE_USER.into()),
                    ..Default::default()
                };
                let (tx, _rx) = mpsc::channel(4);
                if let Err(e) = engine.exec(&container, spec, tx).await {
                    tracing::debug!(%container, "cannot remove the incomplete upload {path}: {e}");
                }
            }
        });
    }
}

/// A failed Podman upload: a full volume is [`ServiceError::NoSpace`].
fn podman_write_error(e: conductor_core::engine::EngineError, t: &Target) -> ServiceError {
    let text = e.to_string();
    if text.contains("no space left on device") || text.contains("No space left on device") {
        return ServiceError::NoSpace(format!(
            "{}: no space left on device: the workspace's volume is full (its limits.volume_size)",
            t.abs()
        ));
    }
    e.into()
}

fn owned_by_user(h: &mut tar::Header) {
    h.set_uid(u64::from(WORKSPACE_UID));
    h.set_gid(u64::from(WORKSPACE_UID));
    h.set_mtime(u64::try_from(now_ms() / 1000).unwrap_or(0));
}

fn dir_header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    owned_by_user(&mut h);
    h
}

/// Copies the tar read from `input` to `out`, member by member, with the agent's rules:
/// names checked by [`archive_member`], only files, directories and symlinks, a member
/// never below a symlink member of the same archive, owner uid/gid 1000, no set-id bits.
/// The input is read through a [`TarGuard`]: a long-name or pax entry over 64 KiB is
/// refused before the parser buffers it. Returns the bytes of file contents.
fn rewrite_archive(input: impl Read, out: &mut ChannelWriter) -> Result<u64> {
    let bad = |m: String| ServiceError::invalid("body", m);
    let malformed = |e: io::Error| ServiceError::invalid("body", format!("the tar stream is malformed: {e}"));
    let mut ar = tar::Archive::new(TarGuard::new(input));
    let mut b = tar::Builder::new(out);
    let mut links: Vec<String> = Vec::new();
    let mut size = 0u64;
    for entry in ar.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8(raw).map_err(|e| {
            bad(format!(
                "member {:?}: the name is not UTF-8",
                String::from_utf8_lossy(e.as_bytes())
            ))
        })?;
        let member = archive_member(&name).map_err(bad)?;
        if let Some(link) = links
            .iter()
            .find(|l| member.strip_prefix(l.as_str()).is_some_and(|r| r.starts_with('/')))
        {
            return Err(bad(format!("member {name:?} goes through the symlink member {link:?}")));
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(entry.header().mode().unwrap_or(0o644) & 0o1777);
        header.set_mtime(entry.header().mtime().unwrap_or(0));
        header.set_uid(u64::from(WORKSPACE_UID));
        header.set_gid(u64::from(WORKSPACE_UID));
        let written = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous if !member.is_empty() => {
                let n = entry.header().size().map_err(malformed)?;
                header.set_size(n);
                b.append_data(&mut header, &member, &mut entry)
                    .map_err(|e| fallback_failed("copy an archive", e))?;
                n
            }
            tar::EntryType::Directory => {
                header.set_size(0);
                let dir = if member.is_empty() { "./".to_string() } else { format!("{member}/") };
                b.append_data(&mut header, dir, io::empty())
                    .map_err(|e| fallback_failed("copy an archive", e))?;
                0
            }
            tar::EntryType::Symlink if !member.is_empty() => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad(format!("member {name:?}: the link target is empty")))?;
                header.set_size(0);
                let target = String::from_utf8_lossy(&target).into_owned();
                b.append_link(&mut header, &member, &target)
                    .map_err(|e| fallback_failed("copy an archive", e))?;
                links.push(member.clone());
                0
            }
            tar::EntryType::Link => {
                return Err(bad(format!(
                    "member {name:?}: hard links are not supported (only files, directories and symlinks)"
                )))
            }
            other => {
                return Err(bad(format!(
                    "member {name:?}: entries of type {other:?} are not supported here (only files, directories and symlinks)"
                )))
            }
        };
        size += written;
    }
    let out = b.into_inner().map_err(|e| fallback_failed("copy an archive", e))?;
    out.flush().map_err(|e| fallback_failed("copy an archive", e))?;
    Ok(size)
}

/// Writes the body to an unnamed temporary file under `dir`; returns its size and a
/// stream of it.
async fn spool(mut body: ByteStream, dir: &std::path::Path) -> Result<(u64, ByteStream)> {
    use tokio::io::AsyncWriteExt;
    let file = tempfile::tempfile_in(dir).map_err(|e| ServiceError::host("create a spool file", e))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ServiceError::host("read the upload", e))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| ServiceError::host("write the spool file", e))?;
        size += chunk.len() as u64;
    }
    file.flush()
        .await
        .map_err(|e| ServiceError::host("write the spool file", e))?;
    let mut file = file.into_std().await;
    io::Seek::rewind(&mut file).map_err(|e| ServiceError::host("rewind the spool file", e))?;
    Ok((size, reader_stream(file)))
}

// ---------------------------------------------------------------------------------------
// Bridges between async byte streams and blocking `Read`/`Write` (for the tar crate).

/// A stream of the bytes `reader` yields, read on a blocking thread in chunks.
pub fn reader_stream(mut reader: impl Read + Send + 'static) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let item = match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    Box::pin(tokio_stream_from(rx))
}

/// A stream of what `produce` writes, run on a blocking thread; its error ends the stream.
pub fn writer_stream<F>(produce: F) -> ByteStream
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter::new(tx.clone());
        let result = produce(&mut out).and_then(|()| out.flush());
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Box::pin(tokio_stream_from(rx))
}

/// A blocking reader of `stream` (polled by a task on the runtime); for use on a blocking
/// thread only.
pub fn blocking_reader(mut stream: ByteStream) -> impl Read + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    ChannelReader { rx, cur: Bytes::new() }
}

struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Sends what is written to it in chunks of [`CHUNK`] bytes; for blocking threads only.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader of the stream is gone"))
    }
}

/// The items of `rx` as a stream.
fn tokio_stream_from(rx: mpsc::Receiver<io::Result<Bytes>>) -> impl futures_util::Stream<Item = io::Result<Bytes>> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (h, data) in entries {
            b.append(h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_cksum();
        h
    }

    fn rewrite(tar: Vec<u8>) -> (Result<u64>, Vec<u8>) {
        let (tx, mut rx) = mpsc::channel(1024);
        let result = rewrite_archive(&tar[..], &mut ChannelWriter::new(tx));
        let mut out = Vec::new();
        while let Ok(Ok(b)) = rx.try_recv() {
            out.extend_from_slice(&b);
        }
        (result, out)
    }

    #[test]
    fn fallback_archives_are_rewritten_for_the_workspace_user() {
        let mut link = header(b"l", tar::EntryType::Symlink, 0, 0o777);
        link.set_link_name("a.sh").unwrap();
        link.set_cksum();
        let tar = tar_of(&[
            (header(b"./", tar::EntryType::Directory, 0, 0o755), b""),
            (header(b"d/", tar::EntryType::Directory, 0, 0o2755), b""),
            (header(b"d/a.sh", tar::EntryType::Regular, 3, 0o4755), b"abc"),
            (link, b""),
        ]);
        let (result, out) = rewrite(tar);
        assert_eq!(result.unwrap(), 3);
        let mut ar = tar::Archive::new(&out[..]);
        let got: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("./".to_string(), 0o755, 1000),
                ("d/".to_string(), 0o755, 1000),
                ("d/a.sh".to_string(), 0o755, 1000),
                ("l".to_string(), 0o777, 1000),
            ]
        );
    }

    #[test]
    fn fallback_archives_with_bad_members_are_refused_by_name() {
        let mut link = header(b"evil", tar::EntryType::Symlink, 0, 0o777);
        link.set_link_name("/etc").unwrap();
        link.set_cksum();
        let cases = [
            (
                tar_of(&[(header(b"../x", tar::EntryType::Regular, 1, 0o644), b"x")]),
                "../x",
            ),
            (
                tar_of(&[(header(b"/etc/x", tar::EntryType::Regular, 1, 0o644), b"x")]),
                "/etc/x",
            ),
            (
                tar_of(&[
                    (link, b""),
                    (header(b"evil/passwd", tar::EntryType::Regular, 1, 0o644), b"x"),
                ]),
                "evil/passwd",
            ),
            (
                tar_of(&[(header(b"h", tar::EntryType::Link, 0, 0o644), b"")]),
                "hard links",
            ),
            (tar_of(&[(header(b"p", tar::EntryType::Fifo, 0, 0o644), b"")]), "Fifo"),
        ];
        for (tar, what) in cases {
            match rewrite(tar).0 {
                Err(ServiceError::Invalid { field, message }) => {
                    assert_eq!(field, "body");
                    assert!(message.contains(what), "{message}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn fallback_archives_with_oversized_extension_entries_are_refused() {
        for kind in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
            let mut tar = header(b"././@LongLink", kind, 1 << 30, 0o644).as_bytes().to_vec();
            tar.extend(std::iter::repeat_n(b'a', 1 << 20));
            match rewrite(tar).0 {
                Err(ServiceError::Invalid { field, message }) => {
                    assert_eq!(field, "body");
                    assert!(message.contains("64 KiB"), "{message}");
                }
                other => panic!("{kind:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn uploads_past_the_limit_end_the_stream() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let over = Arc::new(AtomicBool::new(false));
        let body: ByteStream = Box::pin(futures_util::stream::iter(
            (0..3).map(|_| Ok(Bytes::from_static(&[0u8; 10]))),
        ));
        let items: Vec<io::Result<Bytes>> = rt.block_on(limited(body, 25, over.clone()).collect());
        assert!(items[0].is_ok() && items[1].is_ok() && items[2].is_err());
        assert!(over.load(Ordering::Relaxed));
    }
}
