//! Reading the server name out of a TLS ClientHello, to refuse domain fronting.
//!
//! A client allowed to `CONNECT cdn.allowed.example:443` could send a ClientHello naming
//! `evil.example`, served by the same CDN, and reach a host the policy never allowed. The
//! proxy therefore reads the ClientHello before forwarding it and compares its server name
//! with the `CONNECT` host.
//!
//! The parser works on untrusted bytes, so every length is checked against what is there and
//! nothing is indexed blindly. It fails closed: bytes that start like a TLS handshake record
//! but are not a well-formed ClientHello are [`FirstBytes::Malformed`], never passed through, since
//! a server may understand what this parser did not. It only decides what it must: the records
//! up to the end of the ClientHello message, and the `server_name` extension.

/// A ClientHello that has not ended within this many bytes is refused.
pub(crate) const MAX_HELLO_BYTES: usize = 16 * 1024;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST_NAME: u8 = 0x00;
const RECORD_HEADER_BYTES: usize = 5;
const MAX_RECORD_BYTES: usize = 1 << 14;

/// What the first bytes of a tunnel are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FirstBytes {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// Not a TLS handshake record: some other protocol, passed through.
    NotTls,
    /// A complete ClientHello, with its host name (lowercased) if it sent one.
    ClientHello { sni: Option<String> },
    /// Starts like TLS but is not a ClientHello this parser can vouch for.
    Malformed(&'static str),
}

/// Classifies the first bytes a client sent into a tunnel.
pub(crate) fn parse(data: &[u8]) -> FirstBytes {
    match data {
        [] | [CONTENT_TYPE_HANDSHAKE] => return FirstBytes::Incomplete,
        [first, ..] if *first != CONTENT_TYPE_HANDSHAKE => return FirstBytes::NotTls,
        // Every TLS record version has major 3; anything else is another protocol that
        // happens to start with 0x16.
        [_, major, ..] if *major != 3 => return FirstBytes::NotTls,
        _ => {}
    }
    // The ClientHello message may span several records: join their fragments.
    let mut message = Vec::new();
    let mut rest = data;
    loop {
        let Some((header, after)) = rest.split_first_chunk::<RECORD_HEADER_BYTES>() else {
            return FirstBytes::Incomplete;
        };
        if header[0] != CONTENT_TYPE_HANDSHAKE {
            return FirstBytes::Malformed("a record of another type inside the ClientHello");
        }
        if header[1] != 3 {
            return FirstBytes::Malformed("a record with an unknown version");
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_RECORD_BYTES {
            return FirstBytes::Malformed("a record with an impossible length");
        }
        let complete = after.len() >= length;
        let fragment = &after[..length.min(after.len())];
        message.extend_from_slice(fragment);
        if let Some(verdict) = check_message(&message) {
            return verdict;
        }
        if !complete {
            return FirstBytes::Incomplete;
        }
        rest = &after[length..];
    }
}

/// Looks at the handshake bytes joined so far: `None` while more are needed.
fn check_message(message: &[u8]) -> Option<FirstBytes> {
    let (&kind, after) = message.split_first()?;
    if kind != HANDSHAKE_CLIENT_HELLO {
        return Some(FirstBytes::Malformed(
            "the first handshake message is not a ClientHello",
        ));
    }
    let length = match after {
        [a, b, c, ..] => usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c),
        _ => return None,
    };
    if length + 4 + RECORD_HEADER_BYTES > MAX_HELLO_BYTES {
        return Some(FirstBytes::Malformed("a ClientHello larger than 16 KiB"));
    }
    let body = after.get(3..3 + length)?;
    Some(match server_name(body) {
        Ok(sni) => FirstBytes::ClientHello { sni },
        Err(why) => FirstBytes::Malformed(why),
    })
}

/// The host name in a ClientHello body (what follows the 4-byte handshake header).
fn server_name(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut hello = Reader(body);
    hello.take(2)?; // legacy_version
    hello.take(32)?; // random
    let session_id = hello.u8()?;
    if session_id > 32 {
        return Err("a session id longer than 32 bytes");
    }
    hello.take(usize::from(session_id))?;
    let cipher_suites = hello.u16()?;
    if cipher_suites == 0 || cipher_suites % 2 != 0 {
        return Err("a malformed cipher suite list");
    }
    hello.take(usize::from(cipher_suites))?;
    let compression = hello.u8()?;
    if compression == 0 {
        return Err("an empty compression method list");
    }
    hello.take(usize::from(compression))?;
    if hello.is_empty() {
        // No extensions at all (as old clients send): no server name.
        return Ok(None);
    }
    let length = hello.u16()?;
    let mut extensions = Reader(hello.take(usize::from(length))?);
    if !hello.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut sni = None;
    let mut seen = false;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let length = extensions.u16()?;
        let data = extensions.take(usize::from(length))?;
        if kind == EXTENSION_SERVER_NAME {
            // Two of them would let a server read another name than this parser did.
            if seen {
                return Err("two server_name extensions");
            }
            seen = true;
            sni = host_name(data)?;
        }
    }
    Ok(sni)
}

/// The host name in the data of a `server_name` extension.
fn host_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut extension = Reader(data);
    let length = extension.u16()?;
    let mut list = Reader(extension.take(usize::from(length))?);
    if !extension.is_empty() || list.is_empty() {
        return Err("a malformed server_name extension");
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let length = list.u16()?;
        let name = list.take(usize::from(length))?;
        if kind != NAME_TYPE_HOST_NAME {
            continue; // no other name type is defined; servers skip unknown ones too
        }
        if host.is_some() {
            return Err("two host names in server_name");
        }
        let valid = !name.is_empty()
            && name.len() <= 255
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err("a server name that is not a DNS name");
        }
        host = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
    }
    Ok(host)
}

/// Whether a server name and a `CONNECT` host name the same host: case-insensitively,
/// ignoring a trailing dot on either.
pub(crate) fn same_host(sni: &str, host: &str) -> bool {
    fn bare(name: &str) -> &str {
        name.strip_suffix('.').unwrap_or(name)
    }
    bare(sni).eq_ignore_ascii_case(bare(host))
}

/// A cursor over untrusted bytes whose every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

const TRUNCATED: &str = "a ClientHello field runs past its end";

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.0.len() {
            return Err(TRUNCATED);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A real ClientHello, as rustls sends it, with `name` as its server name (an IP address
    /// makes rustls send none).
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("server name");
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut bytes = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut bytes).expect("write to a Vec");
        }
        bytes
    }

    /// The same handshake message cut into records of at most `size` bytes.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let message = &hello[RECORD_HEADER_BYTES..];
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A minimal hand-made ClientHello whose extensions are `extensions` (raw).
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(message.len() as u16).to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    fn sni_extension(names: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(NAME_TYPE_HOST_NAME);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut extension = EXTENSION_SERVER_NAME.to_be_bytes().to_vec();
        extension.extend_from_slice(&(data.len() as u16).to_be_bytes());
        extension.extend_from_slice(&data);
        extension
    }

    fn sni(name: &str) -> FirstBytes {
        FirstBytes::ClientHello {
            sni: Some(name.to_owned()),
        }
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        assert_eq!(parse(&client_hello("Files.Example.com")), sni("files.example.com"));
    }

    #[test]
    fn a_client_hello_without_server_name_has_none() {
        assert_eq!(parse(&client_hello("127.0.0.1")), FirstBytes::ClientHello { sni: None });
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        let hello = client_hello("example.com");
        for end in 0..hello.len() {
            assert_eq!(parse(&hello[..end]), FirstBytes::Incomplete, "prefix of {end} bytes");
        }
    }

    #[test]
    fn a_client_hello_split_over_many_records_is_joined() {
        let hello = client_hello("example.com");
        for size in [1, 7, 100, 512] {
            let split = refragment(&hello, size);
            assert_eq!(parse(&split), sni("example.com"), "records of {size} bytes");
            assert_eq!(parse(&split[..split.len() - 1]), FirstBytes::Incomplete);
        }
    }

    #[test]
    fn bytes_after_the_client_hello_do_not_matter() {
        let mut hello = client_hello("example.com");
        hello.extend_from_slice(b"\x17\x03\x03 anything");
        assert_eq!(parse(&hello), sni("example.com"));
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), FirstBytes::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.6\r\n"), FirstBytes::NotTls);
        assert_eq!(parse(&[0x16, 0x42, 0x00]), FirstBytes::NotTls);
    }

    #[test]
    fn duplicate_server_names_are_refused() {
        let mut two_extensions = sni_extension(&["allowed.test"]);
        two_extensions.extend_from_slice(&sni_extension(&["evil.test"]));
        assert_eq!(
            parse(&hello_with_extensions(&two_extensions)),
            FirstBytes::Malformed("two server_name extensions")
        );
        assert_eq!(
            parse(&hello_with_extensions(&sni_extension(&["allowed.test", "evil.test"]))),
            FirstBytes::Malformed("two host names in server_name")
        );
        assert_eq!(
            parse(&hello_with_extensions(&sni_extension(&["one.test"]))),
            sni("one.test")
        );
    }

    #[test]
    fn odd_server_names_are_refused() {
        for name in ["", "evil.test\0allowed.test", "a b", "ünï.test"] {
            assert!(
                matches!(
                    parse(&hello_with_extensions(&sni_extension(&[name]))),
                    FirstBytes::Malformed(_)
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn non_handshake_records_and_messages_are_malformed() {
        let mut hello = client_hello("example.com");
        hello[RECORD_HEADER_BYTES] = 0x02; // a ServerHello
        assert_eq!(
            parse(&hello),
            FirstBytes::Malformed("the first handshake message is not a ClientHello")
        );
        let split = refragment(&client_hello("example.com"), 50);
        let mut mixed = split[..55].to_vec();
        mixed.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        assert_eq!(
            parse(&mixed),
            FirstBytes::Malformed("a record of another type inside the ClientHello")
        );
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            FirstBytes::Malformed("a record with an impossible length")
        );
    }

    #[test]
    fn a_huge_declared_length_is_refused_early() {
        let bytes = [0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff];
        assert_eq!(parse(&bytes), FirstBytes::Malformed("a ClientHello larger than 16 KiB"));
    }

    #[test]
    fn garbage_never_panics() {
        let hello = client_hello("example.com");
        // Every single-byte corruption of a real ClientHello, and some noise.
        for at in 0..hello.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bytes = hello.clone();
                bytes[at] ^= flip;
                let _ = parse(&bytes);
            }
        }
        let mut state = 0x2545_f491_u32;
        for _ in 0..2000 {
            let mut bytes = vec![0x16, 0x03];
            for _ in 0..(state % 300) {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                bytes.push(state as u8);
            }
            let _ = parse(&bytes);
        }
    }

    #[test]
    fn names_compare_without_case_and_trailing_dot() {
        assert!(same_host("Allowed.Test", "allowed.test"));
        assert!(same_host("allowed.test.", "allowed.test"));
        assert!(same_host("allowed.test", "allowed.test."));
        assert!(!same_host("evil.test", "allowed.test"));
        assert!(!same_host("allowed.test.evil", "allowed.test"));
    }
}
