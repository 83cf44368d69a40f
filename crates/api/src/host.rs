//! `Host` header check against DNS rebinding.
//!
//! A web page on an attacker's domain can make a browser send requests to 127.0.0.1 by
//! re-pointing its DNS name there; such requests still carry the attacker's name in `Host`.
//! The API therefore only answers requests addressed to `localhost`, a loopback address,
//! or the address it is bound to (any IP literal when bound to the unspecified address),
//! with or without a port. Everything else gets a 403 JSON error.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Which `Host` values are accepted.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    bind: IpAddr,
}

impl HostPolicy {
    pub fn new(bind: IpAddr) -> Self {
        HostPolicy { bind }
    }

    /// Whether a `Host` header value (`name`, `name:port`, `[v6]:port`) is acceptable.
    pub fn allows(&self, host: &str) -> bool {
        let name = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" {
            return true;
        }
        let literal = match name.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']'),
            None => Some(name.as_str()),
        };
        let Some(Ok(ip)) = literal.map(str::parse::<IpAddr>) else {
            return false;
        };
        ip.is_loopback() || ip == self.bind || self.bind.is_unspecified()
    }
}

/// `example:8081` → `example`, `[::1]:8081` → `[::1]`, `::1` stays as it is.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Middleware: refuses requests whose `Host` (or HTTP/2 authority) is not allowed.
pub async fn check_host(State(policy): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
    match host {
        Some(h) if policy.allows(&h) => next.run(req).await,
        Some(h) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!("requests for host {h:?} are not served; use localhost or the address the service is bound to"),
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "the request has no Host header",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_bind_allows_only_local_names() {
        let p = HostPolicy::new("127.0.0.1".parse().unwrap());
        for ok in [
            "localhost",
            "localhost:8081",
            "LOCALHOST.",
            "127.0.0.1",
            "127.0.0.1:9",
            "[::1]",
            "[::1]:8081",
            "::1",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8081",
            "localhost.evil.example",
            "10.0.0.5",
            "",
            "[::1",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }

    #[test]
    fn other_binds_add_their_address() {
        let p = HostPolicy::new("10.0.0.5".parse().unwrap());
        assert!(p.allows("10.0.0.5:8081"));
        assert!(p.allows("localhost"));
        assert!(!p.allows("10.0.0.6"));
        assert!(!p.allows("conductor.example"));
        let any = HostPolicy::new("0.0.0.0".parse().unwrap());
        assert!(any.allows("192.168.1.20:8081"));
        assert!(!any.allows("conductor.example:8081"));
    }
}
