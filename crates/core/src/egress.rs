//! The egress policy of a workspace's network: which outbound connections it may make.
//!
//! A workspace's network is `{mode, allow, deny}`. In `isolated` mode there is no route
//! out; in `egress` mode there is a bridge to the public internet (never the host or private ranges); in `proxy` mode every outbound
//! connection goes through a host-side proxy that asks this module twice:
//!
//! 1. [`EgressPolicy::check_name`] on the name the client asked for (the CONNECT host or
//!    the `Host` header), before resolving it;
//! 2. [`EgressPolicy::check_addr`] on each address that name resolved to, before
//!    connecting. The proxy connects only to an address passing this check, so a name
//!    that resolves (or rebinds) to loopback, a private network, the cloud metadata
//!    service or the host itself is refused even when the name is allowed.
//!
//! Entries of the lists are strings (see [`parse_entry`]): exact names (`pypi.org`),
//! subdomain wildcards (`*.pythonhosted.org`), address ranges (`10.0.0.0/8:5432`) and
//! named bundles (`pypi`) that expand to several entries. Everything here is pure: the
//! proxy does the resolving and the connecting, and passes the host's own addresses in.
//!
//! The operator bounds what callers may allow with `network.egress.max_allow`
//! ([`check_bound`]); the policy of a task is the layering of the configuration default,
//! the environment, the workspace and the task ([`resolve`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The ports an allow entry without a port means: HTTP and HTTPS.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// The longest host name, without a trailing dot (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;
/// The longest label of a host name (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// How a workspace reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Loopback only: no route out, no DNS. The default.
    #[default]
    #[serde(alias = "none")]
    Isolated,
    /// Outbound connections only through the host-side proxy, filtered by the policy.
    Proxy,
    /// A bridge to the public internet (opt-in); no route to the host or private ranges.
    Egress,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Isolated => "isolated",
            Mode::Proxy => "proxy",
            Mode::Egress => "egress",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    /// `none` is accepted as an alias of `isolated` (the older network policy name).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "isolated" | "none" => Ok(Mode::Isolated),
            "proxy" => Ok(Mode::Proxy),
            "egress" => Ok(Mode::Egress),
            _ => Err(format!(
                "{s:?} is not a network mode (allowed: isolated, none, proxy, egress)"
            )),
        }
    }
}

/// An IPv4 or IPv6 address range, `addr/prefix`, with no host bits set.
///
/// IPv4-mapped IPv6 ranges (`::ffff:10.0.0.0/104`) are stored as their IPv4 form, and
/// [`Cidr::contains`] looks at IPv4-mapped addresses as IPv4, so `::ffff:127.0.0.1` is
/// in `127.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range `addr/prefix`. Refuses a prefix longer than the address and host bits
    /// set (the message suggests the network address).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let (bits, width) = addr_bits(addr);
        if prefix > width {
            return Err(format!(
                "prefix length /{prefix} is out of range for an IPv{} address (/0 to /{width})",
                if addr.is_ipv4() { 4 } else { 6 }
            ));
        }
        let network = bits & prefix_mask(width, prefix);
        if network != bits {
            return Err(format!(
                "has host bits set; did you mean {}/{prefix}?",
                bits_addr(network, width)
            ));
        }
        Ok(Cidr::canonical(addr, prefix))
    }

    /// The range holding exactly `addr` (a /32 or a /128).
    pub fn host(addr: IpAddr) -> Cidr {
        let addr = addr.to_canonical();
        Cidr {
            addr,
            prefix: addr_bits(addr).1,
        }
    }

    fn canonical(addr: IpAddr, prefix: u8) -> Cidr {
        match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                None => Cidr { addr, prefix },
            },
            _ => Cidr { addr, prefix },
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `addr` (IPv4-mapped IPv6 taken as IPv4) lies in this range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        if addr.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (mine, width) = addr_bits(self.addr);
        let (theirs, _) = addr_bits(addr);
        let mask = prefix_mask(width, self.prefix);
        mine & mask == theirs & mask
    }

    /// Whether all of `other` lies in this range.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An address as an integer and its width in bits.
fn addr_bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn bits_addr(bits: u128, width: u8) -> IpAddr {
    if width == 32 {
        // Only the low 32 bits are ever set for an IPv4 address.
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

/// The top `prefix` bits of a `width`-bit address set.
fn prefix_mask(width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (u128::MAX >> (128 - u32::from(prefix))) << (width - prefix)
    }
}

/// What an entry matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly this host name (lowercase, no trailing dot).
    Name(String),
    /// Every subdomain of this name (`*.pythonhosted.org` holds `pythonhosted.org`), not
    /// the name itself.
    Wildcard(String),
    /// An address range; matches IP literals and resolved addresses, never names.
    Cidr(Cidr),
    /// A named bundle of entries, expanded when a policy is built.
    Bundle(String),
}

/// One parsed entry of an allow, deny or bound list. Keeps the text it was written as
/// (trimmed), because audit rows and error messages name the rule as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    text: String,
    target: Target,
    port: Option<u16>,
}

impl Entry {
    /// The entry as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The explicit port; `None` means [`DEFAULT_PORTS`] in an allow list and every
    /// port in a deny list.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    pub fn is_bundle(&self) -> bool {
        matches!(self.target, Target::Bundle(_))
    }

    /// Whether `host`, a name as a client gives it (without port; any case, a trailing dot
    /// ignored), is one this entry names: the same name, or for a wildcard a subdomain of
    /// it. Ranges and bundles match no name; the port is for the caller to check.
    pub fn matches_name(&self, host: &str) -> bool {
        let Some(Host::Name(name)) = parse_host(host) else {
            return false;
        };
        match &self.target {
            Target::Name(n) => *n == name,
            Target::Wildcard(suffix) => wildcard_matches(suffix, &name),
            Target::Cidr(_) | Target::Bundle(_) => false,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Entry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_entry(s)
    }
}

/// Parses an entry, knowing the [`default_bundles`]. See [`parse_entry_with`].
pub fn parse_entry(s: &str) -> Result<Entry, String> {
    parse_entry_with(s, &default_bundles())
}

/// Parses an entry of an allow, deny or bound list:
///
/// - `pypi.org`: exactly this name (case-insensitive, a trailing dot ignored);
/// - `*.pythonhosted.org`: every subdomain of the name, not the name itself; the
///   wildcard must be the whole first label, and at least two labels must follow it;
/// - `10.0.0.0/8`, `192.168.1.5`, `fd00::/8`, `[fd00::1]`: an address range (an address
///   alone is a /32 or /128); an IPv6 address with a port must be in brackets;
/// - any of these followed by `:port` (`github.com:22`, `[fd00::1]:443`); without a
///   port the entry means ports 80 and 443 (in a deny list: every port);
/// - `pypi`: a word without a dot names a bundle of `bundles` (no port).
///
/// International names must be written in punycode (`xn--bcher-kva.de`). Errors name the
/// entry and the problem.
pub fn parse_entry_with(s: &str, bundles: &BTreeMap<String, Vec<String>>) -> Result<Entry, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("an entry is empty (\"\"); write a host name, *.domain, an address range or a bundle".into());
    }
    if !text.is_ascii() {
        return Err(format!(
            "{text:?} is not ASCII; write international names in punycode (e.g. xn--bcher-kva.de for bücher.de)"
        ));
    }
    let (host, port, bracketed) = split_port(text)?;
    let entry = |target| Entry {
        text: text.to_string(),
        target,
        port,
    };
    if host.is_empty() {
        return Err(format!("{text:?} has no host before the port"));
    }
    if bracketed {
        let cidr = parse_range(text, host)?;
        if cidr.addr.is_ipv4() {
            return Err(format!(
                "{text:?}: brackets are for IPv6 addresses only; write an IPv4 address without them"
            ));
        }
        return Ok(entry(Target::Cidr(cidr)));
    }
    if host.contains(':') {
        // Two or more colons: an IPv6 address or range without brackets, hence no port.
        return parse_range(text, host)
            .map(|c| entry(Target::Cidr(c)))
            .map_err(|e| format!("{e}; an IPv6 address with a port must be in brackets, e.g. [fd00::1]:443"));
    }
    if host.contains('/') || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse_range(text, host).map(|c| entry(Target::Cidr(c)));
    }
    if host.contains('*') {
        if host == "*" {
            return Err(format!(
                "{text:?}: '*' alone would allow every host; use mode egress for the public internet without a list"
            ));
        }
        let suffix = host
            .strip_prefix("*.")
            .filter(|rest| !rest.contains('*'))
            .ok_or_else(|| {
                format!("{text:?} has a misplaced wildcard; '*' may only be the whole first label, as in *.example.com")
            })?;
        let suffix = normalize_name(suffix).map_err(|e| format!("{text:?} {e}"))?;
        if !suffix.contains('.') {
            return Err(format!(
                "{text:?} would match a whole top-level domain; name at least two labels after '*.'"
            ));
        }
        return Ok(entry(Target::Wildcard(suffix)));
    }
    if !host.contains('.') {
        let word = host.to_ascii_lowercase();
        if !bundles.contains_key(&word) {
            let known: Vec<&str> = bundles.keys().map(String::as_str).collect();
            return Err(format!(
                "{text:?} is not a known bundle (known: {}); a host name needs a dot",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        if port.is_some() {
            return Err(format!(
                "{text:?} names bundle {word:?}, which takes no port (its entries carry their own)"
            ));
        }
        return Ok(entry(Target::Bundle(word)));
    }
    let name = normalize_name(host).map_err(|e| format!("{text:?} {e}"))?;
    if !name.contains('.') {
        return Err(format!(
            "{text:?} is a single label; write a fully qualified name such as example.com"
        ));
    }
    Ok(entry(Target::Name(name)))
}

/// Splits `host[:port]`, `[v6]`, `[v6]:port`; a text with two or more colons and no
/// brackets is all host (an IPv6 address). The flag tells whether the host was
/// bracketed.
fn split_port(text: &str) -> Result<(&str, Option<u16>, bool), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?} has '[' without a closing ']'"))?;
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(parse_port(text, p)?),
                None => return Err(format!("{text:?} has {after:?} after ']'; expected :port")),
            },
        };
        return Ok((inner, port, true));
    }
    match text.matches(':').count() {
        0 => Ok((text, None, false)),
        1 => {
            let (host, port) = text.split_once(':').unwrap_or((text, ""));
            Ok((host, Some(parse_port(text, port)?), false))
        }
        _ => Ok((text, None, false)),
    }
}

fn parse_port(text: &str, port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err(format!("{text:?} has an empty port after ':'"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} has port {port:?}, which is not a number"));
    }
    match port.parse::<u32>().ok().map(u16::try_from) {
        Some(Ok(0)) => Err(format!("{text:?} has port 0; ports are 1 to 65535")),
        Some(Ok(p)) => Ok(p),
        _ => Err(format!("{text:?} has port {port}, out of range (1 to 65535)")),
    }
}

/// `addr` or `addr/prefix`, IPv4 or IPv6.
fn parse_range(text: &str, s: &str) -> Result<Cidr, String> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("{text:?} is not a valid address or range ({ip:?} is not an IP address)"))?;
    match prefix {
        None => Ok(Cidr::host(addr)),
        Some(p) => {
            let len = Some(p)
                .filter(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u8>().ok())
                .ok_or_else(|| format!("{text:?} has prefix length /{p}, which is not a number from 0 to 128"))?;
            Cidr::new(addr, len).map_err(|e| format!("{text:?} {e}"))
        }
    }
}

/// Lowercases a host name and drops one trailing dot, checking it: at most 253
/// characters, labels of 1 to 63 letters, digits and '-' (not first or last), and a last
/// label that is not all digits (that would be an IP address in disguise, such as
/// `127.1`). The error completes a sentence starting with the entry.
fn normalize_name(name: &str) -> Result<String, String> {
    if !name.is_ascii() {
        return Err("is not ASCII; write international names in punycode (e.g. xn--bcher-kva.de)".into());
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty label".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("has a label longer than {MAX_LABEL_LEN} characters"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "has {bad:?} in label {label:?}; labels hold only letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("has label {label:?}, which starts or ends with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("ends in an all-numeric label, which no host name has (an IP address?)".into());
    }
    Ok(name)
}

/// The bundles conductor knows without configuration: the hosts a package manager needs,
/// and no more (no upload hosts, no user-content hosts such as `people.debian.org`).
pub fn default_bundles() -> BTreeMap<String, Vec<String>> {
    let bundle = |name: &str, entries: &[&str]| (name.to_string(), entries.iter().map(|e| e.to_string()).collect());
    BTreeMap::from([
        // pip: the index (pypi.org/simple) and the distribution files.
        bundle("pypi", &["pypi.org", "files.pythonhosted.org"]),
        // npm fetches metadata and tarballs from the registry alone; yarn v1 uses its
        // own alias of it.
        bundle("npm", &["registry.npmjs.org", "registry.yarnpkg.com"]),
        // apt: the CDN mirror (http, port 80, signed by apt) and the security archive.
        bundle("debian", &["deb.debian.org", "security.debian.org"]),
        // git over HTTPS, the API, release and archive downloads, raw files.
        bundle(
            "github",
            &[
                "github.com",
                "*.github.com",
                "codeload.github.com",
                "*.githubusercontent.com",
            ],
        ),
    ])
}

/// The default bundles with the operator's added or replaced by name.
pub fn merge_bundles(overrides: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let mut all = default_bundles();
    for (name, entries) in overrides {
        all.insert(name.to_ascii_lowercase(), entries.clone());
    }
    all
}

/// Checks a bundle table: names are words without a dot starting with a letter (so they
/// can be told from host names and addresses), and every member is a valid entry that is not itself a bundle. Messages start
/// with the key path, e.g. `bundles.internal[1]: "a..b" has an empty label`.
pub fn validate_bundles(bundles: &BTreeMap<String, Vec<String>>) -> Result<(), String> {
    for (name, members) in bundles {
        let name_ok = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(format!(
                "bundles: {name:?} is not a bundle name (a lowercase letter, then lowercase letters, digits, '-' and '_'; no dot)"
            ));
        }
        for (i, member) in members.iter().enumerate() {
            parse_member(member, bundles).map_err(|message| {
                EntryError {
                    list: format!("bundles.{name}"),
                    index: i,
                    entry: member.clone(),
                    message,
                }
                .to_string()
            })?;
        }
    }
    Ok(())
}

/// A member of a bundle: any entry but a bundle.
fn parse_member(s: &str, bundles: &BTreeMap<String, Vec<String>>) -> Result<Entry, String> {
    let entry = parse_entry_with(s, bundles)?;
    if let Target::Bundle(name) = &entry.target {
        return Err(format!(
            "{:?} names bundle {name:?}; bundle entries may not reference other bundles",
            entry.text
        ));
    }
    Ok(entry)
}

/// An entry of a list that cannot be used, with where it is: `Display` gives
/// `allow[2]: "foo..com" has an empty label`, to which the caller prefixes its key path
/// (`network.`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{list}[{index}]: {message}")]
pub struct EntryError {
    /// The list: `allow`, `deny`, `max_allow` or `bundles.<name>`.
    pub list: String,
    pub index: usize,
    /// The entry as given.
    pub entry: String,
    /// A sentence naming the entry and the problem.
    pub message: String,
}

/// One usable rule of a policy: an entry of the list, or a member of a bundle the list
/// named. Remembers both, because an audit row says which list entry let a connection
/// through and, for a bundle, which of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    source: String,
    entry: Entry,
}

impl Rule {
    /// The list entry the rule came from (`pypi`, or `pypi.org` when listed directly).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The entry that matches (`files.pythonhosted.org` for bundle `pypi`).
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    fn matches_name(&self, name: &str) -> bool {
        match &self.entry.target {
            Target::Name(n) => n == name,
            Target::Wildcard(suffix) => wildcard_matches(suffix, name),
            Target::Cidr(_) | Target::Bundle(_) => false,
        }
    }

    fn cidr(&self) -> Option<&Cidr> {
        match &self.entry.target {
            Target::Cidr(c) => Some(c),
            _ => None,
        }
    }

    /// An allow rule without a port allows the web ports.
    fn allows_port(&self, port: u16) -> bool {
        self.entry.port.map_or(DEFAULT_PORTS.contains(&port), |p| p == port)
    }

    /// A deny rule without a port denies every port.
    fn denies_port(&self, port: u16) -> bool {
        self.entry.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for Rule {
    /// `pypi.org` for a direct entry, `pypi (files.pythonhosted.org)` for a bundle member.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source == self.entry.text {
            f.write_str(&self.source)
        } else {
            write!(f, "{} ({})", self.source, self.entry.text)
        }
    }
}

/// Whether `name` is a strict subdomain of `suffix`.
fn wildcard_matches(suffix: &str, name: &str) -> bool {
    name.strip_suffix(suffix)
        .and_then(|head| head.strip_suffix('.'))
        .is_some_and(|head| !head.is_empty())
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No allow rule matches the host and port.
    NotAllowed,
    /// A deny rule matches (deny wins over allow).
    DeniedByRule,
    /// An IP address was asked for and no allow range contains it.
    IpLiteral,
    /// The address is in a range a workspace must not reach (loopback, private, link-local
    /// and cloud metadata, …, or the host's own); the text is the kind, see [`classify`].
    SpecialAddress(&'static str),
    /// The host is neither a valid host name nor an IP address.
    InvalidHost,
}

impl DenyReason {
    /// A short code for audit rows and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::DeniedByRule => "denied",
            DenyReason::IpLiteral => "ip_literal",
            DenyReason::SpecialAddress(_) => "special_address",
            DenyReason::InvalidHost => "invalid_host",
        }
    }

    /// A sentence for people.
    pub fn message(self) -> String {
        match self {
            DenyReason::NotAllowed => "no allow entry matches this host and port".into(),
            DenyReason::DeniedByRule => "a deny entry matches this host and port".into(),
            DenyReason::IpLiteral => {
                "an IP address is reachable only through an allow entry for a range containing it".into()
            }
            DenyReason::SpecialAddress(kind) => {
                format!("the address is {kind}; only an allow entry for that range (or a narrower one) admits it")
            }
            DenyReason::InvalidHost => "the host is not a valid host name or IP address".into(),
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision on one connection. `rule` is a [`Rule`]'s display form: the list entry,
/// and for a bundle the member that matched (`pypi (pypi.org)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow { rule: String },
    Deny { reason: DenyReason, rule: Option<String> },
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }

    /// The rule that decided, if one did.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Verdict::Allow { rule } => Some(rule),
            Verdict::Deny { rule, .. } => rule.as_deref(),
        }
    }

    fn allow(rule: &Rule) -> Verdict {
        Verdict::Allow { rule: rule.to_string() }
    }

    fn deny(reason: DenyReason, rule: Option<&Rule>) -> Verdict {
        Verdict::Deny {
            reason,
            rule: rule.map(Rule::to_string),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow { rule } => write!(f, "allowed by {rule}"),
            Verdict::Deny {
                reason,
                rule: Some(rule),
            } => write!(f, "denied ({reason}) by {rule}: {}", reason.message()),
            Verdict::Deny { reason, rule: None } => write!(f, "denied ({reason}): {}", reason.message()),
        }
    }
}

/// The kind of a special address: one a workspace must not reach unless an allow range
/// names it. IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are classified as their
/// IPv4 address, NAT64 ones (`64:ff9b::/96`) by the IPv4 address they embed.
pub fn classify(addr: IpAddr) -> Option<&'static str> {
    special_block(addr).map(|(kind, _)| kind)
}

/// Special IPv4 ranges, most specific first.
const SPECIAL_V4: &[(&str, [u8; 4], u8)] = &[
    ("unspecified", [0, 0, 0, 0], 32),
    ("broadcast", [255, 255, 255, 255], 32),
    ("\"this network\" (0.0.0.0/8)", [0, 0, 0, 0], 8),
    ("loopback", [127, 0, 0, 0], 8),
    ("private (RFC 1918)", [10, 0, 0, 0], 8),
    ("private (RFC 1918)", [172, 16, 0, 0], 12),
    ("private (RFC 1918)", [192, 168, 0, 0], 16),
    ("carrier-grade NAT (100.64.0.0/10)", [100, 64, 0, 0], 10),
    (
        "link-local (incl. cloud metadata 169.254.169.254)",
        [169, 254, 0, 0],
        16,
    ),
    ("IETF protocol assignments (192.0.0.0/24)", [192, 0, 0, 0], 24),
    ("benchmarking (198.18.0.0/15)", [198, 18, 0, 0], 15),
    ("multicast", [224, 0, 0, 0], 4),
    ("reserved (240.0.0.0/4)", [240, 0, 0, 0], 4),
];

/// Special IPv6 ranges, most specific first (IPv4-mapped ones are looked at as IPv4).
const SPECIAL_V6: &[(&str, [u16; 8], u8)] = &[
    ("unspecified", [0, 0, 0, 0, 0, 0, 0, 0], 128),
    ("loopback", [0, 0, 0, 0, 0, 0, 0, 1], 128),
    ("IPv4-compatible (deprecated, ::/96)", [0, 0, 0, 0, 0, 0, 0, 0], 96),
    ("IPv6 unique local", [0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    ("IPv6 link-local", [0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    ("IPv6 site-local (deprecated)", [0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    ("multicast", [0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
];

/// The NAT64 well-known prefix (RFC 6052): `64:ff9b::a.b.c.d` reaches `a.b.c.d`.
const NAT64: [u16; 8] = [0x64, 0xff9b, 0, 0, 0, 0, 0, 0];

/// The kind of a special address and the whole special range it lies in.
fn special_block(addr: IpAddr) -> Option<(&'static str, Cidr)> {
    let table_v4 = |a: Ipv4Addr| {
        SPECIAL_V4.iter().find_map(|(kind, net, prefix)| {
            let block = Cidr {
                addr: IpAddr::V4(Ipv4Addr::from(*net)),
                prefix: *prefix,
            };
            block.contains(IpAddr::V4(a)).then_some((*kind, block))
        })
    };
    match addr.to_canonical() {
        IpAddr::V4(a) => table_v4(a),
        IpAddr::V6(a) => {
            let nat64 = Cidr {
                addr: IpAddr::V6(Ipv6Addr::from(NAT64)),
                prefix: 96,
            };
            if nat64.contains(IpAddr::V6(a)) {
                let embedded = Ipv4Addr::from(u128::from(a) as u32);
                return table_v4(embedded).map(|(kind, block)| {
                    let (bits, _) = addr_bits(block.addr);
                    let (prefix_bits, _) = addr_bits(nat64.addr);
                    let block = Cidr {
                        addr: IpAddr::V6(Ipv6Addr::from(prefix_bits | bits)),
                        prefix: 96 + block.prefix,
                    };
                    (kind, block)
                });
            }
            SPECIAL_V6.iter().find_map(|(kind, net, prefix)| {
                let block = Cidr {
                    addr: IpAddr::V6(Ipv6Addr::from(*net)),
                    prefix: *prefix,
                };
                block.contains(IpAddr::V6(a)).then_some((*kind, block))
            })
        }
    }
}

/// A host as a client names it.
enum Host {
    Name(String),
    Ip(IpAddr),
}

/// A CONNECT host or `Host` value (without port): an IP address (IPv6 possibly in
/// brackets), else a host name, normalised like entries.
fn parse_host(host: &str) -> Option<Host> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(|a| Host::Ip(IpAddr::V6(a)));
    }
    if let Ok(addr) = host.parse::<IpAddr>() {
        return Some(Host::Ip(addr));
    }
    normalize_name(host).ok().filter(|n| n.contains('.')).map(Host::Name)
}

/// A workspace's egress policy in proxy mode, with bundles expanded. Deny wins over
/// allow; a name must match an allow rule; an IP address, and any special address a
/// name resolves to, only an allow range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl EgressPolicy {
    /// Parses both lists, expanding bundles from `bundles`. The error says which entry of
    /// which list is wrong; for a bundle whose member is invalid, it names both.
    pub fn parse(
        allow: &[String],
        deny: &[String],
        bundles: &BTreeMap<String, Vec<String>>,
    ) -> Result<EgressPolicy, EntryError> {
        Ok(EgressPolicy {
            allow: expand("allow", allow, bundles)?
                .into_iter()
                .flat_map(|(_, rules)| rules)
                .collect(),
            deny: expand("deny", deny, bundles)?
                .into_iter()
                .flat_map(|(_, rules)| rules)
                .collect(),
        })
    }

    pub fn allow(&self) -> &[Rule] {
        &self.allow
    }

    pub fn deny(&self) -> &[Rule] {
        &self.deny
    }

    /// The first check, on the host the client asked for, before resolving it. A name is
    /// denied when a deny name rule matches it, else allowed by the first allow name rule
    /// matching it and the port. An IP literal goes through the address checks of
    /// [`check_addr`](Self::check_addr) and must be in an allow range.
    pub fn check_name(&self, host: &str, port: u16) -> Verdict {
        match parse_host(host) {
            None => Verdict::deny(DenyReason::InvalidHost, None),
            Some(Host::Ip(addr)) => self.check_literal(addr, port, &[]),
            Some(Host::Name(name)) => self.check_normalized_name(&name, port),
        }
    }

    /// The second check, on one address `host` resolved to, before connecting to it.
    /// The name must pass [`check_name`](Self::check_name); then a deny range holding the
    /// address denies; then a special address ([`classify`], or one of `host_addrs`, the
    /// host's own addresses) is refused unless an allow range with the port admits it,
    /// and that range must lie within the special range (a host address: be exactly it),
    /// so a broad `0.0.0.0/0` never opens loopback or the metadata service; the verdict
    /// then names that range. Resolving once and connecting only to the addresses passing
    /// this is what defeats DNS rebinding.
    pub fn check_addr(&self, host: &str, addr: IpAddr, port: u16, host_addrs: &[IpAddr]) -> Verdict {
        match parse_host(host) {
            None => Verdict::deny(DenyReason::InvalidHost, None),
            Some(Host::Ip(literal)) => {
                let verdict = self.check_literal(literal, port, host_addrs);
                if !verdict.is_allowed() || literal.to_canonical() == addr.to_canonical() {
                    return verdict;
                }
                self.check_literal(addr, port, host_addrs)
            }
            Some(Host::Name(name)) => {
                let verdict = self.check_normalized_name(&name, port);
                if !verdict.is_allowed() {
                    return verdict;
                }
                self.screen_addr(addr, port, host_addrs).unwrap_or(verdict)
            }
        }
    }

    fn check_normalized_name(&self, name: &str, port: u16) -> Verdict {
        if let Some(rule) = self.deny.iter().find(|r| r.matches_name(name) && r.denies_port(port)) {
            return Verdict::deny(DenyReason::DeniedByRule, Some(rule));
        }
        match self.allow.iter().find(|r| r.matches_name(name) && r.allows_port(port)) {
            Some(rule) => Verdict::allow(rule),
            None => Verdict::deny(DenyReason::NotAllowed, None),
        }
    }

    /// An IP address asked for directly: the address checks, then an allow range.
    fn check_literal(&self, addr: IpAddr, port: u16, host_addrs: &[IpAddr]) -> Verdict {
        if let Some(verdict) = self.screen_addr(addr, port, host_addrs) {
            return verdict;
        }
        let addr = addr.to_canonical();
        match self
            .allow
            .iter()
            .find(|r| r.cidr().is_some_and(|c| c.contains(addr)) && r.allows_port(port))
        {
            Some(rule) => Verdict::allow(rule),
            None => Verdict::deny(DenyReason::IpLiteral, None),
        }
    }

    /// The checks of an address common to names and literals: a deny range, then the
    /// special ranges. `None` when neither decides (an ordinary address).
    fn screen_addr(&self, addr: IpAddr, port: u16, host_addrs: &[IpAddr]) -> Option<Verdict> {
        let addr = addr.to_canonical();
        if let Some(rule) = self
            .deny
            .iter()
            .find(|r| r.cidr().is_some_and(|c| c.contains(addr)) && r.denies_port(port))
        {
            return Some(Verdict::deny(DenyReason::DeniedByRule, Some(rule)));
        }
        let own = host_addrs.iter().any(|h| h.to_canonical() == addr);
        let (kind, block) = match (special_block(addr), own) {
            (Some((kind, _)), true) => (kind, Cidr::host(addr)),
            (Some(special), false) => special,
            (None, true) => ("the host's own address", Cidr::host(addr)),
            (None, false) => return None,
        };
        let admitting = self
            .allow
            .iter()
            .find(|r| r.cidr().is_some_and(|c| c.contains(addr) && block.contains_cidr(c)) && r.allows_port(port));
        Some(match admitting {
            Some(rule) => Verdict::allow(rule),
            None => Verdict::deny(DenyReason::SpecialAddress(kind), None),
        })
    }
}

/// Parses a list, expanding bundles; each list entry with the rules it gave.
fn expand(
    list: &str,
    entries: &[String],
    bundles: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<(Entry, Vec<Rule>)>, EntryError> {
    let error = |index: usize, entry: &str, message: String| EntryError {
        list: list.to_string(),
        index,
        entry: entry.to_string(),
        message,
    };
    let mut out = Vec::with_capacity(entries.len());
    for (i, s) in entries.iter().enumerate() {
        let entry = parse_entry_with(s, bundles).map_err(|m| error(i, s, m))?;
        let rules = match &entry.target {
            Target::Bundle(name) => {
                let members = bundles.get(name).map(Vec::as_slice).unwrap_or_default();
                members
                    .iter()
                    .map(|m| {
                        parse_member(m, bundles)
                            .map(|member| Rule {
                                source: entry.text.clone(),
                                entry: member,
                            })
                            .map_err(|e| error(i, s, format!("bundle {name:?}: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            _ => vec![Rule {
                source: entry.text.clone(),
                entry: entry.clone(),
            }],
        };
        out.push((entry, rules));
    }
    Ok(out)
}

/// Whether some entry of `bound` covers `entry` (host and ports). An exact name is
/// covered by the same name or a wildcard matching it; a wildcard by the same or a
/// broader one (`*.b` covers `*.a.b`); a range by a range containing it. A bound entry
/// without a port covers entries without one or with port 80 or 443; one with a port
/// covers that port only. Bundles are not looked into: expand them first
/// ([`check_bound`] does).
pub fn within_bound(entry: &Entry, bound: &[Entry]) -> bool {
    bound
        .iter()
        .any(|b| target_covers(&b.target, &entry.target) && port_covers(b.port, entry.port))
}

fn target_covers(bound: &Target, entry: &Target) -> bool {
    match (bound, entry) {
        (Target::Name(b), Target::Name(e)) => b == e,
        (Target::Wildcard(b), Target::Name(e)) => wildcard_matches(b, e),
        (Target::Wildcard(b), Target::Wildcard(e)) => b == e || wildcard_matches(b, e),
        (Target::Cidr(b), Target::Cidr(e)) => b.contains_cidr(e),
        _ => false,
    }
}

fn port_covers(bound: Option<u16>, entry: Option<u16>) -> bool {
    match (bound, entry) {
        (None, None) => true,
        (None, Some(p)) => DEFAULT_PORTS.contains(&p),
        (Some(b), Some(e)) => b == e,
        (Some(_), None) => false,
    }
}

/// Checks an allow list against the operator's bound `network.egress.max_allow` (`None`:
/// unbounded, the list is only parsed). Bundles on either side are expanded, and each
/// member of a bundle in `allow` must be within the bound. Errors of the bound itself
/// are reported for list `max_allow`.
pub fn check_bound(
    allow: &[String],
    bound: Option<&[String]>,
    bundles: &BTreeMap<String, Vec<String>>,
) -> Result<(), EntryError> {
    let allowed = expand("allow", allow, bundles)?;
    let Some(bound) = bound else {
        return Ok(());
    };
    let bound: Vec<Entry> = expand("max_allow", bound, bundles)?
        .into_iter()
        .flat_map(|(_, rules)| rules.into_iter().map(|r| r.entry))
        .collect();
    for (i, (entry, rules)) in allowed.iter().enumerate() {
        for rule in rules {
            if within_bound(&rule.entry, &bound) {
                continue;
            }
            let what = if entry.is_bundle() {
                format!("{:?} (bundle member {:?})", entry.text, rule.entry.text)
            } else {
                format!("{:?}", entry.text)
            };
            let host_ok = bound.iter().any(|b| target_covers(&b.target, &rule.entry.target));
            let why = match (host_ok, rule.entry.port) {
                (true, Some(p)) => format!(" (its host is, but not port {p})"),
                (true, None) => " (its host is, but not both default ports 80 and 443)".to_string(),
                (false, _) => String::new(),
            };
            return Err(EntryError {
                list: "allow".into(),
                index: i,
                entry: entry.text.clone(),
                message: format!("{what} is outside the operator's bound network.egress.max_allow{why}"),
            });
        }
    }
    Ok(())
}

/// One layer of network settings: the configuration default, an environment, a
/// workspace or a task. `allow: None` keeps the earlier list; `Some(vec![])` clears it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyLayer {
    pub mode: Option<Mode>,
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

/// The network a workspace gets after layering.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResolvedNetwork {
    pub mode: Mode,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// Layers network settings, lowest precedence first (configuration default,
/// environment, workspace, task). A given `allow` replaces the earlier one, so a task can
/// narrow what its environment allows; `deny` lists accumulate (each entry once), so no
/// layer can lift an earlier deny; a given mode replaces the earlier one. A non-empty
/// allow implies proxy mode unless the same or a later layer sets the mode. Whether a
/// layer may widen the allow list is for [`check_bound`] to decide.
pub fn resolve(layers: &[PolicyLayer]) -> ResolvedNetwork {
    let mut out = ResolvedNetwork::default();
    for layer in layers {
        if let Some(allow) = &layer.allow {
            out.allow = allow.clone();
            if !allow.is_empty() {
                out.mode = Mode::Proxy;
            }
        }
        if let Some(mode) = layer.mode {
            out.mode = mode;
        }
        for d in &layer.deny {
            if !out.deny.contains(d) {
                out.deny.push(d.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy::parse(&strings(allow), &strings(deny), &default_bundles()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s} is not an address"))
    }

    fn denied(v: &Verdict) -> DenyReason {
        match v {
            Verdict::Deny { reason, .. } => *reason,
            Verdict::Allow { rule } => panic!("allowed by {rule}"),
        }
    }

    fn allowed(v: &Verdict) -> &str {
        match v {
            Verdict::Allow { rule } => rule,
            Verdict::Deny { .. } => panic!("{v}"),
        }
    }

    fn err(s: &str) -> String {
        match parse_entry(s) {
            Ok(e) => panic!("{s:?} parsed as {e:?}"),
            Err(m) => m,
        }
    }

    #[test]
    fn parses_names_wildcards_ports_and_ranges() {
        let e = parse_entry("PyPI.org.").unwrap();
        assert_eq!(e.target(), &Target::Name("pypi.org".into()));
        assert_eq!(e.port(), None);
        assert_eq!(e.as_str(), "PyPI.org.");
        assert_eq!(e.to_string(), "PyPI.org.");

        let e = parse_entry("*.pythonhosted.org").unwrap();
        assert_eq!(e.target(), &Target::Wildcard("pythonhosted.org".into()));
        let e = parse_entry("*.example.com:8443").unwrap();
        assert_eq!(
            (e.target(), e.port()),
            (&Target::Wildcard("example.com".into()), Some(8443))
        );
        assert_eq!(parse_entry("github.com:443").unwrap().port(), Some(443));
        parse_entry("xn--bcher-kva.de").unwrap();
        parse_entry(" pypi.org ").unwrap();

        let e = parse_entry("10.0.0.0/8:5432").unwrap();
        assert_eq!(e.target(), &Target::Cidr(Cidr::new(ip("10.0.0.0"), 8).unwrap()));
        assert_eq!(e.port(), Some(5432));
        let e = parse_entry("192.168.1.5").unwrap();
        assert_eq!(e.target(), &Target::Cidr(Cidr::host(ip("192.168.1.5"))));
        let Target::Cidr(c) = parse_entry("192.168.1.5").unwrap().target().clone() else {
            panic!("not a range")
        };
        assert_eq!(c.prefix(), 32);
        let e = parse_entry("[fd00::1]:443").unwrap();
        assert_eq!(e.target(), &Target::Cidr(Cidr::host(ip("fd00::1"))));
        assert_eq!(e.port(), Some(443));
        let e = parse_entry("fd00::/8").unwrap();
        assert_eq!(e.target(), &Target::Cidr(Cidr::new(ip("fd00::"), 8).unwrap()));
        let e = parse_entry("fd00::1").unwrap();
        assert_eq!(e.target(), &Target::Cidr(Cidr::new(ip("fd00::1"), 128).unwrap()));
        parse_entry("[fd00::]").unwrap();
        // An IPv4-mapped range is stored as IPv4.
        let e = parse_entry("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(e.target(), &Target::Cidr(Cidr::new(ip("10.0.0.0"), 8).unwrap()));

        let e = parse_entry("pypi").unwrap();
        assert!(e.is_bundle());
        assert_eq!(e.target(), &Target::Bundle("pypi".into()));
        assert_eq!(
            "GitHub".parse::<Entry>().unwrap().target(),
            &Target::Bundle("github".into())
        );
    }

    #[test]
    fn parse_errors_name_the_entry_and_the_problem() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty"]),
            ("   ", &["empty"]),
            ("*", &["\"*\"", "every host"]),
            ("foo.*.com", &["\"foo.*.com\"", "wildcard", "first label"]),
            ("*foo.com", &["\"*foo.com\"", "wildcard"]),
            ("**.com", &["\"**.com\"", "wildcard"]),
            ("*.*.com", &["\"*.*.com\"", "wildcard"]),
            ("*.com", &["\"*.com\"", "top-level"]),
            ("a..b", &["\"a..b\"", "empty label"]),
            (".a.com", &["\".a.com\"", "empty label"]),
            ("foo..com:443", &["\"foo..com:443\"", "empty label"]),
            ("*.a..com", &["\"*.a..com\"", "empty label"]),
            ("a_b.com", &["\"a_b.com\"", "'_'", "a_b"]),
            ("a b.com", &["\"a b.com\"", "' '"]),
            ("-a.com", &["\"-a.com\"", "\"-a\"", "'-'"]),
            ("a-.com", &["\"a-.com\"", "'-'"]),
            ("bücher.de", &["\"bücher.de\"", "punycode", "xn--"]),
            ("github.com:0", &["\"github.com:0\"", "port 0"]),
            ("github.com:65536", &["\"github.com:65536\"", "65536", "out of range"]),
            ("github.com:99999999999999999999", &["out of range"]),
            (
                "github.com:https",
                &["\"github.com:https\"", "\"https\"", "not a number"],
            ),
            ("github.com:", &["\"github.com:\"", "empty port"]),
            (":443", &["\":443\"", "no host"]),
            ("10.0.0.1/8", &["\"10.0.0.1/8\"", "host bits", "10.0.0.0/8"]),
            ("10.0.0.1/8:5432", &["host bits", "10.0.0.0/8"]),
            ("10.0.0.0/33", &["\"10.0.0.0/33\"", "/33", "out of range"]),
            ("fd00::/129", &["\"fd00::/129\"", "/129"]),
            ("fd00::1/8", &["host bits", "fd00::/8"]),
            ("10.0.0.0/x", &["\"10.0.0.0/x\"", "/x"]),
            ("10.0.0.0/+8", &["/+8"]),
            ("10.0.0.256", &["\"10.0.0.256\"", "not an IP address"]),
            ("fd00::1:443x", &["brackets", "[fd00::1]:443"]),
            ("[10.0.0.1]:443", &["brackets", "IPv6"]),
            ("[fd00::1", &["']'"]),
            ("[fd00::1]443", &["after ']'"]),
            ("[pypi.org]:443", &["not an IP address"]),
            ("foo", &["\"foo\"", "not a known bundle", "debian, github, npm, pypi"]),
            ("pypi:443", &["\"pypi:443\"", "bundle", "no port"]),
            ("localhost:8080", &["\"localhost:8080\"", "not a known bundle"]),
            ("localhost.", &["\"localhost.\"", "single label"]),
            ("a.123", &["\"a.123\"", "numeric"]),
        ];
        for (entry, needles) in cases {
            let m = err(entry);
            for needle in *needles {
                assert!(m.contains(needle), "{entry:?}: {m:?} lacks {needle:?}");
            }
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(err(&long_label).contains("longer than 63"));
        parse_entry(&format!("{}.com", "a".repeat(63))).unwrap();
        let long_name = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let m = err(&long_name);
        assert!(m.contains("longer than 253") && m.contains(&long_name[..20]), "{m}");
        let just_fits = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        assert_eq!(just_fits.len(), 253);
        parse_entry(&just_fits).unwrap();
        parse_entry(&format!("{just_fits}.")).unwrap();
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let p = policy(&["*.pythonhosted.org"], &[]);
        assert_eq!(
            allowed(&p.check_name("files.pythonhosted.org", 443)),
            "*.pythonhosted.org"
        );
        allowed(&p.check_name("a.b.pythonhosted.org", 443));
        allowed(&p.check_name("FILES.PythonHosted.org.", 443));
        assert_eq!(denied(&p.check_name("pythonhosted.org", 443)), DenyReason::NotAllowed);
        assert_eq!(
            denied(&p.check_name("evilpythonhosted.org", 443)),
            DenyReason::NotAllowed
        );
        assert_eq!(
            denied(&p.check_name("pythonhosted.org.evil.com", 443)),
            DenyReason::NotAllowed
        );
    }

    #[test]
    fn ports_default_to_web_and_explicit_ports_are_exact() {
        let p = policy(&["pypi.org", "github.com:22"], &[]);
        allowed(&p.check_name("pypi.org", 80));
        allowed(&p.check_name("pypi.org", 443));
        assert_eq!(denied(&p.check_name("pypi.org", 8080)), DenyReason::NotAllowed);
        assert_eq!(allowed(&p.check_name("github.com", 22)), "github.com:22");
        assert_eq!(denied(&p.check_name("github.com", 443)), DenyReason::NotAllowed);
        assert_eq!(denied(&p.check_name("www.pypi.org", 443)), DenyReason::NotAllowed);
    }

    #[test]
    fn deny_wins_over_allow_and_a_bare_deny_covers_every_port() {
        let p = policy(&["*.example.com", "*.example.com:8443"], &["secret.example.com"]);
        allowed(&p.check_name("www.example.com", 443));
        let v = p.check_name("secret.example.com", 443);
        assert_eq!(
            v,
            Verdict::Deny {
                reason: DenyReason::DeniedByRule,
                rule: Some("secret.example.com".into())
            }
        );
        assert_eq!(
            denied(&p.check_name("secret.example.com", 8443)),
            DenyReason::DeniedByRule
        );
        let p = policy(&["*.example.com:8443", "*.example.com"], &["secret.example.com:8443"]);
        allowed(&p.check_name("secret.example.com", 443));
        assert_eq!(
            denied(&p.check_name("secret.example.com", 8443)),
            DenyReason::DeniedByRule
        );
        // A deny range applies to the addresses a name resolves to.
        let p = policy(&["*.example.com"], &["203.0.113.0/24"]);
        let v = p.check_addr("www.example.com", ip("203.0.113.9"), 443, &[]);
        assert_eq!(v.rule(), Some("203.0.113.0/24"));
        assert_eq!(denied(&v), DenyReason::DeniedByRule);
        allowed(&p.check_addr("www.example.com", ip("198.51.100.9"), 443, &[]));
    }

    #[test]
    fn ip_literals_need_an_allow_range() {
        let p = policy(&["pypi.org", "203.0.113.0/24"], &["203.0.113.66"]);
        assert_eq!(denied(&p.check_name("198.51.100.1", 443)), DenyReason::IpLiteral);
        assert_eq!(allowed(&p.check_name("203.0.113.5", 443)), "203.0.113.0/24");
        assert_eq!(denied(&p.check_name("203.0.113.5", 22)), DenyReason::IpLiteral);
        assert_eq!(denied(&p.check_name("203.0.113.66", 443)), DenyReason::DeniedByRule);
        assert_eq!(denied(&p.check_name("[2001:db8::1]", 443)), DenyReason::IpLiteral);
        // Spellings getaddrinfo would read as 127.0.0.1 are not host names.
        for sneaky in ["2130706433", "127.1", "0x7f.0.0.1", "localhost", "a..b", ""] {
            assert_eq!(denied(&p.check_name(sneaky, 443)), DenyReason::InvalidHost, "{sneaky}");
        }
    }

    #[test]
    fn a_range_admits_a_private_address() {
        let p = policy(&["10.0.0.0/8:5432", "db.corp.example:5432", "[fd00::1]:443"], &[]);
        assert_eq!(allowed(&p.check_name("10.1.2.3", 5432)), "10.0.0.0/8:5432");
        assert_eq!(
            allowed(&p.check_addr("10.1.2.3", ip("10.1.2.3"), 5432, &[])),
            "10.0.0.0/8:5432"
        );
        assert_eq!(
            allowed(&p.check_addr("db.corp.example", ip("10.1.2.3"), 5432, &[])),
            "10.0.0.0/8:5432"
        );
        assert_eq!(
            denied(&p.check_addr("db.corp.example", ip("10.1.2.3"), 443, &[])),
            DenyReason::NotAllowed
        );
        assert_eq!(
            denied(&p.check_addr("db.corp.example", ip("192.168.0.3"), 5432, &[])),
            DenyReason::SpecialAddress("private (RFC 1918)")
        );
        allowed(&p.check_name("[fd00::1]", 443));
        // An allowed range does not allow names: the name itself must be allowed.
        assert_eq!(
            denied(&p.check_addr("other.example", ip("10.1.2.3"), 5432, &[])),
            DenyReason::NotAllowed
        );
    }

    #[test]
    fn allowed_names_resolving_to_special_addresses_are_refused() {
        let p = policy(&["*.example.com"], &[]);
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("64:ff9b::7f00:1", "loopback"),
            ("169.254.169.254", "link-local (incl. cloud metadata 169.254.169.254)"),
            (
                "::ffff:169.254.169.254",
                "link-local (incl. cloud metadata 169.254.169.254)",
            ),
            ("10.0.0.1", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("100.100.100.200", "carrier-grade NAT (100.64.0.0/10)"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("0.1.2.3", "\"this network\" (0.0.0.0/8)"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved (240.0.0.0/4)"),
            ("fd00:ec2::254", "IPv6 unique local"),
            ("fc00::1", "IPv6 unique local"),
            ("fe80::1", "IPv6 link-local"),
            ("::7f00:1", "IPv4-compatible (deprecated, ::/96)"),
        ];
        for (addr, kind) in cases {
            assert_eq!(classify(ip(addr)), Some(kind), "{addr}");
            let v = p.check_addr("www.example.com", ip(addr), 443, &[]);
            assert_eq!(denied(&v), DenyReason::SpecialAddress(kind), "{addr}");
            assert_eq!(v.rule(), None);
        }
        for public in [
            "93.184.215.14",
            "172.32.0.1",
            "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
            "64:ff9b::5db8:d70e",
        ] {
            assert_eq!(classify(ip(public)), None, "{public}");
            assert_eq!(
                allowed(&p.check_addr("www.example.com", ip(public), 443, &[])),
                "*.example.com"
            );
        }
        // The host's own addresses, in any spelling.
        let own = [ip("198.51.100.7"), ip("2001:db8::7")];
        let v = p.check_addr("www.example.com", ip("::ffff:198.51.100.7"), 443, &own);
        assert_eq!(denied(&v), DenyReason::SpecialAddress("the host's own address"));
        assert_eq!(
            denied(&p.check_addr("www.example.com", ip("2001:db8::7"), 443, &own)),
            DenyReason::SpecialAddress("the host's own address")
        );
        allowed(&p.check_addr("www.example.com", ip("198.51.100.8"), 443, &own));
    }

    #[test]
    fn broad_ranges_do_not_open_special_addresses() {
        let p = policy(&["0.0.0.0/0:443", "[::/0]:443", "*.example.com"], &[]);
        allowed(&p.check_name("93.184.215.14", 443));
        assert_eq!(
            denied(&p.check_name("127.0.0.1", 443)),
            DenyReason::SpecialAddress("loopback")
        );
        assert_eq!(
            denied(&p.check_addr("www.example.com", ip("169.254.169.254"), 443, &[])),
            DenyReason::SpecialAddress("link-local (incl. cloud metadata 169.254.169.254)")
        );
        assert_eq!(
            denied(&p.check_addr("[::ffff:127.0.0.1]", ip("::ffff:127.0.0.1"), 443, &[])),
            DenyReason::SpecialAddress("loopback")
        );
        // A range within the special one does, and a host address needs itself named.
        let own = [ip("10.0.0.5")];
        let p = policy(&["127.0.0.1:8080", "10.0.0.0/8:5432", "10.0.0.5:5432"], &[]);
        allowed(&p.check_addr("127.0.0.1", ip("127.0.0.1"), 8080, &[]));
        allowed(&p.check_addr("[::ffff:127.0.0.1]", ip("::ffff:127.0.0.1"), 8080, &[]));
        assert_eq!(
            allowed(&p.check_addr("10.0.0.5", ip("10.0.0.5"), 5432, &own)),
            "10.0.0.5:5432"
        );
        let p = policy(&["10.0.0.0/8:5432"], &[]);
        assert_eq!(
            denied(&p.check_addr("10.0.0.5", ip("10.0.0.5"), 5432, &own)),
            DenyReason::SpecialAddress("private (RFC 1918)")
        );
        allowed(&p.check_addr("10.0.0.6", ip("10.0.0.6"), 5432, &own));
    }

    #[test]
    fn an_ip_literal_connects_only_to_itself() {
        let p = policy(&["203.0.113.0/24"], &[]);
        allowed(&p.check_addr("203.0.113.5", ip("203.0.113.5"), 443, &[]));
        assert_eq!(
            denied(&p.check_addr("203.0.113.5", ip("198.51.100.1"), 443, &[])),
            DenyReason::IpLiteral
        );
    }

    #[test]
    fn bundles_expand_and_rules_remember_their_entry() {
        let p = policy(&["pypi", "debian"], &[]);
        assert_eq!(allowed(&p.check_name("pypi.org", 443)), "pypi (pypi.org)");
        assert_eq!(
            allowed(&p.check_name("files.pythonhosted.org", 443)),
            "pypi (files.pythonhosted.org)"
        );
        assert_eq!(allowed(&p.check_name("deb.debian.org", 80)), "debian (deb.debian.org)");
        assert_eq!(denied(&p.check_name("registry.npmjs.org", 443)), DenyReason::NotAllowed);
        let rule = &p.allow()[0];
        assert_eq!((rule.source(), rule.entry().as_str()), ("pypi", "pypi.org"));
        assert_eq!(p.allow().len(), 4);

        let p = policy(&["github"], &["gist.github.com"]);
        allowed(&p.check_name("api.github.com", 443));
        allowed(&p.check_name("objects.githubusercontent.com", 443));
        allowed(&p.check_name("codeload.github.com", 443));
        assert_eq!(p.check_name("gist.github.com", 443).rule(), Some("gist.github.com"));
        // Bundles expand in deny lists too.
        let p = policy(&["*.pypi.org", "pypi.org"], &["pypi"]);
        assert_eq!(
            p.check_name("pypi.org", 443),
            Verdict::Deny {
                reason: DenyReason::DeniedByRule,
                rule: Some("pypi (pypi.org)".into())
            }
        );
    }

    #[test]
    fn operator_bundles_are_checked_and_may_not_nest() {
        let mut extra = BTreeMap::new();
        extra.insert(
            "internal".to_string(),
            strings(&["git.corp.example", "10.20.0.0/16:5432"]),
        );
        extra.insert("npm".to_string(), strings(&["npm.corp.example"]));
        let bundles = merge_bundles(&extra);
        validate_bundles(&bundles).unwrap();
        validate_bundles(&default_bundles()).unwrap();
        let p = EgressPolicy::parse(&strings(&["internal", "npm"]), &[], &bundles).unwrap();
        assert_eq!(
            allowed(&p.check_name("npm.corp.example", 443)),
            "npm (npm.corp.example)"
        );
        assert_eq!(denied(&p.check_name("registry.npmjs.org", 443)), DenyReason::NotAllowed);
        let m = parse_entry_with("foo", &bundles).unwrap_err();
        assert!(m.contains("debian, github, internal, npm, pypi"), "{m}");

        let mut nested = default_bundles();
        nested.insert("all".to_string(), strings(&["example.com", "pypi"]));
        let m = validate_bundles(&nested).unwrap_err();
        assert!(
            m.starts_with("bundles.all[1]: \"pypi\"") && m.contains("other bundles"),
            "{m}"
        );
        let e = EgressPolicy::parse(&strings(&["pypi.org", "all"]), &[], &nested).unwrap_err();
        assert_eq!((e.list.as_str(), e.index, e.entry.as_str()), ("allow", 1, "all"));
        assert!(e.to_string().starts_with("allow[1]: bundle \"all\": \"pypi\""), "{e}");

        let mut bad = default_bundles();
        bad.insert("broken".to_string(), strings(&["a..b"]));
        let m = validate_bundles(&bad).unwrap_err();
        assert_eq!(m, "bundles.broken[0]: \"a..b\" has an empty label");
        let mut bad = default_bundles();
        bad.insert("a.b".to_string(), vec![]);
        assert!(validate_bundles(&bad)
            .unwrap_err()
            .contains("\"a.b\" is not a bundle name"));
        let mut bad = default_bundles();
        bad.insert("123".to_string(), vec![]);
        assert!(validate_bundles(&bad)
            .unwrap_err()
            .contains("\"123\" is not a bundle name"));
    }

    #[test]
    fn policy_errors_say_where() {
        let e =
            EgressPolicy::parse(&strings(&["pypi.org", "github", "foo..com"]), &[], &default_bundles()).unwrap_err();
        assert_eq!(e.to_string(), "allow[2]: \"foo..com\" has an empty label");
        assert_eq!((e.index, e.entry.as_str()), (2, "foo..com"));
        let e = EgressPolicy::parse(&[], &strings(&["*"]), &default_bundles()).unwrap_err();
        assert_eq!((e.list.as_str(), e.index), ("deny", 0));
    }

    #[test]
    fn verdicts_and_reasons_have_codes_and_messages() {
        let p = EgressPolicy::default();
        let v = p.check_name("pypi.org", 443);
        assert_eq!(denied(&v).as_str(), "not_allowed");
        assert_eq!(
            v.to_string(),
            "denied (not_allowed): no allow entry matches this host and port"
        );
        assert_eq!(DenyReason::DeniedByRule.to_string(), "denied");
        assert_eq!(DenyReason::IpLiteral.as_str(), "ip_literal");
        let r = DenyReason::SpecialAddress("loopback");
        assert_eq!(r.as_str(), "special_address");
        assert!(r.message().contains("loopback"));
        assert_eq!(
            policy(&["pypi"], &[]).check_name("pypi.org", 443).to_string(),
            "allowed by pypi (pypi.org)"
        );
    }

    #[test]
    fn modes_parse() {
        assert_eq!("none".parse::<Mode>().unwrap(), Mode::Isolated);
        assert_eq!("isolated".parse::<Mode>().unwrap(), Mode::Isolated);
        assert_eq!("proxy".parse::<Mode>().unwrap(), Mode::Proxy);
        assert_eq!("egress".parse::<Mode>().unwrap(), Mode::Egress);
        assert!("open"
            .parse::<Mode>()
            .unwrap_err()
            .contains("isolated, none, proxy, egress"));
        assert_eq!(Mode::Proxy.as_str(), "proxy");
        assert_eq!(Mode::default(), Mode::Isolated);
    }

    #[test]
    fn layers_replace_allow_accumulate_deny_and_imply_proxy() {
        let base = PolicyLayer {
            mode: None,
            allow: Some(strings(&["pypi", "github"])),
            deny: strings(&["gist.github.com"]),
        };
        let task = PolicyLayer {
            mode: None,
            allow: Some(strings(&["pypi"])),
            deny: strings(&["upload.pypi.org", "gist.github.com"]),
        };
        let r = resolve(&[base.clone(), PolicyLayer::default(), task]);
        assert_eq!(r.mode, Mode::Proxy);
        assert_eq!(r.allow, strings(&["pypi"]));
        assert_eq!(r.deny, strings(&["gist.github.com", "upload.pypi.org"]));

        // A layer without allow keeps the earlier list.
        let r = resolve(&[base.clone(), PolicyLayer::default()]);
        assert_eq!(r.allow, strings(&["pypi", "github"]));

        // An explicit mode after (or beside) the allow wins; one before it does not.
        let egress = PolicyLayer {
            mode: Some(Mode::Egress),
            ..PolicyLayer::default()
        };
        assert_eq!(resolve(&[base.clone(), egress.clone()]).mode, Mode::Egress);
        assert_eq!(resolve(&[egress.clone(), base.clone()]).mode, Mode::Proxy);
        let both = PolicyLayer {
            mode: Some(Mode::Isolated),
            allow: Some(strings(&["pypi"])),
            deny: vec![],
        };
        assert_eq!(resolve(&[both]).mode, Mode::Isolated);

        // Nothing given: isolated; an empty allow implies nothing.
        assert_eq!(resolve(&[]), ResolvedNetwork::default());
        let empty = PolicyLayer {
            allow: Some(vec![]),
            ..PolicyLayer::default()
        };
        assert_eq!(resolve(std::slice::from_ref(&empty)).mode, Mode::Isolated);
        let r = resolve(&[base, empty]);
        assert_eq!((r.mode, r.allow.len()), (Mode::Proxy, 0));
    }

    fn entries(v: &[&str]) -> Vec<Entry> {
        v.iter().map(|s| parse_entry(s).unwrap()).collect()
    }

    #[test]
    fn bound_coverage() {
        let bound = entries(&[
            "pypi.org",
            "*.github.com",
            "*.example.com:8443",
            "10.0.0.0/8",
            "[fd00::/8]:443",
        ]);
        let inside = [
            "pypi.org",
            "pypi.org:443",
            "pypi.org:80",
            "api.github.com",
            "*.github.com",
            "*.eu.github.com",
            "*.example.com:8443",
            "a.example.com:8443",
            "10.1.0.0/16",
            "10.1.2.3:443",
            "[fd00::1]:443",
        ];
        for e in inside {
            assert!(within_bound(&parse_entry(e).unwrap(), &bound), "{e} should be inside");
        }
        let outside = [
            "files.pythonhosted.org",
            "www.pypi.org",
            "pypi.org:22",
            "github.com",
            "*.com.github.com.evil.org",
            "*.example.com",
            "a.example.com",
            "a.example.com:443",
            "0.0.0.0/0",
            "10.0.0.0/7",
            "11.0.0.1",
            "10.1.2.3:5432",
            "fd00::1",
            "pypi",
        ];
        for e in outside {
            assert!(!within_bound(&parse_entry(e).unwrap(), &bound), "{e} should be outside");
        }
        // A wildcard covers a narrower wildcard, not a broader one.
        assert!(!within_bound(
            &parse_entry("*.github.com").unwrap(),
            &entries(&["*.api.github.com"])
        ));
    }

    #[test]
    fn check_bound_expands_bundles_and_names_the_culprit() {
        let b = default_bundles();
        let bound = strings(&["pypi", "*.github.com", "github.com", "10.0.0.0/8:5432"]);
        check_bound(
            &strings(&["pypi", "api.github.com", "10.1.0.0/16:5432"]),
            Some(&bound),
            &b,
        )
        .unwrap();
        check_bound(&strings(&["files.pythonhosted.org:443"]), Some(&bound), &b).unwrap();
        check_bound(&strings(&["anything.example"]), None, &b).unwrap();
        assert!(check_bound(&strings(&["a..b"]), None, &b).is_err());

        let e = check_bound(&strings(&["pypi", "github"]), Some(&bound), &b).unwrap_err();
        assert_eq!((e.list.as_str(), e.index, e.entry.as_str()), ("allow", 1, "github"));
        assert_eq!(
            e.to_string(),
            "allow[1]: \"github\" (bundle member \"*.githubusercontent.com\") is outside the operator's bound network.egress.max_allow"
        );
        let e = check_bound(&strings(&["github.com:22"]), Some(&bound), &b).unwrap_err();
        assert!(
            e.message.contains("\"github.com:22\"") && e.message.contains("not port 22"),
            "{e}"
        );
        let e = check_bound(&strings(&["10.0.0.0/8"]), Some(&bound), &b).unwrap_err();
        assert!(e.message.contains("not both default ports 80 and 443"), "{e}");
        let e = check_bound(&strings(&["npmjs.org"]), Some(&bound), &b).unwrap_err();
        assert_eq!(
            e.message,
            "\"npmjs.org\" is outside the operator's bound network.egress.max_allow"
        );
        let e = check_bound(&[], Some(&strings(&["x..y"])), &b).unwrap_err();
        assert_eq!(e.to_string(), "max_allow[0]: \"x..y\" has an empty label");
        // An empty bound allows nothing.
        assert!(check_bound(&strings(&["pypi.org"]), Some(&[]), &b).is_err());
    }

    #[test]
    fn cidr_arithmetic() {
        let c = Cidr::new(ip("10.0.0.0"), 8).unwrap();
        assert!(c.contains(ip("10.255.255.255")) && !c.contains(ip("11.0.0.0")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("::a01:203")));
        assert!(c.contains_cidr(&Cidr::new(ip("10.1.0.0"), 16).unwrap()));
        assert!(!Cidr::new(ip("10.1.0.0"), 16).unwrap().contains_cidr(&c));
        let all = Cidr::new(ip("0.0.0.0"), 0).unwrap();
        assert!(all.contains(ip("1.2.3.4")) && !all.contains(ip("::1")));
        assert!(Cidr::new(ip("::"), 0).unwrap().contains(ip("2001:db8::1")));
        assert_eq!(
            Cidr::new(ip("10.0.0.1"), 8).unwrap_err(),
            "has host bits set; did you mean 10.0.0.0/8?"
        );
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_err());
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::host(ip("::ffff:1.2.3.4")).to_string(), "1.2.3.4/32");
    }
}
