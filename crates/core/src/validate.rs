//! Validation of every caller-supplied string that can reach the container engine or the
//! file system: agent ids, environment and snapshot names, image references, environment
//! variables, paths inside a workspace. Each check returns a sentence the API and CLI show
//! as is, after the name of the field.

/// The longest agent id accepted; it becomes part of container names and directory names.
pub const MAX_AGENT_ID_LEN: usize = 48;

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
}

/// A DNS-label-like name: lowercase letters, digits, `-`, `_`, `.`; starts with a letter or
/// digit; at most `max` characters. Used for agent ids, environment and snapshot names.
pub fn name(value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > max {
        return Err(format!("is longer than {max} characters"));
    }
    let first = value.chars().next().unwrap_or('-');
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!("{value:?} must start with a lowercase letter or a digit"));
    }
    if let Some(bad) = value.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "{value:?} contains {bad:?}; allowed are lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// A Kubernetes DNS-1123 label (namespaces, container names): lowercase letters, digits and
/// `-`, starting and ending with a letter or digit, at most 63 characters.
pub fn dns_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 63 {
        return Err(format!("{value:?} is longer than 63 characters"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{value:?} contains {bad:?}; a Kubernetes name has lowercase letters, digits and '-'"
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(format!("{value:?} must start and end with a letter or a digit"));
    }
    Ok(())
}

/// A Kubernetes DNS-1123 subdomain (object names such as a StorageClass): dot-separated
/// parts of lowercase letters, digits and `-` that start and end with a letter or digit, at
/// most 253 characters in all.
pub fn dns_subdomain(value: &str) -> Result<(), String> {
    if value.len() > 253 {
        return Err(format!("{value:?} is longer than 253 characters"));
    }
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    if value.split('.').all(part_ok) {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

pub fn agent_id(value: &str) -> Result<(), String> {
    name(value, MAX_AGENT_ID_LEN)
}

pub fn environment_name(value: &str) -> Result<(), String> {
    name(value, 63)
}

pub fn snapshot_name(value: &str) -> Result<(), String> {
    name(value, 63)
}

/// An OCI image reference such as `python:3.11-slim`, `docker.io/library/redis:7`,
/// `localhost/conductor/base:bookworm` or `name@sha256:<hex>`. Rejects anything that could
/// be read as an option (`-x`) or that carries shell or control characters.
pub fn image_ref(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 255 {
        return Err("is longer than 255 characters".into());
    }
    if value.starts_with(['-', '.', '/', ':', '@']) {
        return Err(format!(
            "{value:?} is not an image reference (it must start with a letter or digit)"
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@');
    if let Some(bad) = value.chars().find(|c| !ok(*c)) {
        return Err(format!(
            "{value:?} is not an image reference (character {bad:?} is not allowed)"
        ));
    }
    let (name_part, digest) = match value.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (value, None),
    };
    if let Some(d) = digest {
        let valid = d
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()));
        if !valid {
            return Err(format!(
                "{value:?} has an invalid digest (expected sha256:<64 hex digits>)"
            ));
        }
    }
    // A tag is what follows the last ':' after the last '/'.
    let last = name_part.rsplit('/').next().unwrap_or(name_part);
    let (repo_last, tag) = match last.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (last, None),
    };
    if repo_last.is_empty() || name_part.split('/').any(str::is_empty) {
        return Err(format!("{value:?} is not an image reference"));
    }
    if let Some(t) = tag {
        if t.is_empty() || t.len() > 128 || t.contains(':') {
            return Err(format!("{value:?} has an invalid tag"));
        }
    }
    Ok(())
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 characters.
pub fn env_name(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || value.len() > 255 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{value:?} is not a valid environment variable name (letters, digits and '_', not starting with a digit)"
        ));
    }
    Ok(())
}

/// An environment variable value: anything but NUL, at most 128 KiB.
pub fn env_value(name: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("the value of {name} contains a NUL byte"));
    }
    if value.len() > 128 * 1024 {
        return Err(format!("the value of {name} is longer than 128 KiB"));
    }
    Ok(())
}

/// Prefix of the environment variables conductor sets itself; callers may not set them.
pub const RESERVED_ENV_PREFIX: &str = "CONDUCTOR_";

/// A caller-supplied environment variable: a valid name outside conductor's reserved
/// prefix, and a valid value.
pub fn user_env(name: &str, value: &str) -> Result<(), String> {
    env_name(name)?;
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "names starting with {RESERVED_ENV_PREFIX} are reserved for conductor"
        ));
    }
    env_value(name, value)
}

/// A shell command line given to a workspace: non-empty, no NUL byte, at most 1 MiB.
pub fn command(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if value.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if value.len() > 1024 * 1024 {
        return Err("is longer than 1 MiB".into());
    }
    Ok(())
}

/// An absolute path inside a container (a working directory or a volume target):
/// starts with '/', no `..` component, no NUL, at most 4096 bytes.
pub fn container_path(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(format!("{value:?} must be an absolute path"));
    }
    if value.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if value.len() > 4096 {
        return Err("is longer than 4096 bytes".into());
    }
    if value.split('/').any(|c| c == "..") {
        return Err(format!("{value:?} must not contain '..'"));
    }
    Ok(())
}

/// Root of a workspace's files in its container.
pub const WORKSPACE_ROOT: &str = "/workspace";
/// Longest path accepted by the file endpoints, in bytes (`PATH_MAX`).
pub const MAX_FILE_PATH: usize = 4096;
/// Longest component of such a path, in bytes (`NAME_MAX`).
pub const MAX_FILE_NAME: usize = 255;

/// A path of the file endpoints: relative to `/workspace`, or absolute under it. Returns
/// it relative to `/workspace`, cleaned (`.` and repeated slashes dropped; `""` is
/// `/workspace` itself). Refused: empty, a NUL byte, longer than 4096 bytes or a
/// component longer than 255, any `..` component, and absolute paths outside
/// `/workspace`. Symlinks are not looked at here: the workspace's agent resolves them
/// beneath `/workspace` (the same rules as `conductor_agent_protocol::confine`).
pub fn workspace_path(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if value.len() > MAX_FILE_PATH {
        return Err(format!("is longer than {MAX_FILE_PATH} bytes"));
    }
    let rel = match value.strip_prefix('/') {
        Some(abs) => {
            let abs = format!("/{}", abs.trim_start_matches('/'));
            let inside = abs
                .strip_prefix(WORKSPACE_ROOT)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'));
            match inside {
                Some(rest) => rest.to_string(),
                None => return Err(format!("{value:?} is outside {WORKSPACE_ROOT}")),
            }
        }
        None => value.to_string(),
    };
    let mut parts = Vec::new();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{value:?} must not contain '..'")),
            p if p.len() > MAX_FILE_NAME => return Err(format!("a component is longer than {MAX_FILE_NAME} bytes")),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_dns_like_values() {
        for ok in ["a1", "agent-7", "python-dev", "before-deployment", "x.y_z"] {
            name(ok, 63).unwrap();
        }
    }

    #[test]
    fn names_reject_the_dangerous() {
        assert!(name("", 10).unwrap_err().contains("empty"));
        assert!(name("-rf", 10).unwrap_err().contains("must start"));
        assert!(name("a/b", 10).unwrap_err().contains("'/'"));
        assert!(name("A", 10).unwrap_err().contains("must start"));
        assert!(name("a b", 10).unwrap_err().contains("' '"));
        assert!(name("aaaaaaaaaaa", 10).unwrap_err().contains("longer"));
        assert!(agent_id("a;rm").is_err());
    }

    #[test]
    fn image_refs() {
        for ok in [
            "python:3.11-slim",
            "postgres:14",
            "docker.io/library/redis:7",
            "localhost/conductor/base:bookworm",
            "localhost:5000/x/y:z",
            "ubuntu",
        ] {
            image_ref(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "-v",
            "--privileged",
            "a b",
            "a;b",
            "x:$(id)",
            "a|b",
            "/abs",
            "a//b",
            "a:",
            "x@sha256:12",
        ] {
            assert!(image_ref(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn env_names() {
        env_name("PATH").unwrap();
        env_name("_x1").unwrap();
        for bad in ["", "1A", "A-B", "A=B", "A B"] {
            assert!(env_name(bad)
                .unwrap_err()
                .contains("not a valid environment variable name"));
        }
        assert!(env_value("X", "a\0b").is_err());
        assert!(user_env("CONDUCTOR_EXEC_ID", "x").unwrap_err().contains("reserved"));
        user_env("MY_VAR", "x").unwrap();
    }

    #[test]
    fn container_paths() {
        container_path("/workspace/src").unwrap();
        assert!(container_path("workspace").is_err());
        assert!(container_path("/workspace/../etc").is_err());
    }

    #[test]
    fn workspace_paths_stay_in_the_workspace() {
        assert_eq!(workspace_path("/workspace").unwrap(), "");
        assert_eq!(workspace_path("/workspace/").unwrap(), "");
        assert_eq!(workspace_path(".").unwrap(), "");
        assert_eq!(workspace_path("//workspace//src/./a.py").unwrap(), "src/a.py");
        assert_eq!(workspace_path("src/a.py").unwrap(), "src/a.py");
        assert_eq!(workspace_path("dir/").unwrap(), "dir");
        for (bad, why) in [
            ("", "empty"),
            ("../etc/passwd", "'..'"),
            ("/workspace/../etc", "'..'"),
            ("a/..", "'..'"),
            ("/etc/passwd", "outside /workspace"),
            ("/workspacex/a", "outside /workspace"),
            ("/", "outside /workspace"),
            ("a\0b", "NUL"),
        ] {
            let e = workspace_path(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(workspace_path(&"a".repeat(5000)).unwrap_err().contains("4096"));
        assert!(workspace_path(&"a".repeat(256)).unwrap_err().contains("255"));
        workspace_path(&format!("{}/b", "a".repeat(255))).unwrap();
    }

    #[test]
    fn commands() {
        command("ls | wc -l").unwrap();
        assert!(command("  ").is_err());
        assert!(command("a\0").is_err());
    }

    #[test]
    fn kubernetes_names() {
        assert!(dns_label("conductor").is_ok());
        assert!(dns_label("a-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad:?}");
        }
        assert!(dns_subdomain("fast.ssd").is_ok());
        assert!(dns_subdomain("fast..ssd").is_err());
        assert!(dns_subdomain("Fast").is_err());
    }
}
