//! Environments: what image a workspace runs and how that image is made.
//!
//! The presets are defined by the Containerfiles in the repository's `environments/`
//! folder, compiled into the binary so an installed `conductor` needs no source tree; the
//! user setup they all end with is written once, in
//! `environments/workspace-user.Containerfile`.
//! Custom environments come from the configuration. Every buildable environment has a
//! definition hash (Containerfile text + base image + conductor's image format version);
//! the image tag carries it, so an unchanged definition is never rebuilt and a changed one
//! always is.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::config::{Config, NetworkPolicy};
use crate::engine::Labels;
use crate::naming::{LABEL_DEFINITION, LABEL_ENVIRONMENT, LABEL_VERSION};
use crate::volume::VolumeSpec;

/// Bump when the way images are built changes, to rebuild every environment once.
const IMAGE_FORMAT: &str = "1";

/// A built-in environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    /// The whole Containerfile: `environments/<name>/Containerfile` followed by the
    /// workspace user setup every preset shares (`environments/workspace-user.Containerfile`).
    pub containerfile: &'static str,
}

/// A preset's Containerfile, compiled in: `environments/<name>/Containerfile`, a blank line,
/// then the user setup all presets share, written once in
/// `environments/workspace-user.Containerfile` (user `agent` with uid and gid 1000,
/// `/workspace`, `USER 1000`), so it always comes last.
macro_rules! preset_containerfile {
    ($name:literal) => {
        concat!(
            include_str!(concat!("../../../environments/", $name, "/Containerfile")),
            "\n",
            include_str!("../../../environments/workspace-user.Containerfile"),
        )
    };
}

/// The built-in presets.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "minimal",
        description: "Minimal: git, curl, ca-certificates, bash",
        containerfile: preset_containerfile!("minimal"),
    },
    Preset {
        name: "python-dev",
        description: "Python development: python3, pip, venv, pytest, black, flake8, git",
        containerfile: preset_containerfile!("python-dev"),
    },
    Preset {
        name: "nodejs-dev",
        description: "Node.js development: nodejs, npm, jest, eslint, prettier, git",
        containerfile: preset_containerfile!("nodejs-dev"),
    },
    Preset {
        name: "fullstack",
        description: "Full stack: python3, nodejs, npm, build-essential, postgresql-client, redis-tools",
        containerfile: preset_containerfile!("fullstack"),
    },
    Preset {
        name: "python-ml",
        description: "Data science: python3 with numpy, pandas, scikit-learn, jupyter",
        containerfile: preset_containerfile!("python-ml"),
    },
    Preset {
        name: "security-tools",
        description: "Security scanning: bandit, shellcheck, safety, pip-audit, npm audit",
        containerfile: preset_containerfile!("security-tools"),
    },
];

/// Where an environment's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Built from a Containerfile (presets and `dockerfile:`).
    Containerfile(String),
    /// Debian packages installed on top of the base image (`packages:`).
    Packages(Vec<String>),
    /// An existing image, used if present locally, else pulled (`image:`).
    Image(String),
}

/// One environment, resolved from a preset or the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub name: String,
    pub description: String,
    pub source: ImageSource,
    pub volumes: Vec<VolumeSpec>,
    pub network: Option<NetworkPolicy>,
    pub builtin: bool,
}

/// How to obtain the image of an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlan {
    /// Use this reference; pull it when it is not present locally.
    Use(String),
    /// Build `containerfile` into `tag` (skipped when `tag` already exists), FROM `base`.
    Build {
        tag: String,
        containerfile: String,
        base: String,
        labels: Labels,
        definition: String,
    },
}

impl ImagePlan {
    /// The reference a workspace of this environment runs.
    pub fn reference(&self) -> &str {
        match self {
            ImagePlan::Use(r) => r,
            ImagePlan::Build { tag, .. } => tag,
        }
    }
}

/// The Containerfile lines that give any image conductor's workspace layout: a user with
/// uid 1000 and a `/workspace` it owns.
const WORKSPACE_LAYOUT: &str = "RUN (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 --user-group --shell /bin/bash agent) \\\n && mkdir -p /workspace && chown 1000:1000 /workspace\nWORKDIR /workspace\nUSER 1000\n";

impl Environment {
    /// The Containerfile this environment builds, if it is built.
    pub fn containerfile(&self) -> Option<String> {
        match &self.source {
            ImageSource::Containerfile(text) => Some(text.clone()),
            ImageSource::Packages(pkgs) => Some(format!(
                "ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nUSER root\nRUN apt-get update \\\n && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {} \\\n && rm -rf /var/lib/apt/lists/*\n{WORKSPACE_LAYOUT}",
                pkgs.join(" ")
            )),
            ImageSource::Image(_) => None,
        }
    }

    /// Decides how to get this environment's image on top of `base_image`.
    pub fn plan(&self, base_image: &str) -> ImagePlan {
        let Some(containerfile) = self.containerfile() else {
            let ImageSource::Image(r) = &self.source else {
                unreachable!("only images have no containerfile")
            };
            return ImagePlan::Use(r.clone());
        };
        let mut h = Sha256::new();
        for part in [IMAGE_FORMAT, base_image, &containerfile] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let definition = hex::encode(h.finalize());
        let tag = format!("localhost/conductor/{}:{}", self.name, &definition[..12]);
        let labels = Labels::from([
            (LABEL_ENVIRONMENT.to_string(), self.name.clone()),
            (LABEL_DEFINITION.to_string(), definition.clone()),
            (LABEL_VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        ImagePlan::Build {
            tag,
            containerfile,
            base: base_image.to_string(),
            labels,
            definition,
        }
    }
}

/// All environments known to a configuration, by name.
#[derive(Debug, Clone)]
pub struct Catalog {
    envs: BTreeMap<String, Environment>,
}

impl Catalog {
    /// Presets plus the configuration's custom environments (a custom one with a preset's
    /// name replaces the preset).
    pub fn from_config(config: &Config) -> Self {
        let mut envs = BTreeMap::new();
        for preset in PRESETS {
            envs.insert(
                preset.name.to_string(),
                Environment {
                    name: preset.name.to_string(),
                    description: preset.description.to_string(),
                    source: ImageSource::Containerfile(preset.containerfile.to_string()),
                    volumes: Vec::new(),
                    network: None,
                    builtin: true,
                },
            );
        }
        for c in &config.isolated_workspace.agent_containers.environments {
            let source = match (&c.image, &c.dockerfile) {
                (Some(image), _) => ImageSource::Image(image.clone()),
                (None, Some(df)) => ImageSource::Containerfile(df.clone()),
                (None, None) => ImageSource::Packages(c.packages.clone()),
            };
            let volumes = c.volumes.iter().filter_map(|v| VolumeSpec::parse(v).ok()).collect();
            let description = c
                .description
                .clone()
                .unwrap_or_else(|| format!("Custom environment {}", c.name));
            envs.insert(
                c.name.clone(),
                Environment {
                    name: c.name.clone(),
                    description,
                    source,
                    volumes,
                    network: c.network.clone(),
                    builtin: false,
                },
            );
        }
        Catalog { envs }
    }

    pub fn get(&self, name: &str) -> Option<&Environment> {
        self.envs.get(name)
    }

    /// Looks an environment up, with an error that lists the known ones.
    pub fn require(&self, name: &str) -> Result<&Environment, String> {
        self.get(name).ok_or_else(|| {
            format!(
                "unknown environment {name:?} (known: {})",
                self.names().collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.envs.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Environment> {
        self.envs.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_all_there_and_build_from_the_base() {
        let cat = Catalog::from_config(&Config::default());
        for name in [
            "minimal",
            "python-dev",
            "nodejs-dev",
            "fullstack",
            "python-ml",
            "security-tools",
        ] {
            let env = cat.get(name).unwrap();
            let cf = env.containerfile().unwrap();
            assert!(
                cf.contains("BASE_IMAGE"),
                "{name} must build FROM the configurable base"
            );
            assert_eq!(cf.matches("useradd").count(), 1, "{name} sets the user up once");
            assert!(
                cf.ends_with("USER 1000\nENV HOME=/home/agent\nCMD [\"bash\"]\n"),
                "{name} ends as the workspace user"
            );
            match env.plan("localhost/conductor/base:bookworm") {
                ImagePlan::Build { tag, labels, .. } => {
                    assert!(tag.starts_with(&format!("localhost/conductor/{name}:")));
                    assert_eq!(labels[LABEL_ENVIRONMENT], name);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn definition_hash_changes_with_the_definition_only() {
        let cat = Catalog::from_config(&Config::default());
        let env = cat.get("minimal").unwrap();
        assert_eq!(env.plan("b:1"), env.plan("b:1"));
        assert_ne!(env.plan("b:1").reference(), env.plan("b:2").reference());
        let mut edited = env.clone();
        edited.source = ImageSource::Containerfile(format!("{}\nRUN true\n", env.containerfile().unwrap()));
        assert_ne!(edited.plan("b:1").reference(), env.plan("b:1").reference());
    }

    #[test]
    fn custom_environments_from_config() {
        let cfg = Config::parse(
            "isolated_workspace:\n  agent_containers:\n    environments:\n      - name: custom-env\n        dockerfile: |\n          FROM ubuntu:22.04\n          WORKDIR /workspace\n        volumes: [\"source:/workspace/src\", \"cache:/workspace/.cache\"]\n      - name: py\n        image: python:3.11-slim\n      - name: tools\n        packages: [jq]\n",
        )
        .unwrap()
        .config;
        let cat = Catalog::from_config(&cfg);
        let env = cat.get("custom-env").unwrap();
        assert_eq!(env.volumes.len(), 2);
        assert_eq!(
            env.volumes[0],
            VolumeSpec {
                name: "source".into(),
                target: "/workspace/src".into()
            }
        );
        assert_eq!(
            cat.get("py").unwrap().plan("x"),
            ImagePlan::Use("python:3.11-slim".into())
        );
        let tools = cat.get("tools").unwrap().containerfile().unwrap();
        assert!(tools.contains("install -y --no-install-recommends jq"), "{tools}");
        assert!(tools.contains("useradd"));
        let e = cat.require("nope").unwrap_err();
        assert!(
            e.contains("unknown environment \"nope\"") && e.contains("python-dev"),
            "{e}"
        );
    }
}
