//! `/environments`: the environment catalog and whether each image is built.

use axum::extract::State;
use axum::Json;
use conductor_service::images::EnvStatus;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiResult, ErrorBody};
use crate::AppState;

/// An environment workspaces and tasks can use.
#[derive(Debug, Serialize, ToSchema)]
pub struct Environment {
    #[schema(example = "python-dev")]
    pub name: String,
    pub description: String,
    /// Image reference its workspaces run.
    pub image: String,
    /// Whether the image exists (else the first workspace builds it).
    pub built: bool,
    pub size_bytes: Option<u64>,
    /// A preset shipped with conductor (else defined in the configuration).
    pub builtin: bool,
    /// `preset`, `dockerfile`, `packages` or `image`.
    pub kind: String,
}

impl From<EnvStatus> for Environment {
    fn from(e: EnvStatus) -> Self {
        Environment {
            name: e.name,
            description: e.description,
            image: e.image,
            built: e.built,
            size_bytes: e.size_bytes,
            builtin: e.builtin,
            kind: e.kind.to_string(),
        }
    }
}

/// Response of `GET /environments`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvironmentList {
    pub environments: Vec<Environment>,
}

/// List environments.
#[utoipa::path(
    get, path = "/environments", tag = "environments",
    responses(
        (status = 200, description = "Every environment, presets first", body = EnvironmentList),
        (status = 503, description = "The container engine failed", body = ErrorBody),
    )
)]
pub async fn list_environments(State(state): State<AppState>) -> ApiResult<Json<EnvironmentList>> {
    let envs = state.conductor.environments().await?;
    Ok(Json(EnvironmentList {
        environments: envs.into_iter().map(Into::into).collect(),
    }))
}
