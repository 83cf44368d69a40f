//! Failures talking to Podman, and their translation into the core's [`EngineError`].
//!
//! Lower layers (bollard, the small libpod client) fail with an [`ApiError`] that knows the
//! HTTP status but not what conductor was doing. Each engine operation wraps it with
//! [`api_error`], which adds the operation and the object ("start container 'ws-3'") and
//! picks the variant: a 404 about the object becomes `NotFound`, a refused or broken
//! connection becomes `Unavailable`, anything else `Failed`.

use std::error::Error as _;
use std::time::Duration;

use conductor_core::engine::EngineError;

/// A failed request to the Podman API, before the operation context is added.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// A request made through bollard (the Docker-compatible API).
    #[error(transparent)]
    Bollard(#[from] bollard::errors::Error),
    /// The libpod API answered with an error status.
    #[error("Podman responded with status {status}: {message}")]
    Status { status: u16, message: String },
    /// The libpod socket could not be reached.
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// HTTP-level failure of a libpod request.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// A libpod request could not be built.
    #[error(transparent)]
    Request(#[from] hyper::http::Error),
    /// A libpod answer was not the JSON we expected.
    #[error("unexpected answer: {0}")]
    Decode(#[from] serde_json::Error),
    /// A libpod request got no answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl ApiError {
    /// The HTTP status Podman answered with, when it answered.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            ApiError::Bollard(bollard::errors::Error::DockerResponseServerError { status_code, .. }) => {
                Some(*status_code)
            }
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// True when Podman could not be reached at all (socket gone, connection refused).
    fn is_unreachable(&self) -> bool {
        match self {
            ApiError::Connect { .. } => true,
            ApiError::Bollard(bollard::errors::Error::HyperLegacyError { err }) => err.is_connect(),
            ApiError::Bollard(bollard::errors::Error::SocketNotFoundError(_)) => true,
            _ => false,
        }
    }

    /// The message with its whole `source()` chain, which bollard and hyper keep separate.
    fn full_message(&self) -> String {
        let mut message = self.to_string();
        let mut source = self.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        message
    }
}

/// Wraps an API failure of operation `op` (e.g. "start container 'ws-3'").
///
/// `object` names what a 404 refers to (e.g. "container 'ws-3'"); `None` when a 404 is not
/// about a single object and should stay a plain failure.
pub(crate) fn api_error(op: impl Into<String>, object: Option<&str>, error: impl Into<ApiError>) -> EngineError {
    let error = error.into();
    let op = op.into();
    match object {
        Some(object) if error.is_not_found() => EngineError::NotFound {
            what: object.to_string(),
        },
        _ if error.is_unreachable() => EngineError::Unavailable(format!("{op}: {}", error.full_message())),
        _ => EngineError::failed(op, error.full_message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(status: u16) -> ApiError {
        ApiError::Bollard(bollard::errors::Error::DockerResponseServerError {
            status_code: status,
            message: "no such container".into(),
        })
    }

    #[test]
    fn a_404_about_the_object_is_not_found() {
        let error = api_error("start container 'a'", Some("container 'a'"), server_error(404));
        assert!(matches!(error, EngineError::NotFound { ref what } if what == "container 'a'"));
    }

    #[test]
    fn a_404_without_object_stays_a_failure_naming_the_operation() {
        let error = api_error("build image 'x'", None, server_error(404));
        match error {
            EngineError::Failed { op, message } => {
                assert_eq!(op, "build image 'x'");
                assert!(message.contains("no such container"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refused_connection_is_unavailable() {
        let error = ApiError::Connect {
            socket: "/x.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let error = api_error("create network 'n'", Some("network 'n'"), error);
        match error {
            EngineError::Unavailable(message) => assert!(message.starts_with("create network 'n': "), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
