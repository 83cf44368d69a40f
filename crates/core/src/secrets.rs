//! Secrets that never enter a workspace: the egress proxy adds them to requests.
//!
//! A secret is a name, a value kept on the host, and injection rules ([`SecretSpec`]). A
//! rule names a destination ([`InjectionRule::host`]: an exact name or a `*.suffix`
//! wildcard, with an optional port, parsed like an egress entry, see
//! [`crate::egress::parse_entry`]) and what to add to requests going there
//! ([`Injection`]): a header built from a template (`Authorization: Bearer {value}`,
//! `X-Api-Key: {value}`), or HTTP Basic credentials for git over HTTPS.
//!
//! Inside the workspace the secret is only a placeholder ([`placeholder`], e.g.
//! `conductor-secret-github-<random>`) in an environment variable ([`env_var`], e.g.
//! `GITHUB_TOKEN`), so tools that insist on a token still send one. On a request to one of
//! the secret's hosts the proxy calls [`apply`]: the rule's header is set to the real value
//! (whatever the workspace sent in it) and the placeholder is replaced in the other headers.
//! A request to any other host is left as it is: a placeholder sent there goes out
//! unchanged, which gives away nothing (it is not the secret and is useless elsewhere).
//!
//! A rule without a port means port 443 only (not 80): a secret is injected only where the
//! proxy terminates TLS and re-encrypts to the upstream, never into plain HTTP. An
//! explicit port means that port alone.
//!
//! A workspace or task names the secrets it may use; [`bound_check`] checks those names
//! against the registered ones and the operator's bound. Everything here is pure: the
//! store keeps the values (encrypted), the proxy does the TLS and the HTTP.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::egress::{self, Entry, Target};

/// The longest secret name.
pub const MAX_NAME_LEN: usize = 63;
/// The start of every placeholder: `conductor-secret-<name>-<random>`.
pub const PLACEHOLDER_PREFIX: &str = "conductor-secret-";
/// What a header template holds exactly once, where the value goes.
pub const VALUE_MARKER: &str = "{value}";
/// The port a rule without one means: HTTPS only.
pub const DEFAULT_PORT: u16 = 443;
/// The header a [`Injection::Basic`] rule sets.
pub const BASIC_HEADER: &str = "Authorization";
/// The longest header name a rule may set.
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// The longest header template.
pub const MAX_TEMPLATE_LEN: usize = 4096;
/// The longest Basic user name.
pub const MAX_USERNAME_LEN: usize = 256;
/// The longest secret value.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// Headers no rule may set: hop-by-hop ones (the proxy's business, not the upstream's)
/// and those that frame the request.
const FORBIDDEN_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// A secret as registered: its name and where it is injected. The value is kept apart
/// (in the store, encrypted) and never serialised with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// `[a-z0-9][a-z0-9_-]{0,62}`; names the placeholder and the environment variable.
    pub name: String,
    /// Where the secret goes; the first rule matching a host decides ([`Self::rule_for`]).
    pub rules: Vec<InjectionRule>,
}

/// One destination of a secret and what to add to requests going there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectionRule {
    /// `api.github.com`, `*.github.com` (subdomains only, not `github.com` itself), with an
    /// optional `:port` (without: 443). No addresses, no bundles.
    pub host: String,
    pub inject: Injection,
}

/// A secret a workspace may use, as kept with the workspace: its name and the placeholder
/// its environment holds instead of the value ([`placeholder`]). The placeholder is random
/// per workspace and is not secret: it is useless anywhere but through the proxy, which
/// puts the value in only on the secret's own hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBinding {
    pub name: String,
    pub placeholder: String,
}

/// What a rule adds to a request. In JSON: `{"type": "header", "name": "Authorization",
/// "value": "Bearer {value}"}` or `{"type": "basic", "username": "x-access-token"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Injection {
    /// Sets header `name` to `value` with [`VALUE_MARKER`] replaced by the secret.
    Header { name: String, value: String },
    /// Sets `Authorization: Basic base64(username:secret)`, the credential git (and any
    /// HTTP client) sends; git then never needs a credential helper.
    Basic { username: String },
}

impl Injection {
    /// The header this injection sets.
    pub fn header_name(&self) -> &str {
        match self {
            Injection::Header { name, .. } => name,
            Injection::Basic { .. } => BASIC_HEADER,
        }
    }
}

/// `field.sub`, or `sub` alone when `field` is empty (a body that is one secret).
fn key(field: &str, sub: &str) -> String {
    if field.is_empty() {
        sub.to_string()
    } else {
        format!("{field}.{sub}")
    }
}

impl SecretSpec {
    /// Checks the name and every rule. The error is `(field, message)`, the field under
    /// `field` (e.g. `secrets[0]` gives `secrets[0].rules[1].inject.name`; an empty
    /// `field` gives `rules[1].inject.name`).
    pub fn validate(&self, field: &str) -> Result<(), (String, String)> {
        validate_name(&self.name).map_err(|m| (key(field, "name"), m))?;
        if self.rules.is_empty() {
            return Err((
                key(field, "rules"),
                "is empty; name at least one host to inject the secret into".into(),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(&key(field, &format!("rules[{i}]")))?;
        }
        Ok(())
    }

    /// The first rule matching a request for `host` on `port`: the one [`apply`] is to be
    /// called with. `None` for a host the secret never goes to.
    pub fn rule_for(&self, host: &str, port: u16) -> Option<&InjectionRule> {
        self.rules.iter().find(|r| r.matches(host, port))
    }

    /// Whether some rule matches `host` on `port` (the proxy terminates TLS only then).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.rule_for(host, port).is_some()
    }

    /// The environment variable holding the placeholder in the workspace ([`env_var`]).
    pub fn env_var(&self) -> String {
        env_var(&self.name)
    }
}

impl InjectionRule {
    /// Checks the host and the injection; fields as for [`SecretSpec::validate`]
    /// (`<field>.host`, `<field>.inject.name`, `.inject.value`, `.inject.username`).
    pub fn validate(&self, field: &str) -> Result<(), (String, String)> {
        parse_host(&self.host).map_err(|m| (key(field, "host"), m))?;
        match &self.inject {
            Injection::Header { name, value } => {
                validate_header_name(name).map_err(|m| (key(field, "inject.name"), m))?;
                validate_template(value).map_err(|m| (key(field, "inject.value"), m))?;
            }
            Injection::Basic { username } => {
                validate_username(username).map_err(|m| (key(field, "inject.username"), m))?;
            }
        }
        Ok(())
    }

    /// The parsed host entry.
    pub fn entry(&self) -> Result<Entry, String> {
        parse_host(&self.host)
    }

    /// Whether a request for `host` (without port, as the client named it) on `port`
    /// goes where this rule injects: the name matches, and the port is the rule's (443
    /// when it gives none). A rule whose host does not parse matches nothing.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.entry()
            .is_ok_and(|e| e.matches_name(host) && e.port().unwrap_or(DEFAULT_PORT) == port)
    }

    /// The header to set for `value`: `(name, value)`, the template filled in, or for
    /// Basic `("Authorization", "Basic <base64(username:value)>")`. This is what the
    /// proxy adds; it holds the secret, so never log it.
    pub fn header(&self, value: &str) -> (String, String) {
        match &self.inject {
            Injection::Header { name, value: template } => (name.clone(), template.replacen(VALUE_MARKER, value, 1)),
            Injection::Basic { username } => (
                BASIC_HEADER.to_string(),
                format!("Basic {}", base64(format!("{username}:{value}").as_bytes())),
            ),
        }
    }
}

/// Checks a list of secrets (`field` names it, e.g. `secrets`): each as
/// [`SecretSpec::validate`] under `field[i]`, no name twice, and no two names that would
/// give the same environment variable (`a-b` and `a_b`).
pub fn validate_specs(specs: &[SecretSpec], field: &str) -> Result<(), (String, String)> {
    let mut vars: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let item = format!("{field}[{i}]");
        spec.validate(&item)?;
        if let Some((j, other)) = vars.insert(spec.env_var(), (i, &spec.name)) {
            let message = if other == spec.name {
                format!("{:?} is defined twice (also at {field}[{j}])", spec.name)
            } else {
                format!(
                    "{:?} and {other:?} (at {field}[{j}]) would both be {} in the workspace",
                    spec.name,
                    spec.env_var()
                )
            };
            return Err((format!("{item}.name"), message));
        }
    }
    Ok(())
}

/// A secret name: `[a-z0-9][a-z0-9_-]{0,62}`, and not `conductor` or `conductor-…`,
/// whose environment variables conductor keeps for itself.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(format!("{name:?} must start with a lowercase letter or a digit"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{name:?} contains {bad:?}; allowed are lowercase letters, digits, '-' and '_'"
        ));
    }
    if env_var(name).starts_with(crate::validate::RESERVED_ENV_PREFIX) {
        return Err(format!(
            "{name:?} would be {}, and names starting with {} are reserved for conductor",
            env_var(name),
            crate::validate::RESERVED_ENV_PREFIX
        ));
    }
    Ok(())
}

/// The host of a rule: an exact name or `*.suffix`, with an optional `:port`, parsed as an
/// egress entry. Addresses, ranges and bundles are refused: a secret goes to a named host.
pub fn parse_host(host: &str) -> Result<Entry, String> {
    let text = host.trim();
    let hint = "write an exact name such as api.github.com or a wildcard such as *.github.com, optionally with :port";
    if text.is_empty() {
        return Err(format!("is empty; {hint}"));
    }
    // A word without a dot would be read as a bundle name; say what it is here.
    let colons = text.matches(':').count();
    let bare = if colons == 1 {
        text.split(':').next().unwrap_or(text)
    } else {
        text
    };
    if colons <= 1 && !bare.starts_with('[') && !bare.contains('.') {
        return Err(format!(
            "{text:?} is not a fully qualified host name (bundles are not allowed here); {hint}"
        ));
    }
    let entry = egress::parse_entry_with(text, &BTreeMap::new())?;
    match entry.target() {
        Target::Name(_) | Target::Wildcard(_) => Ok(entry),
        Target::Cidr(_) | Target::Bundle(_) => Err(format!(
            "{text:?} is an IP address or range; injection rules name hosts: {hint}"
        )),
    }
}

/// A header a rule may set: a valid HTTP field name (token characters), not a hop-by-hop
/// header, `Host` or `Content-Length`.
pub fn validate_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(format!("is longer than {MAX_HEADER_NAME_LEN} characters"));
    }
    if let Some(bad) = name.chars().find(|c| !is_token_char(*c)) {
        return Err(format!(
            "{name:?} contains {bad:?}; a header name holds letters, digits and !#$%&'*+-.^_`|~"
        ));
    }
    if is_forbidden_header(name) {
        return Err(format!(
            "{name:?} cannot be set by a rule (hop-by-hop headers, Host and Content-Length belong to the proxy)"
        ));
    }
    Ok(())
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn is_forbidden_header(name: &str) -> bool {
    FORBIDDEN_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Printable ASCII and spaces, the characters a header value (or a Basic credential) may
/// hold here.
fn is_value_char(c: char) -> bool {
    c == ' ' || c.is_ascii_graphic()
}

/// A header template: [`VALUE_MARKER`] exactly once, printable ASCII (no CR, LF or other
/// control character), at most [`MAX_TEMPLATE_LEN`] characters.
pub fn validate_template(template: &str) -> Result<(), String> {
    if template.len() > MAX_TEMPLATE_LEN {
        return Err(format!("is longer than {MAX_TEMPLATE_LEN} characters"));
    }
    if template.contains(['\r', '\n']) {
        return Err("contains a line break (CR or LF), which would split the header".into());
    }
    if let Some(bad) = template.chars().find(|c| !is_value_char(*c)) {
        return Err(format!(
            "contains {bad:?}; a header template holds printable ASCII characters and spaces"
        ));
    }
    match template.matches(VALUE_MARKER).count() {
        1 => Ok(()),
        0 => Err(format!(
            "{template:?} has no {VALUE_MARKER}; write where the secret goes, e.g. \"Bearer {VALUE_MARKER}\""
        )),
        n => Err(format!(
            "{template:?} has {VALUE_MARKER} {n} times; it must appear exactly once"
        )),
    }
}

/// A Basic user name: not empty, printable ASCII without ':' (RFC 7617), at most
/// [`MAX_USERNAME_LEN`] characters.
pub fn validate_username(username: &str) -> Result<(), String> {
    if username.is_empty() {
        return Err("must not be empty (git over HTTPS takes any name, e.g. x-access-token or git)".into());
    }
    if username.len() > MAX_USERNAME_LEN {
        return Err(format!("is longer than {MAX_USERNAME_LEN} characters"));
    }
    if username.contains(':') {
        return Err(format!("{username:?} contains ':', which a Basic user name may not"));
    }
    if let Some(bad) = username.chars().find(|c| !is_value_char(*c)) {
        return Err(format!(
            "{username:?} contains {bad:?}; a user name holds printable ASCII characters"
        ));
    }
    Ok(())
}

/// A secret's value as read from a file, an environment variable or a request, checked
/// and borrowed as text: one trailing newline (`\n` or `\r\n`, as files and `echo` leave)
/// is dropped; the rest must be 1 to [`MAX_VALUE_LEN`] printable ASCII characters, not
/// starting or ending with a space (HTTP would trim it). Messages never quote the value.
pub fn check_value(raw: &[u8]) -> Result<&str, String> {
    let raw = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw);
    if raw.is_empty() {
        return Err("the secret's value is empty".into());
    }
    if raw.len() > MAX_VALUE_LEN {
        return Err(format!("the secret's value is longer than {MAX_VALUE_LEN} bytes"));
    }
    if raw.contains(&b'\r') || raw.contains(&b'\n') {
        return Err("the secret's value contains a line break (only one at the end is dropped)".into());
    }
    if let Some(pos) = raw.iter().position(|b| !is_value_char(char::from(*b))) {
        return Err(format!(
            "the secret's value holds a control or non-ASCII byte at offset {pos}; values are printable ASCII"
        ));
    }
    if raw.starts_with(b" ") || raw.ends_with(b" ") {
        return Err("the secret's value starts or ends with a space".into());
    }
    // Every byte is ASCII, so this cannot fail.
    std::str::from_utf8(raw).map_err(|_| "the secret's value is not text".to_string())
}

/// The placeholder a workspace gets instead of the secret:
/// `conductor-secret-<name>-<random>`. `random` comes from the caller (core draws no
/// random numbers): use at least 16 random bytes as lowercase hex, new for each
/// workspace, so a placeholder is never the same twice.
pub fn placeholder(name: &str, random: &str) -> String {
    format!("{PLACEHOLDER_PREFIX}{name}-{random}")
}

/// The environment variable holding a secret's placeholder in the workspace: the name
/// in upper case, `-` as `_`, then `_TOKEN` (`github` → `GITHUB_TOKEN`, `npm-corp` →
/// `NPM_CORP_TOKEN`); a name starting with a digit gets `SECRET_` in front
/// (`1password` → `SECRET_1PASSWORD_TOKEN`), since a variable may not start with one.
/// `a-b` and `a_b` give the same variable: [`validate_specs`] and [`bound_check`] refuse
/// both in one list.
pub fn env_var(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| if c == '-' { '_' } else { c.to_ascii_uppercase() })
        .collect();
    if upper.starts_with(|c: char| c.is_ascii_digit()) {
        format!("SECRET_{upper}_TOKEN")
    } else {
        format!("{upper}_TOKEN")
    }
}

/// Injects a secret into a request's headers if the request goes where `rule` says.
///
/// `host` is the host the request goes to, without port (the CONNECT host the proxy
/// terminated TLS for), `port` its port. When `rule` matches them ([`InjectionRule::
/// matches`]): every occurrence of `placeholder` in the other headers' values is
/// replaced by `value`, and then the rule's header is set to [`InjectionRule::header`],
/// replacing every header of that name (case-insensitively) the workspace sent, at the
/// place of the first one (else appended). Hop-by-hop headers, `Host` and
/// `Content-Length` are never touched. Returns whether it injected; when it does not (the
/// host or port is another one, or `value` fails [`check_value`], or `placeholder` is
/// empty), `headers` are left exactly as they were, placeholder included.
///
/// Call it with the first matching rule of each secret the workspace may use
/// ([`SecretSpec::rule_for`]); if two secrets set the same header of one host, the later
/// call wins.
pub fn apply(
    rule: &InjectionRule,
    host: &str,
    port: u16,
    headers: &mut Vec<(String, String)>,
    placeholder: &str,
    value: &str,
) -> bool {
    if placeholder.is_empty() || !rule.matches(host, port) || check_value(value.as_bytes()) != Ok(value) {
        return false;
    }
    let (name, rendered) = rule.header(value);
    for (n, v) in headers.iter_mut() {
        if !n.eq_ignore_ascii_case(&name) && !is_forbidden_header(n) && v.contains(placeholder) {
            *v = v.replace(placeholder, value);
        }
    }
    let first = headers.iter().position(|(n, _)| n.eq_ignore_ascii_case(&name));
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
    let at = first.unwrap_or(headers.len());
    headers.insert(at, (name, rendered));
    true
}

/// Checks the secrets a workspace or task asks for (`requested`, e.g. its `"secrets":
/// ["github"]`): each is a valid name, is registered (`known`), is within the operator's
/// bound (`allowed`; `None`: no bound, `Some(&[])`: none allowed), is asked for once, and
/// no two give the same environment variable. The error is the index into `requested`
/// and a sentence; the caller prefixes its field (`secrets[1]`).
pub fn bound_check(requested: &[String], allowed: Option<&[String]>, known: &[String]) -> Result<(), (usize, String)> {
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
            sorted.sort_unstable();
            sorted.dedup();
            sorted.join(", ")
        }
    };
    let mut vars: BTreeMap<String, usize> = BTreeMap::new();
    for (i, name) in requested.iter().enumerate() {
        validate_name(name).map_err(|m| (i, format!("secret name {m}")))?;
        if !known.contains(name) {
            return Err((
                i,
                format!("no secret named {name:?} is registered (registered: {})", list(known)),
            ));
        }
        if let Some(allowed) = allowed {
            if !allowed.contains(name) {
                return Err((
                    i,
                    format!(
                        "secret {name:?} is outside the operator's bound (allowed: {})",
                        list(allowed)
                    ),
                ));
            }
        }
        if let Some(j) = vars.insert(env_var(name), i) {
            let other = &requested[j];
            let message = if other == name {
                format!("secret {name:?} is named twice (also at [{j}])")
            } else {
                format!(
                    "secrets {name:?} and {other:?} (at [{j}]) would both be {} in the workspace",
                    env_var(name)
                )
            };
            return Err((i, message));
        }
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648 section 4), for the Basic credential.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_rule(host: &str, name: &str, template: &str) -> InjectionRule {
        InjectionRule {
            host: host.into(),
            inject: Injection::Header {
                name: name.into(),
                value: template.into(),
            },
        }
    }

    fn basic_rule(host: &str, username: &str) -> InjectionRule {
        InjectionRule {
            host: host.into(),
            inject: Injection::Basic {
                username: username.into(),
            },
        }
    }

    fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn field_error(spec: &SecretSpec) -> (String, String) {
        spec.validate("secrets[0]").unwrap_err()
    }

    const PH: &str = "conductor-secret-github-0123456789abcdef";
    const VALUE: &str = "ghp_realvalue123";

    #[test]
    fn specs_serialise_as_tagged_json() {
        let spec = SecretSpec {
            name: "github".into(),
            rules: vec![
                basic_rule("github.com", "x-access-token"),
                header_rule("*.github.com", "Authorization", "Bearer {value}"),
            ],
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "github",
                "rules": [
                    {"host": "github.com", "inject": {"type": "basic", "username": "x-access-token"}},
                    {"host": "*.github.com", "inject": {"type": "header", "name": "Authorization", "value": "Bearer {value}"}},
                ]
            })
        );
        assert_eq!(serde_json::from_value::<SecretSpec>(json).unwrap(), spec);
        for bad in [
            r#"{"name":"a","rules":[],"value":"x"}"#,
            r#"{"name":"a","rules":[{"host":"a.example","inject":{"type":"basic","username":"u","extra":1}}]}"#,
            r#"{"name":"a","rules":[{"host":"a.example","inject":{"type":"cookie","name":"c"}}]}"#,
            r#"{"name":"a","rules":[{"host":"a.example"}]}"#,
        ] {
            assert!(serde_json::from_str::<SecretSpec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_names_wildcards_and_ports() {
        let exact = header_rule("api.github.com", "Authorization", "Bearer {value}");
        assert!(exact.matches("api.github.com", 443));
        assert!(exact.matches("API.GitHub.com.", 443), "case and a trailing dot");
        assert!(!exact.matches("api.github.com", 80), "no port means 443 only");
        assert!(!exact.matches("api.github.com", 8443));
        assert!(!exact.matches("github.com", 443));
        assert!(!exact.matches("evil-api.github.com", 443));
        assert!(!exact.matches("api.github.com.evil.org", 443));
        assert!(!exact.matches("api.github.com:443", 443), "host is given without port");

        let wild = header_rule("*.github.com", "Authorization", "Bearer {value}");
        assert!(wild.matches("api.github.com", 443));
        assert!(wild.matches("a.b.github.com", 443));
        assert!(!wild.matches("github.com", 443), "the apex is not a subdomain");
        assert!(!wild.matches("notgithub.com", 443));
        assert!(!wild.matches("github.com.evil.org", 443));

        let port = header_rule("git.corp.example:8443", "X-Api-Key", "{value}");
        assert!(port.matches("git.corp.example", 8443));
        assert!(!port.matches("git.corp.example", 443));
        let wild_port = header_rule("*.corp.example:8443", "X-Api-Key", "{value}");
        assert!(wild_port.matches("git.corp.example", 8443));
        assert!(!wild_port.matches("git.corp.example", 443));

        // Nothing matches an IP literal, and a broken rule matches nothing.
        assert!(!exact.matches("140.82.112.6", 443));
        assert!(!header_rule("a..b", "X", "{value}").matches("a..b", 443));

        let spec = SecretSpec {
            name: "github".into(),
            rules: vec![
                basic_rule("github.com", "git"),
                header_rule("*.github.com", "Authorization", "token {value}"),
            ],
        };
        assert_eq!(spec.rule_for("github.com", 443), Some(&spec.rules[0]));
        assert_eq!(spec.rule_for("api.github.com", 443), Some(&spec.rules[1]));
        assert!(spec.matches("api.github.com", 443));
        assert!(!spec.matches("gitlab.com", 443));
        assert_eq!(spec.rule_for("github.com", 80), None);
    }

    #[test]
    fn apply_replaces_the_placeholder_and_sets_the_header() {
        let rule = header_rule("api.github.com", "Authorization", "Bearer {value}");
        let mut h = headers(&[
            ("Accept", "*/*"),
            ("authorization", &format!("Bearer {PH}")),
            ("X-Token", &format!("{PH},{PH}")),
            ("User-Agent", "curl"),
        ]);
        assert!(apply(&rule, "api.github.com", 443, &mut h, PH, VALUE));
        assert_eq!(
            h,
            headers(&[
                ("Accept", "*/*"),
                ("Authorization", &format!("Bearer {VALUE}")),
                ("X-Token", &format!("{VALUE},{VALUE}")),
                ("User-Agent", "curl"),
            ])
        );

        // Absent: appended. Sent without the placeholder, or twice: replaced by one.
        let mut h = headers(&[("Accept", "*/*")]);
        assert!(apply(&rule, "api.github.com", 443, &mut h, PH, VALUE));
        assert_eq!(h[1], ("Authorization".into(), format!("Bearer {VALUE}")));
        let mut h = headers(&[
            ("Authorization", "Bearer something-else"),
            ("Accept", "*/*"),
            ("AUTHORIZATION", "Basic Zm9vOmJhcg=="),
        ]);
        assert!(apply(&rule, "api.github.com", 443, &mut h, PH, VALUE));
        assert_eq!(
            h,
            headers(&[("Authorization", &format!("Bearer {VALUE}")), ("Accept", "*/*")])
        );

        let key = header_rule("*.example.com:8443", "X-Api-Key", "{value}");
        let mut h = headers(&[("x-api-key", PH)]);
        assert!(apply(&key, "api.example.com", 8443, &mut h, PH, VALUE));
        assert_eq!(h, headers(&[("X-Api-Key", VALUE)]));
    }

    #[test]
    fn apply_leaves_other_hosts_and_ports_unchanged() {
        let rule = header_rule("api.github.com", "Authorization", "Bearer {value}");
        let original = headers(&[("Authorization", &format!("Bearer {PH}")), ("X-Other", PH)]);
        for (host, port) in [
            ("evil.example", 443),
            ("api.github.com.evil.example", 443),
            ("github.com", 443),
            ("api.github.com", 80),
            ("api.github.com", 8443),
            ("140.82.112.6", 443),
        ] {
            let mut h = original.clone();
            assert!(!apply(&rule, host, port, &mut h, PH, VALUE), "{host}:{port}");
            assert_eq!(h, original, "{host}:{port}: the placeholder goes out unchanged");
        }
        // Never into the proxy's own headers, not even on the secret's host.
        let mut h = headers(&[("Proxy-Authorization", PH), ("Connection", PH)]);
        assert!(apply(&rule, "api.github.com", 443, &mut h, PH, VALUE));
        assert_eq!(
            &h[..2],
            &headers(&[("Proxy-Authorization", PH), ("Connection", PH)])[..]
        );
        // A value that would break the header, or no placeholder: nothing happens.
        let mut h = original.clone();
        assert!(!apply(&rule, "api.github.com", 443, &mut h, PH, "a\r\nX-Evil: 1"));
        assert!(!apply(&rule, "api.github.com", 443, &mut h, PH, ""));
        assert!(!apply(&rule, "api.github.com", 443, &mut h, "", VALUE));
        assert_eq!(h, original);
    }

    #[test]
    fn basic_sets_the_git_credential() {
        let rule = basic_rule("git.corp.example:8443", "x-access-token");
        let mut h = headers(&[("User-Agent", "git/2.39")]);
        assert!(apply(&rule, "git.corp.example", 8443, &mut h, PH, "s3cret"));
        // printf 'x-access-token:s3cret' | base64
        assert_eq!(
            h,
            headers(&[
                ("User-Agent", "git/2.39"),
                ("Authorization", "Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0"),
            ])
        );
        // A credential git made from the placeholder is replaced too.
        let mut h = headers(&[(
            "authorization",
            &format!("Basic {}", base64(format!("git:{PH}").as_bytes())),
        )]);
        assert!(apply(&rule, "git.corp.example", 8443, &mut h, PH, "s3cret"));
        assert_eq!(h, headers(&[("Authorization", "Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0")]));
        assert_eq!(rule.inject.header_name(), "Authorization");
        assert_eq!(
            header_rule("a.example", "X-Key", "k={value};").header("v"),
            ("X-Key".to_string(), "k=v;".to_string())
        );
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn placeholders_and_environment_variables() {
        assert_eq!(
            placeholder("github", "0123456789abcdef"),
            "conductor-secret-github-0123456789abcdef"
        );
        assert!(placeholder("x", "y").starts_with(PLACEHOLDER_PREFIX));
        assert_eq!(env_var("github"), "GITHUB_TOKEN");
        assert_eq!(env_var("npm-corp"), "NPM_CORP_TOKEN");
        assert_eq!(env_var("my_api"), "MY_API_TOKEN");
        assert_eq!(env_var("1password"), "SECRET_1PASSWORD_TOKEN");
        for name in ["github", "npm-corp", "my_api", "1password", "0"] {
            crate::validate::env_name(&env_var(name)).unwrap();
        }
        let spec = SecretSpec {
            name: "openai".into(),
            rules: vec![],
        };
        assert_eq!(spec.env_var(), "OPENAI_TOKEN");
    }

    #[test]
    fn names_are_checked() {
        for ok in ["github", "a", "0", "npm-corp", "my_api_2", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for (bad, why) in [
            ("", "must not be empty"),
            ("-a", "must start with"),
            ("_a", "must start with"),
            ("GitHub", "must start with"),
            ("git.hub", "contains '.'"),
            ("gitHub", "contains 'H'"),
            ("a b", "contains ' '"),
            (&"a".repeat(64), "longer than 63"),
            ("conductor", "reserved for conductor"),
            ("conductor-agent", "CONDUCTOR_AGENT_TOKEN"),
        ] {
            let m = validate_name(bad).unwrap_err();
            assert!(m.contains(why), "{bad:?}: {m}");
        }
        validate_name("conductors").unwrap();
    }

    #[test]
    fn bad_rules_name_their_field() {
        let spec = |rules: Vec<InjectionRule>| SecretSpec {
            name: "github".into(),
            rules,
        };
        let good = header_rule("api.github.com", "Authorization", "Bearer {value}");
        spec(vec![good.clone(), basic_rule("github.com:443", "git")])
            .validate("secrets[0]")
            .unwrap();

        let cases: Vec<(InjectionRule, &str, &str)> = vec![
            (header_rule("a..b.com", "X", "{value}"), "host", "empty label"),
            (header_rule("", "X", "{value}"), "host", "is empty"),
            (
                header_rule("localhost", "X", "{value}"),
                "host",
                "not a fully qualified",
            ),
            (header_rule("pypi", "X", "{value}"), "host", "bundles are not allowed"),
            (
                header_rule("github:443", "X", "{value}"),
                "host",
                "not a fully qualified",
            ),
            (header_rule("10.0.0.0/8", "X", "{value}"), "host", "IP address or range"),
            (
                header_rule("140.82.112.6:443", "X", "{value}"),
                "host",
                "IP address or range",
            ),
            (
                header_rule("[fd00::1]:443", "X", "{value}"),
                "host",
                "IP address or range",
            ),
            (header_rule("fd00::1", "X", "{value}"), "host", "IP address or range"),
            (header_rule("*", "X", "{value}"), "host", "not a fully qualified"),
            (header_rule("*.com", "X", "{value}"), "host", "top-level domain"),
            (header_rule("a.*.com", "X", "{value}"), "host", "misplaced wildcard"),
            (header_rule("a.example:0", "X", "{value}"), "host", "port 0"),
            (header_rule("a.example:http", "X", "{value}"), "host", "not a number"),
            (
                header_rule("a.example", "", "{value}"),
                "inject.name",
                "must not be empty",
            ),
            (
                header_rule("a.example", "X Key", "{value}"),
                "inject.name",
                "contains ' '",
            ),
            (
                header_rule("a.example", "X:Key", "{value}"),
                "inject.name",
                "contains ':'",
            ),
            (
                header_rule("a.example", "Host", "{value}"),
                "inject.name",
                "cannot be set",
            ),
            (
                header_rule("a.example", "content-length", "{value}"),
                "inject.name",
                "cannot be set",
            ),
            (
                header_rule("a.example", "Transfer-Encoding", "{value}"),
                "inject.name",
                "cannot be set",
            ),
            (
                header_rule("a.example", "Proxy-Authorization", "{value}"),
                "inject.name",
                "cannot be set",
            ),
            (
                header_rule("a.example", "Connection", "{value}"),
                "inject.name",
                "cannot be set",
            ),
            (
                header_rule("a.example", "X", "Bearer"),
                "inject.value",
                "has no {value}",
            ),
            (
                header_rule("a.example", "X", "{value}{value}"),
                "inject.value",
                "2 times",
            ),
            (
                header_rule("a.example", "X", "{value}\r\nX-Evil: 1"),
                "inject.value",
                "line break",
            ),
            (header_rule("a.example", "X", "{value}\n"), "inject.value", "line break"),
            (
                header_rule("a.example", "X", "{value}\0"),
                "inject.value",
                "contains '\\0'",
            ),
            (
                header_rule("a.example", "X", "é {value}"),
                "inject.value",
                "printable ASCII",
            ),
            (basic_rule("a.example", ""), "inject.username", "must not be empty"),
            (basic_rule("a.example", "a:b"), "inject.username", "contains ':'"),
            (basic_rule("a.example", "a\nb"), "inject.username", "printable ASCII"),
        ];
        for (rule, field, why) in cases {
            let (f, m) = field_error(&spec(vec![good.clone(), rule.clone()]));
            assert_eq!(f, format!("secrets[0].rules[1].{field}"), "{rule:?}: {m}");
            assert!(m.contains(why), "{rule:?}: {m}");
        }

        let (f, m) = field_error(&spec(vec![]));
        assert_eq!(f, "secrets[0].rules");
        assert!(m.contains("is empty"), "{m}");
        let (f, _) = field_error(&SecretSpec {
            name: "Bad".into(),
            rules: vec![good.clone()],
        });
        assert_eq!(f, "secrets[0].name");
        // Without a prefix (a request body that is one secret).
        let (f, _) = spec(vec![header_rule("a..b.com", "X", "{value}")])
            .validate("")
            .unwrap_err();
        assert_eq!(f, "rules[0].host");
    }

    #[test]
    fn lists_of_specs_refuse_duplicates_and_clashing_variables() {
        let spec = |name: &str| SecretSpec {
            name: name.into(),
            rules: vec![header_rule("a.example", "X-Key", "{value}")],
        };
        validate_specs(&[spec("a"), spec("b")], "secrets").unwrap();
        let (f, m) = validate_specs(&[spec("a"), spec("b"), spec("a")], "secrets").unwrap_err();
        assert_eq!(f, "secrets[2].name");
        assert!(m.contains("defined twice (also at secrets[0])"), "{m}");
        let (f, m) = validate_specs(&[spec("a-b"), spec("a_b")], "secrets").unwrap_err();
        assert_eq!(f, "secrets[1].name");
        assert!(m.contains("A_B_TOKEN"), "{m}");
        let (f, _) = validate_specs(&[spec("a"), spec("B")], "secrets").unwrap_err();
        assert_eq!(f, "secrets[1].name");
    }

    #[test]
    fn bound_check_names_the_index() {
        let known = strings(&["github", "npm-corp", "npm_corp", "openai"]);
        let bound = strings(&["github", "npm-corp", "npm_corp"]);
        bound_check(&strings(&["github", "npm-corp"]), Some(&bound), &known).unwrap();
        bound_check(&strings(&["openai"]), None, &known).unwrap();
        bound_check(&[], Some(&[]), &[]).unwrap();

        let err = |requested: &[&str], allowed: Option<&[String]>| {
            bound_check(&strings(requested), allowed, &known).unwrap_err()
        };
        let (i, m) = err(&["github", "gitlab"], Some(&bound));
        assert_eq!(i, 1);
        assert_eq!(
            m,
            "no secret named \"gitlab\" is registered (registered: github, npm-corp, npm_corp, openai)"
        );
        let (i, m) = err(&["github", "openai"], Some(&bound));
        assert_eq!(i, 1);
        assert!(
            m.contains("outside the operator's bound (allowed: github, npm-corp, npm_corp)"),
            "{m}"
        );
        let (i, m) = err(&["github"], Some(&[]));
        assert_eq!(i, 0);
        assert!(m.contains("(allowed: none)"), "{m}");
        let (i, m) = err(&["openai", "Bad!"], None);
        assert_eq!(i, 1);
        assert!(m.starts_with("secret name \"Bad!\""), "{m}");
        let (i, m) = err(&["github", "openai", "github"], None);
        assert_eq!(i, 2);
        assert!(m.contains("named twice (also at [0])"), "{m}");
        let (i, m) = err(&["npm-corp", "npm_corp"], None);
        assert_eq!(i, 1);
        assert!(m.contains("NPM_CORP_TOKEN"), "{m}");
        assert!(bound_check(&strings(&["github"]), None, &[])
            .unwrap_err()
            .1
            .contains("registered: none"));
    }

    #[test]
    fn values_are_checked_without_quoting_them() {
        assert_eq!(check_value(b"ghp_abc\n"), Ok("ghp_abc"));
        assert_eq!(check_value(b"ghp_abc\r\n"), Ok("ghp_abc"));
        assert_eq!(check_value(b"a b"), Ok("a b"));
        for bad in [
            &b""[..],
            b"\n",
            b"tok\n\n",
            b"to\nk",
            b"to\rk",
            b"tok\0",
            b"tok\t",
            b"t\xc3\xa9k",
            b" tok",
            b"tok ",
        ] {
            let m = check_value(bad).unwrap_err();
            assert!(!m.contains("tok"), "{bad:?}: {m}");
        }
        assert!(check_value(&[b'a'; MAX_VALUE_LEN]).is_ok());
        assert!(check_value(&[b'a'; MAX_VALUE_LEN + 1]).is_err());
    }
}
