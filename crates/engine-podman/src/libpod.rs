//! A minimal client for the libpod endpoints the Docker-compatible API cannot replace.
//!
//! Podman 4.3's compat `POST /networks/create` always enables DNS, which on an internal
//! network still forwards queries to the host's resolver; only libpod's
//! `POST /libpod/networks/create` takes `dns_enabled`. bollard only speaks the Docker API, so
//! this module sends the few libpod requests itself: one HTTP/1.1 connection per request
//! over the Unix socket, JSON in and out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::error::ApiError;

/// API version prefix of the libpod paths; Podman 4.x serves every 4.x prefix.
const PREFIX: &str = "/v4.0.0/libpod";
/// Libpod requests here are short metadata operations.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub(crate) struct Libpod {
    socket: PathBuf,
}

impl Libpod {
    pub(crate) fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends `method` to `PREFIX + path_and_query` with an optional JSON body and decodes
    /// the JSON answer.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ApiError> {
        let bytes = tokio::time::timeout(TIMEOUT, self.send(method, path_and_query, body))
            .await
            .map_err(|_| ApiError::Timeout(TIMEOUT))??;
        Ok(serde_json::from_slice(&bytes)?)
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, ApiError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "libpod connection ended with an error");
            }
        });
        let body = match body {
            Some(value) => Bytes::from(serde_json::to_vec(value)?),
            None => Bytes::new(),
        };
        // Libpod decodes the body only when the content type says JSON.
        let request = Request::builder()
            .method(method)
            .uri(format!("{PREFIX}{path_and_query}"))
            .header(HOST, "podman")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(ApiError::Status {
            status: status.as_u16(),
            message: error_message(&bytes),
        })
    }
}

/// Libpod errors are `{"cause": …, "message": …, "response": 404}`; keep the message.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => error.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub(crate) fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query_value(r#"{"label":["a=b c"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%20c%22%5D%7D"
        );
        assert_eq!(encode_query_value("net-1_x.y~"), "net-1_x.y~");
    }

    #[test]
    fn error_bodies_yield_their_message() {
        assert_eq!(
            error_message(br#"{"cause":"x","message":"network not found","response":404}"#),
            "network not found"
        );
        assert_eq!(error_message(b"plain text\n"), "plain text");
    }
}
