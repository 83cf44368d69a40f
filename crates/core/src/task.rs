//! Tasks as callers submit them, and the pure decisions about running them.
//!
//! [`TaskSpec`] is the body of `POST /tasks`; [`TaskSpec::validate`] checks every field
//! that can reach the engine or the host and names the offending one (`commands[2]`,
//! `env.BAD-NAME`, `services[0]`). The rest of the module holds what the orchestrator
//! decides without I/O: the defaults of well-known sidecar images ([`service_defaults`]),
//! the shell wrapper that makes separate execs behave like one shell session when the
//! workspace agent cannot keep one ([`command_script`]), where `source` lands inside a workspace ([`source_location`]),
//! RFC 3339 timestamps and the task-duration histogram.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::environment::Catalog;
use crate::validate;
use crate::volume::VolumeSpec;

/// The only task type: commands run in an isolated workspace.
pub const TASK_TYPE: &str = "isolated_execution";
/// Most sidecar services one task may ask for.
pub const MAX_SERVICES: usize = 5;
/// Most commands one task may carry.
pub const MAX_COMMANDS: usize = 1000;
/// Longest timeout a task may ask for: one day.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// Longest description accepted, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Where `source` is copied inside the workspace; created empty when a task has no source,
/// so `cd /workspace/src` always works.
pub const SOURCE_TARGET: &str = "/workspace/src";

/// A task as submitted: which environment, which commands, which sidecars.
///
/// ```
/// use conductor_core::task::TaskSpec;
/// let spec: TaskSpec = serde_json::from_str(r#"{
///     "task_type": "isolated_execution",
///     "environment": "python-dev",
///     "commands": ["cd /workspace/src", "python -m pytest tests/"]
/// }"#).unwrap();
/// assert_eq!(spec.commands.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Must be [`TASK_TYPE`].
    pub task_type: String,
    /// Free text shown with the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Name of the environment (preset or custom) the commands run in.
    pub environment: String,
    /// Shell command lines, run in order in one shell session: `cd` and variables carry over
    /// (through the workspace agent, one long-lived shell: functions and aliases too), the
    /// first failing command stops the task.
    pub commands: Vec<String>,
    /// Sidecar images (`postgres:14`, `redis:7`), reachable by name and on localhost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// 1..=10, higher runs first; `task_execution.default_priority` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Seconds all commands together may take; `task_execution.task_timeout` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// The agent the task runs for (names the workspace, selects the shared workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Environment variables of every command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute host directory copied to [`SOURCE_TARGET`] before the commands run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The task's network: over the environment's and the workspace's (an allow list
    /// replaces theirs, within `network.egress.max_allow`; deny entries add up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::config::NetworkPolicy>,
    /// Secrets the egress proxy injects into the task's requests to their hosts (within
    /// `secrets.max_allow`); the workspace holds only placeholders. A sandbox task's
    /// workspace is made with them; in a shared workspace they must be among the
    /// workspace's own, and only they are injected while the task runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// A field of a [`TaskSpec`] that fails validation. `Display` is `field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `commands[2]`, `env.BAD-NAME`.
    pub field: String,
    /// What is wrong, as a sentence for the caller.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl TaskSpec {
    /// An `isolated_execution` task of `commands` in `environment`, every other field unset.
    pub fn new(environment: impl Into<String>, commands: Vec<String>) -> Self {
        TaskSpec {
            task_type: TASK_TYPE.into(),
            description: None,
            environment: environment.into(),
            commands,
            services: Vec::new(),
            priority: None,
            timeout: None,
            agent_id: None,
            env: BTreeMap::new(),
            source: None,
            network: None,
            secrets: Vec::new(),
        }
    }

    /// Checks every field; `catalog` knows the environments. Does no I/O, so whether
    /// `source` exists is checked by the service.
    pub fn validate(&self, catalog: &Catalog) -> Result<(), FieldError> {
        if self.task_type != TASK_TYPE {
            return Err(FieldError::new(
                "task_type",
                format!("{:?} is not supported (allowed: {TASK_TYPE})", self.task_type),
            ));
        }
        if let Some(d) = &self.description {
            if d.len() > MAX_DESCRIPTION_LEN || d.contains('\0') {
                return Err(FieldError::new(
                    "description",
                    format!("must be at most {MAX_DESCRIPTION_LEN} bytes without NUL"),
                ));
            }
        }
        validate::environment_name(&self.environment).map_err(|m| FieldError::new("environment", m))?;
        catalog
            .require(&self.environment)
            .map_err(|m| FieldError::new("environment", m))?;
        if self.commands.is_empty() {
            return Err(FieldError::new("commands", "must contain at least one command"));
        }
        if self.commands.len() > MAX_COMMANDS {
            return Err(FieldError::new(
                "commands",
                format!(
                    "has {} commands; at most {MAX_COMMANDS} are allowed",
                    self.commands.len()
                ),
            ));
        }
        for (i, c) in self.commands.iter().enumerate() {
            validate::command(c).map_err(|m| FieldError::new(format!("commands[{i}]"), m))?;
        }
        self.validate_services()?;
        if let Some(p) = self.priority {
            if !(1..=10).contains(&p) {
                return Err(FieldError::new("priority", format!("{p} is outside 1..=10")));
            }
        }
        if let Some(t) = self.timeout {
            if !(1..=MAX_TIMEOUT_SECS).contains(&t) {
                return Err(FieldError::new(
                    "timeout",
                    format!("{t} is outside 1..={MAX_TIMEOUT_SECS} seconds"),
                ));
            }
        }
        if let Some(a) = &self.agent_id {
            validate::agent_id(a).map_err(|m| FieldError::new("agent_id", m))?;
        }
        for (k, v) in &self.env {
            validate::user_env(k, v).map_err(|m| FieldError::new(format!("env.{k}"), m))?;
        }
        if let Some(s) = &self.source {
            validate_host_path(s).map_err(|m| FieldError::new("source", m))?;
        }
        for (i, name) in self.secrets.iter().enumerate() {
            crate::secrets::validate_name(name).map_err(|m| FieldError::new(format!("secrets[{i}]"), m))?;
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), FieldError> {
        if self.services.len() > MAX_SERVICES {
            return Err(FieldError::new(
                "services",
                format!(
                    "has {} services; at most {MAX_SERVICES} are allowed",
                    self.services.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, image) in self.services.iter().enumerate() {
            let field = || format!("services[{i}]");
            validate::image_ref(image).map_err(|m| FieldError::new(field(), m))?;
            let name = service_name(image);
            validate::name(&name, 63).map_err(|m| {
                FieldError::new(
                    field(),
                    format!("the image name cannot serve as the service's host name: {m}"),
                )
            })?;
            if !names.insert(name.clone()) {
                return Err(FieldError::new(
                    field(),
                    format!("a second service named {name:?}; each service needs its own name"),
                ));
            }
        }
        Ok(())
    }
}

/// An absolute host path without `..`, NUL or excessive length.
fn validate_host_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must be an absolute host path"));
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if path.len() > 4096 {
        return Err("is longer than 4096 bytes".into());
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} must not contain '..'"));
    }
    Ok(())
}

/// A sidecar image conductor knows how to configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownService {
    Postgres,
    Redis,
}

impl KnownService {
    /// The image name (and host name) of this service.
    pub fn as_str(self) -> &'static str {
        match self {
            KnownService::Postgres => "postgres",
            KnownService::Redis => "redis",
        }
    }
}

/// How to run one sidecar image, decided from its reference alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDefaults {
    /// Host name the task's commands reach it by: the last path part of the image name
    /// (`postgres` for `docker.io/library/postgres:14`).
    pub name: String,
    /// Set for images conductor knows (and can build locally without a registry).
    pub known: Option<KnownService>,
    /// Port that accepts connections once the service is ready; `None`: ready once running.
    pub port: Option<u16>,
    /// Environment of the service container.
    pub env: Vec<(String, String)>,
    /// Replaces the image's command when set.
    pub cmd: Option<Vec<String>>,
    /// User the service runs as; `None` keeps the image's.
    pub user: Option<String>,
    /// Local references to use when present, best first.
    pub local_image_candidates: Vec<String>,
    /// What to pull when no candidate is present.
    pub pull_reference: String,
    /// Tag of the locally built image for a known service when pulling fails.
    pub build_tag: Option<String>,
}

/// The parts of an image reference that matter for sidecars.
struct ImageParts<'a> {
    /// `None` for Docker Hub short names.
    registry: Option<&'a str>,
    /// Repository path without the registry, e.g. `library/postgres` or `postgres`.
    path: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

fn image_parts(image: &str) -> ImageParts<'_> {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match name[last_slash..].find(':') {
        Some(c) => (&name[..last_slash + c], Some(&name[last_slash + c + 1..])),
        None => (name, None),
    };
    let (registry, path) = match repo.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (Some(first), rest),
        _ => (None, repo),
    };
    ImageParts {
        registry,
        path,
        tag,
        digest,
    }
}

/// The service (and host) name of a sidecar image: the last path part of its name.
pub fn service_name(image: &str) -> String {
    let parts = image_parts(image);
    parts.path.rsplit('/').next().unwrap_or(parts.path).to_string()
}

/// Decides how to obtain and run the sidecar `image` (a valid image reference).
pub fn service_defaults(image: &str) -> ServiceDefaults {
    let parts = image_parts(image);
    let name = service_name(image);
    let official = matches!(parts.registry, None | Some("docker.io") | Some("localhost"))
        && (parts.path == name || parts.path == format!("library/{name}"));
    let known = match name.as_str() {
        "postgres" if official => Some(KnownService::Postgres),
        "redis" if official => Some(KnownService::Redis),
        _ => None,
    };
    let tag = parts.tag.unwrap_or("latest");
    let (local_image_candidates, pull_reference) = match (parts.registry, parts.digest) {
        (None, None) => {
            let hub_path = if parts.path.contains('/') {
                parts.path.to_string()
            } else {
                format!("library/{}", parts.path)
            };
            let hub = format!("docker.io/{hub_path}:{tag}");
            (vec![format!("localhost/{}:{tag}", parts.path), hub.clone()], hub)
        }
        (None, Some(_)) => {
            let hub = format!("docker.io/{image}");
            (vec![hub.clone()], hub)
        }
        (Some(_), _) => (vec![image.to_string()], image.to_string()),
    };
    let build_tag = (known.is_some() && parts.digest.is_none()).then(|| format!("localhost/{name}:{tag}"));
    let (port, env, cmd, user) = match known {
        Some(KnownService::Postgres) => (
            Some(5432),
            vec![
                ("POSTGRES_PASSWORD".to_string(), "postgres".to_string()),
                ("POSTGRES_USER".to_string(), "postgres".to_string()),
                ("POSTGRES_DB".to_string(), "postgres".to_string()),
            ],
            None,
            Some("postgres".to_string()),
        ),
        Some(KnownService::Redis) => (
            Some(6379),
            Vec::new(),
            // No persistence: no RDB snapshots, no append-only file.
            Some(
                ["redis-server", "--save", "", "--appendonly", "no"]
                    .map(String::from)
                    .to_vec(),
            ),
            Some("redis".to_string()),
        ),
        None => (None, Vec::new(), None, None),
    };
    ServiceDefaults {
        name,
        known,
        port,
        env,
        cmd,
        user,
        local_image_candidates,
        pull_reference,
        build_tag,
    }
}

/// Directory (inside the workspace) holding a task's shell state between commands.
pub fn state_dir(task_id: &str) -> String {
    format!("/tmp/.conductor/{task_id}")
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script that runs `command` as the next step of one shell session whose state lives
/// in `state_dir`.
///
/// The fallback for workspaces whose agent does not answer (Podman exec): the agent keeps a
/// real long-lived shell per session instead. Each command runs in its own exec, so its
/// output, exit code and duration are its own.
/// What a user expects to carry over from one command to the next, the working directory
/// and the exported variables, is saved on exit (also on `exit N`) and restored before the
/// next command. The exec's own marker variable `CONDUCTOR_EXEC_ID` is kept, so killing a
/// command still finds exactly its processes.
pub fn command_script(state_dir: &str, command: &str) -> String {
    format!(
        "__conductor_state={dir}\n\
         if [ -f \"$__conductor_state/env\" ]; then\n\
         __conductor_exec=\"$CONDUCTOR_EXEC_ID\"\n\
         . \"$__conductor_state/env\"\n\
         export CONDUCTOR_EXEC_ID=\"$__conductor_exec\"\n\
         IFS= read -r __conductor_cwd < \"$__conductor_state/cwd\"\n\
         cd \"$__conductor_cwd\"\n\
         unset __conductor_exec __conductor_cwd\n\
         else\n\
         mkdir -p \"$__conductor_state\"\n\
         fi\n\
         trap '__conductor_rc=$?; pwd > \"$__conductor_state/cwd\"; export -p > \"$__conductor_state/env\"; exit $__conductor_rc' EXIT\n\
         {command}\n",
        dir = shell_quote(state_dir),
    )
}

/// Where a path inside the workspace lives: in the named sub-volume whose target contains
/// it (the longest such target), with the rest of the path relative to that volume; or
/// `None` when it is under the plain `/workspace` directory.
pub fn source_location<'a>(volumes: &'a [VolumeSpec], path: &str) -> Option<(&'a VolumeSpec, String)> {
    volumes
        .iter()
        .filter_map(|v| {
            let rest = path.strip_prefix(v.target.trim_end_matches('/'))?;
            (rest.is_empty() || rest.starts_with('/')).then(|| (v, rest.trim_start_matches('/').to_string()))
        })
        .max_by_key(|(v, _)| v.target.len())
}

/// Unix milliseconds as an RFC 3339 UTC timestamp with milliseconds:
/// `2024-05-01T12:34:56.789Z`.
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let millis = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Upper bounds (seconds) of the task-duration histogram buckets; `+Inf` is implied.
pub const DURATION_BUCKETS_SECS: [f64; 9] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A Prometheus-style histogram of task durations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DurationHistogram {
    /// `(upper bound in seconds, cumulative count)` for [`DURATION_BUCKETS_SECS`]; the
    /// `+Inf` bucket is [`DurationHistogram::count`].
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of all observations in seconds.
    pub sum_seconds: f64,
}

impl DurationHistogram {
    /// Builds the histogram from durations in milliseconds.
    pub fn from_millis(durations_ms: impl IntoIterator<Item = u64>) -> Self {
        let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS_SECS.iter().map(|le| (*le, 0)).collect();
        let (mut count, mut sum_seconds) = (0u64, 0f64);
        for ms in durations_ms {
            let secs = ms as f64 / 1000.0;
            count += 1;
            sum_seconds += secs;
            for (le, n) in buckets.iter_mut() {
                if secs <= *le {
                    *n += 1;
                }
            }
        }
        DurationHistogram {
            buckets,
            count,
            sum_seconds,
        }
    }
}

/// The name clients see for field `field` of task `index` in an array submission:
/// `tasks[2].commands[1]`. `field` may be a path relative to the element (`commands[1]`) or
/// to the array as serde names it (`[2].commands[1]`, then `index` is ignored).
pub fn batch_field(index: usize, field: &str) -> String {
    if field.starts_with('[') {
        format!("tasks{field}")
    } else {
        format!("tasks[{index}].{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn catalog() -> Catalog {
        Catalog::from_config(&Config::default())
    }

    fn spec() -> TaskSpec {
        serde_json::from_str(
            r#"{"task_type":"isolated_execution","environment":"python-dev","commands":["cd /workspace/src","python -m pytest tests/"]}"#,
        )
        .unwrap()
    }

    fn field_of(s: &TaskSpec) -> String {
        s.validate(&catalog()).unwrap_err().field
    }

    #[test]
    fn the_spec_examples_parse_and_validate() {
        spec().validate(&catalog()).unwrap();
        let full: TaskSpec = serde_json::from_str(
            r#"{"task_type":"isolated_execution","description":"Run integration tests","environment":"fullstack",
                "services":["postgres:14","redis:7"],"commands":["cd /workspace","./scripts/setup-dev.sh"],
                "priority":7,"timeout":600,"agent_id":"a1","env":{"CI":"1"},"source":"/srv/project"}"#,
        )
        .unwrap();
        full.validate(&catalog()).unwrap();
        // Round trip through the stored JSON.
        let back: TaskSpec = serde_json::from_str(&serde_json::to_string(&full).unwrap()).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn unknown_and_missing_fields_are_rejected() {
        let e = serde_json::from_str::<TaskSpec>(
            r#"{"task_type":"isolated_execution","environment":"x","commands":["a"],"privileged":true}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `privileged`"), "{e}");
        let e = serde_json::from_str::<TaskSpec>(r#"{"task_type":"isolated_execution","commands":["a"]}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `environment`"), "{e}");
    }

    #[test]
    fn every_field_is_checked_and_named() {
        let mut s = spec();
        s.task_type = "shell".into();
        assert_eq!(field_of(&s), "task_type");

        let mut s = spec();
        s.environment = "nope".into();
        let e = s.validate(&catalog()).unwrap_err();
        assert_eq!(e.field, "environment");
        assert!(e.message.contains("unknown environment"), "{e}");

        let mut s = spec();
        s.commands.clear();
        assert_eq!(field_of(&s), "commands");
        let mut s = spec();
        s.commands.push("  ".into());
        assert_eq!(field_of(&s), "commands[2]");

        let mut s = spec();
        s.services = vec!["redis:7".into(), "-v /:/host".into()];
        assert_eq!(field_of(&s), "services[1]");
        s.services = vec!["redis:7".into(), "bitnami/redis:7".into()];
        let e = s.validate(&catalog()).unwrap_err();
        assert_eq!(e.field, "services[1]");
        assert!(e.message.contains("second service named \"redis\""), "{e}");
        s.services = vec!["a:1", "b:1", "c:1", "d:1", "e:1", "f:1"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(field_of(&s), "services");

        for p in [0, 11] {
            let mut s = spec();
            s.priority = Some(p);
            assert_eq!(field_of(&s), "priority");
        }
        for t in [0, MAX_TIMEOUT_SECS + 1] {
            let mut s = spec();
            s.timeout = Some(t);
            assert_eq!(field_of(&s), "timeout");
        }
        let mut s = spec();
        s.agent_id = Some("A;rm".into());
        assert_eq!(field_of(&s), "agent_id");

        let mut s = spec();
        s.env.insert("BAD-NAME".into(), "x".into());
        assert_eq!(field_of(&s), "env.BAD-NAME");
        let mut s = spec();
        s.env.insert("CONDUCTOR_EXEC_ID".into(), "x".into());
        let e = s.validate(&catalog()).unwrap_err();
        assert_eq!(e.field, "env.CONDUCTOR_EXEC_ID");
        assert!(e.message.contains("reserved"), "{e}");

        for bad in ["relative/dir", "/a/../etc", "/a\0b"] {
            let mut s = spec();
            s.source = Some(bad.into());
            assert_eq!(field_of(&s), "source", "{bad}");
        }
        let mut s = spec();
        s.description = Some("x".repeat(MAX_DESCRIPTION_LEN + 1));
        assert_eq!(field_of(&s), "description");
    }

    #[test]
    fn known_services_get_defaults_and_local_candidates() {
        let pg = service_defaults("postgres:14");
        assert_eq!(pg.name, "postgres");
        assert_eq!(pg.known, Some(KnownService::Postgres));
        assert_eq!(pg.port, Some(5432));
        assert!(pg
            .env
            .contains(&("POSTGRES_PASSWORD".to_string(), "postgres".to_string())));
        assert_eq!(
            pg.local_image_candidates,
            ["localhost/postgres:14", "docker.io/library/postgres:14"]
        );
        assert_eq!(pg.pull_reference, "docker.io/library/postgres:14");
        assert_eq!(pg.build_tag.as_deref(), Some("localhost/postgres:14"));
        assert_eq!(pg.user.as_deref(), Some("postgres"));

        let redis = service_defaults("docker.io/library/redis:7");
        assert_eq!((redis.name.as_str(), redis.port), ("redis", Some(6379)));
        assert_eq!(redis.local_image_candidates, ["docker.io/library/redis:7"]);
        assert_eq!(redis.build_tag.as_deref(), Some("localhost/redis:7"));
        let cmd = redis.cmd.unwrap();
        assert!(cmd.windows(2).any(|w| w == ["--appendonly", "no"]), "{cmd:?}");

        let latest = service_defaults("redis");
        assert_eq!(latest.build_tag.as_deref(), Some("localhost/redis:latest"));
        let local = service_defaults("localhost/postgres:15");
        assert_eq!(local.known, Some(KnownService::Postgres));
        assert_eq!(local.local_image_candidates, ["localhost/postgres:15"]);
    }

    #[test]
    fn unknown_services_keep_their_own_setup() {
        let other = service_defaults("bitnami/redis:7");
        assert_eq!(other.name, "redis");
        assert_eq!(other.known, None);
        assert_eq!((other.port, other.cmd, other.user), (None, None, None));
        assert_eq!(
            other.local_image_candidates,
            ["localhost/bitnami/redis:7", "docker.io/bitnami/redis:7"]
        );
        assert_eq!(other.build_tag, None);
        let reg = service_defaults("quay.io/x/mysql:8");
        assert_eq!(reg.name, "mysql");
        assert_eq!(reg.pull_reference, "quay.io/x/mysql:8");
        let port = service_defaults("localhost:5000/team/memcached");
        assert_eq!(port.name, "memcached");
        assert_eq!(port.pull_reference, "localhost:5000/team/memcached");
        let digest = format!("postgres@sha256:{}", "a".repeat(64));
        let d = service_defaults(&digest);
        assert_eq!(d.known, Some(KnownService::Postgres));
        assert_eq!(d.build_tag, None, "a digest cannot be built locally");
        assert_eq!(d.pull_reference, format!("docker.io/{digest}"));
    }

    #[test]
    fn the_command_script_restores_and_saves_the_session() {
        let s = command_script("/tmp/.conductor/task-1", "cd /tmp && echo 'x'");
        assert!(s.starts_with("__conductor_state='/tmp/.conductor/task-1'\n"), "{s}");
        assert!(s.ends_with("\ncd /tmp && echo 'x'\n"), "{s}");
        assert!(s.contains("trap '"), "{s}");
        assert!(s.contains("export -p >"), "{s}");
        assert!(s.contains("export CONDUCTOR_EXEC_ID=\"$__conductor_exec\""), "{s}");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(state_dir("task-abc"), "/tmp/.conductor/task-abc");
    }

    #[test]
    fn source_lands_in_the_sub_volume_that_contains_it() {
        let vols = vec![
            VolumeSpec::parse("cache:/workspace/.cache").unwrap(),
            VolumeSpec::parse("source:/workspace/src").unwrap(),
        ];
        let (v, rest) = source_location(&vols, SOURCE_TARGET).unwrap();
        assert_eq!((v.name.as_str(), rest.as_str()), ("source", ""));
        let (v, rest) = source_location(&vols, "/workspace/src/app").unwrap();
        assert_eq!((v.name.as_str(), rest.as_str()), ("source", "app"));
        assert!(source_location(&vols, "/workspace/srcx").is_none());
        assert!(source_location(&[], SOURCE_TARGET).is_none());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_714_566_896_789), "2024-05-01T12:34:56.789Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn durations_fill_cumulative_buckets() {
        let h = DurationHistogram::from_millis([50, 700, 700, 400_000]);
        assert_eq!(h.count, 4);
        assert!((h.sum_seconds - 401.45).abs() < 1e-9);
        let at = |le: f64| h.buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(0.1), 1);
        assert_eq!(at(0.5), 1);
        assert_eq!(at(1.0), 3);
        assert_eq!(at(300.0), 3);
        assert_eq!(h.buckets.len(), DURATION_BUCKETS_SECS.len());
    }

    #[test]
    fn batch_fields_are_named_from_the_array() {
        assert_eq!(batch_field(2, "commands[1]"), "tasks[2].commands[1]");
        assert_eq!(batch_field(0, "[3].environment"), "tasks[3].environment");
    }
}
