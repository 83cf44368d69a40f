//! Tar streams of the workspace: `archive` sends a file or a directory tree as a tar in
//! `data` frames; `extract` unpacks a tar arriving in `data` frames beneath the root.
//!
//! Both stream: a tar is never held in memory, only one chunk of it.
//!
//! - **archive** follows the requested path itself when it is a symlink inside the root
//!   (as `read` does), but nothing below it: descendants are opened with
//!   `RESOLVE_NO_SYMLINKS` from the top directory, and symlinks are stored as links.
//!   Entries are named relative to the parent of the path (`src/`, `src/a.py`), as
//!   `docker cp` does. Sockets, FIFOs and devices are left out.
//! - **extract** judges every member by the protocol's member rules
//!   ([`MemberRules::extract`]: relative UTF-8 names, no `..`, no NUL, length limits; files,
//!   directories and symlinks only, hard links, devices and FIFOs refused with an error
//!   naming the member; no set-uid or set-gid bits) and creates it through the same
//!   `openat2(RESOLVE_BENEATH)` helpers as every other file operation, so a symlink (from
//!   the archive or already in the workspace) that leads outside the root is never written
//!   through. The tar is read through [`TarGuard`], so a long-name or pax extension entry
//!   over 64 KiB is refused before the parser buffers it. The owner is the agent's uid (the
//!   workspace user). An existing file or symlink of a member's name is replaced (unlinked
//!   first, never written through); an existing directory stays and takes the member's
//!   mode.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use conductor_agent_protocol::{ErrorCode, MemberKind, MemberRules, Request, Response, TarGuard, CHUNK, MAX_PATH};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, futimens, FileStat as RawStat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};
use tar::{Builder, EntryType, Header};

use crate::conn::Conn;
use crate::files::{
    checked, errno_error, io_error, kind_of, make_dir, open_beneath, open_root, parent_dir, split, OpError,
};
use conductor_agent_protocol::FileKind;

/// Sends what is written to it as `data` frames of at most [`CHUNK`] bytes.
struct FrameWriter<'a> {
    conn: &'a mut Conn,
    buf: Vec<u8>,
    sent: u64,
    /// Writing to the client failed: the connection is gone.
    broken: bool,
}

impl FrameWriter<'_> {
    fn send(&mut self, n: usize) -> io::Result<()> {
        if let Err(e) = self.conn.send(&Response::Data, &self.buf[..n]) {
            self.broken = true;
            return Err(e);
        }
        self.sent += n as u64;
        self.buf.drain(..n);
        Ok(())
    }
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= CHUNK {
            self.send(CHUNK)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send(self.buf.len())?;
        }
        Ok(())
    }
}

/// Reads `size` bytes of a file; zeros stand in for what it lost meanwhile, so the tar
/// entry always has the size its header announced.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

fn header(st: &RawStat, kind: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(size);
    h
}

fn os(name: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(name))
}

/// Appends the tree below the directory `top` (named `top_name` in the archive).
fn append_tree(b: &mut Builder<&mut FrameWriter>, top: &OwnedFd, top_name: &Path) -> io::Result<()> {
    // Directories still to archive, relative to `top` ("" is `top` itself). Iterative: a
    // deep tree must not exhaust the connection thread's small stack.
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(sub) = pending.pop() {
        let dir = if sub.as_os_str().is_empty() {
            top.try_clone()?
        } else {
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
            match openat2(top, &sub, how) {
                Ok(fd) => fd,
                // Gone (or replaced by a link) meanwhile: leave it out.
                Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let name = top_name.join(&sub);
        let st = fstat(&dir)?;
        let mut dir_name = name.clone().into_os_string();
        if !dir_name.as_bytes().ends_with(b"/") {
            dir_name.push("/");
        }
        b.append_data(&mut header(&st, EntryType::Directory, 0), &dir_name, io::empty())?;
        let mut names: Vec<Vec<u8>> = Dir::from_fd(dir.try_clone()?)?
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for child in &names {
            let child = os(child);
            let st = match fstatat(&dir, child, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            match kind_of(&st) {
                FileKind::Dir => subdirs.push(sub.join(child)),
                FileKind::File => {
                    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                    let fd = match nix::fcntl::openat(&dir, child, flags, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(Errno::ENOENT | Errno::ELOOP) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    append_file(b, fd, &name.join(child))?;
                }
                FileKind::Symlink => {
                    let target = match readlinkat(&dir, child) {
                        Ok(t) => t,
                        Err(Errno::ENOENT | Errno::EINVAL) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    b.append_link(&mut header(&st, EntryType::Symlink, 0), name.join(child), target)?;
                }
                FileKind::Other => {}
            }
        }
        // Popped in name order.
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

fn append_file(b: &mut Builder<&mut FrameWriter>, fd: OwnedFd, name: &Path) -> io::Result<()> {
    let st = fstat(&fd)?;
    if kind_of(&st) != FileKind::File {
        return Ok(());
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let data = Exact {
        inner: std::fs::File::from(fd),
        left: size,
    };
    b.append_data(&mut header(&st, EntryType::Regular, size), name, data)
}

/// Answers `archive`: the tar as `data` frames, then `eof` with its size.
pub fn archive(conn: &mut Conn, root: &Path, path: &str) -> io::Result<()> {
    let opened = (|| {
        let rel = checked(path, root)?;
        let rootfd = open_root(root)?;
        // O_NONBLOCK: opening a FIFO must not hang; it is refused below.
        let fd = open_beneath(&rootfd, &rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty(), path)?;
        let st = fstat(&fd).map_err(|e| errno_error(e, path))?;
        let kind = kind_of(&st);
        if kind != FileKind::File && kind != FileKind::Dir {
            return Err((ErrorCode::NotARegularFile, format!("{path} is not a regular file")));
        }
        let name = match split(&rel).1 {
            "" => root
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("root")),
            n => PathBuf::from(n),
        };
        Ok((fd, kind, name))
    })();
    let (fd, kind, name) = match opened {
        Ok(o) => o,
        Err((code, message)) => return conn.send_error(code, message),
    };
    let mut out = FrameWriter {
        conn,
        buf: Vec::with_capacity(CHUNK + 1024),
        sent: 0,
        broken: false,
    };
    let result = (|| {
        let mut b = Builder::new(&mut out);
        match kind {
            FileKind::Dir => append_tree(&mut b, &fd, &name)?,
            _ => append_file(&mut b, fd, &name)?,
        }
        b.into_inner()?.flush()
    })();
    match result {
        Ok(()) => {
            let size = out.sent;
            conn.send(&Response::Eof { size }, &[])
        }
        Err(e) if out.broken => Err(e),
        Err(e) => {
            let (code, message) = io_error(e, path);
            conn.send_error(code, message)
        }
    }
}

/// How the stream of an `extract` ended, when it did not end well.
#[derive(Debug, PartialEq, Eq)]
enum Stream {
    Open,
    /// The client sent `eof`.
    Ended,
    /// The client hung up or broke the protocol: no answer is owed.
    Lost,
    Protocol(String),
}

/// Reads the contents of `data` frames up to the `eof`.
struct FrameReader<'a> {
    conn: &'a mut Conn,
    chunk: Vec<u8>,
    pos: usize,
    state: Stream,
}

impl FrameReader<'_> {
    /// Reads and drops what is left of the stream.
    fn drain(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 16 << 10];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }
}

impl Read for FrameReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.state {
                Stream::Open => {}
                Stream::Ended => return Ok(0),
                _ => return Err(io::Error::other("the stream broke off")),
            }
            match self.conn.recv() {
                Ok(Some(Ok((Request::Data, data)))) => {
                    self.chunk = data;
                    self.pos = 0;
                }
                Ok(Some(Ok((Request::Eof, _)))) => self.state = Stream::Ended,
                Ok(Some(Ok(_))) => self.state = Stream::Protocol("an extract takes data frames and an eof".into()),
                Ok(Some(Err(m))) => self.state = Stream::Protocol(m.0),
                Ok(None) | Err(_) => self.state = Stream::Lost,
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Answers `extract`: unpacks the tar that follows into the directory `path`.
pub fn extract(conn: &mut Conn, root: &Path, path: &str) -> io::Result<()> {
    let target = (|| {
        let rel = checked(path, root)?;
        let rootfd = open_root(root)?;
        open_beneath(&rootfd, &rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty(), path)?;
        Ok((rootfd, rel))
    })();
    let mut input = FrameReader {
        conn,
        chunk: Vec::new(),
        pos: 0,
        state: Stream::Open,
    };
    let result = target.and_then(|(rootfd, rel)| unpack(&mut input, &rootfd, &rel));
    match &input.state {
        Stream::Lost => return Err(io::Error::other("the client hung up during an extract")),
        Stream::Protocol(m) => {
            let m = m.clone();
            input.conn.send_error(ErrorCode::Protocol, m)?;
            return Err(io::Error::other("protocol error during an extract"));
        }
        Stream::Ended | Stream::Open => {}
    }
    match result {
        Ok(size) => {
            // The tar's end blocks and the `eof` may still be on their way.
            input.drain()?;
            input.conn.send(&Response::Done { size }, &[])
        }
        Err((code, message)) => {
            // Answered at once (the client may stop sending), then read to the `eof`.
            input.conn.send_error(code, message)?;
            match input.drain() {
                Ok(()) => Ok(()),
                Err(_) if matches!(input.state, Stream::Protocol(_) | Stream::Lost) => {
                    Err(io::Error::other("the stream broke off after an error"))
                }
                Err(e) => Err(e),
            }
        }
    }
}

fn invalid(message: String) -> OpError {
    (ErrorCode::InvalidArchive, message)
}

fn set_mtime(fd: &OwnedFd, mtime: Option<u64>) {
    if let Some(t) = mtime.and_then(|t| i64::try_from(t).ok()) {
        // Best effort, as tar does: a file whose time cannot be set is still extracted.
        let _ = futimens(fd, &TimeSpec::UTIME_OMIT, &TimeSpec::new(t, 0));
    }
}

/// Makes room for a file or symlink named `name` in `parent`: an existing file or symlink
/// is removed (so it is replaced, never written through); a directory is refused.
fn clear_name(parent: &OwnedFd, name: &str, shown: &str) -> Result<(), OpError> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if kind_of(&st) == FileKind::Dir => Err((
            ErrorCode::IsADirectory,
            format!("{shown}: a directory of that name exists"),
        )),
        Ok(_) => unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(|e| errno_error(e, shown)),
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(errno_error(e, shown)),
    }
}

/// Unpacks the tar read from `input` into `base` (relative to the root, an existing
/// directory); returns the bytes of file contents written.
fn unpack(input: &mut FrameReader, rootfd: &OwnedFd, base: &str) -> Result<u64, OpError> {
    // The guard keeps the parser from buffering a huge long-name or pax entry.
    let mut archive = tar::Archive::new(TarGuard::new(input));
    let malformed = |e: io::Error| invalid(format!("the tar stream is malformed: {e}"));
    let mut rules = MemberRules::extract();
    let mut written = 0u64;
    // Directory modes and times are set at the end: a read-only directory must not stop
    // its own members from being written.
    let mut dirs: Vec<(String, u32, Option<u64>, String)> = Vec::new();
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let header = entry.header();
        let (kind, mode, mtime) = (header.entry_type(), header.mode().ok(), header.mtime().ok());
        let checked = rules
            .check(
                &entry.path_bytes(),
                kind.as_byte(),
                entry.link_name_bytes().as_deref(),
                mode,
            )
            .map_err(invalid)?;
        let Some(member) = checked else { continue };
        // UTF-8: these rules require it.
        let path = member.path_str().into_owned();
        let name = &member.name;
        let rel = match (base, path.as_str()) {
            ("", m) => m.to_string(),
            (b, "") => b.to_string(),
            (b, m) => format!("{b}/{m}"),
        };
        if rel.len() > MAX_PATH {
            return Err(invalid(format!(
                "member {name:?}: its path in the workspace would be longer than {MAX_PATH} bytes"
            )));
        }
        let shown = format!("member {name:?}");
        let mode = member.mode;
        match member.kind {
            MemberKind::File => {
                let parent = parent_dir(rootfd, &rel, true, &shown)?;
                let file_name = split(&rel).1;
                clear_name(&parent, file_name, &shown)?;
                // O_EXCL | O_NOFOLLOW: a link planted meanwhile is an error, never a way out.
                let how = OpenHow::new()
                    .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                    .mode(Mode::from_bits_truncate(mode & 0o777))
                    .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
                let fd = openat2(&parent, file_name, how).map_err(|e| errno_error(e, &shown))?;
                let mut file = std::fs::File::from(fd);
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(malformed(e)),
                    };
                    file.write_all(&buf[..n]).map_err(|e| io_error(e, &shown))?;
                    written += n as u64;
                }
                let fd = OwnedFd::from(file);
                fchmod(&fd, Mode::from_bits_truncate(mode & 0o777)).map_err(|e| errno_error(e, &shown))?;
                set_mtime(&fd, mtime);
            }
            MemberKind::Dir => {
                make_dir(rootfd, &rel, 0o755, true, &shown)?;
                // The target itself keeps its own mode.
                if !path.is_empty() {
                    dirs.push((rel, mode, mtime, shown));
                }
            }
            MemberKind::Symlink(target) => {
                let parent = parent_dir(rootfd, &rel, true, &shown)?;
                let link_name = split(&rel).1;
                clear_name(&parent, link_name, &shown)?;
                symlinkat(os(&target), &parent, link_name).map_err(|e| errno_error(e, &shown))?;
            }
        }
    }
    for (rel, mode, mtime, shown) in dirs.iter().rev() {
        let fd = open_beneath(rootfd, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty(), shown)?;
        fchmod(&fd, Mode::from_bits_truncate(*mode)).map_err(|e| errno_error(e, shown))?;
        set_mtime(&fd, *mtime);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_files_are_padded_to_their_announced_size() {
        let mut r = Exact {
            inner: &b"abc"[..],
            left: 5,
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
        let mut r = Exact {
            inner: &b"abcdef"[..],
            left: 2,
        };
        out.clear();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
    }
}
