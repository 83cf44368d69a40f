//! `conductor mcp` driven by the MCP SDK's own client over the child's stdio (and the same
//! tools over streamable HTTP from `conductor serve`), against real Podman: the tool list and schemas, a workspace created, commands run (output, exit
//! codes, truncation, timeout), files written, read back and listed, a snapshot restored,
//! the workspace destroyed, and bad input answered with tool errors the model can read.

mod common;

use std::path::PathBuf;

use conductor_core::Config;
use conductor_service::workspaces::ListFilter;
use conductor_service::Conductor;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

/// A `conductor mcp` child with its own data directory. Dropping it removes whatever the
/// test left behind (also after a failed assertion).
struct McpServer {
    dir: tempfile::TempDir,
    client: Option<RunningService<RoleClient, ()>>,
}

impl McpServer {
    async fn start() -> McpServer {
        let (dir, config) = common::config_dir("conductor-mcp-", "");
        let transport = TokioChildProcess::new(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_conductor")).configure(|cmd| {
                cmd.arg("mcp").arg("--config").arg(&config);
            }),
        )
        .expect("spawn conductor mcp");
        let client = ().serve(transport).await.expect("MCP initialize");
        McpServer {
            dir,
            client: Some(client),
        }
    }

    fn client(&self) -> &RunningService<RoleClient, ()> {
        self.client.as_ref().expect("client")
    }

    async fn call(&self, tool: &str, args: Value) -> CallToolResult {
        let Value::Object(args) = args else {
            panic!("arguments must be an object")
        };
        self.client()
            .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args))
            .await
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    }

    /// The text of a successful call.
    async fn ok(&self, tool: &str, args: Value) -> String {
        let r = self.call(tool, args).await;
        let t = text(&r);
        assert_ne!(r.is_error, Some(true), "{tool} failed: {t}");
        t
    }

    /// The text of a call that must fail with a tool error.
    async fn err(&self, tool: &str, args: Value) -> String {
        let r = self.call(tool, args).await;
        let t = text(&r);
        assert_eq!(r.is_error, Some(true), "{tool} should have failed: {t}");
        t
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }
}

fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let client = self.client.take();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                // Closing stdin ends the server; then clean up what a failed test left.
                if let Some(c) = client {
                    let _ = c.cancel().await;
                }
            })
        });
        remove_everything(&self.config_path());
    }
}

/// Removes every workspace of the conductor configured by `config` (what a test, failed
/// or not, left behind) and reconciles.
fn remove_everything(config: &std::path::Path) {
    let config = std::fs::read_to_string(config).unwrap_or_default();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async move {
            let Ok(parsed) = Config::parse(&config) else { return };
            let Ok(c) = Conductor::open(parsed.config).await else {
                return;
            };
            for w in c.list_workspaces(&ListFilter::default()).unwrap_or_default() {
                let _ = c.remove_workspace(&w.id, Some(false)).await;
            }
            let _ = c.reconcile().await;
        })
    });
}

/// Calls [`remove_everything`] when dropped.
struct CleanUp(PathBuf);

impl Drop for CleanUp {
    fn drop(&mut self) {
        remove_everything(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mcp_client_drives_a_workspace_through_the_tools() {
    let server = McpServer::start().await;
    let info = server.client().peer_info().expect("server info");
    assert_eq!(info.server_info.as_ref().expect("server_info").name, "conductor");
    assert!(info.instructions.as_deref().unwrap_or("").contains("create_workspace"));

    // Every tool is listed with a description and a schema naming its required inputs.
    let tools = server.client().list_all_tools().await.expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "create_workspace",
            "destroy_workspace",
            "list_environments",
            "list_files",
            "list_snapshots",
            "list_workspaces",
            "pause_workspace",
            "read_file",
            "restore",
            "resume_workspace",
            "run_command",
            "snapshot",
            "suspend_workspace",
            "workspace_egress",
            "workspace_fork",
            "write_file",
        ]
    );
    for t in &tools {
        assert!(
            t.description.as_deref().unwrap_or("").len() > 40,
            "{} is undocumented",
            t.name
        );
    }
    let run = tools.iter().find(|t| t.name == "run_command").unwrap();
    assert_eq!(run.input_schema["required"], json!(["workspace_id", "command"]));
    assert!(run.input_schema["properties"]["timeout_secs"]["description"].is_string());

    let envs = server.ok("list_environments", json!({})).await;
    assert!(envs.lines().any(|l| l.starts_with("minimal - ")), "{envs}");

    // Bad input is a tool error that says what is wrong, before anything is created.
    let e = server
        .err("create_workspace", json!({"environment": "no-such-env"}))
        .await;
    assert!(e.contains("no-such-env"), "{e}");
    let e = server
        .err(
            "create_workspace",
            json!({"environment": "minimal", "agent_id": "Bad Agent"}),
        )
        .await;
    assert!(e.starts_with("invalid agent_id"), "{e}");
    let e = server
        .err("run_command", json!({"workspace_id": "ws-nope", "command": "true"}))
        .await;
    assert!(
        e.contains("'ws-nope' not found") && e.contains("list_workspaces"),
        "{e}"
    );
    // So are arguments that do not match the schema (a misspelt field here).
    let e = server
        .err("run_command", json!({"workspace_id": "ws-nope", "cmd": "true"}))
        .await;
    assert!(e.contains("unknown field `cmd`"), "{e}");

    let created = server
        .ok(
            "create_workspace",
            json!({"environment": "minimal", "agent_id": "mcp-test"}),
        )
        .await;
    let id = created
        .lines()
        .find_map(|l| l.strip_prefix("workspace_id: "))
        .unwrap_or_else(|| panic!("no workspace_id in {created}"))
        .to_string();
    let listed = server.ok("list_workspaces", json!({})).await;
    assert!(listed.contains(&id) && listed.contains("agent=mcp-test"), "{listed}");

    // Commands: exit code, both streams, working directory.
    let out = server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "pwd; echo to-stderr >&2; exit 3"}),
        )
        .await;
    assert!(out.starts_with("exit_code: 3\n"), "{out}");
    assert!(out.contains("stdout:\n/workspace\n"), "{out}");
    assert!(out.contains("stderr:\nto-stderr\n"), "{out}");
    let out = server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "pwd", "cwd": "/tmp"}),
        )
        .await;
    assert!(
        out.contains("stdout:\n/tmp\n") && out.contains("stderr: (empty)"),
        "{out}"
    );

    // Long output keeps its end, with a note.
    let out = server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "seq 1 100000; echo last-line"}),
        )
        .await;
    assert!(out.contains("[stdout truncated: the first "), "{out:.300}");
    assert!(
        out.ends_with("100000\nlast-line\nstderr: (empty)\n"),
        "{}",
        &out[out.len() - 200..]
    );
    assert!(out.len() < 70 * 1024, "{} bytes returned", out.len());

    // The timeout kills the command.
    let e = server
        .err(
            "run_command",
            json!({"workspace_id": id, "command": "true", "timeout_secs": 0}),
        )
        .await;
    assert!(e.starts_with("invalid timeout_secs"), "{e}");
    let out = server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "sleep 60", "timeout_secs": 1}),
        )
        .await;
    assert!(out.starts_with("exit_code: 124 (timed out after 1 s"), "{out}");

    // A server started in the background does not hold the call open.
    let out = server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "nohup sleep 300 > /tmp/bg.log 2>&1 &", "timeout_secs": 20}),
        )
        .await;
    assert!(out.starts_with("exit_code: 0\n"), "{out}");
    let out = server
        .ok("run_command", json!({"workspace_id": id, "command": "pgrep -x sleep"}))
        .await;
    assert!(
        out.starts_with("exit_code: 0\n"),
        "the background process is gone: {out}"
    );

    // Files: written with awkward names and content, read back exactly, listed.
    let content = "héllo 'quoted' \"double\" $HOME `tick`\n\tindented\nno newline at end";
    let path = "/workspace/notes/it's a file.txt";
    let w = server
        .ok(
            "write_file",
            json!({"workspace_id": id, "path": path, "content": content}),
        )
        .await;
    assert_eq!(w, format!("Wrote {} bytes to {path}.", content.len()));
    assert_eq!(
        server.ok("read_file", json!({"workspace_id": id, "path": path})).await,
        content
    );
    let listing = server
        .ok(
            "list_files",
            json!({"workspace_id": id, "path": "/workspace", "depth": 2}),
        )
        .await;
    assert!(listing.contains("dir              notes/\n"), "{listing}");
    assert!(
        listing.contains(&format!("file {:>10}  notes/it's a file.txt\n", content.len())),
        "{listing}"
    );
    // Paths relative to /workspace name the same files (the file API's rule).
    server
        .ok(
            "write_file",
            json!({"workspace_id": id, "path": "empty", "content": ""}),
        )
        .await;
    let empty = server
        .ok("read_file", json!({"workspace_id": id, "path": "/workspace/empty"}))
        .await;
    assert_eq!(empty, "(/workspace/empty is empty)");
    assert_eq!(
        server
            .ok(
                "read_file",
                json!({"workspace_id": id, "path": "notes/it's a file.txt"})
            )
            .await,
        content
    );

    // Paths outside /workspace (/tmp included: the file API's rule for every client), with
    // '..' or through a symlink leading out, missing files and directories are tool errors.
    server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "ln -s /etc /workspace/etc-link"}),
        )
        .await;
    for (tool, path, expect) in [
        ("write_file", "/etc/passwd", "outside /workspace"),
        ("write_file", "/tmp/x", "outside /workspace"),
        ("read_file", "/tmp/bg.log", "outside /workspace"),
        ("list_files", "/tmp", "outside /workspace"),
        ("read_file", "etc-link/passwd", "leads outside"),
        ("read_file", "/workspace/../etc/passwd", "'..'"),
        ("read_file", "notes/x", "no such file"),
        ("read_file", "/workspace/missing.txt", "no such file"),
        ("read_file", "/workspace/notes", "is a directory"),
        ("list_files", "/workspace/notes/it's a file.txt", "not a directory"),
    ] {
        let mut args = json!({"workspace_id": id, "path": path});
        if tool == "write_file" {
            args["content"] = json!("x");
        }
        let e = server.err(tool, args).await;
        assert!(e.contains(expect), "{tool} {path}: {e}");
    }
    let e = server
        .err("read_file", json!({"workspace_id": id, "path": "/workspace/bin"}))
        .await;
    assert!(e.contains("no such file"), "{e}");
    server
        .ok(
            "run_command",
            json!({"workspace_id": id, "command": "printf '\\377\\376' > /workspace/bin"}),
        )
        .await;
    let e = server
        .err("read_file", json!({"workspace_id": id, "path": "/workspace/bin"}))
        .await;
    assert!(e.contains("not UTF-8 text (2 bytes)"), "{e}");

    // Snapshot, change, restore: the change is gone.
    let s = server
        .ok("snapshot", json!({"workspace_id": id, "name": "before-change"}))
        .await;
    assert!(s.starts_with("Took snapshot 'before-change'"), "{s}");
    let e = server
        .err("snapshot", json!({"workspace_id": id, "name": "before-change"}))
        .await;
    assert!(e.contains("overwrite"), "{e}");
    let e = server
        .err("snapshot", json!({"workspace_id": id, "name": "Bad Name"}))
        .await;
    assert!(e.starts_with("invalid name"), "{e}");
    server
        .ok(
            "write_file",
            json!({"workspace_id": id, "path": path, "content": "changed"}),
        )
        .await;
    let listed = server.ok("list_snapshots", json!({"workspace_id": id})).await;
    assert!(listed.starts_with("before-change  taken "), "{listed}");
    let r = server
        .ok("restore", json!({"workspace_id": id, "name": "before-change"}))
        .await;
    assert!(r.contains("is running"), "{r}");
    assert_eq!(
        server.ok("read_file", json!({"workspace_id": id, "path": path})).await,
        content
    );

    // Pause and suspend: the next command resumes the workspace, the files are kept.
    let p = server.ok("pause_workspace", json!({"workspace_id": id})).await;
    assert_eq!(p, format!("Workspace {id} is paused."));
    assert_eq!(
        server.ok("read_file", json!({"workspace_id": id, "path": path})).await,
        content
    );
    let s = server.ok("suspend_workspace", json!({"workspace_id": id})).await;
    assert_eq!(s, format!("Workspace {id} is suspended; its files are kept."));
    let r = server.ok("resume_workspace", json!({"workspace_id": id})).await;
    assert_eq!(r, format!("Workspace {id} is running."));

    // Fork from the snapshot: a copy of its own, with the snapshot's content.
    let f = server
        .ok(
            "workspace_fork",
            json!({"workspace_id": id, "snapshot": "before-change", "count": 1}),
        )
        .await;
    assert!(
        f.starts_with(&format!("Forked workspace {id} from snapshot 'before-change'")),
        "{f}"
    );
    let copy = f
        .lines()
        .find_map(|l| l.strip_prefix("workspace_id: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the copy's id")
        .to_string();
    assert_ne!(copy, id);
    assert_eq!(
        server
            .ok("read_file", json!({"workspace_id": copy, "path": path}))
            .await,
        content
    );
    let e = server
        .err("workspace_fork", json!({"workspace_id": id, "count": 0}))
        .await;
    assert!(e.starts_with("invalid count"), "{e}");
    server
        .ok("destroy_workspace", json!({"workspace_id": copy, "keep_data": false}))
        .await;

    // Destroy: gone, and later calls say so.
    let d = server
        .ok("destroy_workspace", json!({"workspace_id": id, "keep_data": false}))
        .await;
    assert_eq!(d, format!("Removed workspace {id}; its /workspace data was deleted."));
    let e = server
        .err("run_command", json!({"workspace_id": id, "command": "true"}))
        .await;
    assert!(e.contains("removed"), "{e}");
    assert!(server
        .ok("list_workspaces", json!({}))
        .await
        .starts_with("No live workspaces"));
}

/// `conductor serve` also serves the tools over streamable HTTP at `/mcp`: the SDK's HTTP
/// client drives a workspace through it with the API's token; without the token, or from a
/// web page (an `Origin` header), it is refused; a session left open does not hold up the
/// server's shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn the_http_api_serves_the_tools_at_mcp() {
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use rmcp::transport::StreamableHttpClientTransport;

    let (dir, config) = common::config_dir("conductor-mcp-http-", "security:\n  api_key_required: true\n");
    let served = common::serve(&config);
    // Removes the test's workspace at the end, also after a failed assertion (dropped
    // before `dir`, whose database it opens).
    let _clean_up = CleanUp(config.clone());
    let url = format!("{}/mcp", served.base);
    let token = std::fs::read_to_string(dir.path().join("config/api-key"))
        .unwrap()
        .trim()
        .to_string();

    // Refusals, before any MCP handling: no token; a request a web page sent.
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "0"}}
    });
    let http = reqwest::Client::new();
    let post = |auth: Option<&str>, origin: Option<&str>| {
        let mut r = http
            .post(&url)
            .header("accept", "application/json, text/event-stream")
            .json(&initialize);
        if let Some(t) = auth {
            r = r.bearer_auth(t);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    assert_eq!(post(None, None).await.unwrap().status().as_u16(), 401);
    assert_eq!(post(Some("wrong"), None).await.unwrap().status().as_u16(), 401);
    assert_eq!(
        post(Some(&token), Some("http://page.invalid"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );

    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.clone()).auth_header(token.clone()),
    );
    let client = ().serve(transport).await.expect("MCP initialize over HTTP");
    let call = |tool: &'static str, args: Value| {
        let Value::Object(args) = args else {
            panic!("arguments must be an object")
        };
        client.call_tool(CallToolRequestParams::new(tool).with_arguments(args))
    };
    let tools = client.list_all_tools().await.expect("tools/list");
    assert_eq!(
        tools.len(),
        16,
        "{:?}",
        tools.iter().map(|t| &t.name).collect::<Vec<_>>()
    );

    let created = text(
        &call(
            "create_workspace",
            json!({"environment": "minimal", "agent_id": "mcp-http"}),
        )
        .await
        .unwrap(),
    );
    let id = created
        .lines()
        .find_map(|l| l.strip_prefix("workspace_id: "))
        .unwrap_or_else(|| panic!("no workspace_id in {created}"))
        .to_string();
    let wrote = call(
        "write_file",
        json!({"workspace_id": id, "path": "/workspace/hello.txt", "content": "over http\n"}),
    )
    .await
    .unwrap();
    assert_ne!(wrote.is_error, Some(true), "{}", text(&wrote));
    let out = text(
        &call(
            "run_command",
            json!({"workspace_id": id, "command": "cat hello.txt; id -u"}),
        )
        .await
        .unwrap(),
    );
    assert!(out.starts_with("exit_code: 0\n"), "{out}");
    assert!(out.contains("stdout:\nover http\n1000\n"), "{out}");
    // The workspace is the service's: the REST API sees it.
    let listed: Value = http
        .get(format!("{}/workspaces", served.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed.to_string().contains(&id), "{listed}");

    // Stopping the server with the session still open ends the session, so the server
    // does not sit out its 10 s drain of open requests.
    let stopped_at = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stopped_at.elapsed() < std::time::Duration::from_secs(8),
        "took {:?}",
        stopped_at.elapsed()
    );
    drop(client);
}
