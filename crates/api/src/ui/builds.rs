//! Environment builds started from the dashboard: `POST /ui/environments/{name}/build`
//! starts one (or shows the one running), `GET` the same path shows its progress, which the
//! page's script re-reads every few seconds (the log is a `data-refresh` part). The lines
//! are the engine's progress events (`STEP i/n: …` and build output), kept in memory, the
//! last [`MAX_LINES`] of each build.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Path, State};
use axum::response::{Html, Redirect};
use axum::Form;
use conductor_core::engine::Progress;
use maud::html;
use serde::Deserialize;

use super::{layout, segment, UiResult, UiState};
use crate::error::ApiError;

/// Lines of output a build keeps.
const MAX_LINES: usize = 2000;

/// One build: its output so far and, once over, how it ended.
#[derive(Default)]
pub struct Build {
    lines: VecDeque<String>,
    result: Option<Result<String, String>>,
}

/// The dashboard's builds, by environment.
#[derive(Default)]
pub struct Builds {
    inner: Mutex<HashMap<String, Arc<Mutex<Build>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Deserialize)]
pub struct BuildForm {
    /// Rebuild even when the image exists.
    #[serde(default)]
    force: Option<String>,
}

/// Starts a build of `name` unless one runs; shows its progress page.
pub(crate) async fn start(
    State(s): State<UiState>,
    Path(name): Path<String>,
    Form(f): Form<BuildForm>,
) -> UiResult<Redirect> {
    let c = s.app.conductor.clone();
    c.catalog
        .require(&name)
        .map_err(|m| ApiError::invalid("environment", m))?;
    let page = Redirect::to(&format!("/ui/environments/{}/build", segment(&name)));
    let build = {
        let mut all = lock(&s.builds.inner);
        if let Some(b) = all.get(&name) {
            if lock(b).result.is_none() {
                return Ok(page);
            }
        }
        let b = Arc::new(Mutex::new(Build::default()));
        all.insert(name.clone(), b.clone());
        b
    };
    let sink_build = build.clone();
    let sink: conductor_core::engine::ProgressSink = Arc::new(move |p: Progress| {
        let line = match p {
            Progress::Step { index, total, text } => format!("STEP {index}/{total}: {text}"),
            Progress::Line(l) => l,
        };
        let mut b = lock(&sink_build);
        b.lines.push_back(line);
        if b.lines.len() > MAX_LINES {
            b.lines.pop_front();
        }
    });
    let force = f.force.is_some();
    tokio::spawn(async move {
        let result = c
            .ensure_environment(&name, sink, force)
            .await
            .map(|img| {
                if img.made_now {
                    format!("built {}", img.reference)
                } else {
                    format!("{} was already built", img.reference)
                }
            })
            .map_err(|e| e.to_string());
        lock(&build).result = Some(result);
    });
    Ok(page)
}

/// The progress of the last build of `name` started here.
pub(crate) async fn page(State(s): State<UiState>, Path(name): Path<String>) -> UiResult<Html<String>> {
    let build = lock(&s.builds.inner).get(&name).cloned();
    let Some(build) = build else {
        return Err(ApiError::not_found(format!("no build of '{name}' was started from the dashboard")).into());
    };
    let (lines, result) = {
        let b = lock(&build);
        (b.lines.iter().cloned().collect::<Vec<_>>(), b.result.clone())
    };
    let body = html! {
        h1 { "Build of " code { (name) } }
        div #build-live data-refresh {
            @match &result {
                None => p { span.badge.s-running { "running" } " — this page follows its output" },
                Some(Ok(done)) => p { span.badge.s-succeeded { "succeeded" } " " code #build-result { (done) } },
                Some(Err(e)) => p { span.badge.s-failed { "failed" } " " span.error #build-result { (e) } },
            }
            pre.log #build-log { @for l in &lines { (l) "\n" } }
        }
        p { a href="/ui/environments" { "All environments" } }
    };
    Ok(layout("Build", "Environments", s.key.is_some(), body))
}
