//! The service's error type: one enum every caller (CLI, HTTP API) maps in one place.

use conductor_core::config::ConfigError;
use conductor_core::engine::EngineError;
use conductor_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Caller input that fails validation; `field` names the offending input.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    /// The request is valid but conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The workspace's container stopped under a request (its main process died, or the
    /// engine's monitor of it did); the workspace is recorded as `stopped` or `lost`.
    #[error("{0}")]
    WorkspaceExited(String),
    /// A configured limit (max_containers, …) is reached.
    #[error("{0}")]
    Exhausted(String),
    /// A request body larger than what it is allowed to fill (a file upload above the
    /// workspace's storage limit).
    #[error("{0}")]
    TooLarge(String),
    /// The workspace's volume is full (ENOSPC while writing).
    #[error("{0}")]
    NoSpace(String),
    /// An environment's image could not be made (build failure, pull failure).
    #[error("environment '{name}': {message}")]
    Environment { name: String, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A host operation (mount, mkfs, debootstrap, file I/O) failed.
    #[error("{op}: {message}")]
    Host { op: String, message: String },
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServiceError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn host(op: impl Into<String>, message: impl ToString) -> Self {
        ServiceError::Host {
            op: op.into(),
            message: message.to_string(),
        }
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        ServiceError::NotFound { what: what.into() }
    }
    /// Whether retrying the same operation later may succeed (engine trouble), as opposed
    /// to a problem with the request itself.
    pub fn is_infrastructure(&self) -> bool {
        matches!(
            self,
            ServiceError::Engine(_) | ServiceError::Host { .. } | ServiceError::Store(_)
        )
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
