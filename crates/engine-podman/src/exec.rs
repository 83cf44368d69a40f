//! Running a command in a container with live, bounded output streaming.
//!
//! The exec is started attached; Podman multiplexes stdout and stderr frames on the
//! hijacked connection and each frame is forwarded as it arrives. Sending into the bounded
//! channel is awaited, so a slow consumer slows the command down instead of growing a
//! buffer. Stdin, when given, is written concurrently with reading (a command may fill its
//! output pipe before reading its input) and then half-closed so the command sees EOF. If
//! the receiver goes away the output is still drained, so the exit code can be collected.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use conductor_core::engine::{EngineError, EngineResult, ExecSpec, OutputChunk};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::error::api_error;

/// How long to wait for Podman to record the exit code after the output has ended.
const EXIT_CODE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn exec(
    docker: &Docker,
    id: &str,
    spec: ExecSpec,
    output: mpsc::Sender<OutputChunk>,
) -> EngineResult<i64> {
    let command = spec.argv.first().cloned().unwrap_or_default();
    let op = |what: &str| format!("{what} '{command}' in container '{id}'");
    let container = format!("container '{id}'");
    let options = CreateExecOptions {
        attach_stdin: Some(spec.stdin.is_some()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        env: Some(spec.env.iter().map(|(name, value)| format!("{name}={value}")).collect()),
        cmd: Some(spec.argv.clone()),
        user: spec.user.clone(),
        working_dir: spec.workdir.clone(),
        ..Default::default()
    };
    let created = docker
        .create_exec(id, options)
        .await
        .map_err(|e| api_error(op("create exec of"), Some(&container), e))?;
    let started = docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: None,
            }),
        )
        .await
        .map_err(|e| api_error(op("start exec of"), Some(&container), e))?;
    let StartExecResults::Attached {
        output: mut frames,
        mut input,
    } = started
    else {
        return Err(EngineError::failed(
            op("start exec of"),
            "Podman detached an attached exec",
        ));
    };

    let write_stdin = async {
        if let Some(data) = spec.stdin {
            // A command that exits without reading its input closes the pipe: not an error.
            if let Err(error) = input.write_all(&data).await {
                tracing::debug!(%error, "stdin of exec not fully written");
            }
            if let Err(error) = input.shutdown().await {
                tracing::debug!(%error, "closing stdin of exec failed");
            }
        }
    };
    let forward_output = async {
        let mut receiver_alive = true;
        while let Some(frame) = frames.next().await {
            let chunk = match frame.map_err(|e| api_error(op("read output of"), None, e))? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => OutputChunk::Stdout(message),
                LogOutput::StdErr { message } => OutputChunk::Stderr(message),
                LogOutput::StdIn { .. } => continue,
            };
            if receiver_alive && output.send(chunk).await.is_err() {
                // Keep draining: the command runs on and its exit code is still wanted.
                receiver_alive = false;
            }
        }
        Ok::<(), EngineError>(())
    };
    // Once the output ends the command is gone; a stdin write still pending is abandoned.
    tokio::pin!(write_stdin, forward_output);
    let mut stdin_done = false;
    loop {
        tokio::select! {
            () = &mut write_stdin, if !stdin_done => stdin_done = true,
            forwarded = &mut forward_output => break forwarded?,
        }
    }
    exit_code(docker, &created.id, &op("get exit code of")).await
}

/// Polls the exec until Podman reports it finished; the attach stream can end slightly
/// before the exit code is recorded.
async fn exit_code(docker: &Docker, exec_id: &str, op: &str) -> EngineResult<i64> {
    let deadline = tokio::time::Instant::now() + EXIT_CODE_TIMEOUT;
    let mut delay = Duration::from_millis(2);
    loop {
        let inspect = docker.inspect_exec(exec_id).await.map_err(|e| api_error(op, None, e))?;
        if inspect.running != Some(true) {
            if let Some(code) = inspect.exit_code {
                return Ok(code);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(EngineError::failed(
                op,
                "the command's output ended but it did not exit",
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
