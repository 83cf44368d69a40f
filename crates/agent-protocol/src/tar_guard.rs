//! Reading untrusted tars: [`TarGuard`] bounds the memory a tar parser can be made to
//! spend, [`MemberRules`] decides which members are accepted. Every tar conductor parses
//! goes through both: the agent's `extract`, the service's Podman fallback (which rewrites
//! an upload before Podman unpacks it) and `conductor ws cp` (a directory's tar from a
//! workspace, unpacked on the host).
//!
//! # The guard
//!
//! The `tar` crate reads the body of every extension entry whole into memory: GNU long
//! names and long link targets (`L`, `K`) and pax extended headers (`x`; `g` when the
//! caller reads it). A single header claiming a huge extension size therefore makes the
//! parser buffer whatever follows, up to the end of the stream. `TarGuard` sits between the
//! byte stream and the parser: it follows the 512-byte block structure of the archive
//! (header, data rounded up to a block, next header), passes every byte through unchanged,
//! and fails the read that completes a header announcing an extension entry larger than
//! [`MAX_EXTENSION`]: the parser gets an [`io::ErrorKind::InvalidData`] error before it
//! allocates anything for that entry.
//!
//! To stay in step with the parser it reads the sizes the way the `tar` crate does: the
//! size field (bytes 124..136: octal, or base-256 when its first byte has the high bit
//! set), the `size` record of a pax `x` header (which overrides the size of the entry it
//! describes; at most [`MAX_EXTENSION`] bytes of it are kept to read it), and the extension
//! blocks that follow a GNU sparse (`S`) header. Zero blocks (the end of the archive, or
//! padding) are passed through and the blocks after them are read as headers again.
//!
//! # The member rules
//!
//! [`MemberRules::check`] judges each member the parser yields, from its raw name, type
//! byte, link target and mode, and answers the cleaned [`Member`] or why it is refused
//! (naming the member). One set of rules for every unpacker:
//!
//! - the name is relative (no leading `/`), has no `..` component and no NUL byte, is at
//!   most [`MAX_PATH`](crate::MAX_PATH) bytes with components of at most
//!   [`MAX_NAME`](crate::MAX_NAME) (the path rules of [`confine`](crate::confine)); `./`
//!   prefixes and repeated slashes are dropped;
//! - only regular files, directories and symlinks: hard links, devices, FIFOs, sparse files
//!   and other types are refused; pax global headers (`g`) are skipped;
//! - the entry naming the directory unpacked into (`./`) can only be a directory;
//! - a symlink's target is not empty and at most `MAX_PATH` bytes (any target: making a
//!   link is harmless, following it is what the unpacker checks);
//! - the mode keeps the permission bits and the sticky bit, never set-uid or set-gid.
//!
//! What depends on the unpacker is said by its constructor: the agent creates every member
//! through `openat2(RESOLVE_BENEATH)`, so a symlink member is followed when it stays
//! beneath the root and refused when it leads out ([`MemberRules::extract`]); Podman's
//! chrooted copy and the host cannot resolve links that way, so there a member below a
//! symlink member of the same tar, or a directory at a symlink member's name, is refused
//! ([`MemberRules::extract_unresolved`], [`MemberRules::download`]). Names must be UTF-8
//! where they become workspace paths (those are strings); a download unpacked on the host
//! takes any bytes, and only members under the directory downloaded. No dependency beyond
//! `std`: the caller hands over the header fields its parser read.

use std::io::{self, Read};

/// The largest extension entry (`L`, `K`, `x`, `g`) accepted, in bytes of its body.
pub const MAX_EXTENSION: u64 = 64 << 10;

const BLOCK: usize = 512;

/// An entry's data, padding included, still to pass.
#[derive(Debug)]
struct Data {
    /// Bytes of the body left.
    body: u64,
    /// Bytes of padding after it left.
    pad: u64,
    /// The body so far of a pax `x` header (at most [`MAX_EXTENSION`] bytes).
    pax: Option<Vec<u8>>,
}

/// Where in the archive the next byte is.
#[derive(Debug)]
enum State {
    /// In a header block (or a zero block).
    Header,
    /// In the extension blocks of a GNU sparse header; the entry's data follows.
    SparseExt(Data),
    /// In an entry's data.
    Data(Data),
}

/// Passes a tar stream through, refusing extension entries larger than [`MAX_EXTENSION`].
/// See the [module documentation](self).
#[derive(Debug)]
pub struct TarGuard<R> {
    inner: R,
    state: State,
    /// The header or sparse extension block being read, `filled` bytes of it so far.
    block: Box<[u8; BLOCK]>,
    filled: usize,
    /// The `size` record of the pax `x` header that describes the next entry.
    pax_size: Option<u64>,
    /// The error already returned: every later read returns it again.
    failed: Option<String>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R) -> TarGuard<R> {
        TarGuard {
            inner,
            state: State::Header,
            block: Box::new([0u8; BLOCK]),
            filled: 0,
            pax_size: None,
            failed: None,
        }
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Enters the data of an entry (or the next header when it has none).
    fn enter(&mut self, data: Data) {
        if data.body == 0 && data.pad == 0 {
            self.data_done(data);
        } else {
            self.state = State::Data(data);
        }
    }

    fn data_done(&mut self, data: Data) {
        if let Some(body) = data.pax {
            self.pax_size = pax_size(&body);
        }
        self.state = State::Header;
    }

    /// A whole header block has been read: what follows it.
    fn header_done(&mut self) -> Result<(), String> {
        let h = &*self.block;
        if h.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let kind = h[156];
        let declared = size_field(&h[124..136]).ok_or_else(|| {
            format!(
                "tar header of {:?}: the size field is not a number",
                String::from_utf8_lossy(name_of(h))
            )
        })?;
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g');
        if extension && declared > MAX_EXTENSION {
            return Err(format!(
                "tar entry of type '{}' declares {declared} bytes of extension data, more than the \
                 limit of {} KiB ({MAX_EXTENSION} bytes)",
                kind as char,
                MAX_EXTENSION >> 10
            ));
        }
        // As the tar crate: an `L`, `K` or `x` entry in a ustar or GNU header describes the
        // next entry; any other entry stands for itself, and the pending pax `size` applies
        // to it unless it is an extension type itself (`g`, or `L`/`K`/`x` in an old header).
        let gnu = &h[257..265] == b"ustar  \0";
        let recognized = gnu || &h[257..265] == b"ustar\x0000";
        let describes_next = recognized && matches!(kind, b'L' | b'K' | b'x');
        let size = match self.pax_size {
            Some(n) if !extension => n,
            _ => declared,
        };
        if !describes_next {
            self.pax_size = None;
        }
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        if size.checked_add(pad).is_none() {
            return Err(format!("tar entry size {size} is too large"));
        }
        let pax = (recognized && kind == b'x').then(Vec::new);
        let data = Data { body: size, pad, pax };
        // GNU sparse: `isextended` (byte 482) announces extension blocks before the data.
        if kind == b'S' && gnu && h[482] == 1 {
            self.state = State::SparseExt(data);
        } else {
            self.enter(data);
        }
        Ok(())
    }

    /// A whole block has been read in the header or sparse extension state.
    fn block_done(&mut self) -> Result<(), String> {
        match std::mem::replace(&mut self.state, State::Header) {
            State::Header => self.header_done(),
            // `isextended` of an extension block is its byte 504.
            State::SparseExt(data) if self.block[504] == 1 => {
                self.state = State::SparseExt(data);
                Ok(())
            }
            State::SparseExt(data) => {
                self.enter(data);
                Ok(())
            }
            State::Data(_) => unreachable!("blocks are only read outside data"),
        }
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(m) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, m.clone()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if let State::Data(data) = &mut self.state {
            let left = data.body + data.pad;
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.inner.read(&mut buf[..want])?;
            let body = n.min(usize::try_from(data.body).unwrap_or(usize::MAX));
            if let Some(pax) = &mut data.pax {
                pax.extend_from_slice(&buf[..body]);
            }
            data.body -= body as u64;
            data.pad -= (n - body) as u64;
            if n > 0 && data.body == 0 && data.pad == 0 {
                if let State::Data(data) = std::mem::replace(&mut self.state, State::Header) {
                    self.data_done(data);
                }
            }
            return Ok(n);
        }
        // A header or a sparse extension block: never read past its end, so that the
        // block is judged before the parser sees what follows.
        let want = buf.len().min(BLOCK - self.filled);
        let n = self.inner.read(&mut buf[..want])?;
        self.block[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
        self.filled += n;
        if self.filled == BLOCK {
            self.filled = 0;
            if let Err(m) = self.block_done() {
                self.failed = Some(m.clone());
                return Err(io::Error::new(io::ErrorKind::InvalidData, m));
            }
        }
        Ok(n)
    }
}

/// The name field of a header, up to its first NUL (for messages).
fn name_of(h: &[u8; BLOCK]) -> &[u8] {
    let name = &h[..100];
    name.iter().position(|b| *b == 0).map_or(name, |i| &name[..i])
}

/// A numeric header field as the `tar` crate reads it: base-256 when the high bit of the
/// first byte is set (the last 8 bytes), else octal text up to the first NUL, trimmed.
fn size_field(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let skip = field.len().saturating_sub(8).max(1);
        let mut n: u64 = if field.len() == 8 {
            u64::from(field[0] ^ 0x80)
        } else {
            0
        };
        for b in &field[skip..] {
            n = (n << 8) | u64::from(*b);
        }
        return Some(n);
    }
    let text = field.iter().position(|b| *b == 0).map_or(field, |i| &field[..i]);
    let text = std::str::from_utf8(text).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The value of the first `size` record of a pax extended header, as the `tar` crate reads
/// it: `None` when there is none, or when a record before it (or it) is malformed.
fn pax_size(body: &[u8]) -> Option<u64> {
    for line in body.split(|b| *b == b'\n') {
        if line.is_empty() {
            return None;
        }
        let space = line.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let record = &line[space + 1..];
        let eq = record.iter().position(|b| *b == b'=')?;
        if &record[..eq] == b"size" {
            return std::str::from_utf8(&record[eq + 1..]).ok()?.parse().ok();
        }
    }
    None
}

/// A member accepted by [`MemberRules::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The name as the archive gives it (lossy UTF-8), for messages.
    pub name: String,
    /// Cleaned and relative: components joined by `/`, without `.`; `""` is the directory
    /// unpacked into (for a [download](MemberRules::download), the directory downloaded:
    /// the path is relative to it).
    pub path: Vec<u8>,
    pub kind: MemberKind,
    /// Permission bits and the sticky bit; never set-uid or set-gid (0755 for a directory
    /// and 0644 otherwise when the header's mode is unreadable).
    pub mode: u32,
}

impl Member {
    /// [`path`](Self::path) as text: exact where the rules require UTF-8 names (every
    /// unpacker into a workspace), lossy otherwise.
    pub fn path_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.path)
    }
}

/// What a member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberKind {
    File,
    Dir,
    /// A symlink with its target (not empty, at most `MAX_PATH` bytes, as written).
    Symlink(Vec<u8>),
}

/// The rules for the members of an untrusted tar; see the [module documentation](self).
/// One value per archive: it remembers the symlink members seen so far.
#[derive(Debug, Clone)]
pub struct MemberRules {
    /// Names must be UTF-8.
    utf8: bool,
    /// The symlink members so far (their cleaned paths), when members may not go through
    /// them; `None` where the unpacker resolves every member beneath its root.
    links: Option<Vec<Vec<u8>>>,
    /// Every member must lie under this directory (a download).
    top: Option<Vec<u8>>,
}

impl MemberRules {
    /// For an unpacker that creates every member beneath its root with
    /// `openat2(RESOLVE_BENEATH)` (the agent's `extract`): a symlink member, or one already
    /// there, is followed when it stays beneath the root; the unpacker refuses the rest.
    pub fn extract() -> MemberRules {
        MemberRules {
            utf8: true,
            links: None,
            top: None,
        }
    }

    /// For an unpacker into a workspace that cannot resolve symlinks beneath its root (the
    /// service's Podman fallback: Podman unpacks chrooted into the volume): no member below a
    /// symlink member of the same tar, and no directory at a symlink member's name.
    pub fn extract_unresolved() -> MemberRules {
        MemberRules {
            links: Some(Vec::new()),
            ..MemberRules::extract()
        }
    }

    /// For a directory's tar from a workspace unpacked on the host (`conductor ws cp`):
    /// every member lies under `top/` (the directory downloaded, which must be a directory
    /// entry), names may be any bytes, and the symlink rule of
    /// [`extract_unresolved`](Self::extract_unresolved) applies.
    pub fn download(top: &str) -> MemberRules {
        MemberRules {
            utf8: false,
            links: Some(Vec::new()),
            top: Some(top.as_bytes().to_vec()),
        }
    }

    /// Judges the next member from its header fields: the raw `name` (with long names and
    /// pax paths applied), the type byte (`b'0'`, `b'5'`…), the link target and the mode.
    /// `Ok(None)`: an entry to skip (a pax global header). The error names the member.
    pub fn check(
        &mut self,
        name: &[u8],
        entry_type: u8,
        link: Option<&[u8]>,
        mode: Option<u32>,
    ) -> Result<Option<Member>, String> {
        if entry_type == b'g' {
            return Ok(None);
        }
        let shown = String::from_utf8_lossy(name).into_owned();
        let bad = |why: String| Err(format!("member {shown:?}: {why}"));
        if self.utf8 && std::str::from_utf8(name).is_err() {
            return bad("the name is not UTF-8".into());
        }
        if name.starts_with(b"/") {
            return bad("absolute names are not allowed".into());
        }
        if let Err(why) = crate::check_whole(name) {
            return bad(why);
        }
        let mut parts = match crate::components(name) {
            Ok(parts) => parts,
            Err(why) => return bad(why),
        };
        if let Some(top) = &self.top {
            if parts.first() != Some(&top.as_slice()) {
                return bad(format!(
                    "not under {:?}, the directory copied",
                    String::from_utf8_lossy(top)
                ));
            }
            parts.remove(0);
        }
        let path = parts.join(&b'/');
        let kind = match entry_type {
            b'0' | b'\0' | b'7' => MemberKind::File,
            b'5' => MemberKind::Dir,
            b'2' => match link {
                Some(t) if !t.is_empty() && t.len() <= crate::MAX_PATH => MemberKind::Symlink(t.to_vec()),
                _ => return bad("the link target is empty or too long".into()),
            },
            b'1' => return bad("hard links are not supported (only files, directories and symlinks)".into()),
            other => {
                return bad(format!(
                    "entries of type {} are not supported (only files, directories and symlinks)",
                    type_name(other)
                ))
            }
        };
        if path.is_empty() && kind != MemberKind::Dir {
            return bad(match &self.top {
                Some(top) => format!(
                    "{:?}, the directory copied, must be a directory",
                    String::from_utf8_lossy(top)
                ),
                None => "it names the directory unpacked into, which must be a directory".into(),
            });
        }
        if let Some(links) = &mut self.links {
            let below = |l: &Vec<u8>| path.strip_prefix(l.as_slice()).is_some_and(|r| r.starts_with(b"/"));
            if let Some(l) = links
                .iter()
                .find(|l| below(l) || (kind == MemberKind::Dir && **l == path))
            {
                let mut link = self.top.clone().unwrap_or_default();
                if !link.is_empty() {
                    link.push(b'/');
                }
                link.extend_from_slice(l);
                let how = if *l == path { "replaces" } else { "goes through" };
                return bad(format!("{how} the symlink member {:?}", String::from_utf8_lossy(&link)));
            }
            if matches!(kind, MemberKind::Symlink(_)) {
                links.push(path.clone());
            }
        }
        let default = if kind == MemberKind::Dir { 0o755 } else { 0o644 };
        Ok(Some(Member {
            name: shown,
            path,
            kind,
            mode: mode.unwrap_or(default) & 0o1777,
        }))
    }
}

/// The name the `tar` crate gives a type byte (`Fifo`, `Char`…), for messages.
fn type_name(entry_type: u8) -> String {
    match entry_type {
        b'3' => "Char".into(),
        b'4' => "Block".into(),
        b'6' => "Fifo".into(),
        b'K' => "GNULongLink".into(),
        b'L' => "GNULongName".into(),
        b'S' => "GNUSparse".into(),
        b'x' => "XHeader".into(),
        other => format!("Other({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields at most `step` bytes per read and counts what it yielded.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        given: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len() - self.given);
            buf[..n].copy_from_slice(&self.data[self.given..self.given + n]);
            self.given += n;
            Ok(n)
        }
    }

    fn through(data: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        TarGuard::new(Trickle { data, step, given: 0 }).read_to_end(&mut out)?;
        Ok(out)
    }

    /// (name, link target, contents) of every entry, parsed through a guard.
    fn entries(data: &[u8]) -> io::Result<Vec<(String, String, Vec<u8>)>> {
        let mut ar = tar::Archive::new(TarGuard::new(Trickle {
            data,
            step: 700,
            given: 0,
        }));
        let mut out = Vec::new();
        for e in ar.entries()? {
            let mut e = e?;
            let name = e.path()?.to_string_lossy().into_owned();
            let link = e
                .link_name()?
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut body = Vec::new();
            e.read_to_end(&mut body)?;
            out.push((name, link, body));
        }
        Ok(out)
    }

    fn header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    /// A header announcing `size` bytes of a `kind` entry, then `body` (not padded).
    fn raw(kind: tar::EntryType, size: u64, body: &[u8]) -> Vec<u8> {
        let mut out = header("././@LongLink", kind, size).as_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn project() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("top/{}/{}.txt", "d".repeat(120), "f".repeat(200));
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "top/", io::empty()).unwrap();
        for (name, data) in [
            ("top/empty", &b""[..]),
            ("top/one", &b"1"[..]),
            ("top/block", &[7u8; 512][..]),
            ("top/block1", &[8u8; 513][..]),
            (long.as_str(), &b"long name\n"[..]),
            ("top/big.bin", &big[..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "top/link", "x".repeat(300)).unwrap();
        b.append_pax_extensions([("user.comment", &b"pax"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o600);
        h.set_size(3);
        b.append_data(&mut h, "top/after-pax", &b"abc"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn a_normal_tar_passes_unchanged() {
        let tar = project();
        for step in [1, 7, 511, 512, 513, 64 << 10] {
            assert!(through(&tar, step).unwrap() == tar, "step {step}");
        }
        let got = entries(&tar).unwrap();
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names.len(), 9);
        assert!(names[5].ends_with(&format!("{}.txt", "f".repeat(200))), "{names:?}");
        assert_eq!(got[5].2, b"long name\n");
        assert_eq!(got[6].2.len(), 100_000);
        assert_eq!(got[7].1, "x".repeat(300));
        assert_eq!((names[8], &got[8].2[..]), ("top/after-pax", &b"abc"[..]));
    }

    #[test]
    fn oversized_extension_entries_are_refused_before_their_body_is_read() {
        let huge = 1u64 << 40;
        for kind in [
            tar::EntryType::GNULongName,
            tar::EntryType::GNULongLink,
            tar::EntryType::XHeader,
            tar::EntryType::XGlobalHeader,
        ] {
            let mut tar = raw(kind, huge, &[b'a'; 4096]);
            tar.extend_from_slice(&[0u8; 1024]);
            let mut src = Trickle {
                data: &tar,
                step: 100,
                given: 0,
            };
            let mut ar = tar::Archive::new(TarGuard::new(&mut src));
            let e = ar.entries().unwrap().next().unwrap().err().expect("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{kind:?}");
            assert!(e.to_string().contains("64 KiB"), "{e}");
            assert_eq!(src.given, 512, "{kind:?}: only the header was read");
            let e = through(&tar, 4096).unwrap_err();
            assert!(e.to_string().contains(&format!("declares {huge} bytes")), "{e}");
        }
        // Base-256 sizes too; the limit itself is fine.
        let mut h = header("x", tar::EntryType::GNULongName, 0);
        h.as_old_mut().size = [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        h.set_cksum();
        let e = through(h.as_bytes(), 512).unwrap_err();
        assert!(e.to_string().contains("declares 65537 bytes"), "{e}");
        let mut ok = raw(
            tar::EntryType::XHeader,
            MAX_EXTENSION,
            &vec![b'\n'; MAX_EXTENSION as usize],
        );
        ok.extend_from_slice(&[0u8; 1024]);
        assert!(through(&ok, 1000).unwrap() == ok);
    }

    #[test]
    fn a_size_field_that_is_no_number_is_refused() {
        let mut h = header("x", tar::EntryType::Regular, 0);
        h.as_old_mut().size = *b"12x45678901\0";
        let e = through(h.as_bytes(), 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("size field"), "{e}");
        assert_eq!(size_field(b"00000001750\0"), Some(1000));
        assert_eq!(size_field(b" 1750 \0\0\0\0\0\0"), Some(1000));
        assert_eq!(size_field(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1]), Some(513));
    }

    /// A block that looks like an oversized long-name header.
    fn decoy() -> Vec<u8> {
        raw(tar::EntryType::GNULongName, 1 << 30, b"")
    }

    #[test]
    fn the_size_record_of_a_pax_header_is_followed() {
        // The pax `size` (1024) overrides the entry's header (0): the decoy is data.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"1024"[..])]).unwrap();
        let mut tar = b.into_inner().unwrap();
        tar.truncate(tar.len() - 1024);
        tar.extend_from_slice(header("a", tar::EntryType::Regular, 0).as_bytes());
        tar.extend_from_slice(&decoy());
        tar.extend_from_slice(&[1u8; 512]);
        tar.extend_from_slice(header("b", tar::EntryType::Regular, 1).as_bytes());
        tar.extend_from_slice(&[b'b'; 512]);
        tar.extend_from_slice(&[0u8; 1024]);
        assert!(through(&tar, 333).unwrap() == tar);
        let got = entries(&tar).unwrap();
        assert_eq!((got[0].0.as_str(), got[0].2.len()), ("a", 1024));
        assert_eq!((got[1].0.as_str(), &got[1].2[..]), ("b", &b"b"[..]));
        // Without it the decoy is a header, and refused.
        let plain = &tar[1024..];
        assert!(through(plain, 333).is_err());
        assert_eq!(pax_size(b"9 size=5\n"), Some(5));
        assert_eq!(pax_size(b"12 path=abc\n9 size=5\n"), Some(5));
        assert_eq!(pax_size(b"9 path=abc\n9 size=5\n"), None, "malformed first record");
        assert_eq!(pax_size(b"12 path=abc\n"), None);
    }

    #[test]
    fn the_extension_blocks_of_a_sparse_file_are_skipped() {
        // 1536 bytes: data at 0..512 (in the header) and 1024..1536 (in an extension block).
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..6].copy_from_slice(b"sparse");
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(1024);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].offset = *b"00000000000\0";
        gnu.sparse[0].numbytes = *b"00000001000\0";
        gnu.isextended = [1];
        gnu.realsize = *b"00000003000\0";
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        let mut ext = [0u8; 512];
        ext[..12].copy_from_slice(b"00000002000\0");
        ext[12..24].copy_from_slice(b"00000001000\0");
        tar.extend_from_slice(&ext);
        tar.extend_from_slice(&[b's'; 1024]);
        tar.extend_from_slice(header("after", tar::EntryType::Regular, 2).as_bytes());
        tar.extend_from_slice(&[b'z'; 512]);
        tar.extend_from_slice(&[0u8; 1024]);
        assert!(through(&tar, 100).unwrap() == tar);
        let got = entries(&tar).unwrap();
        assert_eq!(got[0].2.len(), 1536);
        assert_eq!((got[1].0.as_str(), &got[1].2[..]), ("after", &b"zz"[..]));
        // The extension block is not read as a header: a decoy there passes.
        let mut tar2 = h.as_bytes().to_vec();
        let mut ext2 = decoy();
        ext2[..24].copy_from_slice(&ext[..24]);
        ext2[504] = 0;
        tar2.extend_from_slice(&ext2);
        tar2.extend_from_slice(&[b's'; 1024]);
        assert!(through(&tar2, 512).unwrap() == tar2);
    }

    /// The path of a regular file member, or why it is refused.
    fn file_path(rules: &mut MemberRules, name: &[u8]) -> Result<Vec<u8>, String> {
        rules
            .check(name, b'0', None, Some(0o644))
            .map(|m| m.expect("a member").path)
    }

    #[test]
    fn member_names_stay_beneath_the_target() {
        let path = |n: &str| file_path(&mut MemberRules::extract(), n.as_bytes());
        assert_eq!(path("src/a.py").unwrap(), b"src/a.py");
        assert_eq!(path("./src/a").unwrap(), b"src/a");
        assert_eq!(path("a//b/./c").unwrap(), b"a/b/c");
        let dir = MemberRules::extract().check(b"./", b'5', None, None).unwrap().unwrap();
        assert_eq!((dir.path.as_slice(), dir.mode), (&b""[..], 0o755));
        for (bad, why) in [
            ("/etc/passwd", "absolute"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("a/..", "'..'"),
            ("a\0b", "NUL"),
            ("", "empty"),
        ] {
            let e = path(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")) && e.contains(why), "{bad:?}: {e}");
        }
        assert!(path(&"a/".repeat(crate::MAX_PATH / 2 + 1))
            .unwrap_err()
            .contains("4096"));
        assert!(path(&"n".repeat(crate::MAX_NAME + 1)).unwrap_err().contains("255"));
        let e = MemberRules::extract().check(b"caf\xe9", b'0', None, None).unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn only_files_directories_and_symlinks_are_accepted() {
        let mut rules = MemberRules::extract();
        let mut check = |name: &[u8], t: u8, link: Option<&[u8]>, mode: Option<u32>| rules.check(name, t, link, mode);
        let m = check(b"run.sh", b'0', None, Some(0o104755)).unwrap().unwrap();
        assert_eq!(
            (m.kind, m.mode),
            (MemberKind::File, 0o755),
            "set-uid and type bits dropped"
        );
        assert_eq!(check(b"old", b'\0', None, None).unwrap().unwrap().mode, 0o644);
        assert_eq!(check(b"c", b'7', None, None).unwrap().unwrap().kind, MemberKind::File);
        let d = check(b"d/", b'5', None, Some(0o3777)).unwrap().unwrap();
        assert_eq!(
            (d.kind, d.mode),
            (MemberKind::Dir, 0o1777),
            "sticky kept, set-gid dropped"
        );
        let l = check(b"l", b'2', Some(b"/etc"), Some(0o777)).unwrap().unwrap();
        assert_eq!(l.kind, MemberKind::Symlink(b"/etc".to_vec()));
        assert_eq!(check(b"pax_global_header", b'g', None, None), Ok(None));
        for (t, link, why) in [
            (b'1', Some(&b"/etc/passwd"[..]), "hard links"),
            (b'3', None, "Char"),
            (b'4', None, "Block"),
            (b'6', None, "Fifo"),
            (b'S', None, "GNUSparse"),
            (b'V', None, "Other(86)"),
            (b'2', Some(&b""[..]), "link target"),
            (b'2', None, "link target"),
        ] {
            let e = check(b"x", t, link, None).unwrap_err();
            assert!(e.starts_with("member \"x\": ") && e.contains(why), "{e}");
        }
        let long = vec![b'a'; crate::MAX_PATH + 1];
        assert!(check(b"x", b'2', Some(&long), None).is_err());
        // The directory unpacked into can only be a directory.
        for t in [b'0', b'2'] {
            let e = check(b"./", t, Some(b"y"), None).unwrap_err();
            assert!(e.contains("must be a directory"), "{e}");
        }
    }

    #[test]
    fn symlink_members_are_not_gone_through_where_links_are_not_resolved() {
        /// (name, type, link target) of each member.
        type Members<'a> = [(&'a [u8], u8, Option<&'a [u8]>)];
        const MEMBERS: &Members = &[
            (b"l", b'2', Some(b"/etc")),
            (b"l", b'2', Some(b".")),
            (b"lx/a", b'0', None),
            (b"l/passwd", b'0', None),
            (b"./l/", b'5', None),
            (b"l", b'0', None),
        ];
        let tar = |rules: &mut MemberRules| -> Vec<Result<(), String>> {
            MEMBERS
                .iter()
                .map(|(n, t, l)| rules.check(n, *t, *l, None).map(|_| ()))
                .collect()
        };
        // The agent resolves every member beneath its root: the rules leave links to it.
        assert!(tar(&mut MemberRules::extract()).iter().all(|r| r.is_ok()));
        let got = tar(&mut MemberRules::extract_unresolved());
        assert_eq!(got[..3], [Ok(()), Ok(()), Ok(())]);
        assert_eq!(
            got[3].as_ref().unwrap_err(),
            "member \"l/passwd\": goes through the symlink member \"l\""
        );
        assert_eq!(
            got[4].as_ref().unwrap_err(),
            "member \"./l/\": replaces the symlink member \"l\""
        );
        assert_eq!(got[5], Ok(()), "a file may replace a link");
    }

    #[test]
    fn downloads_stay_under_the_directory_copied() {
        let mut rules = MemberRules::download("proj");
        for (name, t, rel) in [
            (&b"proj/"[..], b'5', &b""[..]),
            (b"proj", b'5', b""),
            (b"./proj/a.txt", b'0', b"a.txt"),
            (b"proj/sub/deep/x", b'0', b"sub/deep/x"),
            (b"proj//a", b'7', b"a"),
            (b"proj/caf\xe9", b'0', b"caf\xe9"),
        ] {
            let m = rules.check(name, t, None, None).unwrap().unwrap();
            assert_eq!(m.path, rel, "{name:?}");
        }
        rules.check(b"proj/link", b'2', Some(b"."), None).unwrap();
        for (name, t, why) in [
            (&b"../x"[..], b'0', "'..'"),
            (b"proj/../../x", b'0', "'..'"),
            (b"proj/a/../../other/x", b'0', "'..'"),
            (b"/etc/cron.d/x", b'0', "absolute"),
            (b"/proj/x", b'0', "absolute"),
            (b"other/x", b'0', "not under \"proj\""),
            (b"projx/a", b'0', "not under"),
            (b"./", b'5', "not under"),
            (b"proj", b'2', "\"proj\", the directory copied, must be a directory"),
            (b"proj", b'0', "must be a directory"),
            (b"proj/h", b'1', "hard links"),
            (b"proj/p", b'6', "Fifo"),
            (b"proj/link/x", b'0', "goes through the symlink member \"proj/link\""),
        ] {
            let e = rules.check(name, t, Some(b"t"), None).unwrap_err();
            assert!(
                e.contains(&format!("{:?}", String::from_utf8_lossy(name))) && e.contains(why),
                "{name:?}: {e}"
            );
        }
    }
}
