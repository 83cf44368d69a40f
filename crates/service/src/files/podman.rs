//! The Podman fallback of the file API: what [`super`] does when the workspace's agent does
//! not answer (or is too old for `archive`).
//!
//! Every path is first resolved in the container by `realpath`, run as the workspace user
//! through Podman exec ([`RESOLVE_SCRIPT`]), and refused when it leads out of `/workspace`,
//! as the agent does. Then Podman's archive endpoints move the bytes: `copy_in` unpacks a
//! tar chrooted into the volume's directory (uploads, made directories), `copy_out` makes
//! one (downloads; a file's tar is unwrapped to the raw file). Uploaded tars are checked
//! and rewritten on the way ([`super::rewrite`]). List, stat and delete run
//! `find`/`stat`/`rm` as the workspace user. Podman writes as root, so an upload first
//! checks that the workspace user could write the directory, and a raw upload goes to a
//! temporary file renamed over the target by a `mv` run as that user ([`TempUpload`]
//! removes it when the upload does not complete).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use conductor_agent_protocol::{FileKind, FileStat};
use conductor_core::engine::{ByteStream, ExecSpec, OutputChunk};
use conductor_core::validate::WORKSPACE_ROOT;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::rewrite::rewrite_archive;
use super::{not_regular, Download, DownloadKind, FileEntry, PutOptions, Target};
use crate::exec::{ExecPath, WORKSPACE_USER};
use crate::streams::{self, blocking_reader, first_member, piped, spool};
use crate::volumes::WORKSPACE_UID;
use crate::{now_ms, Conductor, Result, ServiceError};

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

pub(super) fn fallback_failed(what: &str, detail: impl std::fmt::Display) -> ServiceError {
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
        self.engine
            .copy_in(&t.container, base, streams::from_bytes(tar))
            .await?;
        Ok(())
    }

    pub(super) async fn podman_put_file(&self, t: &Target, body: ByteStream, opts: PutOptions) -> Result<u64> {
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
        let stream: ByteStream = Box::pin(streams::from_bytes(head).chain(contents).chain(tail));
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

    pub(super) async fn podman_put_archive(&self, t: &Target, body: ByteStream) -> Result<u64> {
        let r = self.resolve(t, Resolve::Full).await?;
        match r.kind.as_str() {
            "dir" => {}
            "missing" => self.podman_mkdirs(t, &r.base, &r.path).await?,
            _ => return Err(ServiceError::Conflict(format!("{} is not a directory", t.abs()))),
        }
        // Check and rewrite the members on a blocking thread, streaming into Podman.
        let input = blocking_reader(body);
        let (stream, checker) = piped(move |out| rewrite_archive(input, out));
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

    pub(super) async fn podman_get(&self, t: &Target) -> Result<Download> {
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
                // A tar of one member: unwrapped on a blocking thread.
                Ok(Download {
                    kind: DownloadKind::File,
                    size: Some(r.size),
                    name: t.name(),
                    via: ExecPath::Podman,
                    stream: first_member(archive.await?),
                })
            }
            "missing" => Err(ServiceError::not_found(format!("{} in the workspace", t.abs()))),
            _ => Err(not_regular(&t.abs())),
        }
    }

    pub(super) async fn podman_stat(&self, t: &Target) -> Result<FileEntry> {
        let r = self.resolve(t, Resolve::Full).await?;
        r.stat(t)
            .ok_or_else(|| ServiceError::not_found(format!("{} in the workspace", t.abs())))
    }

    pub(super) async fn podman_list(&self, t: &Target) -> Result<Vec<FileEntry>> {
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

    pub(super) async fn podman_delete(&self, t: &Target, recursive: bool) -> Result<()> {
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
