//! Environment images: the base image, presets and custom environments, built or pulled
//! on demand with live progress. Tags carry the definition hash (see
//! `conductor_core::environment`), so "is it built?" is "does the tag exist?".

use std::collections::BTreeMap;

use conductor_core::config::LOCAL_BASE_IMAGE;
use conductor_core::engine::{BuildSpec, ImageInfo, Progress, ProgressSink};
use conductor_core::environment::{Environment, ImagePlan};
use serde::Serialize;

use crate::{Conductor, Result, ServiceError};

/// What `conductor env list` and `GET /environments` show.
#[derive(Debug, Clone, Serialize)]
pub struct EnvStatus {
    pub name: String,
    pub description: String,
    /// The image reference workspaces of this environment run.
    pub image: String,
    pub built: bool,
    pub size_bytes: Option<u64>,
    pub builtin: bool,
    /// `preset`, `dockerfile`, `packages` or `image`.
    pub kind: &'static str,
}

/// The image an environment resolved to.
#[derive(Debug, Clone)]
pub struct EnvImage {
    pub reference: String,
    /// Whether this call built or pulled it (false: it was already there).
    pub made_now: bool,
    pub info: ImageInfo,
}

fn kind(env: &Environment) -> &'static str {
    use conductor_core::environment::ImageSource::*;
    match (&env.source, env.builtin) {
        (_, true) => "preset",
        (Containerfile(_), false) => "dockerfile",
        (Packages(_), _) => "packages",
        (Image(_), _) => "image",
    }
}

impl Conductor {
    pub fn base_image(&self) -> &str {
        &self.config.isolated_workspace.agent_containers.base_image
    }

    /// Makes sure the base image exists: bootstraps the local one, pulls any other.
    pub async fn ensure_base(&self, progress: ProgressSink) -> Result<ImageInfo> {
        let base = self.base_image().to_string();
        if let Some(info) = self.engine.image_inspect(&base).await? {
            return Ok(info);
        }
        if base == LOCAL_BASE_IMAGE {
            self.bootstrap_base(&base, progress).await
        } else {
            progress(Progress::Line(format!("pulling base image {base}")));
            Ok(self.engine.image_pull(&base, progress).await?)
        }
    }

    /// Status of every environment.
    pub async fn environments(&self) -> Result<Vec<EnvStatus>> {
        let mut out = Vec::new();
        for env in self.catalog.iter() {
            let plan = env.plan(self.base_image());
            let info = self.engine.image_inspect(plan.reference()).await?;
            out.push(EnvStatus {
                name: env.name.clone(),
                description: env.description.clone(),
                image: plan.reference().to_string(),
                built: info.is_some(),
                size_bytes: info.map(|i| i.size_bytes),
                builtin: env.builtin,
                kind: kind(env),
            });
        }
        Ok(out)
    }

    /// The image reference of an environment (without building it).
    pub fn environment_image(&self, name: &str) -> Result<String> {
        let env = self
            .catalog
            .require(name)
            .map_err(|m| ServiceError::invalid("environment", m))?;
        Ok(env.plan(self.base_image()).reference().to_string())
    }

    /// Builds (or pulls) an environment's image unless it already exists; `force`
    /// rebuilds anyway.
    pub async fn ensure_environment(&self, name: &str, progress: ProgressSink, force: bool) -> Result<EnvImage> {
        let env = self
            .catalog
            .require(name)
            .map_err(|m| ServiceError::invalid("environment", m))?;
        let plan = env.plan(self.base_image());
        let reference = plan.reference().to_string();
        if !force {
            if let Some(info) = self.engine.image_inspect(&reference).await? {
                return Ok(EnvImage {
                    reference,
                    made_now: false,
                    info,
                });
            }
        }
        let wrap = |e: ServiceError| match e {
            ServiceError::Engine(err) => ServiceError::Environment {
                name: name.to_string(),
                message: err.to_string(),
            },
            other => other,
        };
        let info = match plan {
            ImagePlan::Use(r) => {
                progress(Progress::Line(format!("pulling {r}")));
                self.engine.image_pull(&r, progress).await.map_err(|e| wrap(e.into()))?
            }
            ImagePlan::Build {
                tag,
                containerfile,
                base,
                labels,
                ..
            } => {
                if containerfile.contains("BASE_IMAGE") {
                    self.ensure_base(progress.clone()).await?;
                }
                let spec = BuildSpec {
                    tag,
                    containerfile,
                    context_files: Vec::new(),
                    build_args: BTreeMap::from([("BASE_IMAGE".to_string(), base)]),
                    labels,
                    host_network: true,
                };
                self.engine
                    .image_build(spec, progress)
                    .await
                    .map_err(|e| wrap(e.into()))?
            }
        };
        Ok(EnvImage {
            reference,
            made_now: true,
            info,
        })
    }
}
