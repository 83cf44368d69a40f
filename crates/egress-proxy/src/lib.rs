//! The host side of a proxy-mode workspace's network.
//!
//! A workspace in proxy mode has only loopback. Its agent listens on `127.0.0.1:3128` and
//! relays every TCP connection over a per-workspace Unix socket to the host, where conductor
//! hands each accepted stream to [`Proxy::serve`]. The proxy speaks HTTP/1.1 proxy protocol:
//! `CONNECT host:port` tunnels and absolute-URI plain HTTP requests (`GET http://host/path`).
//!
//! Every connection goes through the same steps, and ends in exactly one [`EgressEvent`]:
//!
//! 1. read the request head (bounded in size and time);
//! 2. ask the [`Gate`] about the name and port ([`Gate::check_name`]);
//! 3. resolve the name (the test-only override map first, then DNS; IP literals skip DNS)
//!    and ask the gate about every address ([`Gate::check_addr`]); only an address that was
//!    checked is ever connected to, so a DNS answer cannot be swapped between check and use;
//! 4. connect to the first allowed address that answers, then tunnel or forward;
//! 5. inside a `CONNECT` tunnel, hold the client's first bytes back until they are known not
//!    to be a TLS ClientHello, or to be one whose server name (SNI) is the `CONNECT` host: a
//!    different name is domain fronting and closes the tunnel before a byte reaches upstream.
//!
//! Refusals are answered in plain text that names the host, the reason and how to allow it,
//! so that the agent in the workspace (often a program driven by a model) can tell the user
//! what to change. A cap on concurrent connections per workspace is a [`ConnectionLimiter`]
//! used with [`Proxy::serve_limited`].
//!
//! The policy itself is not here: the caller adapts its own policy type to [`Gate`].
//!
//! For hosts that have a secret-injection rule, [`mitm`] terminates the client's TLS inside
//! the `CONNECT` with a leaf from a per-instance CA, verifies the upstream, and hands each
//! request's headers to an [`mitm::Injector`], so that a secret never enters the workspace.
//! A [`Proxy::with_interception`] asks [`Gate::intercept`] about every allowed `CONNECT`
//! (after the name check, before resolving): when the gate returns an injector, the proxy
//! resolves and checks the addresses as for any tunnel, answers `200`, and hands the client to
//! [`mitm::intercept_with`] with the first allowed address; the event gets the interception's
//! byte counts, server name, error and [`EgressEvent::injected`] secret names.
//!
//! # Design notes
//!
//! - A `CONNECT` is connected upstream *before* the `200` reply, so that a refused or silent
//!   port is answered `502` with the error rather than a tunnel that dies; the ClientHello is
//!   checked after the reply but before any client byte is forwarded, so a fronting attempt
//!   costs the upstream one TCP connection that never carries a byte. The upstream's bytes flow
//!   at once, so server-speaks-first protocols (SSH, SMTP) work through the tunnel.
//! - The SNI check fails closed: bytes that start like a TLS record but are not a ClientHello
//!   the parser can read whole (within 16 KiB) are refused as `bad_client_hello`. An Encrypted
//!   ClientHello shows its public outer name, which is refused unless it is the `CONNECT` host.
//! - The bytes of a tunnel (after its ClientHello is checked) and of a forwarded request
//!   (after its head) are moved between the two sockets by `splice(2)` through a pipe per
//!   direction, never entering user space; see `relay.rs`. A client stream that is not a
//!   tokio socket is copied through a buffer instead. Intercepted TLS goes through hyper.
//! - Plain HTTP is forwarded with `Host` taken from the URL (not the client's header, which
//!   could name another virtual host on the allowed server) and `Connection: close`, so the
//!   exchange ends with the upstream's response. Bytes the client sends after its first
//!   request go to the same upstream unread; `Connection` upgrades (WebSocket over plain
//!   HTTP) are not carried: clients use `CONNECT` for those.

mod event;
mod gate;
mod head;
mod limit;
pub mod mitm;
mod proxy;
mod relay;
mod sni;

pub use event::{Decision, EgressEvent};
pub use gate::{Gate, Verdict};
pub use limit::{ConnectionLimiter, ConnectionPermit};
pub use proxy::{Interception, Proxy, ProxyConfig};
