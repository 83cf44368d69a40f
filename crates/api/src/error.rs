//! The API's one error type and its one mapping to HTTP.
//!
//! Every failure a client can see — a service error, a rejected request body, a missing
//! token, a foreign `Host` header — becomes an [`ApiError`], and [`ApiError`]'s
//! `IntoResponse` is the only place that writes an error response. The body is always
//! `{"error":{"code":…,"message":…,"field":…,"request_id":…}}`. Messages of internal failures (engine,
//! host, database) stay in the service log; the client gets a generic sentence, never a
//! `Debug` dump or a host path.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use conductor_core::engine::EngineError;
use conductor_service::ServiceError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error as sent to a client: status, stable machine-readable code, human message and
/// the request field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: `invalid_request`, `malformed_json`, `unsupported_media_type`,
    /// `payload_too_large`, `not_found`, `method_not_allowed`, `conflict`,
    /// `resource_exhausted`, `environment_unavailable`, `invalid_config`, `unauthorized`,
    /// `forbidden_host`, `shutting_down`, `insufficient_storage`, `workspace_exited`,
    /// `engine_unavailable`, `engine_error` or `internal_error`.
    pub code: String,
    pub message: String,
    /// The request field at fault, as a path such as `commands[1]` or `env.BAD-NAME`.
    pub field: Option<String>,
    /// The request's id, also in the `X-Request-Id` header and in the service log's lines
    /// about the request.
    #[schema(example = "3f2a9c1e77b04b0e")]
    pub request_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A 400 for a request value that fails validation.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A generic 500 whose detail goes to the log only.
    fn internal(code: &'static str, status: StatusCode, message: &str, detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(code, "{detail}");
        ApiError::new(status, code, message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid { field, message } => ApiError::invalid(field, message),
            ServiceError::NotFound { what } => ApiError::not_found(format!("{what} not found")),
            ServiceError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ServiceError::WorkspaceExited(m) => ApiError::new(StatusCode::CONFLICT, "workspace_exited", m),
            ServiceError::Exhausted(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "resource_exhausted", m),
            ServiceError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m),
            ServiceError::NoSpace(m) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", m),
            ServiceError::Environment { name, message } => {
                tracing::error!("environment '{name}': {message}");
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "environment_unavailable",
                    format!("the image of environment '{name}' could not be built or pulled; the service log has the details"),
                )
            }
            ServiceError::Config(c) => {
                let (field, message) = match &c {
                    conductor_core::config::ConfigError::Invalid { path, message } => {
                        (Some(path.clone()), message.clone())
                    }
                    conductor_core::config::ConfigError::Syntax(m) => (None, m.clone()),
                };
                ApiError {
                    field,
                    ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", message)
                }
            }
            ServiceError::Engine(e @ EngineError::Unavailable(_)) => ApiError::internal(
                "engine_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "the container engine does not answer; the service log has the details",
                &e,
            ),
            ServiceError::Engine(e) => ApiError::internal(
                "engine_error",
                StatusCode::INTERNAL_SERVER_ERROR,
                "a container engine operation failed; the service log has the details",
                &e,
            ),
            e @ (ServiceError::Store(_) | ServiceError::Host { .. }) => ApiError::internal(
                "internal_error",
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; the service log has the details",
                &e,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                field: self.field,
                request_id: crate::request_id(),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_errors_map_to_status_and_code() {
        let cases = [
            (
                ServiceError::invalid("env.X-Y", "bad"),
                400,
                "invalid_request",
                Some("env.X-Y"),
            ),
            (ServiceError::not_found("workspace 'ws-1'"), 404, "not_found", None),
            (ServiceError::Conflict("busy".into()), 409, "conflict", None),
            (
                ServiceError::WorkspaceExited("its main process died".into()),
                409,
                "workspace_exited",
                None,
            ),
            (
                ServiceError::Engine(EngineError::failed("remove container 'c'", "/run/x: improper")),
                500,
                "engine_error",
                None,
            ),
            (ServiceError::Exhausted("full".into()), 429, "resource_exhausted", None),
            (ServiceError::TooLarge("big".into()), 413, "payload_too_large", None),
            (ServiceError::NoSpace("full".into()), 507, "insufficient_storage", None),
            (
                ServiceError::Environment {
                    name: "e".into(),
                    message: "/var/lib/secret failed".into(),
                },
                422,
                "environment_unavailable",
                None,
            ),
            (
                ServiceError::Engine(EngineError::Unavailable("/run/podman.sock".into())),
                503,
                "engine_unavailable",
                None,
            ),
            (
                ServiceError::host("mount /home/x", "EPERM"),
                500,
                "internal_error",
                None,
            ),
        ];
        for (e, status, code, field) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status, "{code}");
            assert_eq!(a.code, code);
            assert_eq!(a.field.as_deref(), field);
            assert!(!a.message.contains("/var/lib"), "{}", a.message);
            assert!(!a.message.contains("/run/"), "{}", a.message);
            assert!(!a.message.contains("/home"), "{}", a.message);
        }
    }
}
