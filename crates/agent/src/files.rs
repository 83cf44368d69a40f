//! File operations confined to one directory tree (the root, `/workspace`).
//!
//! Paths are first checked by [`confine`] (no NUL, no `..`, not too long, absolute ones
//! inside the root). Every open then goes through `openat2` from a descriptor of the root
//! with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel resolves symlinks and refuses
//! (EXDEV) any resolution that would leave the root, including absolute symlinks and links
//! swapped in while we work. `delete` and `list` never follow the final component.
//!
//! A raw `write` (not appending) goes to a temporary file beside the target, renamed over
//! it at the `eof`: a failed or abandoned upload leaves the previous file as it was. A
//! recursive `delete` walks the tree iteratively, so no depth exhausts the thread's stack.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use conductor_agent_protocol::{confine, ErrorCode, FileKind, FileStat, Request, Response, CHUNK};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat2, readlink, readlinkat, renameat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat as RawStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::conn::Conn;

/// A failed operation, as sent to the client.
pub(crate) type OpError = (ErrorCode, String);

pub(crate) fn errno_error(e: Errno, path: &str) -> OpError {
    let code = match e {
        Errno::EXDEV => return (ErrorCode::OutsideRoot, format!("{path} leads outside the allowed root")),
        Errno::ENOENT => ErrorCode::NotFound,
        Errno::EACCES | Errno::EPERM => ErrorCode::PermissionDenied,
        Errno::EISDIR => ErrorCode::IsADirectory,
        Errno::ENOTDIR => ErrorCode::NotADirectory,
        Errno::ENOTEMPTY => ErrorCode::DirectoryNotEmpty,
        Errno::ELOOP => ErrorCode::OutsideRoot,
        Errno::ENAMETOOLONG => ErrorCode::InvalidPath,
        Errno::ENOSPC | Errno::EDQUOT => ErrorCode::NoSpace,
        _ => ErrorCode::Io,
    };
    (code, format!("{path}: {}", e.desc()))
}

pub(crate) fn io_error(e: io::Error, path: &str) -> OpError {
    match e.raw_os_error() {
        Some(n) => errno_error(Errno::from_raw(n), path),
        None => (ErrorCode::Io, format!("{path}: {e}")),
    }
}

pub(crate) fn open_root(root: &Path) -> Result<OwnedFd, OpError> {
    nix::fcntl::open(
        root,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_error(e, &root.display().to_string()))
}

/// Opens `rel` (relative, checked) beneath `root`.
pub(crate) fn open_beneath(
    root: &OwnedFd,
    rel: &str,
    flags: OFlag,
    mode: Mode,
    shown: &str,
) -> Result<OwnedFd, OpError> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel = if rel.is_empty() { "." } else { rel };
    openat2(root, rel, how).map_err(|e| errno_error(e, shown))
}

/// Splits `a/b/c` into (`a/b`, `c`); the parent of `c` is `""`.
pub(crate) fn split(rel: &str) -> (&str, &str) {
    match rel.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", rel),
    }
}

pub(crate) fn kind_of(st: &RawStat) -> FileKind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => FileKind::File,
        SFlag::S_IFDIR => FileKind::Dir,
        SFlag::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

fn to_stat(name: &str, st: &RawStat, link_target: Option<String>) -> FileStat {
    FileStat {
        name: name.to_string(),
        kind: kind_of(st),
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ms: st.st_mtime * 1000 + st.st_mtime_nsec / 1_000_000,
        link_target,
    }
}

/// Sends the outcome of an operation that answers with one message.
pub(crate) fn reply(conn: &mut Conn, result: Result<Response, OpError>) -> io::Result<()> {
    match result {
        Ok(msg) => conn.send(&msg, &[]),
        Err((code, message)) => conn.send_error(code, message),
    }
}

pub(crate) fn checked(path: &str, root: &Path) -> Result<String, OpError> {
    confine(path, &root.to_string_lossy())
}

pub fn stat(conn: &mut Conn, root: &Path, path: &str) -> io::Result<()> {
    let result = (|| {
        let rel = checked(path, root)?;
        let rootfd = open_root(root)?;
        let fd = open_beneath(&rootfd, &rel, OFlag::O_PATH, Mode::empty(), path)?;
        let st = fstat(&fd).map_err(|e| errno_error(e, path))?;
        Ok(Response::Stat(to_stat(split(&rel).1, &st, None)))
    })();
    reply(conn, result)
}

pub fn list(conn: &mut Conn, root: &Path, path: &str) -> io::Result<()> {
    let result = (|| {
        let rel = checked(path, root)?;
        let rootfd = open_root(root)?;
        let fd = open_beneath(&rootfd, &rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty(), path)?;
        let dirfd = fd.try_clone().map_err(|e| io_error(e, path))?;
        let mut dir = Dir::from_fd(fd).map_err(|e| errno_error(e, path))?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| errno_error(e, path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            // Gone meanwhile: skip it.
            let Ok(st) = fstatat(&dirfd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            let target = (kind_of(&st) == FileKind::Symlink)
                .then(|| readlinkat(&dirfd, name.as_str()).ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned());
            entries.push(to_stat(&name, &st, target));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::List { entries })
    })();
    reply(conn, result)
}

pub fn read(conn: &mut Conn, root: &Path, path: &str) -> io::Result<()> {
    let opened = (|| {
        let rel = checked(path, root)?;
        let rootfd = open_root(root)?;
        // O_NONBLOCK: opening a FIFO must not hang; it is refused below anyway.
        let fd = open_beneath(&rootfd, &rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty(), path)?;
        let st = fstat(&fd).map_err(|e| errno_error(e, path))?;
        match kind_of(&st) {
            FileKind::File => Ok(File::from(fd)),
            FileKind::Dir => Err((ErrorCode::IsADirectory, format!("{path} is a directory"))),
            _ => Err((ErrorCode::NotARegularFile, format!("{path} is not a regular file"))),
        }
    })();
    let mut file = match opened {
        Ok(f) => f,
        Err((code, message)) => return conn.send_error(code, message),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return conn.send(&Response::Eof { size }, &[]),
            Ok(n) => {
                size += n as u64;
                conn.send(&Response::Data, &buf[..n])?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let (code, message) = io_error(e, path);
                return conn.send_error(code, message);
            }
        }
    }
}

/// Opens (making missing ones with `create_dirs`) the parent directory of `rel`.
pub(crate) fn parent_dir(rootfd: &OwnedFd, rel: &str, create_dirs: bool, shown: &str) -> Result<OwnedFd, OpError> {
    let (parent, _) = split(rel);
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    match open_beneath(rootfd, parent, flags, Mode::empty(), shown) {
        Err((ErrorCode::NotFound, _)) if create_dirs => {}
        other => return other,
    }
    let mut dir = open_beneath(rootfd, "", flags, Mode::empty(), shown)?;
    let mut done = String::new();
    for part in parent.split('/') {
        if !done.is_empty() {
            done.push('/');
        }
        done.push_str(part);
        match mkdirat(&dir, part, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_error(e, shown)),
        }
        // Re-resolved from the root, so a component swapped for a symlink is still checked.
        dir = open_beneath(rootfd, &done, flags, Mode::empty(), shown)?;
    }
    Ok(dir)
}

/// A random token (32 hex digits) from std's randomly keyed SipHash: unpredictable without
/// the keys, which std takes from the kernel's random source. No `unsafe`, no `/dev`.
pub(crate) fn random_token() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = String::with_capacity(32);
    for _ in 0..2 {
        // Each `RandomState` has distinct keys (random per thread, then counted up).
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
        h.write_u128(nanos);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The temporary name an upload of `name` is written to: `.<name>.conductor-<random>`, the
/// name cut (at a character boundary) to keep it a valid file name.
fn temp_name(name: &str) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}.conductor-{}", &name[..end], &random_token()[..16])
}

/// Permission bits `write` applies: the permissions and the sticky bit, never set-id bits.
const WRITE_MODE_BITS: u32 = 0o1777;

/// A file being uploaded under a temporary name in the target's directory; removed when
/// dropped unless [`Upload::commit`] renamed it over the target.
struct Upload {
    dir: OwnedFd,
    temp: Option<String>,
    name: String,
}

impl Upload {
    /// Renames the temporary file over the target, relative to the same directory
    /// descriptor (nothing is resolved again).
    fn commit(mut self, shown: &str) -> Result<(), OpError> {
        let temp = self.temp.take().expect("not committed yet");
        match renameat(&self.dir, temp.as_str(), &self.dir, self.name.as_str()) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.temp = Some(temp); // removed on drop
                Err(errno_error(e, shown))
            }
        }
    }

    /// Removes the temporary file at once (its space is free again).
    fn discard(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = unlinkat(&self.dir, temp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.discard();
    }
}

/// The path of `fd` below the root open as `rootfd` (both read back from `/proc`), for a
/// symlink that `write` follows.
fn path_below(rootfd: &OwnedFd, fd: &OwnedFd, shown: &str) -> Result<String, OpError> {
    let path_of = |fd: &OwnedFd| {
        readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str())
            .map_err(|e| errno_error(e, shown))?
            .into_string()
            .map_err(|_| {
                (
                    ErrorCode::InvalidPath,
                    format!("{shown} leads to a name that is not UTF-8"),
                )
            })
    };
    let (root, path) = (path_of(rootfd)?, path_of(fd)?);
    let root = root.trim_end_matches('/');
    path.strip_prefix(root)
        .and_then(|p| p.strip_prefix('/'))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            (
                ErrorCode::OutsideRoot,
                format!("{shown} leads outside the allowed root"),
            )
        })
}

/// Opens the destination of a raw upload. With `append`, the file itself (created when
/// missing). Otherwise a new temporary file beside it, which the `eof` renames over it; a
/// symlink at `rel` is followed when it leads to a file inside the root (that file is
/// replaced, the link stays), a dangling one is replaced by the file. The mode, when given,
/// is applied with `fchmod` (whatever the umask, to an existing file too); without one, a
/// replaced file keeps its permissions and a new one gets 0644 less the umask.
fn open_upload(
    root: &Path,
    path: &str,
    mode: Option<u32>,
    append: bool,
    create_dirs: bool,
) -> Result<(File, Option<Upload>), OpError> {
    let rel = checked(path, root)?;
    if rel.is_empty() {
        return Err((ErrorCode::IsADirectory, format!("{path} is the root directory")));
    }
    let rootfd = open_root(root)?;
    let mut dir = parent_dir(&rootfd, &rel, create_dirs, path)?;
    let mode = mode.map(|m| Mode::from_bits_truncate(m & WRITE_MODE_BITS));
    let check_file = |st: &RawStat| match kind_of(st) {
        FileKind::File => Ok(()),
        FileKind::Dir => Err((ErrorCode::IsADirectory, format!("{path} is a directory"))),
        _ => Err((ErrorCode::NotARegularFile, format!("{path} is not a regular file"))),
    };
    if append {
        // O_NONBLOCK: opening a FIFO must not hang (without a reader it fails with ENXIO).
        let how = OpenHow::new()
            .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(0o644))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match openat2(&rootfd, rel.as_str(), how) {
            Ok(fd) => fd,
            Err(Errno::ENXIO) => return Err((ErrorCode::NotARegularFile, format!("{path} is not a regular file"))),
            Err(e) => return Err(errno_error(e, path)),
        };
        check_file(&fstat(&fd).map_err(|e| errno_error(e, path))?)?;
        if let Some(mode) = mode {
            fchmod(&fd, mode).map_err(|e| errno_error(e, path))?;
        }
        return Ok((File::from(fd), None));
    }
    let mut name = split(&rel).1.to_string();
    let existing = match fstatat(&dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if kind_of(&st) == FileKind::Symlink => {
            // O_PATH: a FIFO is not opened for real.
            match open_beneath(&rootfd, &rel, OFlag::O_PATH, Mode::empty(), path) {
                Ok(fd) => {
                    let st = fstat(&fd).map_err(|e| errno_error(e, path))?;
                    check_file(&st)?;
                    let target = path_below(&rootfd, &fd, path)?;
                    dir = parent_dir(&rootfd, &target, false, path)?;
                    name = split(&target).1.to_string();
                    Some(st)
                }
                Err((ErrorCode::NotFound, _)) => None,
                Err(e) => return Err(e),
            }
        }
        Ok(st) => {
            check_file(&st)?;
            Some(st)
        }
        Err(Errno::ENOENT) => None,
        Err(e) => return Err(errno_error(e, path)),
    };
    // Beneath the target's directory; O_EXCL | O_NOFOLLOW: never an existing file or link.
    let how = OpenHow::new()
        .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(0o644))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let mut taken = 0;
    let (fd, temp) = loop {
        let temp = temp_name(&name);
        match openat2(&dir, temp.as_str(), how) {
            Ok(fd) => break (fd, temp),
            Err(Errno::EEXIST) if taken < 3 => taken += 1,
            Err(e) => return Err(errno_error(e, path)),
        }
    };
    let upload = Upload {
        dir,
        temp: Some(temp),
        name,
    };
    let keep = existing.map(|st| Mode::from_bits_truncate(st.st_mode & WRITE_MODE_BITS));
    if let Some(mode) = mode.or(keep) {
        fchmod(&fd, mode).map_err(|e| errno_error(e, path))?;
    }
    Ok((File::from(fd), Some(upload)))
}

/// A raw upload. Unless appending, the contents go to a temporary file in the target's
/// directory that the `eof` renames over the target: an upload that fails or is cut off
/// (the client hangs up) removes it and leaves the previous file, if any, as it was.
pub fn write(
    conn: &mut Conn,
    root: &Path,
    path: &str,
    mode: Option<u32>,
    append: bool,
    create_dirs: bool,
) -> io::Result<()> {
    // A failure is answered at once (the client may stop sending); the contents that
    // still come are read to the `eof` and dropped, so the connection stays in step.
    // Returning early (hang-up, protocol error) drops the upload, which removes it.
    let mut file = open_upload(root, path, mode, append, create_dirs);
    if let Err((code, message)) = &file {
        conn.send_error(*code, message.clone())?;
    }
    let mut size = 0u64;
    loop {
        let frame = match conn.recv()? {
            Some(Ok(f)) => f,
            Some(Err(m)) => return conn.send_error(ErrorCode::Protocol, m.0),
            None => return Ok(()),
        };
        match frame {
            (Request::Data, data) => {
                if let Ok((f, _)) = &mut file {
                    if let Err(e) = f.write_all(&data) {
                        let (code, message) = io_error(e, path);
                        // Dropping the upload frees the space before the answer goes out.
                        file = Err((code, message.clone()));
                        conn.send_error(code, message)?;
                    }
                    size += data.len() as u64;
                }
            }
            (Request::Eof, _) => break,
            _ => return conn.send_error(ErrorCode::Protocol, "a write takes data frames and an eof"),
        }
    }
    let done = match file {
        Ok((f, upload)) => {
            drop(f);
            match upload {
                Some(u) => u.commit(path),
                None => Ok(()),
            }
        }
        Err(_) => return Ok(()),
    };
    reply(conn, done.map(|()| Response::Done { size }))
}

/// Creates the directory `rel` beneath the root (with `parents`, its missing parents too);
/// an existing directory is fine. Returns it opened.
pub(crate) fn make_dir(rootfd: &OwnedFd, rel: &str, mode: u32, parents: bool, shown: &str) -> Result<OwnedFd, OpError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    if !rel.is_empty() {
        let parent = parent_dir(rootfd, rel, parents, shown)?;
        match mkdirat(&parent, split(rel).1, Mode::from_bits_truncate(mode & 0o1777)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_error(e, shown)),
        }
    }
    // Re-resolved beneath the root: a link swapped in meanwhile is checked, and an existing
    // file of that name is `not_a_directory`.
    open_beneath(rootfd, rel, flags, Mode::empty(), shown)
}

pub fn mkdir(conn: &mut Conn, root: &Path, path: &str, mode: Option<u32>, parents: bool) -> io::Result<()> {
    let result = (|| {
        let rel = checked(path, root)?;
        let rootfd = open_root(root)?;
        make_dir(&rootfd, &rel, mode.unwrap_or(0o755), parents, path)?;
        Ok(Response::Done { size: 0 })
    })();
    reply(conn, result)
}

/// How many levels of a tree being removed keep their directory open: deeper ones are
/// reopened by name from the nearest open one when the walk comes back to them, so a very
/// deep tree needs neither a deep stack nor a descriptor per level.
const OPEN_LEVELS: usize = 64;

/// One directory of a tree being removed.
struct Level {
    /// Its name in the level above ("" for the top).
    name: String,
    fd: Option<OwnedFd>,
    /// Entries still to remove.
    todo: Vec<String>,
}

fn entry_names(dir: &OwnedFd) -> Result<Vec<String>, Errno> {
    let dup = dir
        .try_clone()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let mut it = Dir::from_fd(dup)?;
    Ok(it
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect())
}

const SUBDIR: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The open directory of `levels[i]`, reopened (by name, never following a link) from the
/// nearest level above that is still open.
fn level_fd(levels: &mut [Level], i: usize) -> Result<&OwnedFd, Errno> {
    let open = (0..=i)
        .rev()
        .find(|&k| levels[k].fd.is_some())
        .expect("the top stays open");
    for k in open + 1..=i {
        let parent = levels[k - 1].fd.as_ref().expect("opened just before");
        let fd = nix::fcntl::openat(parent, levels[k].name.as_str(), SUBDIR, Mode::empty())?;
        levels[k].fd = Some(fd);
    }
    Ok(levels[i].fd.as_ref().expect("opened above"))
}

/// Removes the contents of the directory open as `top`, never following links. Iterative
/// (an explicit stack of levels): a deep tree must not exhaust the connection thread's
/// small stack.
fn remove_contents(top: &OwnedFd, shown: &str) -> Result<(), OpError> {
    let fail = |e: Errno| errno_error(e, shown);
    let top = top.try_clone().map_err(|e| io_error(e, shown))?;
    let todo = entry_names(&top).map_err(fail)?;
    let mut levels = vec![Level {
        name: String::new(),
        fd: Some(top),
        todo,
    }];
    while let Some(depth) = levels.len().checked_sub(1) {
        let Some(name) = levels[depth].todo.pop() else {
            // Emptied: remove it from the level above (the top itself is the caller's).
            let done = levels.pop().expect("not empty");
            drop(done.fd);
            if depth == 0 {
                break;
            }
            let parent = level_fd(&mut levels, depth - 1).map_err(fail)?;
            match unlinkat(parent, done.name.as_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(fail(e)),
            }
            continue;
        };
        let dir = level_fd(&mut levels, depth).map_err(fail)?;
        let st = match fstatat(dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(fail(e)),
        };
        if kind_of(&st) != FileKind::Dir {
            match unlinkat(dir, name.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(fail(e)),
            }
            continue;
        }
        // O_NOFOLLOW: a directory swapped for a link meanwhile is not entered.
        let sub = nix::fcntl::openat(dir, name.as_str(), SUBDIR, Mode::empty()).map_err(fail)?;
        let todo = entry_names(&sub).map_err(fail)?;
        levels.push(Level {
            name,
            fd: Some(sub),
            todo,
        });
        // Close the level that just left the open window, unless it is a checkpoint that
        // bounds how far a reopening walks.
        if let Some(k) = levels.len().checked_sub(OPEN_LEVELS + 1) {
            if k % OPEN_LEVELS != 0 {
                levels[k].fd = None;
            }
        }
    }
    Ok(())
}

pub fn delete(conn: &mut Conn, root: &Path, path: &str, recursive: bool) -> io::Result<()> {
    let result = (|| {
        let rel = checked(path, root)?;
        if rel.is_empty() {
            return Err((ErrorCode::PermissionDenied, format!("{path} is the root directory")));
        }
        let rootfd = open_root(root)?;
        let parent = parent_dir(&rootfd, &rel, false, path)?;
        let name = split(&rel).1;
        let st = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| errno_error(e, path))?;
        if kind_of(&st) == FileKind::Dir {
            if recursive {
                let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let sub = nix::fcntl::openat(&parent, name, flags, Mode::empty()).map_err(|e| errno_error(e, path))?;
                remove_contents(&sub, path)?;
            }
            unlinkat(&parent, name, UnlinkatFlags::RemoveDir).map_err(|e| errno_error(e, path))?;
        } else {
            unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir).map_err(|e| errno_error(e, path))?;
        }
        Ok(Response::Done { size: 0 })
    })();
    reply(conn, result)
}
