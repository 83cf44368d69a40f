//! The web dashboard under `/ui`: server-rendered HTML (maud, which escapes every value
//! it interpolates), one small stylesheet and one small script embedded in the binary.
//!
//! Pages call the service directly, like the JSON routes. Every state change is a POST
//! form; a cross-site POST is refused ([`same_origin`]: `Sec-Fetch-Site: same-origin`, or an
//! `Origin` equal to the `Host`). With `security.api_key_required` the pages need the
//! token: the login form puts it in the `conductor_token` cookie (HttpOnly,
//! SameSite=Strict), which [`crate::auth`] accepts for `/ui` and, for the dashboard's own
//! reads of the JSON API (the task log stream), for the API too. Every response carries a
//! strict Content-Security-Policy ([`security_headers`]). Lists render without JavaScript;
//! the script only refreshes marked parts of a page and follows a task's log.

mod actions;
pub mod builds;
mod pages;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::AppState;

/// The name of the dashboard's session cookie (it holds the API token).
pub const COOKIE: &str = "conductor_token";

/// The Content-Security-Policy of every `/ui` response.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'";

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

/// What the dashboard's handlers reach: the API's state and the token, when one is required.
#[derive(Clone)]
pub struct UiState {
    pub app: AppState,
    pub key: Option<Arc<ApiKey>>,
    /// Environment builds started from the dashboard, by environment name.
    pub builds: Arc<builds::Builds>,
}

/// Paths the token middleware lets through without a token: the login form and the
/// static assets (they hold no data).
pub fn is_public(method: &Method, path: &str) -> bool {
    path == "/ui/login" || (method == Method::GET && path.starts_with("/ui/assets/"))
}

/// Whether `path` belongs to the dashboard.
pub fn is_ui(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// Whether a request comes from a page of this server: `Sec-Fetch-Site: same-origin`
/// when the browser sends it, else an `Origin` whose host is the request's `Host`.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        return site.eq_ignore_ascii_case("same-origin");
    }
    match (get("origin"), get("host")) {
        (Some(origin), Some(host)) => origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// The value of the `conductor_token` cookie, if the request has one.
pub fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// Whether a request may change state (anything but GET, HEAD and OPTIONS).
pub fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The dashboard's routes, with their guards: security headers on every response, and
/// state-changing requests only from the dashboard's own pages.
pub fn router(state: UiState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/ui", get(pages::overview))
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route("/ui/tasks", get(pages::tasks))
        .route("/ui/tasks/{id}", get(pages::task))
        .route("/ui/tasks/{id}/cancel", post(actions::cancel_task))
        .route("/ui/tasks/{id}/retry", post(actions::retry_task))
        .route("/ui/workspaces", get(pages::workspaces))
        .route("/ui/workspaces/{id}", get(pages::workspace))
        .route("/ui/workspaces/{id}/download", get(actions::download))
        .route("/ui/workspaces/{id}/exec", post(actions::exec))
        .route("/ui/workspaces/{id}/exec/stream", post(actions::exec_stream))
        .route("/ui/workspaces/{id}/upload", post(actions::upload))
        .route("/ui/workspaces/{id}/snapshots", post(actions::create_snapshot))
        .route("/ui/workspaces/{id}/fork", post(actions::fork))
        .route(
            "/ui/workspaces/{id}/snapshots/{name}/restore",
            post(actions::restore_snapshot),
        )
        .route(
            "/ui/workspaces/{id}/snapshots/{name}/delete",
            post(actions::delete_snapshot),
        )
        .route("/ui/environments", get(pages::environments))
        .route("/ui/environments/{name}/build", get(builds::page).post(builds::start))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route(
            "/ui/assets/ui.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/ui/assets/ui.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .layer(middleware::from_fn(refuse_cross_site))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `/`: a browser (`Accept: text/html`) is sent to the dashboard; anything else gets the
/// API's 404.
async fn root(headers: HeaderMap) -> Response {
    if accepts_html(&headers) {
        Redirect::to("/ui").into_response()
    } else {
        ApiError::not_found("no such endpoint").into_response()
    }
}

pub fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// Middleware: the security headers of every dashboard response.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    add_security_headers(response.headers_mut());
    response
}

pub fn add_security_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

/// Middleware: a state-changing request to the dashboard must come from its own pages,
/// whether or not a token is required (forms cannot be cross-site requests then either).
async fn refuse_cross_site(req: Request, next: Next) -> Response {
    if is_unsafe(req.method()) && !same_origin(req.headers()) {
        return cross_site();
    }
    next.run(req).await
}

/// The 403 for a cross-site state-changing request.
pub fn cross_site() -> Response {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_site",
        "state-changing requests authenticated by the dashboard cookie must come from the dashboard (Sec-Fetch-Site: same-origin, or an Origin equal to the Host)",
    )
    .into_response()
}

/// A page: the document around `body`, with the navigation (`active` marks the section).
fn layout(title: &str, active: &str, logout: bool, body: Markup) -> Html<String> {
    let nav = [
        ("/ui", "Overview"),
        ("/ui/tasks", "Tasks"),
        ("/ui/workspaces", "Workspaces"),
        ("/ui/environments", "Environments"),
    ];
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · conductor" }
                    link rel="stylesheet" href="/ui/assets/ui.css";
                    script src="/ui/assets/ui.js" defer {}
                }
                body {
                    header {
                        a.brand href="/ui" { "conductor" }
                        nav {
                            @for (href, label) in nav {
                                a href=(href) class=[(active == label).then_some("active")] { (label) }
                            }
                        }
                        @if logout {
                            form.logout method="post" action="/ui/logout" {
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
}

/// An error page with the status of the API's error for the same failure.
pub(crate) struct UiError(ApiError);

impl From<conductor_service::ServiceError> for UiError {
    fn from(e: conductor_service::ServiceError) -> Self {
        UiError(ApiError::from(e))
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        UiError(e)
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = html! {
            h1 { "Error " (e.status.as_u16()) }
            p.error { (e.message) }
            @if let Some(field) = &e.field { p { "Field: " code { (field) } } }
            p { a href="/ui" { "Back to the overview" } }
        };
        (e.status, layout("Error", "", false, body)).into_response()
    }
}

pub(crate) type UiResult<T> = Result<T, UiError>;

/// The login form.
async fn login_page(State(s): State<UiState>) -> Response {
    if s.key.is_none() {
        return Redirect::to("/ui").into_response();
    }
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let body = html! {
        h1 { "Log in" }
        p { "This conductor requires its API token (the file " code { "security.api_key_file" } ", by default " code { "<base>/config/api-key" } ")." }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.login method="post" action="/ui/login" {
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Log in" }
        }
    };
    (status, layout("Log in", "", false, body)).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// Checks the token and keeps it in the session cookie.
async fn login(State(s): State<UiState>, Form(f): Form<LoginForm>) -> Response {
    let Some(key) = &s.key else {
        return Redirect::to("/ui").into_response();
    };
    let token = f.token.trim();
    if !key.matches(token) {
        return login_form(StatusCode::UNAUTHORIZED, Some("That is not the token."));
    }
    // The token is hex (or at least printable); anything else cannot be a cookie value.
    let Ok(cookie) = HeaderValue::from_str(&format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")) else {
        return login_form(StatusCode::BAD_REQUEST, Some("The token cannot be kept in a cookie."));
    };
    let mut r = Redirect::to("/ui").into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r
}

/// Forgets the session cookie.
async fn logout() -> Response {
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("conductor_token=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

/// Percent-encodes a query value (everything but unreserved characters).
pub(crate) fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A path segment for a link: ids and snapshot names are validated by the service, but
/// encode them anyway.
pub(crate) fn segment(s: &str) -> String {
    query_value(s)
}

/// `1536` → `1.5 KiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `1234` → `1.2 s`.
pub(crate) fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{}m {}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_needs_the_fetch_metadata_or_a_matching_origin() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&h(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "http://a:1"),
            ("host", "a:1")
        ])));
        assert!(!same_origin(&h(&[("sec-fetch-site", "same-site")])));
        assert!(!same_origin(&h(&[("sec-fetch-site", "none")])));
        assert!(same_origin(&h(&[
            ("origin", "http://127.0.0.1:8081"),
            ("host", "127.0.0.1:8081")
        ])));
        assert!(!same_origin(&h(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8081")
        ])));
        assert!(!same_origin(&h(&[("origin", "null"), ("host", "127.0.0.1:8081")])));
        assert!(!same_origin(&h(&[("host", "127.0.0.1:8081")])));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut m = HeaderMap::new();
        m.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; conductor_token=abc ; b=2"),
        );
        assert_eq!(cookie_token(&m), Some("abc"));
        m.insert(header::COOKIE, HeaderValue::from_static("xconductor_token=abc"));
        assert_eq!(cookie_token(&m), None);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(query_value("a b/<x>&\"é"), "a%20b%2F%3Cx%3E%26%22%C3%A9");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn values_are_escaped_in_pages() {
        let page = layout(
            "<t>",
            "",
            false,
            html! { p { ("<script>alert(1)</script>\"><img src=x onerror=alert(1)>") } },
        )
        .0;
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
        assert!(page.contains("<title>&lt;t&gt; · conductor</title>"));
    }
}
