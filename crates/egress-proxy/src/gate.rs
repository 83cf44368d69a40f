//! The policy seam: what the proxy asks before it connects anywhere.

use std::net::IpAddr;
use std::sync::Arc;

use crate::event::EgressEvent;
use crate::mitm::Injector;

/// A gate's answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on; `rule` names the allow-list entry that matched, for the audit event.
    Allow { rule: String },
    /// Refuse. `reason` is a short code for the audit event and the answer (`"not_allowed"`),
    /// `message` the human explanation, `rule` the entry that denied, if one did.
    Deny {
        reason: String,
        message: String,
        rule: Option<String>,
    },
}

/// The egress policy of one workspace, as the proxy sees it.
///
/// Names reach the gate lowercased, without a trailing dot, and IPv6 literals without their
/// brackets (`::1`). Addresses reach it canonical: an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.1`) is passed as the IPv4 address it stands for, so a rule about IPv4
/// ranges cannot be stepped around by writing the address the other way.
pub trait Gate: Send + Sync {
    /// First check: the name (or IP literal) and port the client asked for.
    fn check_name(&self, host: &str, port: u16) -> Verdict;

    /// Second check: each resolved address, before connecting. Only an address this allowed
    /// is connected to, so a name cannot be rebound to another address between check and use.
    fn check_addr(&self, host: &str, addr: IpAddr, port: u16) -> Verdict;

    /// Called exactly once per connection, as soon as the proxy has decided and before it
    /// answers the client or forwards anything. The event has what is known then: the
    /// decision, rule and reason, the address connected to; byte counts are zero.
    ///
    /// The event [`Proxy::serve`](crate::Proxy::serve) returns at the end is the record to
    /// keep: an allowed tunnel can still end denied (`sni_mismatch`), and the byte counts,
    /// duration and error are known only then. The default does nothing.
    fn decided(&self, _event: &EgressEvent) {}

    /// Asked about an allowed `CONNECT`, after [`check_name`](Self::check_name) allowed it and
    /// before anything is resolved: whether the proxy is to terminate its TLS and hand its
    /// requests to the returned [`Injector`] (the host has a secret-injection rule), instead
    /// of relaying the tunnel untouched. Only a [`Proxy`](crate::Proxy) made
    /// [`with_interception`](crate::Proxy::with_interception) asks. The default, `None`,
    /// keeps every tunnel untouched.
    fn intercept(&self, _host: &str, _port: u16) -> Option<Arc<dyn Injector>> {
        None
    }
}
