//! File operations confined to one directory tree (the root, `/workspace`).
//!
//! Paths are first checked by [`confine`] (no NUL, no `..`, not too long, absolute ones
//! inside the root). Every open then goes through `openat2` from a descriptor of the root
//! with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel resolves symlinks and refuses
//! (EXDEV) any resolution that would leave the root, including absolute symlinks and links
//! swapped in while we work. `delete` and `list` never follow the final component.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use conductor_agent_protocol::{confine, ErrorCode, FileKind, FileStat, Request, Response, CHUNK};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat as RawStat, Mode, SFlag};
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

pub fn write(
    conn: &mut Conn,
    root: &Path,
    path: &str,
    mode: Option<u32>,
    append: bool,
    create_dirs: bool,
) -> io::Result<()> {
    let opened = (|| {
        let rel = checked(path, root)?;
        if rel.is_empty() {
            return Err((ErrorCode::IsADirectory, format!("{path} is the root directory")));
        }
        let rootfd = open_root(root)?;
        parent_dir(&rootfd, &rel, create_dirs, path)?;
        let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NONBLOCK;
        flags |= if append { OFlag::O_APPEND } else { OFlag::O_TRUNC };
        let mode = Mode::from_bits_truncate(mode.unwrap_or(0o644) & 0o7777);
        let fd = open_beneath(&rootfd, &rel, flags, mode, path)?;
        let st = fstat(&fd).map_err(|e| errno_error(e, path))?;
        if kind_of(&st) != FileKind::File {
            return Err((ErrorCode::NotARegularFile, format!("{path} is not a regular file")));
        }
        Ok(File::from(fd))
    })();
    // A failure is answered at once (the client may stop sending); the contents that
    // still come are read to the `eof` and dropped, so the connection stays in step.
    let mut file = opened;
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
                if let Ok(f) = &mut file {
                    if let Err(e) = f.write_all(&data) {
                        let (code, message) = io_error(e, path);
                        conn.send_error(code, message.clone())?;
                        file = Err((code, message));
                    }
                    size += data.len() as u64;
                }
            }
            (Request::Eof, _) => break,
            _ => return conn.send_error(ErrorCode::Protocol, "a write takes data frames and an eof"),
        }
    }
    match file {
        Ok(_) => conn.send(&Response::Done { size }, &[]),
        Err(_) => Ok(()),
    }
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

/// Removes the contents of the directory open as `dir`, never following links.
fn remove_contents(dir: &OwnedFd, shown: &str) -> Result<(), OpError> {
    let mut it = Dir::from_fd(dir.try_clone().map_err(|e| io_error(e, shown))?).map_err(|e| errno_error(e, shown))?;
    let names: Vec<String> = it
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    for name in names {
        let st = match fstatat(dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(errno_error(e, shown)),
        };
        if kind_of(&st) == FileKind::Dir {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let sub =
                nix::fcntl::openat(dir, name.as_str(), flags, Mode::empty()).map_err(|e| errno_error(e, shown))?;
            remove_contents(&sub, shown)?;
            unlinkat(dir, name.as_str(), UnlinkatFlags::RemoveDir).map_err(|e| errno_error(e, shown))?;
        } else {
            unlinkat(dir, name.as_str(), UnlinkatFlags::NoRemoveDir).map_err(|e| errno_error(e, shown))?;
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
