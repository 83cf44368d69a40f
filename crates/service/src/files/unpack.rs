//! A directory's tar from a workspace, unpacked on the host ([`Download::unpack_on_host`],
//! for `conductor ws cp`).
//!
//! The tar is not trusted: the workspace, through its agent or Podman, made it. Every member
//! is judged by the protocol's member rules ([`MemberRules::download`]: under the directory
//! downloaded, no `..` or absolute names, only files, directories and symlinks, nothing
//! through or at a symlink member of the same tar; one bad member refuses the whole copy),
//! the tar is read through a [`TarGuard`] (extension entries over 64 KiB refused), set-id
//! and sticky bits are dropped (modes `& 0o777`: host files get permission bits only), and
//! owners and xattrs are not restored. Members are unpacked with the tar crate's
//! `unpack_in` (which keeps each inside) into a fresh temporary directory next to the
//! destination, which is moved into place only when the whole tar was good: renamed when
//! the destination does not exist, else merged into it (a file or symlink replaces one of
//! the same name; a directory meeting a non-directory refuses the copy before anything is
//! moved).

use std::io::{self, Error, ErrorKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use conductor_agent_protocol::{MemberKind, MemberRules, TarGuard};

use super::rewrite::judge;
use super::{Download, DownloadKind};
use crate::streams::blocking_reader;

impl Download {
    /// Unpacks this download, a directory's tar (entries under `self.name/`), into the
    /// existing directory `dst` as `dst/<name>`, or as the new path `dst`; returns where it
    /// went. See the [module documentation](self) for what is checked.
    pub async fn unpack_on_host(self, dst: PathBuf, name: String) -> io::Result<PathBuf> {
        if self.kind != DownloadKind::Archive {
            return Err(Error::other(format!("{} is not a directory's tar", self.name)));
        }
        let reader = blocking_reader(self.stream);
        let top = self.name;
        tokio::task::spawn_blocking(move || unpack(reader, &dst, &top, &name))
            .await
            .map_err(Error::other)?
    }
}

/// Unpacks the tar (entries under `top/`) into `dst` as `dst/<name>` when `dst` is a
/// directory, else as the new path `dst`; returns where it went.
fn unpack(reader: impl io::Read, dst: &Path, top: &str, name: &str) -> io::Result<PathBuf> {
    for n in [top, name] {
        if n.is_empty() || n == "." || n == ".." || n.contains('/') {
            return Err(Error::other(format!("cannot copy a directory named {n:?}")));
        }
    }
    let (parent, target) = if dst.is_dir() {
        (dst.to_path_buf(), dst.join(name))
    } else if dst.symlink_metadata().is_ok() {
        return Err(Error::other(format!("{} exists and is not a directory", dst.display())));
    } else {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, dst.to_path_buf())
    };
    let tmp = tempfile::Builder::new().prefix(".conductor-cp-").tempdir_in(&parent)?;
    // On any error the temporary directory goes, and with it all that was unpacked.
    let dirs = unpack_checked(reader, tmp.path(), top).map_err(|e| {
        let why = if e.kind() == ErrorKind::InvalidData {
            "refused, "
        } else {
            ""
        };
        Error::new(e.kind(), format!("{why}nothing was copied: {e}"))
    })?;
    let unpacked = tmp.path().join(top);
    if unpacked.symlink_metadata().is_err() {
        return Err(Error::other(format!("the archive holds nothing under {top:?}")));
    }
    install(&unpacked, &target)?;
    // Directory modes last (deepest first), so a read-only directory could be filled.
    for (rel, mode) in dirs.iter().rev() {
        std::fs::set_permissions(target.join(rel), PermissionsExt::from_mode(*mode))?;
    }
    Ok(target)
}

/// Unpacks the members of the tar, each judged by [`MemberRules::download`], into the
/// empty directory `into`; returns the directories' paths below `top` (sorted) and modes,
/// to apply once the tree is in place.
fn unpack_checked(reader: impl io::Read, into: &Path, top: &str) -> io::Result<Vec<(PathBuf, u32)>> {
    let refused = |m: String| Error::new(ErrorKind::InvalidData, m);
    let mut ar = tar::Archive::new(TarGuard::new(reader));
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut rules = MemberRules::download(top);
    // The last mode given for each directory.
    let mut dirs: std::collections::BTreeMap<PathBuf, u32> = Default::default();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let Some(member) = judge(&mut rules, &entry).map_err(refused)? else {
            continue;
        };
        if !entry.unpack_in(into)? {
            return Err(refused(format!("member {:?}: refused", member.name)));
        }
        if member.kind == MemberKind::Dir {
            // Writable meanwhile; the mode from the header (no set-id, no sticky) later.
            let rel = PathBuf::from(std::ffi::OsStr::from_bytes(&member.path));
            let mode = member.mode & 0o777;
            std::fs::set_permissions(into.join(top).join(&rel), PermissionsExt::from_mode(mode | 0o700))?;
            dirs.insert(rel, mode);
        }
    }
    Ok(dirs.into_iter().collect())
}

/// Moves the unpacked tree `src` to `dst`: renamed when `dst` does not exist, else merged
/// (directories into directories; a file or symlink replaces a file or symlink). A
/// directory meeting a non-directory (a symlink included: it is never followed) is refused
/// before anything moves.
fn install(src: &Path, dst: &Path) -> io::Result<()> {
    // Pass 1: conflicts.
    let mut pending = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = pending.pop() {
        let d_meta = match d.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let s_dir = s.symlink_metadata()?.is_dir();
        match (s_dir, d_meta.is_dir()) {
            (true, true) => {
                for child in std::fs::read_dir(&s)? {
                    let child = child?;
                    pending.push((child.path(), d.join(child.file_name())));
                }
            }
            (true, false) => {
                return Err(Error::other(format!(
                    "{} exists and is not a directory; nothing was copied",
                    d.display()
                )))
            }
            (false, true) => {
                return Err(Error::other(format!(
                    "{} exists and is a directory; nothing was copied",
                    d.display()
                )))
            }
            (false, false) => {}
        }
    }
    // Pass 2: move.
    let mut pending = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = pending.pop() {
        match d.symlink_metadata() {
            Ok(m) if m.is_dir() => {
                for child in std::fs::read_dir(&s)? {
                    let child = child?;
                    pending.push((child.path(), d.join(child.file_name())));
                }
            }
            _ => std::fs::rename(&s, &d)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use tar::EntryType as T;

    /// A header with a raw name (no checks: the tar crate refuses to write bad names).
    fn header(name: &[u8], kind: T, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_cksum();
        h
    }

    fn link(name: &[u8], target: &str) -> tar::Header {
        let mut h = header(name, T::Symlink, 0, 0o777);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        h
    }

    fn tar_of(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (h, data) in entries {
            b.append(h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    fn good_tar() -> Vec<u8> {
        tar_of(&[
            (header(b"proj/", T::Directory, 0, 0o1777), b""),
            (header(b"proj/run.sh", T::Regular, 3, 0o4755), b"run"),
            (header(b"proj/g", T::Regular, 1, 0o2640), b"g"),
            (header(b"proj/ro/", T::Directory, 0, 0o555), b""),
            (header(b"proj/ro/f", T::Regular, 1, 0o444), b"f"),
            (link(b"proj/link", "/etc/passwd"), b""),
        ])
    }

    #[test]
    fn a_good_tar_lands_without_set_id_or_sticky_bits() {
        let host = tempfile::tempdir().unwrap();
        // To a new path.
        let dst = host.path().join("copy");
        let got = unpack(&good_tar()[..], &dst, "proj", "proj").unwrap();
        assert_eq!(got, dst);
        assert_eq!(names(&dst), ["g", "link", "ro", "run.sh"]);
        assert_eq!(std::fs::read(dst.join("run.sh")).unwrap(), b"run");
        assert_eq!(mode(&dst), 0o777);
        assert_eq!(mode(&dst.join("run.sh")), 0o755);
        assert_eq!(mode(&dst.join("g")), 0o640);
        assert_eq!(mode(&dst.join("ro")), 0o555);
        assert_eq!(std::fs::read_link(dst.join("link")).unwrap(), Path::new("/etc/passwd"));
        // Into an existing directory, as `<dir>/<name>`; again: merged, files replaced.
        let into = host.path().join("into");
        std::fs::create_dir(&into).unwrap();
        for _ in 0..2 {
            let got = unpack(&good_tar()[..], &into, "proj", "asked").unwrap();
            assert_eq!(got, into.join("asked"));
            assert_eq!(names(&into), ["asked"], "no temporary directory left");
            assert_eq!(mode(&into.join("asked/run.sh")), 0o755);
        }
        assert_eq!(names(host.path()), ["copy", "into"]);
    }

    #[test]
    fn a_bad_member_refuses_the_whole_copy_and_leaves_nothing() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, PermissionsExt::from_mode(0o755)).unwrap();
        let ok = (header(b"proj/a.txt", T::Regular, 1, 0o644), &b"a"[..]);
        let mut oversized = header(b"././@LongLink", T::GNULongName, 1 << 30, 0o644)
            .as_bytes()
            .to_vec();
        oversized.extend(std::iter::repeat_n(b'a', 1 << 20));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_of(&[ok.clone(), (header(b"../escape", T::Regular, 1, 0o644), b"x")]),
                "\"../escape\"",
            ),
            (
                tar_of(&[ok.clone(), (header(b"/tmp/escape", T::Regular, 1, 0o644), b"x")]),
                "absolute",
            ),
            (
                tar_of(&[ok.clone(), (header(b"other/x", T::Regular, 1, 0o644), b"x")]),
                "\"other/x\"",
            ),
            (
                tar_of(&[
                    ok.clone(),
                    (link(b"proj/evil", outside.to_str().unwrap()), b""),
                    (header(b"proj/evil/x", T::Regular, 1, 0o644), b"x"),
                ]),
                "goes through the symlink member",
            ),
            (
                tar_of(&[
                    (link(b"proj/evil", "."), b""),
                    (header(b"proj/evil/x", T::Regular, 1, 0o644), b"x"),
                ]),
                "goes through the symlink member",
            ),
            (
                tar_of(&[
                    (link(b"proj/evil", outside.to_str().unwrap()), b""),
                    (header(b"proj/evil/", T::Directory, 0, 0o777), b""),
                ]),
                "replaces the symlink member",
            ),
            (
                tar_of(&[ok.clone(), (header(b"proj/h", T::Link, 0, 0o644), b"")]),
                "hard links",
            ),
            (
                tar_of(&[ok.clone(), (header(b"proj/dev", T::Char, 0, 0o644), b"")]),
                "Char",
            ),
            (
                tar_of(&[ok.clone(), (header(b"proj/fifo", T::Fifo, 0, 0o644), b"")]),
                "Fifo",
            ),
            (oversized, "64 KiB"),
        ];
        for (tar, why) in cases {
            let e = unpack(&tar[..], &host.path().join("copy"), "proj", "proj").unwrap_err();
            assert!(
                e.to_string().contains(why) && e.to_string().contains("nothing was copied"),
                "{why}: {e}"
            );
            assert_eq!(names(host.path()), ["outside"], "{why}: nothing left");
            assert!(names(&outside).is_empty(), "{why}");
            assert_eq!(mode(&outside), 0o755, "{why}: no mode set through a link");
        }
    }

    #[test]
    fn existing_files_are_never_written_through_and_conflicts_move_nothing() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let into = host.path().join("into");
        std::fs::create_dir_all(into.join("proj/dir")).unwrap();
        std::os::unix::fs::symlink(&outside, into.join("proj/sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), into.join("proj/file")).unwrap();
        // A directory where the host has a symlink to one: refused, before anything moved.
        let tar = tar_of(&[
            (header(b"proj/new", T::Regular, 1, 0o644), b"n"),
            (header(b"proj/sub/x", T::Regular, 1, 0o644), b"x"),
        ]);
        let e = unpack(&tar[..], &into, "proj", "proj").unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        // A file where the host has a directory.
        let tar = tar_of(&[(header(b"proj/dir", T::Regular, 1, 0o644), b"x")]);
        let e = unpack(&tar[..], &into, "proj", "proj").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert_eq!(names(&into.join("proj")), ["dir", "file", "sub"]);
        assert_eq!(names(&into), ["proj"]);
        // A file where the host has a symlink: the link is replaced, not followed.
        let tar = tar_of(&[(header(b"proj/file", T::Regular, 3, 0o644), b"new")]);
        unpack(&tar[..], &into, "proj", "proj").unwrap();
        assert_eq!(std::fs::read(into.join("proj/file")).unwrap(), b"new");
        assert!(names(&outside).is_empty());
        // A new path that is a dangling symlink is not written through either.
        std::os::unix::fs::symlink(outside.join("made"), host.path().join("dangling")).unwrap();
        let e = unpack(&good_tar()[..], &host.path().join("dangling"), "proj", "proj").unwrap_err();
        assert!(e.to_string().contains("exists and is not a directory"), "{e}");
        assert!(names(&outside).is_empty());
    }
}
