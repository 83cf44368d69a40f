//! [`TarGuard`]: a reader adapter that bounds the memory a tar parser can be made to spend.
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
//! padding) are passed through and the blocks after them are read as headers again. No
//! dependency beyond `std`.

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
}
