//! Bearer-token authentication (`security.api_key_required`).
//!
//! The token lives in `security.api_key_file` (default `<base>/config/api-key`). When the
//! file is missing, a random 256-bit token is written there with mode 0600, so enabling
//! the option is enough to secure a fresh installation: the operator reads the token from
//! the file. Tokens are compared in constant time. The web dashboard keeps the token in
//! a cookie ([`crate::ui`]), accepted here with a same-origin check for state changes. `/health` stays open so that process
//! supervisors and the start script can probe the service without the secret.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use conductor_core::config::DataPaths;
use conductor_core::Config;
use conductor_service::{home_dir, Result, ServiceError};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::ui;

/// The secret a client must send as `Authorization: Bearer <token>`.
pub struct ApiKey(String);

/// Where the token file is: `security.api_key_file` (with `~` expanded) or
/// `<base>/config/api-key`.
pub fn key_path(config: &Config, paths: &DataPaths) -> PathBuf {
    match config.security.api_key_file.as_deref() {
        Some("~") => home_dir(),
        Some(p) => match p.strip_prefix("~/") {
            Some(rest) => home_dir().join(rest),
            None => PathBuf::from(p),
        },
        None => paths.base.join("config").join("api-key"),
    }
}

impl ApiKey {
    /// Reads the token from `path`, creating the file with a random token (mode 0600)
    /// when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<ApiKey> {
        let op = |what: &str| format!("{what} API key file {}", path.display());
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim().to_string();
                if token.len() < 16 {
                    return Err(ServiceError::invalid(
                        "security.api_key_file",
                        format!("{} holds a token shorter than 16 characters", path.display()),
                    ));
                }
                let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0);
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        "API key file {} is readable by other users (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    );
                }
                Ok(ApiKey(token))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| ServiceError::host(op("create the directory of the"), e))?;
                }
                let mut random = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut random))
                    .map_err(|e| ServiceError::host("read /dev/urandom", e))?;
                let token = hex::encode(random);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| ServiceError::host(op("create"), e))?;
                writeln!(file, "{token}").map_err(|e| ServiceError::host(op("write"), e))?;
                tracing::info!("created API key file {}", path.display());
                Ok(ApiKey(token))
            }
            Err(e) => Err(ServiceError::host(op("read"), e)),
        }
    }

    /// The token itself (the E2B API derives its envd access tokens from it).
    pub fn token(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the token (constant time in the token's content).
    pub(crate) fn matches(&self, presented: &str) -> bool {
        presented.as_bytes().ct_eq(self.0.as_bytes()).into()
    }
}

/// Middleware: lets a request through when it carries the right bearer token, or the
/// dashboard's session cookie ([`crate::ui::COOKIE`]) holding it. A cookie-authenticated
/// request that changes state must come from the dashboard itself
/// ([`crate::ui::same_origin`]), so that another site cannot make a browser send it. A
/// dashboard page without a token redirects to the login form.
pub async fn require_token(State(key): State<Arc<ApiKey>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/health" || ui::is_public(req.method(), path) {
        return next.run(req).await;
    }
    // `/` only redirects a browser to the dashboard.
    if path == "/" && req.method() == Method::GET && ui::accepts_html(req.headers()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match presented {
        Some(t) if key.matches(t) => return next.run(req).await,
        Some(_) => return unauthorized("the bearer token is not valid"),
        None => {}
    }
    if let Some(cookie) = ui::cookie_token(req.headers()) {
        if key.matches(cookie) {
            if ui::is_unsafe(req.method()) && !ui::same_origin(req.headers()) {
                return ui::cross_site();
            }
            return next.run(req).await;
        }
    }
    if ui::is_ui(path) {
        if matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut r = Redirect::to("/ui/login").into_response();
            ui::add_security_headers(r.headers_mut());
            return r;
        }
        return unauthorized("log in to the dashboard first (/ui/login)");
    }
    unauthorized(
        "this service requires an API key: send Authorization: Bearer <token> (the token is in security.api_key_file)",
    )
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_random_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config").join("api-key");
        let a = ApiKey::load_or_create(&path).unwrap();
        assert_eq!(a.0.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = ApiKey::load_or_create(&path).unwrap();
        assert_eq!(a.0, b.0);
        assert!(a.matches(&b.0));
        assert!(!a.matches(&b.0[..63]));
        assert!(!a.matches(""));

        std::fs::write(&path, "short\n").unwrap();
        match ApiKey::load_or_create(&path) {
            Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "security.api_key_file"),
            other => panic!("{:?}", other.err()),
        }
    }
}
