//! The OpenAPI 3 document, generated from the handlers' `#[utoipa::path]` attributes and
//! the request and response types. `docs/openapi.json` in the repository is a golden copy
//! checked by the tests, so every change to the API shows up in review.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::routes::egress::{EgressEnd, EgressEvent, EgressLagged};
use crate::routes::tasks::{LogChunk, LogEnd};

/// The document's fixed part; paths and their schemas are added by the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "conductor",
        description = "Isolated Podman workspaces for AI agents: tasks run in fresh or shared \
                       workspaces, workspaces can be driven directly. Errors are \
                       `{\"error\":{\"code\",\"message\",\"field\"}}`. When \
                       `security.api_key_required` is on, every endpoint but `/health` needs \
                       `Authorization: Bearer <token>` (the token is in `security.api_key_file`).",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "tasks", description = "Queued task execution in isolated workspaces"),
        (name = "workspaces", description = "Workspaces driven directly"),
        (name = "files", description = "Files of a running workspace: upload, download (raw or tar), list, delete"),
        (name = "snapshots", description = "Snapshots of a workspace's whole state, and restoring them"),
        (name = "secrets", description = "Write-only secrets the egress proxy injects into requests to their hosts; a workspace holds only placeholders"),
        (name = "environments", description = "Environment images"),
        (name = "system", description = "Health, metrics and this document"),
    ),
    components(schemas(ErrorBody, LogChunk, LogEnd, EgressEvent, EgressLagged, EgressEnd)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Declares the optional bearer token scheme.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}
