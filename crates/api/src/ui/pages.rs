//! The dashboard's pages (GET only). Every value from a task or a workspace goes through
//! maud's escaping; nothing here uses `PreEscaped`.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::Html;
use conductor_core::lifecycle::{TaskState, WorkspaceState};
use conductor_service::files::{FileEntry, FileKind};
use conductor_service::tasks::{TaskListFilter, TaskView};
use conductor_service::workspaces::{ListFilter, Usage, WorkspaceInfo};
use maud::{html, Markup};
use serde::Deserialize;

use super::{bytes, layout, millis, query_value, segment, UiResult, UiState};
use crate::error::ApiError;

fn status_badge(status: &str) -> Markup {
    html! { span class={"badge s-" (status)} { (status) } }
}

fn task_row(t: &TaskView) -> Markup {
    let first = t
        .commands
        .iter()
        .find(|c| c.phase == "main")
        .map(|c| c.command.as_str())
        .unwrap_or("");
    html! {
        tr {
            td { a href={"/ui/tasks/" (segment(&t.id))} { code { (t.id) } } }
            td { (status_badge(t.status.as_str())) }
            td { (t.environment) }
            td { (t.agent_id.as_deref().unwrap_or("")) }
            td.cmd { (t.description.as_deref().unwrap_or(first)) }
            td { (t.created_at) }
            td { (t.duration_ms.map(millis).unwrap_or_default()) }
        }
    }
}

fn task_table(tasks: &[TaskView]) -> Markup {
    html! {
        table.tasks {
            thead { tr { th { "Task" } th { "Status" } th { "Environment" } th { "Agent" } th { "What" } th { "Created" } th { "Duration" } } }
            tbody {
                @for t in tasks { (task_row(t)) }
                @if tasks.is_empty() { tr { td colspan="7" { "No tasks." } } }
            }
        }
    }
}

/// `/ui`: workspaces by state and environment, tasks by status, recent tasks.
pub async fn overview(State(s): State<UiState>) -> UiResult<Html<String>> {
    let c = &s.app.conductor;
    let metrics = c.task_metrics()?;
    let workspaces = c.list_workspaces(&ListFilter::default())?;
    let mut by_env: BTreeMap<&str, usize> = BTreeMap::new();
    let mut pool_ready: BTreeMap<&str, usize> = BTreeMap::new();
    let mut committed = 0u64;
    for w in &workspaces {
        *by_env.entry(w.environment.as_str()).or_default() += 1;
        committed += w.limits.memory.bytes();
        if w.agent_id == conductor_service::warm_pool::POOL_AGENT && w.state == WorkspaceState::Running {
            *pool_ready.entry(w.environment.as_str()).or_default() += 1;
        }
    }
    let host = conductor_service::host::capacity(&c.paths.base);
    let (recent, _) = c.list_tasks(&TaskListFilter {
        limit: 10,
        ..TaskListFilter::default()
    })?;
    let cfg = &c.config;
    let body = html! {
        h1 { "Overview" }
        div #overview-live data-refresh {
            section.cards {
                div.card {
                    h2 { "Tasks" }
                    table.counts {
                        @for (state, n) in &metrics.tasks_by_state {
                            tr { th { a href={"/ui/tasks?status=" (state.as_str())} { (status_badge(state.as_str())) } } td.n { (n) } }
                        }
                        tr { th { "queue depth" } td.n #queue-depth { (metrics.queue_depth) } }
                    }
                }
                div.card {
                    h2 { "Workspaces by state" }
                    table.counts {
                        @for (state, n) in &metrics.workspaces_by_state {
                            @if *n > 0 || WorkspaceState::LIVE.contains(state) {
                                tr { th { (status_badge(state.as_str())) } td.n { (n) } }
                            }
                        }
                    }
                }
                div.card {
                    h2 { "Workspaces by environment" }
                    table.counts {
                        @for (env, n) in &by_env { tr { th { (env) } td.n { (n) } } }
                        @if by_env.is_empty() { tr { td { "No live workspaces." } } }
                    }
                }
                div.card {
                    h2 { "Capacity" }
                    table.counts {
                        tr { th { "task workers" } td.n { (cfg.task_execution.max_workers) } }
                        tr { th { "max containers (cleanup.max_containers)" } td.n { (cfg.isolated_workspace.cleanup.max_containers) } }
                        tr { th { "host CPUs" } td.n { (host.cpus) } }
                        tr { th { "host memory available / total" } td.n { (gib(host.memory_available)) " / " (gib(host.memory_total)) } }
                        tr { th { "memory limits of live workspaces" } td.n { (gib(committed)) } }
                        tr { th { "data disk free / total" } td.n { (gib(host.disk_free)) " / " (gib(host.disk_total)) } }
                    }
                }
                div.card {
                    h2 { "Warm pools" }
                    table.counts {
                        @for (env, want) in &cfg.isolated_workspace.warm_pool {
                            tr { th { (env) } td.n { (pool_ready.get(env.as_str()).copied().unwrap_or(0)) " / " (want) " ready" } }
                        }
                        @if cfg.isolated_workspace.warm_pool.is_empty() { tr { td { "None configured (isolated_workspace.warm_pool)." } } }
                    }
                }
            }
            h2 { "Recent tasks" }
            (task_table(&recent))
        }
    };
    Ok(layout("Overview", "Overview", s.key.is_some(), body))
}

#[derive(Deserialize)]
pub struct TasksQuery {
    status: Option<String>,
}

/// `/ui/tasks?status=…`: the newest 200 tasks, optionally of one status.
pub async fn tasks(State(s): State<UiState>, Query(q): Query<TasksQuery>) -> UiResult<Html<String>> {
    let status = match q.status.as_deref().filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(
            TaskState::ALL
                .into_iter()
                .find(|st| st.as_str() == v)
                .ok_or_else(|| ApiError::invalid("status", "not a task status"))?,
        ),
    };
    let (list, total) = s.app.conductor.list_tasks(&TaskListFilter {
        status,
        limit: 200,
        ..TaskListFilter::default()
    })?;
    let body = html! {
        h1 { "Tasks" }
        form.filter method="get" action="/ui/tasks" {
            label for="status" { "Status" }
            select #status name="status" {
                option value="" selected[status.is_none()] { "any" }
                @for st in TaskState::ALL {
                    option value=(st.as_str()) selected[status == Some(st)] { (st.as_str()) }
                }
            }
            button type="submit" { "Filter" }
        }
        div #tasks-live data-refresh {
            p.muted { (list.len()) " of " (total) " tasks" }
            (task_table(&list))
        }
    };
    Ok(layout("Tasks", "Tasks", s.key.is_some(), body))
}

/// `/ui/tasks/{id}`: commands, live output, cancel and retry, egress summary.
pub async fn task(State(s): State<UiState>, Path(id): Path<String>) -> UiResult<Html<String>> {
    let c = &s.app.conductor;
    let t = c.get_task(&id)?;
    let log = c.read_task_log(&id, 0)?;
    let last_seq = log.last().map(|(seq, _, _)| *seq).unwrap_or(0);
    let text: String = log.into_iter().map(|(_, _, data)| data).collect();
    let finished = t.status.is_finished();
    let tid = segment(&t.id);
    let body = html! {
        h1 { "Task " code { (t.id) } }
        div #task-head data-refresh {
            p { (status_badge(t.status.as_str()))
                @if let Some(code) = t.exit_code { " exit code " code.exit { (code) } } }
            @if let Some(e) = &t.error { p.error { (e) } }
            table.facts {
                tr { th { "Environment" } td { (t.environment) } }
                @if let Some(d) = &t.description { tr { th { "Description" } td { (d) } } }
                @if let Some(a) = &t.agent_id { tr { th { "Agent" } td { (a) } } }
                tr { th { "Workspace" } td {
                    @if let Some(w) = &t.workspace_id { a href={"/ui/workspaces/" (segment(w))} { code { (w) } } }
                } }
                tr { th { "Priority" } td { (t.priority) } }
                tr { th { "Attempt" } td { (t.attempt) } }
                tr { th { "Created" } td { (t.created_at) } }
                tr { th { "Started" } td { (t.started_at.as_deref().unwrap_or("")) } }
                tr { th { "Finished" } td { (t.finished_at.as_deref().unwrap_or("")) } }
                tr { th { "Duration" } td { (t.duration_ms.map(millis).unwrap_or_default()) } }
                @if !t.services.is_empty() { tr { th { "Services" } td { (t.services.join(", ")) } } }
            }
            div.actions {
                @if !finished {
                    form method="post" action={"/ui/tasks/" (tid) "/cancel"} {
                        button.danger #cancel type="submit" { "Cancel" }
                    }
                } @else {
                    form method="post" action={"/ui/tasks/" (tid) "/retry"} {
                        button #retry type="submit" { "Retry" }
                    }
                }
            }
            h2 { "Commands" }
            table.commands {
                thead { tr { th { "Phase" } th { "#" } th { "Command" } th { "Exit code" } th { "Duration" } } }
                tbody {
                    @for cmd in &t.commands {
                        tr {
                            td { (cmd.phase) } td { (cmd.index) }
                            td.cmd { code { (cmd.command) } }
                            td { (cmd.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "—".into())) }
                            td { (millis(cmd.duration_ms)) }
                        }
                    }
                    @if t.commands.is_empty() { tr { td colspan="5" { "No command has run yet." } } }
                }
            }
            @if let Some(e) = &t.egress {
                h2 { "Egress" }
                p { (e.allowed) " allowed, " (e.denied) " denied; " (bytes(e.bytes_up)) " up, " (bytes(e.bytes_down)) " down" }
                table {
                    thead { tr { th { "Host" } th { "Port" } th { "Allowed" } th { "Denied" } } }
                    tbody { @for h in &e.hosts { tr { td { (h.host) } td { (h.port) } td { (h.allowed) } td { (h.denied) } } } }
                }
            }
        }
        h2 { "Output" }
        pre #log .log data-task=(t.id) data-after=(last_seq) data-follow=(if finished { "false" } else { "true" }) { (text) }
    };
    Ok(layout("Task", "Tasks", s.key.is_some(), body))
}

/// A `<meter>` with its figures, or a dash when unknown.
fn meter(used: Option<u64>, limit: Option<u64>, show: fn(u64) -> String) -> Markup {
    match (used, limit) {
        (Some(u), Some(l)) if l > 0 => html! {
            meter min="0" max=(l) value=(u.min(l)) high=(l / 10 * 9) {}
            " " span.figure { (show(u)) " / " (show(l)) }
        },
        (Some(u), _) => html! { span.figure { (show(u)) } },
        _ => html! { "—" },
    }
}

fn usage_cells(u: Option<&Usage>) -> Markup {
    let Some(u) = u else {
        return html! { td { "—" } td { "—" } td { "—" } td { "—" } };
    };
    html! {
        td { meter min="0" max="100" value=(u.cpu_percent.clamp(0.0, 100.0)) {} " " span.figure { (format!("{:.1} %", u.cpu_percent)) } }
        td { (meter(Some(u.memory_bytes), Some(u.memory_limit_bytes), bytes)) }
        td { (meter(Some(u.pids), Some(u.pids_limit), |n| n.to_string())) }
        td { (meter(u.disk_used_bytes, u.disk_limit_bytes, bytes)) }
    }
}

#[derive(Deserialize)]
pub struct WorkspacesQuery {
    #[serde(default)]
    all: bool,
}

/// `/ui/workspaces`: live workspaces with their use against their limits.
pub async fn workspaces(State(s): State<UiState>, Query(q): Query<WorkspacesQuery>) -> UiResult<Html<String>> {
    let c = &s.app.conductor;
    let list = c.list_workspaces(&ListFilter {
        all: q.all,
        ..ListFilter::default()
    })?;
    let usages = futures_util::future::join_all(list.iter().map(|w| async {
        if w.state == WorkspaceState::Running {
            c.inspect_workspace(&w.id).await.ok().and_then(|(_, u)| u)
        } else {
            None
        }
    }))
    .await;
    let body = html! {
        h1 { "Workspaces" }
        p { @if q.all { a href="/ui/workspaces" { "Only live workspaces" } } @else { a href="/ui/workspaces?all=true" { "Include removed and failed ones" } } }
        div #workspaces-live data-refresh {
            table.workspaces {
                thead { tr { th { "Workspace" } th { "State" } th { "Environment" } th { "Agent" } th { "Network" } th { "CPU" } th { "Memory" } th { "Pids" } th { "Disk" } } }
                tbody {
                    @for (w, u) in list.iter().zip(&usages) {
                        tr {
                            td { a href={"/ui/workspaces/" (segment(&w.id))} { code { (w.id) } } }
                            td { (status_badge(w.state.as_str())) }
                            td { (w.environment) }
                            td { (w.agent_id) }
                            td { (w.network_policy.mode.as_str()) }
                            (usage_cells(u.as_ref()))
                        }
                    }
                    @if list.is_empty() { tr { td colspan="9" { "No workspaces." } } }
                }
            }
        }
    };
    Ok(layout("Workspaces", "Workspaces", s.key.is_some(), body))
}

#[derive(Deserialize)]
pub struct WorkspaceQuery {
    #[serde(default)]
    path: String,
    notice: Option<String>,
}

/// What a redirect after an action says, by code (never text from the URL).
fn notice(code: &str) -> Option<&'static str> {
    Some(match code {
        "snapshot-created" => "Snapshot created.",
        "snapshot-restored" => "Snapshot restored.",
        "snapshot-deleted" => "Snapshot deleted.",
        "file-uploaded" => "File uploaded.",
        "forked" => "Forked: this is the first copy (every copy is in the workspace list).",
        _ => return None,
    })
}

/// The result of an exec from the workspace page.
pub struct ExecResult {
    pub command: String,
    pub exit_code: i64,
    pub timed_out: bool,
    pub duration_ms: u64,
    pub stdout: String,
    pub stderr: String,
}

/// `/ui/workspaces/{id}?path=…`: limits, policy, usage, snapshots, files, exec.
pub async fn workspace(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Query(q): Query<WorkspaceQuery>,
) -> UiResult<Html<String>> {
    render_workspace(&s, &id, &q.path, q.notice.as_deref().and_then(notice), None).await
}

pub(crate) async fn render_workspace(
    s: &UiState,
    id: &str,
    path: &str,
    notice: Option<&str>,
    exec: Option<ExecResult>,
) -> UiResult<Html<String>> {
    let c = &s.app.conductor;
    let (w, usage) = c.inspect_workspace(id).await?;
    let snapshots = c.list_snapshots(&w.id)?;
    let forked_from = c
        .store
        .fork_source(&w.id)
        .map_err(conductor_service::ServiceError::from)?;
    let forks: Vec<(String, String)> = c
        .store
        .forks_of(&w.id)
        .map_err(conductor_service::ServiceError::from)?
        .into_iter()
        .map(|f| {
            let state = c
                .get_workspace(&f)
                .map(|w| w.state.as_str().to_string())
                .unwrap_or_else(|_| "removed".into());
            (f, state)
        })
        .collect();
    let running = w.state == WorkspaceState::Running;
    // Relative to /workspace, without slashes at either end ("" is /workspace itself).
    let path = path.trim_start_matches('/');
    let path = path
        .strip_prefix("workspace")
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .unwrap_or(path)
        .trim_matches('/');
    let files = if running {
        let target = if path.is_empty() { "/workspace" } else { path };
        Some(c.list_files(&w.id, target).await.map_err(|e| e.to_string()))
    } else {
        None
    };
    let egress = c.egress_events(
        &w.id,
        conductor_store::EgressFilter {
            limit: EGRESS_ROWS,
            ..Default::default()
        },
    )?;
    let wid = segment(&w.id);
    let body = html! {
        h1 { "Workspace " code { (w.id) } }
        @if let Some(n) = notice { p.notice role="status" { (n) } }
        div #workspace-live data-refresh {
            p { (status_badge(w.state.as_str())) }
            @if let Some(e) = &w.error { p.error { (e) } }
            (workspace_facts(&w, usage.as_ref()))
        }
        h2 { "Snapshots" }
        table.snapshots {
            thead { tr { th { "Name" } th { "State" } th { "Size" } th { "Created" } th {} } }
            tbody {
                @for snap in &snapshots {
                    tr {
                        td { code { (snap.name) } }
                        td { (snap.state.as_str()) }
                        td { (bytes(snap.size_bytes)) }
                        td { (snap.created_at) }
                        td.actions {
                            form method="post" action={"/ui/workspaces/" (wid) "/snapshots/" (segment(&snap.name)) "/restore"} {
                                button type="submit" data-snapshot=(snap.name) { "Restore" }
                            }
                            form method="post" action={"/ui/workspaces/" (wid) "/snapshots/" (segment(&snap.name)) "/delete"} {
                                button.danger type="submit" { "Delete" }
                            }
                        }
                    }
                }
                @if snapshots.is_empty() { tr { td colspan="5" { "No snapshots." } } }
            }
        }
        form.inline #snapshot-form method="post" action={"/ui/workspaces/" (wid) "/snapshots"} {
            label for="snapshot-name" { "New snapshot" }
            input #snapshot-name type="text" name="name" required pattern="[A-Za-z0-9][A-Za-z0-9_.-]*" placeholder="name";
            button type="submit" { "Take snapshot" }
        }
        h2 { "Fork" }
        @if let Some(src) = &forked_from {
            p #forked-from { "Forked from " a href={"/ui/workspaces/" (segment(src))} { code { (src) } } }
        }
        table.forks {
            thead { tr { th { "Fork" } th { "State" } } }
            tbody {
                @for (fid, state) in &forks {
                    tr { td { a href={"/ui/workspaces/" (segment(fid))} { code { (fid) } } } td { (status_badge(state)) } }
                }
                @if forks.is_empty() { tr { td colspan="2" { "No forks." } } }
            }
        }
        form.inline #fork-form method="post" action={"/ui/workspaces/" (wid) "/fork"} {
            label for="fork-count" { "Copies" }
            input #fork-count type="number" name="count" min="1" max=(c.config.isolated_workspace.fork.max_count) value="1" required;
            button type="submit" { "Fork" }
        }
        h2 { "Files" }
        @match &files {
            None => p.muted { "The workspace is not running." },
            Some(Err(e)) => p.error { (e) },
            Some(Ok(entries)) => (file_list(&w.id, path, entries)),
        }
        @if running {
            form.inline #upload-form method="post" enctype="multipart/form-data" action={"/ui/workspaces/" (wid) "/upload?path=" (query_value(path))} {
                label for="upload" { "Upload into this directory" }
                input #upload type="file" name="file" required;
                button type="submit" { "Upload" }
            }
        }
        @if !egress.is_empty() || w.network_policy.mode.as_str() == "proxy" {
            h2 { "Egress (last " (EGRESS_ROWS) ")" }
            (egress_table(&egress))
        }
        h2 { "Run a command" }
        form.exec method="post" action={"/ui/workspaces/" (wid) "/exec"} {
            label for="command" { "Command" }
            input #command type="text" name="command" required placeholder="ls -la /workspace";
            button type="submit" disabled[!running] { "Run" }
        }
        form.exec-live #exec-live-form method="post" action={"/ui/workspaces/" (wid) "/exec/stream"} {
            label for="live-command" { "Follow live" }
            input #live-command type="text" name="command" required placeholder="for i in 1 2 3; do echo $i; sleep 1; done";
            button type="submit" disabled[!running] { "Run and follow" }
        }
        pre.log #exec-live hidden {}
        @if let Some(r) = &exec {
            section #exec-result {
                p { "$ " code { (r.command) } " → exit code " code.exit { (r.exit_code) } " in " (millis(r.duration_ms))
                    @if r.timed_out { " (timed out)" } }
                h3 { "stdout" }
                pre.log #exec-stdout { (r.stdout) }
                @if !r.stderr.is_empty() { h3 { "stderr" } pre.log #exec-stderr { (r.stderr) } }
            }
        }
    };
    Ok(layout("Workspace", "Workspaces", s.key.is_some(), body))
}

/// Rows of the egress audit a workspace page shows.
const EGRESS_ROWS: usize = 50;

fn egress_table(events: &[conductor_store::EgressEventRecord]) -> Markup {
    html! {
        table.egress {
            thead { tr { th { "Time" } th { "Task" } th { "Method" } th { "Host" } th { "Port" } th { "Decision" } th { "Rule / reason" } th { "Up" } th { "Down" } } }
            tbody {
                @for e in events.iter().rev() {
                    tr {
                        td { (conductor_core::task::rfc3339(e.at_ms)) }
                        td { @if let Some(t) = &e.task_id { a href={"/ui/tasks/" (segment(t))} { code { (t) } } } }
                        td { (e.method) }
                        td { code { (e.host) } }
                        td { (e.port) }
                        td { span class={"badge d-" (e.decision.as_str())} { (e.decision.as_str()) } }
                        td { (e.rule.as_deref().or(e.reason.as_deref()).unwrap_or("")) @if let Some(err) = &e.error { " " span.error { (err) } } }
                        td { (bytes(e.bytes_up)) }
                        td { (bytes(e.bytes_down)) }
                    }
                }
                @if events.is_empty() { tr { td colspan="9" { "No outbound connection attempts yet." } } }
            }
        }
    }
}

fn workspace_facts(w: &WorkspaceInfo, usage: Option<&Usage>) -> Markup {
    let l = &w.limits;
    let policy = &w.network_policy;
    html! {
        table.facts {
            tr { th { "Agent" } td { (w.agent_id) } }
            tr { th { "Environment" } td { (w.environment) } }
            tr { th { "Image" } td { code { (w.image) } } }
            tr { th { "Container" } td { code { (w.container_name) } } }
            tr { th { "Limits" } td { "memory " (l.memory) ", cpu " (l.cpu) ", pids " (l.pids) ", volume " (l.volume_size) } }
            tr { th { "Network" } td { (policy.mode.as_str())
                @if !policy.allow.is_empty() { "; allow " code { (policy.allow.join(", ")) } }
                @if !policy.deny.is_empty() { "; deny " code { (policy.deny.join(", ")) } } } }
            @if !w.secrets.is_empty() { tr { th { "Secrets" } td { (w.secrets.join(", ")) } } }
            @if let Some(u) = usage {
                tr { th { "CPU" } td { meter min="0" max="100" value=(u.cpu_percent.clamp(0.0, 100.0)) {} " " span.figure { (format!("{:.1} %", u.cpu_percent)) } } }
                tr { th { "Memory" } td { (meter(Some(u.memory_bytes), Some(u.memory_limit_bytes), bytes)) } }
                tr { th { "Pids" } td { (meter(Some(u.pids), Some(u.pids_limit), |n| n.to_string())) } }
                tr { th { "Disk" } td { (meter(u.disk_used_bytes, u.disk_limit_bytes, bytes)) } }
                @if let Some(k) = u.oom_kills { tr { th { "OOM kills" } td { (k) } } }
                @if !u.published_ports.is_empty() { tr { th { "Ports" } td {
                    @for (inner, outer) in &u.published_ports { (inner) " → 127.0.0.1:" (outer) " " }
                } } }
            }
        }
    }
}

fn join_path(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn file_list(id: &str, path: &str, entries: &[FileEntry]) -> Markup {
    let wid = segment(id);
    let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    html! {
        p { code { "/workspace/" (path) } }
        table.files {
            thead { tr { th { "Name" } th { "Kind" } th { "Size" } th { "Mode" } } }
            tbody {
                @if !path.is_empty() {
                    tr { td { a href={"/ui/workspaces/" (wid) "?path=" (query_value(parent))} { ".." } } td { "dir" } td {} td {} }
                }
                @for e in entries {
                    @let full = join_path(path, &e.name);
                    tr {
                        td.name {
                            @match e.kind {
                                FileKind::Dir => a href={"/ui/workspaces/" (wid) "?path=" (query_value(&full))} { (e.name) "/" },
                                FileKind::File => a.download href={"/ui/workspaces/" (wid) "/download?path=" (query_value(&full))} download { (e.name) },
                                _ => span { (e.name) @if let Some(t) = &e.link_target { " → " (t) } },
                            }
                        }
                        td { (match e.kind { FileKind::File => "file", FileKind::Dir => "dir", FileKind::Symlink => "symlink", FileKind::Other => "other" }) }
                        td { (bytes(e.size)) }
                        td { code { (format!("{:o}", e.mode & 0o7777)) } }
                    }
                }
                @if entries.is_empty() { tr { td colspan="4" { "Empty directory." } } }
            }
        }
    }
}

/// `/ui/environments`: presets and custom environments.
pub async fn environments(State(s): State<UiState>) -> UiResult<Html<String>> {
    let envs = s.app.conductor.environments().await?;
    let body = html! {
        h1 { "Environments" }
        table.environments {
            thead { tr { th { "Name" } th { "Kind" } th { "Built" } th { "Size" } th { "Definition hash" } th { "Description" } th { "Build" } } }
            tbody {
                @for e in &envs {
                    tr {
                        td { code { (e.name) } }
                        td { (e.kind) @if e.builtin && e.kind != "preset" { " (built in)" } }
                        td { @if e.built { span.badge.s-succeeded { "built" } } @else { span.badge.s-queued { "not built" } } }
                        td { (e.size_bytes.map(bytes).unwrap_or_default()) }
                        td { code title=(e.image) { (e.image.rsplit_once(':').map(|(_, t)| t).unwrap_or(e.image.as_str())) } }
                        td { (e.description) }
                        td {
                            form.inline method="post" action={"/ui/environments/" (segment(&e.name)) "/build"} {
                                @if e.built { input type="hidden" name="force" value="1"; }
                                button type="submit" data-build=(e.name) { @if e.built { "Rebuild" } @else { "Build" } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout("Environments", "Environments", s.key.is_some(), body))
}

/// Bytes as GiB with one decimal.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}
