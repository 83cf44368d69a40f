//! Secrets that never enter a workspace: registered on the host, injected by the egress
//! proxy into requests to their own hosts (docs/egress.md, "Secrets").
//!
//! - **Storage.** Values are sealed in the `secrets` table under the key in
//!   `<base>/secrets.key` (0600, made at first use), the database files are 0600 too.
//!   Config-defined secrets (`secrets.define`) are read from their file or variable and
//!   registered whenever conductor opens; [`Conductor::put_secret`] registers or rotates one
//!   (for `POST /secrets`). Nothing here returns a value.
//! - **Binding.** A workspace (or a task) names the secrets it may use, within
//!   `secrets.max_allow`; each gets a random placeholder of its own, kept with the workspace,
//!   and its rules' hosts are added to the workspace's allow list. The container gets the
//!   placeholder in `<NAME>_TOKEN` and the conductor CA in its trust.
//! - **Injection.** The workspace's egress gate asks for interception of a `CONNECT` whose
//!   host:port a bound secret's rule matches; the proxy then terminates TLS with a leaf from
//!   the per-instance CA (`<base>/egress-ca.crt`, its key `egress-ca.key` 0600) and calls the
//!   [`SecretInjector`] for every request, which reads the current value from the store (so
//!   a rotation applies to the next request) and applies the rule. The audit row names the
//!   secrets injected, never their values.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use conductor_core::config::ConfigError;
use conductor_core::egress::Target;
use conductor_core::secrets::{self as core_secrets, InjectionRule, SecretBinding, SecretSpec};
use conductor_egress_proxy::mitm::{CertificateAuthority, Injector, InterceptConfig, UpstreamTrust};
use conductor_egress_proxy::Interception;
use conductor_store::{SecretKey, SecretMeta, Store};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use crate::{now_ms, Conductor, Result, ServiceError};

/// The key sealing secret values, under the base directory.
pub const KEY_FILE: &str = "secrets.key";
/// The egress CA's certificate and key, under the base directory.
pub const CA_CERT_FILE: &str = "egress-ca.crt";
pub const CA_KEY_FILE: &str = "egress-ca.key";
/// In a workspace's egress directory (mounted at `/run/conductor-egress`): the CA alone,
/// and the host's bundle plus the CA.
pub const WORKSPACE_CA_FILE: &str = "ca.crt";
pub const WORKSPACE_BUNDLE_FILE: &str = "bundle.crt";
/// The host's CA bundle, the start of a workspace's `bundle.crt`.
const HOST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The key and the CA, loaded at first use.
#[derive(Default)]
pub(crate) struct SecretsRuntime {
    key: Mutex<Option<Arc<SecretKey>>>,
    interception: Mutex<Option<Arc<Interception>>>,
}

/// A registered secret as shown to users: everything but its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub rules: Vec<InjectionRule>,
    /// The variable holding the placeholder in a workspace (`GITHUB_TOKEN`).
    pub env_var: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// 1 when registered, one more per rotation.
    pub version: u32,
}

fn parse_rules(name: &str, rules_json: &str) -> Result<Vec<InjectionRule>> {
    serde_json::from_str(rules_json).map_err(|e| {
        ServiceError::Store(conductor_store::StoreError::Corrupt {
            what: format!("secrets row '{name}', column rules_json"),
            detail: e.to_string(),
        })
    })
}

impl SecretInfo {
    fn from_meta(m: SecretMeta) -> Result<Self> {
        Ok(SecretInfo {
            rules: parse_rules(&m.name, &m.rules_json)?,
            env_var: core_secrets::env_var(&m.name),
            created_at: m.created_at,
            updated_at: m.updated_at,
            version: m.version,
            name: m.name,
        })
    }
}

/// 16 random bytes as lowercase hex, for a placeholder.
fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ServiceError::host("draw random numbers for a placeholder", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The allow-list entry that lets a workspace reach where `rule` injects: its host with the
/// rule's port (443 when it gives none, as the rule means).
pub fn allow_entry(rule: &InjectionRule) -> Option<String> {
    let entry = rule.entry().ok()?;
    let port = entry.port().unwrap_or(core_secrets::DEFAULT_PORT);
    match entry.target() {
        Target::Name(name) => Some(format!("{name}:{port}")),
        Target::Wildcard(suffix) => Some(format!("*.{suffix}:{port}")),
        Target::Cidr(_) | Target::Bundle(_) => None,
    }
}

/// Sets `path` to mode 0600 if it exists.
fn owner_only(path: &Path) -> Result<()> {
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ServiceError::host(format!("chmod 600 {}", path.display()), e)),
    }
}

/// Before the store opens the database: a new file is made 0600, so that neither it nor the
/// `-wal` and `-shm` files SQLite makes with its mode are ever readable by others.
pub(crate) fn prepare_database(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| ServiceError::host(format!("create {}", path.display()), e))?;
    }
    owner_only(path)
}

/// After the store opened the database: the database and its `-wal` and `-shm` files are
/// readable by their owner only (also those an older version made 0644).
pub(crate) fn restrict_database(path: &Path) -> Result<()> {
    owner_only(path)?;
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        owner_only(&PathBuf::from(name))?;
    }
    Ok(())
}

impl Conductor {
    /// The key sealing secret values, `<base>/secrets.key`, made at first use.
    pub(crate) fn secret_key(&self) -> Result<Arc<SecretKey>> {
        let mut slot = self.secrets.key.lock().unwrap();
        if let Some(key) = slot.as_ref() {
            return Ok(key.clone());
        }
        let path = self.paths.base.join(KEY_FILE);
        let key = Arc::new(
            SecretKey::load_or_create(&path)
                .map_err(|e| ServiceError::host(format!("load the secret key {}", path.display()), e))?,
        );
        *slot = Some(key.clone());
        Ok(key)
    }

    /// The egress CA (made at first use) and the upstream trust (the host's roots plus
    /// `network.egress.upstream_ca_files`), for intercepting the hosts of secrets.
    pub(crate) fn interception(&self) -> Result<Arc<Interception>> {
        let mut slot = self.secrets.interception.lock().unwrap();
        if let Some(i) = slot.as_ref() {
            return Ok(i.clone());
        }
        let (cert, key) = (self.paths.base.join(CA_CERT_FILE), self.paths.base.join(CA_KEY_FILE));
        let ca = CertificateAuthority::load_or_create(&cert, &key)
            .map_err(|e| ServiceError::host("load the egress CA", e))?;
        let egress = &self.config.network.egress;
        let trust = UpstreamTrust::load(&egress.upstream_ca_files).map_err(|e| {
            ServiceError::Config(ConfigError::Invalid {
                path: "network.egress.upstream_ca_files".into(),
                message: e.to_string(),
            })
        })?;
        for warning in trust.warnings() {
            tracing::warn!("egress upstream trust: {warning}");
        }
        let interception = Arc::new(Interception {
            ca: Arc::new(ca),
            trust,
            config: InterceptConfig {
                connect_timeout: std::time::Duration::from_secs(egress.connect_timeout),
                idle_timeout: std::time::Duration::from_secs(egress.idle_timeout),
                ..Default::default()
            },
        });
        *slot = Some(interception.clone());
        Ok(interception)
    }

    /// The egress CA's certificate (PEM), which workspaces with secrets trust.
    pub fn egress_ca_pem(&self) -> Result<String> {
        Ok(self.interception()?.ca.cert_pem())
    }

    /// Registers the secrets of `secrets.define`, reading each value from its file or
    /// variable. A secret whose value and rules are stored already is left as it is (its
    /// version does not move); a changed one is rotated. A missing file or variable is an
    /// error naming the key (`secrets.define[0].from_file`); values are never logged.
    pub fn register_config_secrets(&self) -> Result<usize> {
        let defined = &self.config.secrets.define;
        if defined.is_empty() {
            return Ok(0);
        }
        let key = self.secret_key()?;
        let mut written = 0;
        for (i, d) in defined.iter().enumerate() {
            let invalid = |sub: &str, message: String| {
                ServiceError::Config(ConfigError::Invalid {
                    path: format!("secrets.define[{i}]{sub}"),
                    message,
                })
            };
            let raw = match (&d.from_file, &d.from_env) {
                (Some(path), _) => std::fs::read(path)
                    .map_err(|e| invalid(".from_file", format!("cannot read {}: {e}", path.display())))?,
                (None, Some(var)) => std::env::var_os(var)
                    .ok_or_else(|| invalid(".from_env", format!("the environment variable {var} is not set")))?
                    .into_encoded_bytes(),
                (None, None) => return Err(invalid("", "needs from_file or from_env".into())),
            };
            let source = if d.from_file.is_some() {
                ".from_file"
            } else {
                ".from_env"
            };
            let value = core_secrets::check_value(&raw).map_err(|m| invalid(source, m))?;
            let rules_json = serde_json::to_string(&d.rules).map_err(|e| ServiceError::host("encode rules", e))?;
            if let Some((stored, stored_rules, _)) = self.store.get_secret_value(&key, &d.name)? {
                if stored.expose() == value.as_bytes() && stored_rules == rules_json {
                    continue;
                }
            }
            self.store
                .put_secret(&key, &d.name, value.as_bytes(), &rules_json, now_ms())?;
            tracing::info!(secret = %d.name, "registered secret from the configuration");
            written += 1;
        }
        Ok(written)
    }

    /// Registers secret `name` with `rules`, or rotates it (a new value and rules, its
    /// version + 1): connections and requests after this use the new value. Errors name the
    /// field (`name`, `value`, `rules[1].host`); the value is never echoed.
    pub fn put_secret(&self, name: &str, value: &[u8], rules: Vec<InjectionRule>) -> Result<SecretInfo> {
        let spec = SecretSpec {
            name: name.to_string(),
            rules,
        };
        spec.validate("").map_err(|(f, m)| ServiceError::invalid(f, m))?;
        let value = core_secrets::check_value(value).map_err(|m| ServiceError::invalid("value", m))?;
        let key = self.secret_key()?;
        let rules_json = serde_json::to_string(&spec.rules).map_err(|e| ServiceError::host("encode rules", e))?;
        self.store
            .put_secret(&key, name, value.as_bytes(), &rules_json, now_ms())?;
        self.get_secret(name)
    }

    /// A registered secret, without its value.
    pub fn get_secret(&self, name: &str) -> Result<SecretInfo> {
        let meta = self
            .store
            .list_secrets()?
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ServiceError::not_found(format!("secret '{name}'")))?;
        SecretInfo::from_meta(meta)
    }

    /// Every registered secret, by name, without values.
    pub fn list_secrets(&self) -> Result<Vec<SecretInfo>> {
        self.store
            .list_secrets()?
            .into_iter()
            .map(SecretInfo::from_meta)
            .collect()
    }

    /// Deletes secret `name`. Workspaces bound to it keep their placeholder, which from now
    /// on goes out unchanged.
    pub fn delete_secret(&self, name: &str) -> Result<()> {
        if self.store.delete_secret(name)? {
            Ok(())
        } else {
            Err(ServiceError::not_found(format!("secret '{name}'")))
        }
    }

    /// Checks the secrets a workspace or task asks for (`field[i]` in errors) against the
    /// registered ones and `secrets.max_allow`.
    pub(crate) fn check_secret_names(&self, field: &str, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let known: Vec<String> = self.store.list_secrets()?.into_iter().map(|m| m.name).collect();
        core_secrets::bound_check(names, self.config.secrets.max_allow.as_deref(), &known)
            .map_err(|(i, m)| ServiceError::invalid(format!("{field}[{i}]"), m))
    }

    /// New bindings for `names` (already checked): a random placeholder each.
    pub(crate) fn bind_secrets(&self, names: &[String]) -> Result<Vec<SecretBinding>> {
        names
            .iter()
            .map(|name| {
                Ok(SecretBinding {
                    name: name.clone(),
                    placeholder: core_secrets::placeholder(name, &random_hex()?),
                })
            })
            .collect()
    }

    /// The allow entries the rules of `names` need (`github.com:443`), each once.
    pub(crate) fn secret_hosts<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>> {
        let metas = self.store.list_secrets()?;
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let Some(meta) = metas.iter().find(|m| m.name == name) else {
                continue;
            };
            for rule in parse_rules(&meta.name, &meta.rules_json)? {
                if let Some(entry) = allow_entry(&rule) {
                    if !out.contains(&entry) {
                        out.push(entry);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes the CA (`ca.crt`) and the host's bundle plus the CA (`bundle.crt`) into the
    /// workspace's egress directory, and returns the variables that point tools at them.
    pub(crate) fn secrets_trust_setup(&self, workspace_id: &str) -> Result<Vec<(String, String)>> {
        let pem = self.egress_ca_pem()?;
        let dir = self.egress_dir(workspace_id);
        let mut bundle = std::fs::read_to_string(HOST_BUNDLE).unwrap_or_default();
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&pem);
        for (name, text) in [(WORKSPACE_CA_FILE, &pem), (WORKSPACE_BUNDLE_FILE, &bundle)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| ServiceError::host(format!("write {}", path.display()), e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| ServiceError::host(format!("chmod {}", path.display()), e))?;
        }
        let mount = conductor_agent_protocol::EGRESS_SOCKET_DIR;
        let bundle = format!("{mount}/{WORKSPACE_BUNDLE_FILE}");
        let mut env: Vec<(String, String)> = [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "PIP_CERT",
        ]
        .into_iter()
        .map(|k| (k.to_string(), bundle.clone()))
        .collect();
        env.push(("NODE_EXTRA_CA_CERTS".into(), format!("{mount}/{WORKSPACE_CA_FILE}")));
        Ok(env)
    }
}

/// What the egress gate of a workspace with secrets needs: the store and key to read the
/// current values and rules, and the secrets in force with their placeholders.
pub(crate) struct SecretSource {
    pub store: Arc<Store>,
    pub key: Arc<SecretKey>,
    pub bindings: Arc<Vec<SecretBinding>>,
}

impl SecretSource {
    /// The injector for a `CONNECT` to `host:port`, when a secret in force has a rule for it
    /// (its current rules, from the store).
    pub fn injector_for(&self, host: &str, port: u16) -> Option<Arc<dyn Injector>> {
        let metas = match self.store.list_secrets() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("reading the secrets' rules failed: {e}");
                return None;
            }
        };
        let matching: Vec<SecretBinding> = self
            .bindings
            .iter()
            .filter(|b| {
                metas.iter().any(|m| {
                    m.name == b.name
                        && parse_rules(&m.name, &m.rules_json).is_ok_and(|rules| {
                            SecretSpec {
                                name: m.name.clone(),
                                rules,
                            }
                            .matches(host, port)
                        })
                })
            })
            .cloned()
            .collect();
        if matching.is_empty() {
            return None;
        }
        Some(Arc::new(SecretInjector {
            store: self.store.clone(),
            key: self.key.clone(),
            bindings: matching,
        }))
    }
}

/// A request's headers as text pairs (for [`core_secrets::apply`]) and those whose value is
/// not visible ASCII, kept apart unchanged.
type SplitHeaders = (Vec<(String, String)>, Vec<(HeaderName, HeaderValue)>);

/// Puts the secrets into the requests of one intercepted connection: for each secret whose
/// current rules match the host, its current value replaces its placeholder and fills the
/// rule's header ([`core_secrets::apply`]).
pub(crate) struct SecretInjector {
    store: Arc<Store>,
    key: Arc<SecretKey>,
    bindings: Vec<SecretBinding>,
}

impl Injector for SecretInjector {
    fn inject(&self, host: &str, port: u16, headers: &mut HeaderMap) -> Vec<String> {
        let mut used = Vec::new();
        let mut set_headers: Vec<String> = Vec::new();
        // Text headers as the core wants them; the others (not visible ASCII) kept apart.
        let mut split: Option<SplitHeaders> = None;
        for b in &self.bindings {
            let (value, rules_json) = match self.store.get_secret_value(&self.key, &b.name) {
                Ok(Some((value, rules_json, _))) => (value, rules_json),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(secret = %b.name, "reading the secret failed: {e}");
                    continue;
                }
            };
            let Ok(rules) = parse_rules(&b.name, &rules_json) else {
                continue;
            };
            let spec = SecretSpec {
                name: b.name.clone(),
                rules,
            };
            let Some(rule) = spec.rule_for(host, port) else {
                continue;
            };
            let Ok(value) = std::str::from_utf8(value.expose()) else {
                continue;
            };
            let (text, _) = split.get_or_insert_with(|| {
                let mut text = Vec::new();
                let mut opaque = Vec::new();
                for (name, value) in headers.iter() {
                    match value.to_str() {
                        Ok(v) => text.push((name.as_str().to_string(), v.to_string())),
                        Err(_) => opaque.push((name.clone(), value.clone())),
                    }
                }
                (text, opaque)
            });
            if core_secrets::apply(rule, host, port, text, &b.placeholder, value) {
                used.push(b.name.clone());
                set_headers.push(rule.inject.header_name().to_ascii_lowercase());
            }
        }
        if used.is_empty() {
            return used;
        }
        let Some((text, opaque)) = split else {
            return used;
        };
        let mut rebuilt = HeaderMap::with_capacity(text.len() + opaque.len());
        for (name, value) in text {
            let (Ok(name), Ok(mut value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value))
            else {
                continue;
            };
            if set_headers.iter().any(|h| h == name.as_str()) {
                value.set_sensitive(true);
            }
            rebuilt.append(name, value);
        }
        for (name, value) in opaque {
            // A header a rule set replaces every value of that name the workspace sent.
            if !set_headers.iter().any(|h| h == name.as_str()) {
                rebuilt.append(name, value);
            }
        }
        *headers = rebuilt;
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conductor_core::secrets::Injection;

    fn rule(host: &str, inject: Injection) -> InjectionRule {
        InjectionRule {
            host: host.into(),
            inject,
        }
    }

    #[test]
    fn allow_entries_name_the_port_the_rule_means() {
        let basic = || Injection::Basic { username: "git".into() };
        assert_eq!(
            allow_entry(&rule("github.com", basic())).as_deref(),
            Some("github.com:443")
        );
        assert_eq!(
            allow_entry(&rule("*.corp.example:8443", basic())).as_deref(),
            Some("*.corp.example:8443")
        );
        assert_eq!(allow_entry(&rule("a..b", basic())), None);
    }

    fn injector(store: &Arc<Store>, key: &Arc<SecretKey>, rules: &str, value: &[u8]) -> SecretInjector {
        store.put_secret(key, "github", value, rules, 1).unwrap();
        SecretInjector {
            store: store.clone(),
            key: key.clone(),
            bindings: vec![SecretBinding {
                name: "github".into(),
                placeholder: "conductor-secret-github-abc".into(),
            }],
        }
    }

    #[test]
    fn the_injector_sets_the_header_replaces_placeholders_and_keeps_the_rest() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let key = Arc::new(SecretKey::from_bytes([7; 32]));
        let rules =
            r#"[{"host":"api.github.com","inject":{"type":"header","name":"Authorization","value":"Bearer {value}"}}]"#;
        let inj = injector(&store, &key, rules, b"s3cret");
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer conductor-secret-github-abc"),
        );
        h.insert("x-copy", HeaderValue::from_static("conductor-secret-github-abc"));
        h.insert("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let original = h.clone();
        assert!(inj.inject("other.test", 443, &mut h).is_empty());
        assert_eq!(h, original, "another host: unchanged");
        assert!(inj.inject("api.github.com", 80, &mut h).is_empty());
        assert_eq!(h, original, "another port: unchanged");
        assert_eq!(inj.inject("api.github.com", 443, &mut h), ["github"]);
        assert_eq!(h["authorization"], "Bearer s3cret");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["x-copy"], "s3cret");
        assert_eq!(h["x-bin"].as_bytes(), b"caf\xe9");
        // Rotation: the next request gets the new value.
        store.put_secret(&key, "github", b"n3w", rules, 2).unwrap();
        let mut h = original.clone();
        assert_eq!(inj.inject("api.github.com", 443, &mut h), ["github"]);
        assert_eq!(h["authorization"], "Bearer n3w");
        // Deleted: nothing is injected, the placeholder goes out unchanged.
        store.delete_secret("github").unwrap();
        let mut h = original.clone();
        assert!(inj.inject("api.github.com", 443, &mut h).is_empty());
        assert_eq!(h, original);
    }

    #[test]
    fn the_source_intercepts_only_the_hosts_of_its_secrets() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let key = Arc::new(SecretKey::from_bytes([7; 32]));
        let rules = r#"[{"host":"git.test","inject":{"type":"basic","username":"x-access-token"}}]"#;
        store.put_secret(&key, "github", b"tok", rules, 1).unwrap();
        store
            .put_secret(
                &key,
                "other",
                b"tok",
                r#"[{"host":"echo.test","inject":{"type":"basic","username":"u"}}]"#,
                1,
            )
            .unwrap();
        let source = SecretSource {
            store: store.clone(),
            key,
            bindings: Arc::new(vec![SecretBinding {
                name: "github".into(),
                placeholder: "p".into(),
            }]),
        };
        assert!(source.injector_for("git.test", 443).is_some());
        assert!(source.injector_for("git.test", 80).is_none());
        assert!(
            source.injector_for("echo.test", 443).is_none(),
            "not a secret of this workspace"
        );
        let inj = source.injector_for("git.test", 443).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(inj.inject("git.test", 443, &mut h), ["github"]);
        // printf 'x-access-token:tok' | base64
        assert_eq!(h["authorization"], "Basic eC1hY2Nlc3MtdG9rZW46dG9r");
    }
}
