//! The audit record of one connection attempt.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// Whether the proxy let the connection through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied,
}

/// One connection attempt through the proxy, from accept to close.
///
/// A connection the gate allowed but that failed (the upstream refused, DNS failed) is
/// `Allowed` with `error` set; a denial always has `reason` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressEvent {
    pub started_at: SystemTime,
    /// `"CONNECT"`, `"GET"`, …; empty when no request head could be read.
    pub method: String,
    /// Lowercased, without a trailing dot or IPv6 brackets; empty when no target was read.
    pub host: String,
    pub port: u16,
    /// The address actually connected to.
    pub resolved: Option<IpAddr>,
    pub decision: Decision,
    /// The rule that allowed (the name check's) or denied the connection.
    pub rule: Option<String>,
    /// The short code of a denial: the gate's, or one of the proxy's own: `bad_request`,
    /// `request_timeout`, `sni_mismatch`, `bad_client_hello`, `connection_limit`.
    pub reason: Option<String>,
    /// The TLS server name the client sent inside a `CONNECT` tunnel, if it sent one.
    pub sni: Option<String>,
    /// Bytes delivered to the upstream (for plain HTTP, including the rewritten request head).
    pub bytes_up: u64,
    /// Bytes delivered from the upstream to the client.
    pub bytes_down: u64,
    pub duration: Duration,
    /// What went wrong: why a connection failed (DNS, connect) or ended abnormally (idle
    /// timeout, reset), or the detail of a denial made by the proxy itself (a bad request,
    /// the two names of an `sni_mismatch`, the connection limit). Gate denials leave it empty.
    pub error: Option<String>,
    /// For an intercepted `CONNECT` (a host with a secret-injection rule, see
    /// [`Gate::intercept`](crate::Gate::intercept)): the names of the secrets put into its
    /// requests, in first-use order. Never values. Empty for every other connection.
    pub injected: Vec<String>,
}

impl EgressEvent {
    pub(crate) fn begin() -> Self {
        Self {
            started_at: SystemTime::now(),
            method: String::new(),
            host: String::new(),
            port: 0,
            resolved: None,
            decision: Decision::Denied,
            rule: None,
            reason: None,
            sni: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
            error: None,
            injected: Vec::new(),
        }
    }

    pub(crate) fn deny(&mut self, reason: &str, rule: Option<String>) {
        self.decision = Decision::Denied;
        self.reason = Some(reason.to_owned());
        self.rule = rule;
    }
}
