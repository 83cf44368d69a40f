//! Named sub-volumes of a workspace's data volume (`source:/workspace/src`): what an
//! environment declares under `volumes:` and the configuration validates. Its own module so
//! the configuration and the environment catalog can both use it without depending on each
//! other.

use crate::validate;

/// A named sub-volume of the workspace's data volume: `source:/workspace/src`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub target: String,
}

impl VolumeSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, target) = s.split_once(':').ok_or_else(|| {
            format!("{s:?} is not a volume (expected name:/absolute/path, e.g. source:/workspace/src)")
        })?;
        validate::name(name, 63).map_err(|m| format!("volume name {m}"))?;
        validate::container_path(target).map_err(|m| format!("volume target {m}"))?;
        if target == "/" || !target.starts_with("/workspace") && !target.starts_with("/home/") {
            return Err(format!("volume target {target:?} must be under /workspace or /home"));
        }
        Ok(VolumeSpec {
            name: name.to_string(),
            target: target.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs() {
        assert!(VolumeSpec::parse("src").is_err());
        assert!(VolumeSpec::parse("src:/etc").unwrap_err().contains("under /workspace"));
        assert!(VolumeSpec::parse("Src:/workspace/x").is_err());
        assert!(VolumeSpec::parse("src:/workspace/../etc").is_err());
    }
}
