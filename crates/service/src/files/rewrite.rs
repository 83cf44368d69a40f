//! Tar rewriting for the Podman fallback: an uploaded tar is copied member by member into
//! the tar Podman unpacks, on the protocol's member rules
//! ([`MemberRules::extract_unresolved`]: Podman unpacks chrooted into the volume, so no
//! member may go through a symlink member of the same tar), with owner uid/gid 1000 and no
//! set-id bits whatever the upload says.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;

use conductor_agent_protocol::{Member, MemberKind, MemberRules, TarGuard};

use super::podman::fallback_failed;
use crate::volumes::WORKSPACE_UID;
use crate::{Result, ServiceError};

/// Copies the tar read from `input` to `out`, member by member, on the member rules of
/// [`MemberRules::extract_unresolved`] (names, kinds, link targets, no member through a
/// symlink member of the same tar, no set-id bits), every member owned by uid/gid 1000.
/// The input is read through a [`TarGuard`]: a long-name or pax entry over 64 KiB is
/// refused before the parser buffers it. Returns the bytes of file contents.
pub(super) fn rewrite_archive(input: impl Read, out: &mut dyn Write) -> Result<u64> {
    let bad = |m: String| ServiceError::invalid("body", m);
    let malformed = |e: io::Error| ServiceError::invalid("body", format!("the tar stream is malformed: {e}"));
    let copy_failed = |e: io::Error| fallback_failed("copy an archive", e);
    let mut ar = tar::Archive::new(TarGuard::new(input));
    let mut b = tar::Builder::new(out);
    let mut rules = MemberRules::extract_unresolved();
    let mut size = 0u64;
    for entry in ar.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let Some(member) = judge(&mut rules, &entry).map_err(bad)? else {
            continue;
        };
        // UTF-8: these rules require it.
        let path = member.path_str().into_owned();
        let mut header = tar::Header::new_gnu();
        header.set_mode(member.mode);
        header.set_mtime(entry.header().mtime().unwrap_or(0));
        header.set_uid(u64::from(WORKSPACE_UID));
        header.set_gid(u64::from(WORKSPACE_UID));
        header.set_size(0);
        match member.kind {
            MemberKind::File => {
                let n = entry.size();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(n);
                b.append_data(&mut header, &path, &mut entry).map_err(copy_failed)?;
                size += n;
            }
            MemberKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                let dir = if path.is_empty() {
                    "./".to_string()
                } else {
                    format!("{path}/")
                };
                b.append_data(&mut header, dir, io::empty()).map_err(copy_failed)?;
            }
            MemberKind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut header, &path, OsStr::from_bytes(&target))
                    .map_err(copy_failed)?;
            }
        }
    }
    b.into_inner().and_then(|out| out.flush()).map_err(copy_failed)?;
    Ok(size)
}

/// What `rules` say of a tar entry: from its name (long names and pax paths applied), type,
/// link target and mode. `Ok(None)`: an entry to skip.
pub(super) fn judge<R: Read>(
    rules: &mut MemberRules,
    entry: &tar::Entry<'_, R>,
) -> std::result::Result<Option<Member>, String> {
    let h = entry.header();
    let link = entry.link_name_bytes();
    rules.check(
        &entry.path_bytes(),
        h.entry_type().as_byte(),
        link.as_deref(),
        h.mode().ok(),
    )
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
        let mut out = Vec::new();
        let result = rewrite_archive(&tar[..], &mut out);
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
            (
                tar_of(&[(header(b"./", tar::EntryType::Regular, 0, 0o644), b"")]),
                "must be a directory",
            ),
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
}
