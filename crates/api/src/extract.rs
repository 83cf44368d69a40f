//! Request extractors that report failures as [`ApiError`]s.
//!
//! axum's own `Json` and `Query` answer a bad request with a plain-text body; these answer
//! with the API's JSON error body and name the offending field. Bodies are parsed through
//! `serde_path_to_error`, so a wrong type deep inside a task reports `commands[1]` and an
//! unknown field reports its own name (`privileged`), not just "invalid body".

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// A JSON request body of type `T`.
pub struct JsonBody<T>(pub T);

/// The 413 sent for a body above `network.max_body_size`.
fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than {limit} bytes (network.max_body_size)"),
    )
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the request body must be JSON (Content-Type: application/json)",
            ));
        }
        let limit = state.body_limit;
        // Refuse a declared oversize body before reading any of it.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large(limit));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(limit)
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    "the request body could not be read",
                )
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON document, naming the field at fault on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    // Trailing characters after the document.
    de.end().map_err(|e| syntax_error(&e))?;
    Ok(value)
}

/// Converts an already parsed JSON value, naming the field at fault on failure.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

fn syntax_error(e: &serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_json",
        format!("the request body is not valid JSON: {e}"),
    )
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return syntax_error(&inner);
    }
    let message = strip_position(&inner.to_string());
    let parent = (path != ".").then_some(path);
    ApiError::invalid(field_path(parent, &message), message)
}

/// The field a serde message is about: for "missing field `x`" the named field inside
/// `parent`, else `parent` itself (for an unknown field it already ends with the name; the
/// top level is `body`).
fn field_path(parent: Option<String>, message: &str) -> String {
    let named = ["unknown field `", "missing field `"].iter().find_map(|p| {
        message
            .strip_prefix(p)
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_string())
    });
    match (parent, named) {
        (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p,
        (Some(p), Some(n)) => format!("{p}.{n}"),
        (None, Some(n)) => n,
        (Some(p), None) => p,
        (None, None) => "body".to_string(),
    }
}

/// serde_json appends " at line L column C"; the field path says more to an API client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message.to_string(),
    }
}

/// Query parameters of type `T`.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(QueryParams(v)),
            Err(r) => {
                let text = r.body_text();
                let message = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_string();
                // axum reports "<field>: <message>" for a bad value.
                let field = match message.split_once(": ") {
                    Some((f, _)) if !f.contains(' ') => f.to_string(),
                    _ => field_path(None, &message).replace("body", "query"),
                };
                Err(ApiError::invalid(field, message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        name: String,
        commands: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    }

    fn err<T: DeserializeOwned + std::fmt::Debug>(body: &str) -> ApiError {
        parse_json::<T>(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn errors_name_the_field() {
        let e = err::<Item>(r#"{"name": "a", "commands": ["ok", 3]}"#);
        assert_eq!((e.code, e.field.as_deref()), ("invalid_request", Some("commands[1]")));
        assert!(e.message.starts_with("invalid type: integer `3`"), "{}", e.message);
        assert!(!e.message.contains("line"), "{}", e.message);

        let e = err::<Item>(r#"{"name": "a", "commands": [], "privileged": true}"#);
        assert_eq!(e.field.as_deref(), Some("privileged"));
        assert!(e.message.starts_with("unknown field `privileged`"), "{}", e.message);

        let e = err::<Item>(r#"{"name": "a"}"#);
        assert_eq!(e.field.as_deref(), Some("commands"));

        let e = err::<Vec<Item>>(r#"[{"name": "a", "commands": []}, {"name": "b", "commands": [], "mounts": []}]"#);
        assert_eq!(e.field.as_deref(), Some("[1].mounts"));

        let e = err::<Item>(r#"{"name": 1, "commands": []}"#);
        assert_eq!(e.field.as_deref(), Some("name"));

        let e = err::<Item>(r#"[]"#);
        assert_eq!(e.field.as_deref(), Some("body"));
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        for body in [
            r#"{"name": "#,
            "{not json}",
            "",
            r#"{"name":"a","commands":[]} trailing"#,
        ] {
            let e = err::<Item>(body);
            assert_eq!(
                (e.status, e.code, e.field),
                (StatusCode::BAD_REQUEST, "malformed_json", None),
                "{body}"
            );
        }
    }
}
