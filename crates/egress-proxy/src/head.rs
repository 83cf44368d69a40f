//! Reading a proxy request head and making sense of its target.

use std::io;
use std::net::{IpAddr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// More header lines than this is a malformed request.
const MAX_HEADERS: usize = 100;

/// The longest DNS name.
const MAX_NAME_BYTES: usize = 253;

/// A request head as read, before its target is understood.
#[derive(Debug)]
pub(crate) struct RawHead {
    pub method: String,
    pub target: String,
    /// The `x` of `HTTP/1.x`.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes the client sent after the head (a body, or the start of a tunnel).
    pub rest: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("the client closed the connection before sending a complete request head")]
    Closed,
    #[error("the request head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    #[error("reading the request head: {0}")]
    Io(#[from] io::Error),
}

/// Reads until a complete head, keeping whatever arrived after it.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(client: &mut S, max_bytes: usize) -> Result<RawHead, HeadError> {
    let mut buf = Vec::with_capacity(max_bytes.min(8 * 1024));
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(length)) => {
                    return Ok(RawHead {
                        method: request.method.unwrap_or_default().to_owned(),
                        target: request.path.unwrap_or_default().to_owned(),
                        version: request.version.unwrap_or(1),
                        headers: request
                            .headers
                            .iter()
                            .map(|header| (header.name.to_owned(), header.value.to_vec()))
                            .collect(),
                        rest: buf[length..].to_vec(),
                    });
                }
                Ok(httparse::Status::Partial) => {}
                Err(error) => return Err(HeadError::Malformed(error)),
            }
        }
        if buf.len() >= max_bytes {
            return Err(HeadError::TooLarge(max_bytes));
        }
        let filled = buf.len();
        buf.resize(max_bytes.min(filled + 8 * 1024), 0);
        let n = client.read(&mut buf[filled..]).await?;
        buf.truncate(filled + n);
        if n == 0 {
            return Err(HeadError::Closed);
        }
    }
}

/// Where a request wants to go.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `CONNECT host:port`.
    Tunnel { host: String, port: u16 },
    /// `GET http://host[:port]/path`: forward in origin-form (`path`, with its query).
    Forward { host: String, port: u16, path: String },
}

impl Target {
    pub fn host(&self) -> &str {
        match self {
            Target::Tunnel { host, .. } | Target::Forward { host, .. } => host,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Target::Tunnel { port, .. } | Target::Forward { port, .. } => *port,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TargetError {
    #[error("{0:?} is not a proxy request: send an absolute URL (GET http://host/path) or CONNECT host:port")]
    NotProxyRequest(String),
    #[error("only http:// URLs are forwarded, not {0:?}; for https use CONNECT host:443")]
    UnsupportedScheme(String),
    #[error("bad host or port in {authority:?}: {why}")]
    BadAuthority { authority: String, why: &'static str },
}

/// Understands the target of a request with `method`.
pub(crate) fn parse_target(method: &str, target: &str) -> Result<Target, TargetError> {
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = parse_authority(target, None)?;
        return Ok(Target::Tunnel { host, port });
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(TargetError::NotProxyRequest(target.to_owned()));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(TargetError::UnsupportedScheme(target.to_owned()));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let (host, port) = parse_authority(authority, Some(80))?;
    let path = match path.split_once('#') {
        Some((path, _fragment)) => path,
        None => path,
    };
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Ok(Target::Forward { host, port, path })
}

/// `host:port`, `[v6]:port`, or without the port when there is a default. The host comes
/// back lowercased, without a trailing dot or brackets.
fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), TargetError> {
    let bad = |why| TargetError::BadAuthority {
        authority: authority.to_owned(),
        why,
    };
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']').ok_or_else(|| bad("an unclosed '['"))?;
        let v6: Ipv6Addr = v6.parse().map_err(|_| bad("not an IPv6 address inside '[…]'"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
        };
        (v6.to_string(), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.contains(':') {
            return Err(bad("an IPv6 address must be in brackets, as [::1]:443"));
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let valid = !host.is_empty()
            && host.len() <= MAX_NAME_BYTES
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(bad("not a host name"));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match (port, default_port) {
        // All digits: `u16::from_str` would also take "+443".
        (Some(text), _) => Some(text)
            .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|text| text.parse::<u16>().ok())
            .filter(|port| *port != 0)
            .ok_or_else(|| bad("not a port number"))?,
        (None, Some(default)) => default,
        (None, None) => return Err(bad("a port is required, as host:443")),
    };
    Ok((host, port))
}

/// `host:port`, with brackets around an IPv6 host.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The request head to send upstream: origin-form, `Host` from the URL, no hop-by-hop or
/// proxy headers, `Connection: close`.
///
/// `Host` is replaced as RFC 9112 §3.2.2 asks of a proxy given an absolute URL; keeping the
/// client's would let it name another virtual host on the allowed server.
pub(crate) fn forward_head(head: &RawHead, host: &str, port: u16, path: &str) -> Vec<u8> {
    // Headers the client named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    let named: Vec<String> = head
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("proxy-connection"))
        .flat_map(|(_, value)| {
            String::from_utf8_lossy(value)
                .split(',')
                .map(|token| token.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let dropped = |name: &str| {
        let name = name.to_ascii_lowercase();
        matches!(
            name.as_str(),
            "host" | "connection" | "proxy-connection" | "proxy-authorization" | "keep-alive"
        ) || named.contains(&name)
    };
    let authority = if port == 80 {
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{host}]"),
            _ => host.to_owned(),
        }
    } else {
        host_port(host, port)
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(
        format!(
            "{} {path} HTTP/1.{}\r\nHost: {authority}\r\n",
            head.method, head.version
        )
        .as_bytes(),
    );
    for (name, value) in head.headers.iter().filter(|(name, _)| !dropped(name)) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(host: &str, port: u16) -> Target {
        Target::Tunnel {
            host: host.to_owned(),
            port,
        }
    }

    fn forward(host: &str, port: u16, path: &str) -> Target {
        Target::Forward {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        }
    }

    #[test]
    fn connect_targets() {
        assert_eq!(
            parse_target("CONNECT", "Files.Example.COM.:443"),
            Ok(tunnel("files.example.com", 443))
        );
        assert_eq!(parse_target("CONNECT", "[::1]:8443"), Ok(tunnel("::1", 8443)));
        assert_eq!(
            parse_target("CONNECT", "[2001:DB8::1]:443"),
            Ok(tunnel("2001:db8::1", 443))
        );
        assert_eq!(parse_target("CONNECT", "10.0.0.1:22"), Ok(tunnel("10.0.0.1", 22)));
    }

    #[test]
    fn bad_connect_targets() {
        for target in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+443",
            "::1:443",
            "[::1]",
            "[::1:443",
            "[::1]x:443",
            "[example.com]:443",
            ":443",
            "exa mple.com:443",
            "user@example.com:443",
            "/path",
        ] {
            assert!(
                matches!(parse_target("CONNECT", target), Err(TargetError::BadAuthority { .. })),
                "{target:?}"
            );
        }
    }

    #[test]
    fn absolute_urls() {
        assert_eq!(
            parse_target("GET", "http://Example.com/a/b?c=d"),
            Ok(forward("example.com", 80, "/a/b?c=d"))
        );
        assert_eq!(
            parse_target("GET", "HTTP://example.com:8080"),
            Ok(forward("example.com", 8080, "/"))
        );
        assert_eq!(
            parse_target("GET", "http://example.com?q"),
            Ok(forward("example.com", 80, "/?q"))
        );
        assert_eq!(
            parse_target("GET", "http://[::1]:81/x#frag"),
            Ok(forward("::1", 81, "/x"))
        );
        assert_eq!(parse_target("GET", "http://[::1]/"), Ok(forward("::1", 80, "/")));
    }

    #[test]
    fn requests_that_are_not_for_a_proxy() {
        assert_eq!(
            parse_target("GET", "/index.html"),
            Err(TargetError::NotProxyRequest("/index.html".into()))
        );
        assert_eq!(
            parse_target("OPTIONS", "*"),
            Err(TargetError::NotProxyRequest("*".into()))
        );
        assert_eq!(
            parse_target("GET", "https://example.com/"),
            Err(TargetError::UnsupportedScheme("https://example.com/".into()))
        );
        assert!(matches!(
            parse_target("GET", "http://user:pw@example.com/"),
            Err(TargetError::BadAuthority { .. })
        ));
    }

    #[test]
    fn brackets_only_around_ipv6() {
        assert_eq!(host_port("::1", 443), "[::1]:443");
        assert_eq!(host_port("127.0.0.1", 443), "127.0.0.1:443");
        assert_eq!(host_port("example.com", 80), "example.com:80");
    }

    #[tokio::test]
    async fn reads_a_head_in_pieces_and_keeps_what_follows() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move { read_head(&mut server, 4096).await });
        use tokio::io::AsyncWriteExt;
        for piece in ["POST http://a.test/ HTTP/1.0\r\nContent-", "Length: 3\r\n", "\r\nabc"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::task::yield_now().await;
        }
        let head = reader.await.unwrap().expect("a complete head");
        assert_eq!(
            (head.method.as_str(), head.target.as_str(), head.version),
            ("POST", "http://a.test/", 0)
        );
        assert_eq!(head.headers, vec![("Content-Length".to_owned(), b"3".to_vec())]);
        assert_eq!(head.rest, b"abc");
    }

    #[tokio::test]
    async fn head_errors() {
        let mut closed: &[u8] = b"GET http://a.test/ HTTP/1.1\r\n";
        assert!(matches!(read_head(&mut closed, 4096).await, Err(HeadError::Closed)));
        let mut huge: &[u8] = &[b'a'; 5000];
        assert!(matches!(
            read_head(&mut huge, 4096).await,
            Err(HeadError::TooLarge(4096))
        ));
        let mut garbage: &[u8] = b"\x00\x01\x02 / HTTP/1.1\r\n\r\n";
        assert!(matches!(
            read_head(&mut garbage, 4096).await,
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn forwarded_head_is_origin_form_without_proxy_headers() {
        let head = RawHead {
            method: "GET".into(),
            target: "http://a.test:8080/x?y".into(),
            version: 1,
            headers: vec![
                ("Host".into(), b"evil.test".to_vec()),
                ("Proxy-Connection".into(), b"keep-alive".to_vec()),
                ("Proxy-Authorization".into(), b"Basic eDp5".to_vec()),
                ("Connection".into(), b"keep-alive, X-Hop".to_vec()),
                ("X-Hop".into(), b"1".to_vec()),
                ("Accept".into(), b"*/*".to_vec()),
            ],
            rest: Vec::new(),
        };
        let out = forward_head(&head, "a.test", 8080, "/x?y");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x?y HTTP/1.1\r\nHost: a.test:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let out = forward_head(&head, "::1", 80, "/");
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("GET / HTTP/1.1\r\nHost: [::1]\r\n"));
    }
}
