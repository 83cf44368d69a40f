//! Egress confinement of a workspace's network namespace.
//!
//! A workspace in the bridged `egress` mode sits on its own Podman bridge, with the host at
//! the bridge's gateway address. Without further rules the workload reaches every service
//! the host listens with on `0.0.0.0` (at the gateway, or at any other host address, which
//! the host routes to itself), every private network the host can reach, and the cloud
//! metadata address. [`confine`] closes that: it enters the container's network namespace
//! from the host (`nsenter --net=/proc/<pid>/ns/net`) and loads one filter table there with
//! a single atomic `iptables-restore` (and one `ip6tables-restore`). The rules live in the
//! container's own namespace, so they hold whatever the host's firewall looks like and do
//! not interfere with netavark's rules on the host; the workload has no `CAP_NET_ADMIN`, so
//! it can neither see nor change them.
//!
//! The IPv4 `OUTPUT` chain (the container's own traffic), in order:
//!
//! 1. accept `ESTABLISHED,RELATED` (replies to connections made *into* the container, such
//!    as published ports, and the rest of connections already allowed);
//! 2. accept everything leaving through `lo` (the container talking to itself, including at
//!    its own bridge address);
//! 3. accept UDP and TCP port 53 to the gateway (aardvark-dns);
//! 4. reject everything else to the gateway, to each host address given, and to the
//!    private and special ranges in [`BLOCKED_V4`] (which include loopback, link-local and
//!    with it the metadata address `169.254.169.254`, multicast and broadcast);
//! 5. accept the rest: the public internet.
//!
//! Rejecting means a TCP reset for TCP and an ICMP port-unreachable for the rest, so a
//! client fails at once with "connection refused" instead of hanging until its timeout.
//!
//! IPv6: conductor's workspace networks are IPv4-only, so the container has no IPv6 route
//! off its bridge, only link-local addresses, and those reach nothing but the host (its
//! link-local address on the bridge, hence every host service listening on `::`). All
//! IPv6 egress except loopback is therefore rejected; the host's IPv6 addresses need no
//! rules of their own. Should workspace networks ever get IPv6, [`rules`] must grow an
//! IPv6 list like the IPv4 one.
//!
//! Applying is idempotent: `iptables-restore` (without `--noflush`) replaces the whole
//! `filter` table in the namespace, so a second application leaves exactly one copy of
//! the rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::ServiceError;

/// The user chain every rejected packet jumps to.
const REJECT_CHAIN: &str = "CONDUCTOR-REJECT";

/// How long one `nsenter … iptables-restore` may take before it is given up on.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// The IPv4 ranges a workspace may not reach, besides the host's own addresses: "this
/// network", RFC 1918, carrier-grade NAT (RFC 6598), loopback, link-local (with the cloud
/// metadata address), IETF protocol assignments, benchmarking (RFC 2544), multicast, and
/// reserved (240.0.0.0/4, which holds the limited broadcast address 255.255.255.255).
pub const BLOCKED_V4: [(Ipv4Addr, u8); 11] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Confines the network namespace of the process `pid` (a workspace container's main
/// process, as the engine reports it): see the module documentation for the rules.
///
/// `gateway` is the workspace bridge's gateway (the host, and the DNS server);
/// `host_addrs` are the host's own addresses ([`host_addresses`]), rejected explicitly
/// so that a host with a public address is not reachable at it either.
///
/// Call it after the container started and before the workload may use the network. On
/// error the namespace may be confined partly or not at all: the caller must not let the
/// workload run (stop the container).
pub async fn confine(pid: u32, gateway: Ipv4Addr, host_addrs: &[IpAddr]) -> Result<(), ServiceError> {
    if pid == 0 {
        return Err(ServiceError::host(
            "confine workspace network",
            "no process id for the container (is it running?)",
        ));
    }
    confine_netns(Path::new(&format!("/proc/{pid}/ns/net")), gateway, host_addrs).await
}

/// [`confine`] for a network namespace given by path (`/proc/<pid>/ns/net`, or a named
/// namespace's `/run/netns/<name>`).
///
/// Refuses the namespace this process runs in (and that of PID 1): loading these rules
/// there would cut the host itself off from every private network.
pub(crate) async fn confine_netns(netns: &Path, gateway: Ipv4Addr, host_addrs: &[IpAddr]) -> Result<(), ServiceError> {
    const OP: &str = "confine workspace network";
    if is_host_netns(netns).map_err(|e| ServiceError::host(OP, format!("{}: {e}", netns.display())))? {
        return Err(ServiceError::host(
            OP,
            format!(
                "{} is the host's own network namespace; refusing to firewall the host",
                netns.display()
            ),
        ));
    }
    let (v4, v6) = rules(gateway, host_addrs);
    restore(netns, "iptables-restore", &v4).await?;
    if Path::new("/proc/net/if_inet6").exists() {
        restore(netns, "ip6tables-restore", &v6).await?;
    } else {
        // A kernel without IPv6 (booted with ipv6.disable=1) has no IPv6 egress to close,
        // and ip6tables-restore would fail for want of the protocol.
        tracing::debug!("no IPv6 in this kernel; skipping the IPv6 rules");
    }
    Ok(())
}

/// Whether `netns` is the network namespace of this process or of PID 1.
fn is_host_netns(netns: &Path) -> std::io::Result<bool> {
    let target = std::fs::metadata(netns)?;
    let id = (target.dev(), target.ino());
    for own in ["/proc/self/ns/net", "/proc/1/ns/net"] {
        match std::fs::metadata(own) {
            Ok(m) if (m.dev(), m.ino()) == id => return Ok(true),
            Ok(_) => {}
            // PID 1's namespace may be out of sight (another PID namespace); ours is not.
            Err(_) if own == "/proc/1/ns/net" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Runs `nsenter --net=<netns> <tool>` with `text` on its standard input.
async fn restore(netns: &Path, tool: &str, text: &str) -> Result<(), ServiceError> {
    let op = format!("{tool} in {}", netns.display());
    let mut net_arg = std::ffi::OsString::from("--net=");
    net_arg.push(netns);
    let mut child = tokio::process::Command::new("nsenter")
        .arg(net_arg)
        .arg("--")
        .arg(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ServiceError::host(&op, format!("cannot run nsenter: {e}")))?;
    let run = async {
        let mut stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
        stdin.write_all(text.as_bytes()).await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(RESTORE_TIMEOUT, run)
        .await
        .map_err(|_| ServiceError::host(&op, format!("no answer within {RESTORE_TIMEOUT:?}")))?
        .map_err(|e| ServiceError::host(&op, e))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ServiceError::host(&op, format!("{}: {}", output.status, stderr.trim())));
    }
    Ok(())
}

/// The rule sets for [`confine`]: the `iptables-restore` text and the `ip6tables-restore`
/// text. Deterministic: host addresses are sorted and deduplicated, and those the gateway
/// or a [`BLOCKED_V4`] range already covers are left out (IPv4-mapped IPv6 addresses count
/// as IPv4; other IPv6 addresses need no rule, as all IPv6 egress is rejected).
pub fn rules(gateway: Ipv4Addr, host_addrs: &[IpAddr]) -> (String, String) {
    let mut hosts: Vec<Ipv4Addr> = host_addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        })
        .filter(|a| *a != gateway && !blocked_v4(*a))
        .collect();
    hosts.sort();
    hosts.dedup();

    let mut v4 = String::new();
    let mut line = |s: &str| {
        v4.push_str(s);
        v4.push('\n');
    };
    line("# conductor: workspace egress confinement (generated)");
    line("*filter");
    line(":INPUT ACCEPT [0:0]");
    line(":FORWARD ACCEPT [0:0]");
    line(":OUTPUT ACCEPT [0:0]");
    line(&format!(":{REJECT_CHAIN} - [0:0]"));
    line(&format!("-A {REJECT_CHAIN} -p tcp -j REJECT --reject-with tcp-reset"));
    line(&format!(
        "-A {REJECT_CHAIN} -j REJECT --reject-with icmp-port-unreachable"
    ));
    line("-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    line("-A OUTPUT -o lo -j ACCEPT");
    line(&format!("-A OUTPUT -d {gateway}/32 -p udp -m udp --dport 53 -j ACCEPT"));
    line(&format!("-A OUTPUT -d {gateway}/32 -p tcp -m tcp --dport 53 -j ACCEPT"));
    line(&format!("-A OUTPUT -d {gateway}/32 -j {REJECT_CHAIN}"));
    for host in &hosts {
        line(&format!("-A OUTPUT -d {host}/32 -j {REJECT_CHAIN}"));
    }
    for (net, len) in BLOCKED_V4 {
        line(&format!("-A OUTPUT -d {net}/{len} -j {REJECT_CHAIN}"));
    }
    line("COMMIT");

    let v6 = format!(
        "# conductor: workspace egress confinement (generated); no IPv6 egress but loopback\n\
         *filter\n\
         :INPUT ACCEPT [0:0]\n\
         :FORWARD ACCEPT [0:0]\n\
         :OUTPUT DROP [0:0]\n\
         :{REJECT_CHAIN} - [0:0]\n\
         -A {REJECT_CHAIN} -p tcp -j REJECT --reject-with tcp-reset\n\
         -A {REJECT_CHAIN} -j REJECT --reject-with icmp6-port-unreachable\n\
         -A OUTPUT -o lo -j ACCEPT\n\
         -A OUTPUT -j {REJECT_CHAIN}\n\
         COMMIT\n"
    );
    (v4, v6)
}

/// Whether `addr` lies in one of the [`BLOCKED_V4`] ranges.
fn blocked_v4(addr: Ipv4Addr) -> bool {
    BLOCKED_V4.iter().any(|&(net, len)| {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        u32::from(addr) & mask == u32::from(net)
    })
}

/// The host's own addresses, IPv4 and IPv6, on every interface (loopback included),
/// sorted and deduplicated, as seen from the network namespace this process runs in.
///
/// Read from `ip -j addr show`; when that fails, from `/proc/net/fib_trie` (IPv4) and
/// `/proc/net/if_inet6` (IPv6). Empty if neither can be read. Blocking (it runs `ip`):
/// call it from a blocking context or accept a few milliseconds on the runtime.
pub fn host_addresses() -> Vec<IpAddr> {
    let from_ip = std::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| parse_ip_json(&o.stdout));
    let mut addrs = match from_ip {
        Some(addrs) => addrs,
        None => {
            let mut addrs = std::fs::read_to_string("/proc/net/fib_trie")
                .map(|t| parse_fib_trie(&t))
                .unwrap_or_default();
            addrs.extend(
                std::fs::read_to_string("/proc/net/if_inet6")
                    .map(|t| parse_if_inet6(&t))
                    .unwrap_or_default(),
            );
            addrs
        }
    };
    addrs.sort();
    addrs.dedup();
    addrs
}

/// The `local` addresses in `ip -j addr show` output; `None` if it is not that JSON.
fn parse_ip_json(json: &[u8]) -> Option<Vec<IpAddr>> {
    let links: Vec<serde_json::Value> = serde_json::from_slice(json).ok()?;
    Some(
        links
            .iter()
            .filter_map(|link| link.get("addr_info")?.as_array())
            .flatten()
            .filter_map(|info| info.get("local")?.as_str()?.parse().ok())
            .collect(),
    )
}

/// The local (`/32 host LOCAL`) addresses in `/proc/net/fib_trie`.
fn parse_fib_trie(text: &str) -> Vec<IpAddr> {
    let mut addrs = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(addr) = line.parse::<Ipv4Addr>() {
            last = Some(addr);
        } else if line.starts_with("/32 host LOCAL") {
            addrs.extend(last.take().map(IpAddr::V4));
        }
    }
    addrs
}

/// The addresses in `/proc/net/if_inet6` (32 hex digits first on each line).
fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            if hex.len() != 32 {
                return None;
            }
            u128::from_str_radix(hex, 16)
                .ok()
                .map(|bits| IpAddr::V6(Ipv6Addr::from(bits)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exact_text() {
        let gateway = Ipv4Addr::new(10, 89, 0, 1);
        let host_addrs: Vec<IpAddr> = [
            "127.0.0.1",
            "::1",
            "203.0.113.9",
            "10.89.0.1",
            "192.168.1.20",
            "fe80::1",
            "198.51.100.7",
            "203.0.113.9",
            "::ffff:198.51.100.200",
            "10.89.0.9",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let (v4, v6) = rules(gateway, &host_addrs);
        assert_eq!(
            v4,
            "# conductor: workspace egress confinement (generated)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CONDUCTOR-REJECT - [0:0]
-A CONDUCTOR-REJECT -p tcp -j REJECT --reject-with tcp-reset
-A CONDUCTOR-REJECT -j REJECT --reject-with icmp-port-unreachable
-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -d 10.89.0.1/32 -p udp -m udp --dport 53 -j ACCEPT
-A OUTPUT -d 10.89.0.1/32 -p tcp -m tcp --dport 53 -j ACCEPT
-A OUTPUT -d 10.89.0.1/32 -j CONDUCTOR-REJECT
-A OUTPUT -d 198.51.100.7/32 -j CONDUCTOR-REJECT
-A OUTPUT -d 198.51.100.200/32 -j CONDUCTOR-REJECT
-A OUTPUT -d 203.0.113.9/32 -j CONDUCTOR-REJECT
-A OUTPUT -d 0.0.0.0/8 -j CONDUCTOR-REJECT
-A OUTPUT -d 10.0.0.0/8 -j CONDUCTOR-REJECT
-A OUTPUT -d 100.64.0.0/10 -j CONDUCTOR-REJECT
-A OUTPUT -d 127.0.0.0/8 -j CONDUCTOR-REJECT
-A OUTPUT -d 169.254.0.0/16 -j CONDUCTOR-REJECT
-A OUTPUT -d 172.16.0.0/12 -j CONDUCTOR-REJECT
-A OUTPUT -d 192.0.0.0/24 -j CONDUCTOR-REJECT
-A OUTPUT -d 192.168.0.0/16 -j CONDUCTOR-REJECT
-A OUTPUT -d 198.18.0.0/15 -j CONDUCTOR-REJECT
-A OUTPUT -d 224.0.0.0/4 -j CONDUCTOR-REJECT
-A OUTPUT -d 240.0.0.0/4 -j CONDUCTOR-REJECT
COMMIT
"
        );
        assert_eq!(
            v6,
            "# conductor: workspace egress confinement (generated); no IPv6 egress but loopback
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT DROP [0:0]
:CONDUCTOR-REJECT - [0:0]
-A CONDUCTOR-REJECT -p tcp -j REJECT --reject-with tcp-reset
-A CONDUCTOR-REJECT -j REJECT --reject-with icmp6-port-unreachable
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -j CONDUCTOR-REJECT
COMMIT
"
        );
        // The same addresses in another order give the same text.
        let mut reversed = host_addrs.clone();
        reversed.reverse();
        assert_eq!(rules(gateway, &reversed).0, v4);
    }

    #[test]
    fn blocked_ranges() {
        for blocked in [
            "0.1.2.3",
            "10.255.0.1",
            "100.127.255.255",
            "127.0.0.53",
            "169.254.169.254",
            "172.31.0.1",
            "192.0.0.170",
            "192.168.0.1",
            "198.19.255.255",
            "224.0.0.251",
            "239.255.255.250",
            "255.255.255.255",
        ] {
            assert!(blocked_v4(blocked.parse().unwrap()), "{blocked}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "192.0.1.1",
            "198.20.0.1",
        ] {
            assert!(!blocked_v4(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn parses_ip_json() {
        let json = br#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8},{"family":"inet6","local":"::1","prefixlen":128}]},{"ifindex":2,"ifname":"ifb0","addr_info":[]},{"ifindex":4,"ifname":"eth0","addr_info":[{"family":"inet","local":"192.0.2.2","prefixlen":24,"broadcast":"192.0.2.255"},{"family":"inet6","local":"fe80::fc:ff:fe00:1","prefixlen":64}]},{"ifindex":5,"ifname":"x"}]"#;
        let addrs = parse_ip_json(json).unwrap();
        let want: Vec<IpAddr> = ["127.0.0.1", "::1", "192.0.2.2", "fe80::fc:ff:fe00:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(addrs, want);
        assert!(parse_ip_json(b"Object \"addr\" is unknown").is_none());
    }

    #[test]
    fn parses_proc_files() {
        let fib = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
";
        let want: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "192.0.2.2".parse().unwrap()];
        assert_eq!(parse_fib_trie(fib), want);
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 80     eth0
";
        let want: Vec<IpAddr> = vec!["::1".parse().unwrap(), "fd00::2".parse().unwrap()];
        assert_eq!(parse_if_inet6(inet6), want);
    }

    #[test]
    fn lists_host_addresses() {
        let addrs = host_addresses();
        // Every Linux host has loopback, unless it cannot even read its own interfaces.
        if !addrs.is_empty() {
            assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
        }
    }

    #[tokio::test]
    async fn refuses_pid_zero() {
        let err = confine(0, Ipv4Addr::new(10, 89, 0, 1), &[]).await.unwrap_err();
        assert!(err.to_string().contains("no process id"), "{err}");
    }

    /// Real kernel test (root only): a network namespace joined to the host by a veth
    /// pair. All traffic stays on that pair: host side 10.99.R.1/30 plus the
    /// documentation addresses 203.0.113.R (passed as a "host address") and 198.51.100.R
    /// (a "public" peer, not a host address) and fd99:R::1, namespace side 10.99.R.2/30
    /// with routes to exactly those addresses; no default route.
    mod netns {
        use super::super::*;
        use std::net::{SocketAddr, TcpListener, UdpSocket};
        use std::path::PathBuf;
        use std::process::Command;
        use std::time::Instant;

        /// Tears the namespace and the veth pair down, whatever happened.
        struct TestNet {
            ns: String,
            host_if: String,
        }

        impl Drop for TestNet {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
                let _ = Command::new("ip")
                    .args(["link", "del", &self.host_if])
                    .stderr(Stdio::null())
                    .status();
            }
        }

        impl TestNet {
            fn path(&self) -> PathBuf {
                PathBuf::from(format!("/run/netns/{}", self.ns))
            }
            fn host(&self, args: &[&str]) {
                run("ip", args);
            }
            fn inside(&self, args: &[&str]) {
                let mut all = vec!["netns", "exec", &self.ns, "ip"];
                all.extend_from_slice(args);
                run("ip", &all);
            }
            /// Connects from inside the namespace to `addr` with bash's /dev/tcp;
            /// the outcome (stderr on failure) and how long it took.
            fn connect(&self, addr: SocketAddr) -> (Result<(), String>, Duration) {
                let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
                let start = Instant::now();
                let out = Command::new("timeout")
                    .args(["5", "ip", "netns", "exec", &self.ns, "bash", "-c", &script])
                    .output()
                    .unwrap();
                let took = start.elapsed();
                if out.status.success() {
                    (Ok(()), took)
                } else {
                    let err = String::from_utf8_lossy(&out.stderr).into_owned();
                    (Err(format!("{}: {err}", out.status)), took)
                }
            }
            /// Sends one UDP datagram from inside the namespace (errors ignored: a
            /// rejected send may fail or not; the receiver tells).
            fn send_udp(&self, addr: SocketAddr, payload: &str) {
                let script = format!("printf %s {payload} >/dev/udp/{}/{} || true", addr.ip(), addr.port());
                let _ = Command::new("timeout")
                    .args(["5", "ip", "netns", "exec", &self.ns, "bash", "-c", &script])
                    .stderr(Stdio::null())
                    .status();
            }
            fn output_rules(&self) -> Vec<String> {
                let out = Command::new("nsenter")
                    .arg(format!("--net={}", self.path().display()))
                    .args(["--", "iptables-save", "-t", "filter"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with("-A OUTPUT"))
                    .map(str::to_string)
                    .collect()
            }
        }

        fn run(cmd: &str, args: &[&str]) {
            let out = Command::new(cmd).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        fn random_octet() -> u8 {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            (h.finish() % 250) as u8 + 2
        }

        fn refused_fast(net: &TestNet, addr: SocketAddr) {
            let (outcome, took) = net.connect(addr);
            eprintln!("connect {addr} after confine: {outcome:?} in {took:?}");
            let err = outcome.expect_err("connection must be refused");
            assert!(err.contains("Connection refused"), "{addr}: {err}");
            assert!(took < Duration::from_secs(2), "{addr}: took {took:?}");
        }

        #[test]
        fn confines_a_real_namespace() {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipped: needs root (network namespaces, veth, iptables)");
                return;
            }
            let r = random_octet();
            let tag = format!("{:x}{r:02x}", std::process::id() & 0xffff);
            let net = TestNet {
                ns: format!("cond-fw-test-{tag}"),
                host_if: format!("cfw{tag}h"),
            };
            let ns_if = format!("cfw{tag}n");
            let gateway = Ipv4Addr::new(10, 99, r, 1);
            let host_public = Ipv4Addr::new(203, 0, 113, r);
            let public_peer = Ipv4Addr::new(198, 51, 100, r);
            let host_v6: Ipv6Addr = format!("fd99:{r:x}::1").parse().unwrap();

            net.host(&["netns", "add", &net.ns]);
            net.host(&["link", "add", &net.host_if, "type", "veth", "peer", "name", &ns_if]);
            net.host(&["link", "set", &ns_if, "netns", &net.ns]);
            net.host(&["addr", "add", &format!("{gateway}/30"), "dev", &net.host_if]);
            net.host(&["addr", "add", &format!("{host_public}/32"), "dev", &net.host_if]);
            net.host(&["addr", "add", &format!("{public_peer}/32"), "dev", &net.host_if]);
            net.host(&[
                "-6",
                "addr",
                "add",
                &format!("{host_v6}/64"),
                "dev",
                &net.host_if,
                "nodad",
            ]);
            net.host(&["link", "set", &net.host_if, "up"]);
            net.inside(&["link", "set", "lo", "up"]);
            net.inside(&["addr", "add", &format!("10.99.{r}.2/30"), "dev", &ns_if]);
            net.inside(&[
                "-6",
                "addr",
                "add",
                &format!("fd99:{r:x}::2/64"),
                "dev",
                &ns_if,
                "nodad",
            ]);
            net.inside(&["link", "set", &ns_if, "up"]);
            net.inside(&["route", "add", &format!("{host_public}/32"), "dev", &ns_if]);
            net.inside(&["route", "add", &format!("{public_peer}/32"), "dev", &ns_if]);

            let listener = TcpListener::bind("0.0.0.0:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let listener6 = TcpListener::bind("[::]:0").unwrap();
            let port6 = listener6.local_addr().unwrap().port();
            let at = |ip: Ipv4Addr| SocketAddr::from((ip, port));
            let at_gateway = at(gateway);
            let at_host_public = at(host_public);
            let at_public_peer = at(public_peer);
            let at_v6 = SocketAddr::from((host_v6, port6));

            for addr in [at_gateway, at_host_public, at_public_peer, at_v6] {
                let (outcome, took) = net.connect(addr);
                eprintln!("connect {addr} before confine: {outcome:?} in {took:?}");
                outcome.unwrap_or_else(|e| panic!("before confine, {addr}: {e}"));
            }

            // Never the host's own namespace.
            assert!(is_host_netns(Path::new("/proc/self/ns/net")).unwrap());
            assert!(!is_host_netns(&net.path()).unwrap());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let err = runtime
                .block_on(confine_netns(Path::new("/proc/self/ns/net"), gateway, &[]))
                .unwrap_err();
            assert!(err.to_string().contains("refusing"), "{err}");

            let host_addrs = [IpAddr::V4(host_public), IpAddr::V6(host_v6), IpAddr::V4(gateway)];
            let start = Instant::now();
            runtime
                .block_on(confine_netns(&net.path(), gateway, &host_addrs))
                .unwrap();
            eprintln!("confine_netns took {:?}", start.elapsed());
            let first = net.output_rules();
            // Idempotent: a second application replaces the first.
            runtime
                .block_on(confine_netns(&net.path(), gateway, &host_addrs))
                .unwrap();
            let second = net.output_rules();
            assert_eq!(first, second);
            let expected = rules(gateway, &host_addrs)
                .0
                .lines()
                .filter(|l| l.starts_with("-A OUTPUT"))
                .count();
            assert_eq!(second.len(), expected, "{second:#?}");

            refused_fast(&net, at_gateway);
            refused_fast(&net, at_host_public);
            refused_fast(&net, at_v6);
            // A public address that is not the host's stays reachable.
            let (outcome, took) = net.connect(at_public_peer);
            eprintln!("connect {at_public_peer} after confine: {outcome:?} in {took:?}");
            outcome.unwrap_or_else(|e| panic!("after confine, public {at_public_peer}: {e}"));

            // DNS to the gateway stays allowed. Port 53 on the test's own gateway address
            // can only be taken if something on the host listens on 0.0.0.0:53 or
            // [::]:53; then the DNS assertions are skipped rather than fought over.
            match TcpListener::bind((gateway, 53)) {
                Ok(_dns) => {
                    let (outcome, took) = net.connect(SocketAddr::from((gateway, 53)));
                    eprintln!("connect {gateway}:53 after confine: {outcome:?} in {took:?}");
                    outcome.unwrap_or_else(|e| panic!("DNS over TCP to the gateway: {e}"));
                }
                Err(e) => eprintln!("skipped the TCP/53 check: cannot listen on {gateway}:53: {e}"),
            }
            match UdpSocket::bind((gateway, 53)) {
                Ok(dns) => {
                    dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    net.send_udp(SocketAddr::from((gateway, 53)), "dns");
                    let mut buf = [0u8; 16];
                    let (n, from) = dns.recv_from(&mut buf).expect("DNS over UDP to the gateway");
                    assert_eq!(&buf[..n], b"dns");
                    assert_eq!(from.ip(), IpAddr::V4(Ipv4Addr::new(10, 99, r, 2)));
                }
                Err(e) => eprintln!("skipped the UDP/53 check: cannot listen on {gateway}:53: {e}"),
            }
            // Any other UDP port on the gateway is not.
            let other = UdpSocket::bind((gateway, 0)).unwrap();
            other.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            net.send_udp(other.local_addr().unwrap(), "leak");
            let mut buf = [0u8; 16];
            assert!(other.recv_from(&mut buf).is_err(), "UDP to the gateway got through");
            drop(listener);
            drop(listener6);
        }
    }
}
