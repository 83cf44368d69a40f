//! envd's process service over conductor's long-lived processes
//! ([`Conductor::spawn_process`](conductor_service::Conductor::spawn_process)): `Start`
//! (server-streaming: the start event with the pid, output as it comes, the end),
//! `Connect` (the same stream for a running process), `List`, `SendInput`, `CloseStdin`
//! and `SendSignal`. A process outlives the stream that started it (a background command
//! whose client disconnects keeps running, as in E2B); a `Connect-Timeout-Ms` on `Start`
//! limits the process itself. PTYs (`Update`, `pty` input) and `StreamInput` are refused
//! with `unimplemented`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use conductor_core::engine::OutputChunk;
use conductor_service::exec::{Command, ExecRequest};
use conductor_service::process::{ProcessExit, ProcessSignal, Spawned};
use futures_util::Stream;
use tokio::sync::mpsc;

use super::{unary, unknown_method, Sandbox};
use crate::connect::{self, Code, RpcError};
use crate::pb::process as pb;
use pb::process_event::{data_event, DataEvent, EndEvent, Event, KeepAlive, StartEvent};

/// How often a stream without news carries a keep-alive event.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Events buffered per stream (a slow reader slows the process down).
const STREAM_BUFFER: usize = 64;
/// The working directory of a command that names none.
pub(crate) const DEFAULT_CWD: &str = "/workspace";

type Subscriber = mpsc::Sender<Result<pb::ProcessEvent, RpcError>>;

/// A process started through envd.
struct Proc {
    pid: u32,
    tag: Option<String>,
    config: pb::ProcessConfig,
    marker: String,
    stdin: Mutex<Option<mpsc::Sender<Bytes>>>,
    subscribers: Mutex<Vec<Subscriber>>,
}

/// The processes of every sandbox, by pid.
#[derive(Default)]
pub(crate) struct Processes {
    inner: Mutex<HashMap<String, HashMap<u32, Arc<Proc>>>>,
}

impl Processes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, Arc<Proc>>>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, sandbox: &str, p: Arc<Proc>) {
        self.lock().entry(sandbox.to_string()).or_default().insert(p.pid, p);
    }

    fn remove(&self, sandbox: &str, pid: u32) {
        let mut all = self.lock();
        if let Some(procs) = all.get_mut(sandbox) {
            procs.remove(&pid);
            if procs.is_empty() {
                all.remove(sandbox);
            }
        }
    }

    fn list(&self, sandbox: &str) -> Vec<Arc<Proc>> {
        let mut v: Vec<_> = self
            .lock()
            .get(sandbox)
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|p| p.pid);
        v
    }

    fn find(&self, sandbox: &str, selector: Option<&pb::ProcessSelector>) -> Result<Arc<Proc>, RpcError> {
        use pb::process_selector::Selector;
        let Some(selector) = selector.and_then(|s| s.selector.as_ref()) else {
            return Err(RpcError::invalid("process: a pid or a tag is required"));
        };
        let procs = self.list(sandbox);
        let found = match selector {
            Selector::Pid(pid) => procs.into_iter().find(|p| p.pid == *pid),
            Selector::Tag(tag) => procs.into_iter().find(|p| p.tag.as_deref() == Some(tag.as_str())),
        };
        found.ok_or_else(|| {
            RpcError::not_found(match selector {
                Selector::Pid(pid) => format!("process with pid {pid} was not found"),
                Selector::Tag(tag) => format!("process with tag '{tag}' was not found"),
            })
        })
    }

    /// Drops what is known of a removed sandbox's processes.
    pub(crate) fn forget_sandbox(&self, sandbox: &str) {
        self.lock().remove(sandbox);
    }
}

fn event(e: Event) -> pb::ProcessEvent {
    pb::ProcessEvent { event: Some(e) }
}

/// The end event of a process as envd reports it (a signal: exit code -1, not exited).
fn end_event(exit: ProcessExit) -> EndEvent {
    match exit.signal {
        Some(sig) => EndEvent {
            exit_code: -1,
            exited: false,
            status: match sig {
                9 => "signal: killed".into(),
                15 => "signal: terminated".into(),
                n => format!("signal: {n}"),
            },
            error: None,
        },
        None => EndEvent {
            exit_code: exit.code,
            exited: true,
            status: format!("exit status {}", exit.code),
            error: None,
        },
    }
}

/// The command a `ProcessConfig` describes: the SDKs' `/bin/bash -l -c <line>` becomes a
/// command line for the workspace's shell (bash when the image has it, else sh).
fn command_of(cfg: &pb::ProcessConfig) -> Result<Command, RpcError> {
    if cfg.cmd.is_empty() {
        return Err(RpcError::invalid("process.cmd: required"));
    }
    let shell = matches!(cfg.cmd.as_str(), "/bin/bash" | "bash" | "/bin/sh" | "sh");
    match cfg.args.as_slice() {
        [l, c, line] if shell && l == "-l" && c == "-c" => Ok(Command::Shell(line.clone())),
        [c, line] if shell && c == "-c" => Ok(Command::Shell(line.clone())),
        args => {
            let mut argv = vec![cfg.cmd.clone()];
            argv.extend(args.iter().cloned());
            Ok(Command::Argv(argv))
        }
    }
}

pub(crate) async fn call(
    Extension(sandbox): Extension<Sandbox>,
    method: Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let s = &sandbox;
    match method.0.as_str() {
        "Start" => match connect::stream_request::<pb::StartRequest>(&headers, &body) {
            Ok((codec, req)) => match start(s, &headers, req).await {
                Ok(stream) => {
                    connect::stream_response(codec, stream_of(stream, |e| pb::StartResponse { event: Some(e) }))
                }
                Err(e) => connect::stream_error(codec, e),
            },
            Err((codec, e)) => connect::stream_error(codec, e),
        },
        "Connect" => match connect::stream_request::<pb::ConnectRequest>(&headers, &body) {
            Ok((codec, req)) => match attach(s, req) {
                Ok(stream) => {
                    connect::stream_response(codec, stream_of(stream, |e| pb::ConnectResponse { event: Some(e) }))
                }
                Err(e) => connect::stream_error(codec, e),
            },
            Err((codec, e)) => connect::stream_error(codec, e),
        },
        "List" => unary(&headers, &body, |_: pb::ListRequest| async move { Ok(list(s)) }).await,
        "SendInput" => unary(&headers, &body, |r: pb::SendInputRequest| send_input(s, r)).await,
        "CloseStdin" => {
            unary(
                &headers,
                &body,
                |r: pb::CloseStdinRequest| async move { close_stdin(s, r) },
            )
            .await
        }
        "SendSignal" => unary(&headers, &body, |r: pb::SendSignalRequest| send_signal(s, r)).await,
        "Update" => connect::error_response(&RpcError::unimplemented(
            "PTYs are not supported by conductor: run commands without a terminal",
        )),
        "StreamInput" => connect::error_response(&RpcError::unimplemented(
            "StreamInput is not supported by conductor: send stdin with SendInput",
        )),
        _ => unknown_method("process.Process", &method),
    }
}

/// Starts a process; the stream of its events (the first one its start).
async fn start(
    s: &Sandbox,
    headers: &HeaderMap,
    req: pb::StartRequest,
) -> Result<mpsc::Receiver<Result<pb::ProcessEvent, RpcError>>, RpcError> {
    if req.pty.is_some() {
        return Err(RpcError::unimplemented(
            "PTYs are not supported by conductor: run commands without a terminal",
        ));
    }
    let cfg = req.process.ok_or_else(|| RpcError::invalid("process: required"))?;
    let mut exec = ExecRequest::new(command_of(&cfg)?);
    exec.cwd = Some(
        cfg.cwd
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| DEFAULT_CWD.into()),
    );
    exec.env = cfg.envs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    exec.timeout = connect::timeout(headers);
    let with_stdin = req.stdin.unwrap_or(true);
    let spawned = s.e2b.conductor.spawn_process(&s.id, exec, with_stdin).await?;
    let Spawned {
        pid,
        marker,
        stdin,
        output,
        done,
    } = spawned;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let _ = tx.send(Ok(event(Event::Start(StartEvent { pid })))).await;
    let proc = Arc::new(Proc {
        pid,
        tag: req.tag,
        config: cfg,
        marker,
        stdin: Mutex::new(stdin),
        subscribers: Mutex::new(vec![tx]),
    });
    s.e2b.processes.insert(&s.id, proc.clone());
    let sandbox = s.clone();
    tokio::spawn(async move {
        pump(&proc, output).await;
        let end = match done.await {
            Ok(Ok(exit)) if exit.timed_out => Err(RpcError::new(
                Code::DeadlineExceeded,
                "the command was killed at its timeout",
            )),
            Ok(Ok(exit)) => Ok(event(Event::End(end_event(exit)))),
            Ok(Err(e)) => Err(RpcError::new(Code::Unavailable, e.to_string())),
            Err(_) => Err(RpcError::new(Code::Internal, "the process's runner ended early")),
        };
        sandbox.e2b.processes.remove(&sandbox.id, proc.pid);
        broadcast(&proc, end).await;
    });
    Ok(rx)
}

/// Forwards output to every attached stream until the process's output ends.
async fn pump(proc: &Proc, mut output: mpsc::Receiver<OutputChunk>) {
    while let Some(chunk) = output.recv().await {
        let data = match chunk {
            OutputChunk::Stdout(b) => data_event::Output::Stdout(b.to_vec()),
            OutputChunk::Stderr(b) => data_event::Output::Stderr(b.to_vec()),
        };
        broadcast(proc, Ok(event(Event::Data(DataEvent { output: Some(data) })))).await;
    }
}

/// Sends `ev` to every attached stream; streams whose reader has gone are dropped.
async fn broadcast(proc: &Proc, ev: Result<pb::ProcessEvent, RpcError>) {
    let subs: Vec<Subscriber> = proc.subscribers.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut gone = false;
    for s in &subs {
        gone |= s.send(ev.clone()).await.is_err();
    }
    if gone {
        proc.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|s| !s.is_closed());
    }
}

/// A new stream of a running process's events (from now on).
fn attach(
    s: &Sandbox,
    req: pb::ConnectRequest,
) -> Result<mpsc::Receiver<Result<pb::ProcessEvent, RpcError>>, RpcError> {
    let proc = s.e2b.processes.find(&s.id, req.process.as_ref())?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tx.try_send(Ok(event(Event::Start(StartEvent { pid: proc.pid }))))
        .map_err(|_| RpcError::new(Code::Internal, "could not attach"))?;
    proc.subscribers.lock().unwrap_or_else(PoisonError::into_inner).push(tx);
    Ok(rx)
}

/// The stream of a response: each event wrapped by `wrap`, with keep-alives while quiet,
/// until the end event or an error.
fn stream_of<M, W>(
    rx: mpsc::Receiver<Result<pb::ProcessEvent, RpcError>>,
    wrap: W,
) -> impl Stream<Item = Result<M, RpcError>> + Send + 'static
where
    M: Send + 'static,
    W: Fn(pb::ProcessEvent) -> M + Send + Sync + 'static,
{
    let wrap = Arc::new(wrap);
    futures_util::stream::unfold((rx, false), move |(mut rx, ended)| {
        let wrap = wrap.clone();
        async move {
            if ended {
                return None;
            }
            match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
                Err(_) => Some((Ok(wrap(event(Event::Keepalive(KeepAlive {})))), (rx, false))),
                Ok(Some(Ok(ev))) => {
                    let end = matches!(ev.event, Some(Event::End(_)));
                    Some((Ok(wrap(ev)), (rx, end)))
                }
                Ok(Some(Err(e))) => Some((Err(e), (rx, true))),
                Ok(None) => Some((
                    Err(RpcError::new(
                        Code::Unavailable,
                        "the process's stream ended without its end",
                    )),
                    (rx, true),
                )),
            }
        }
    })
}

fn list(s: &Sandbox) -> pb::ListResponse {
    pb::ListResponse {
        processes: s
            .e2b
            .processes
            .list(&s.id)
            .into_iter()
            .map(|p| pb::ProcessInfo {
                config: Some(p.config.clone()),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect(),
    }
}

async fn send_input(s: &Sandbox, req: pb::SendInputRequest) -> Result<pb::SendInputResponse, RpcError> {
    let proc = s.e2b.processes.find(&s.id, req.process.as_ref())?;
    let data = match req.input.and_then(|i| i.input) {
        Some(pb::process_input::Input::Stdin(b)) => b,
        Some(pb::process_input::Input::Pty(_)) => {
            return Err(RpcError::unimplemented("PTYs are not supported by conductor"));
        }
        None => return Err(RpcError::invalid("input: required")),
    };
    let sender = proc.stdin.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let Some(sender) = sender else {
        return Err(RpcError::new(
            Code::FailedPrecondition,
            format!("process {} was started without stdin, or its stdin is closed", proc.pid),
        ));
    };
    sender
        .send(Bytes::from(data))
        .await
        .map_err(|_| RpcError::not_found(format!("process with pid {} has ended", proc.pid)))?;
    Ok(pb::SendInputResponse {})
}

fn close_stdin(s: &Sandbox, req: pb::CloseStdinRequest) -> Result<pb::CloseStdinResponse, RpcError> {
    let proc = s.e2b.processes.find(&s.id, req.process.as_ref())?;
    proc.stdin.lock().unwrap_or_else(PoisonError::into_inner).take();
    Ok(pb::CloseStdinResponse {})
}

async fn send_signal(s: &Sandbox, req: pb::SendSignalRequest) -> Result<pb::SendSignalResponse, RpcError> {
    let signal = match req.signal() {
        pb::Signal::Sigkill => ProcessSignal::Kill,
        pb::Signal::Sigterm => ProcessSignal::Term,
        pb::Signal::Unspecified => return Err(RpcError::invalid("signal: SIGKILL or SIGTERM")),
    };
    let proc = s.e2b.processes.find(&s.id, req.process.as_ref())?;
    s.e2b.conductor.signal_process(&s.id, &proc.marker, signal).await?;
    Ok(pb::SendSignalResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdks_bash_line_runs_in_the_workspace_shell() {
        let cfg = pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), "echo hi | wc -c".into()],
            ..Default::default()
        };
        assert_eq!(command_of(&cfg).unwrap(), Command::Shell("echo hi | wc -c".into()));
        let cfg = pb::ProcessConfig {
            cmd: "python3".into(),
            args: vec!["-c".into(), "print(1)".into()],
            ..Default::default()
        };
        assert_eq!(
            command_of(&cfg).unwrap(),
            Command::Argv(vec!["python3".into(), "-c".into(), "print(1)".into()])
        );
        assert_eq!(
            command_of(&pb::ProcessConfig::default()).unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn ends_report_signals_as_envd_does() {
        let e = end_event(ProcessExit {
            code: 137,
            signal: Some(9),
            timed_out: false,
        });
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (-1, false, "signal: killed")
        );
        let e = end_event(ProcessExit {
            code: 3,
            signal: None,
            timed_out: false,
        });
        assert_eq!((e.exit_code, e.exited, e.status.as_str()), (3, true, "exit status 3"));
    }
}
