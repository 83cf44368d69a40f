//! The web dashboard (`/ui`) over real HTTP on 127.0.0.1:0: the token (login form,
//! cookie, redirects), the cookie on the JSON API with its same-origin check, the security
//! headers, and escaping of task values. No orchestrator runs, so submitted tasks stay
//! queued and nothing reaches Podman but the conductor's own start. The browser tests are
//! in tests/ui/ (Playwright and chromium).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestEnv;
use conductor_core::task::TaskSpec;
use conductor_service::Conductor;
use reqwest::header::{HeaderMap, CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};
use reqwest::StatusCode;

struct Ui {
    _env: TestEnv,
    conductor: Arc<Conductor>,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

impl Ui {
    async fn start(extra: &str) -> Ui {
        let mut env = TestEnv::new(extra).await;
        let conductor = Arc::new(env.conductor.take().expect("conductor"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = conductor.clone();
        let server = tokio::spawn(async move {
            conductor_api::serve(c, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let ui = Ui {
            _env: env,
            conductor,
            port,
            stop: Some(stop),
            server: Some(server),
            http,
        };
        for _ in 0..100 {
            if ui.http.get(ui.url("/health")).send().await.is_ok() {
                return ui;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the API did not come up");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.conductor.paths.base.join("config/api-key"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let (stop, server) = (self.stop.take(), self.server.take());
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                if let Some(s) = stop {
                    let _ = s.send(());
                }
                if let Some(h) = server {
                    let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
                }
            })
        });
    }
}

fn assert_security_headers(h: &HeaderMap, what: &str) {
    let csp = h
        .get(CONTENT_SECURITY_POLICY)
        .unwrap_or_else(|| panic!("{what}: no CSP"))
        .to_str()
        .unwrap();
    for part in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(part), "{what}: {part} not in {csp}");
    }
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
}

/// With a token required: pages redirect to the login form, the form sets the cookie,
/// the cookie opens the pages and the JSON API (state changes only from the same
/// origin), and every `/ui` response has the security headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_cookie_and_headers() {
    let ui = Ui::start("security:\n  api_key_required: true\n").await;
    let token = ui.token();
    let http = &ui.http;

    for path in [
        "/ui",
        "/ui/tasks",
        "/ui/tasks/task-x",
        "/ui/workspaces",
        "/ui/workspaces/ws-x",
        "/ui/environments",
    ] {
        let r = http.get(ui.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()[LOCATION], "/ui/login", "{path}");
        assert_security_headers(r.headers(), path);
        assert_eq!(r.text().await.unwrap(), "", "{path} shows nothing");
    }
    let r = http
        .get(ui.url("/ui"))
        .header("cookie", "conductor_token=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = http.get(ui.url("/ui/login")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_security_headers(r.headers(), "/ui/login");
    for asset in ["/ui/assets/ui.css", "/ui/assets/ui.js"] {
        let r = http.get(ui.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
        assert_security_headers(r.headers(), asset);
    }
    // `/`: a browser goes to the dashboard; a JSON client still needs the token.
    let r = http
        .get(ui.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), r.headers()[LOCATION].to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/ui")
    );
    assert_eq!(
        http.get(ui.url("/")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // Login: a wrong token stays on the form; the right one sets the cookie.
    let same = |b: reqwest::RequestBuilder| b.header("sec-fetch-site", "same-origin");
    let r = same(http.post(ui.url("/ui/login")).form(&[("token", "nope")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    let r = http
        .post(ui.url("/ui/login"))
        .header("origin", "http://evil.example")
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a cross-site login is refused");
    let r = same(http.post(ui.url("/ui/login")).form(&[("token", token.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/ui");
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(set.starts_with(&format!("conductor_token={token};")), "{set}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    let cookie = format!("conductor_token={token}");

    for path in ["/ui", "/ui/tasks", "/ui/workspaces", "/ui/environments"] {
        let r = http.get(ui.url(path)).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert_security_headers(r.headers(), path);
    }
    let r = http
        .get(ui.url("/ui/tasks/task-nope"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_security_headers(r.headers(), "an error page");

    // The cookie on the JSON API: reads pass; state changes only from the same origin.
    let r = http
        .get(ui.url("/tasks"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for (name, value) in [("origin", "http://evil.example"), ("sec-fetch-site", "cross-site")] {
        let r = http
            .post(ui.url("/tasks/task-nope/cancel"))
            .header("cookie", &cookie)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}: {value}");
    }
    let r = http
        .post(ui.url("/tasks/task-nope/cancel"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "no origin at all");
    let r = http
        .post(ui.url("/tasks/task-nope/cancel"))
        .header("cookie", &cookie)
        .header("origin", ui.origin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "same origin gets through");
    // Dashboard forms: the same rule.
    let r = http
        .post(ui.url("/ui/tasks/task-nope/cancel"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = same(
        http.post(ui.url("/ui/tasks/task-nope/cancel"))
            .header("cookie", &cookie),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // State changes are never GETs.
    let r = http
        .get(ui.url("/ui/tasks/task-nope/cancel"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    // The Host check stays in front.
    let r = http
        .get(ui.url("/ui"))
        .header("cookie", &cookie)
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Logout clears the cookie.
    let r = same(http.post(ui.url("/ui/logout")).header("cookie", &cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(r.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
}

/// Values from tasks are escaped on every page they appear on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_values_are_escaped() {
    let ui = Ui::start("").await;
    let payload = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>";
    let spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "task_type": "isolated_execution",
        "description": payload,
        "environment": "minimal",
        "commands": [format!("echo '{payload}'")],
        "agent_id": "ui-test",
    }))
    .unwrap();
    let task = ui.conductor.submit_tasks(vec![spec]).unwrap().remove(0);
    for path in [
        "/ui".to_string(),
        "/ui/tasks".to_string(),
        format!("/ui/tasks/{}", task.id),
    ] {
        let r = ui.http.get(ui.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_security_headers(r.headers(), &path);
        let page = r.text().await.unwrap();
        assert!(page.contains(&task.id), "{path} lists the task");
        assert!(!page.contains("<script>alert"), "{path}: {page}");
        assert!(!page.contains("<img src=x"), "{path}: {page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"),
            "{path}: {page}"
        );
    }
    // Without a token required, a cross-site form post is still refused.
    let r = ui
        .http
        .post(ui.url(&format!("/ui/tasks/{}/cancel", task.id)))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(ui.conductor.get_task(&task.id).unwrap().status.as_str(), "queued");
    let r = ui
        .http
        .post(ui.url(&format!("/ui/tasks/{}/cancel", task.id)))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(ui.conductor.get_task(&task.id).unwrap().status.as_str(), "cancelled");
}
