//! The agent binary on the host (no container): protocol, exec, kill, file confinement, init.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{code_of, error_code, wait_gone, wait_until, Agent};
use conductor_agent_protocol::{ErrorCode, ExecRequest, FileKind, Request, Response};

fn shell(cmd: &str) -> ExecRequest {
    ExecRequest {
        shell: Some(cmd.into()),
        ..Default::default()
    }
}

#[test]
fn exec_streams_output_exit_code_env_cwd_and_stdin() {
    let a = Agent::start("serve");
    let mut c = a.connect();
    let (exit, out, err) = c.exec(shell("echo out; echo err >&2; exit 7"));
    assert_eq!((code_of(&exit), out.as_str(), err.as_str()), (7, "out\n", "err\n"));
    let req = ExecRequest {
        argv: Some(vec!["sh".into(), "-c".into(), "echo $GREETING from $(pwd); cat".into()]),
        cwd: Some("/tmp".into()),
        env: vec![("GREETING".into(), "hi there".into())],
        stdin: true,
        ..Default::default()
    };
    let (exit, out, _) = c.exec_stdin(req, b"piped\n");
    assert_eq!(code_of(&exit), 0);
    assert_eq!(out, "hi there from /tmp\npiped\n");
    // Same connection, next request; a missing program is 127 as in a shell.
    let (exit, _, err) = c.exec(ExecRequest {
        argv: Some(vec!["/no/such/program".into()]),
        ..Default::default()
    });
    assert_eq!(code_of(&exit), 127, "{err}");
    let (exit, _, _) = c.exec(shell("kill -TERM $$"));
    match exit {
        Response::Exit { code, signal, .. } => assert_eq!((code, signal), (143, Some(15))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_version_and_garbage_are_refused() {
    let a = Agent::start("serve");
    let mut c = a.raw();
    c.send(&Request::Hello { version: 99 }, b"");
    assert_eq!(error_code(&c.recv().0), ErrorCode::UnsupportedVersion);
    let mut c = a.raw();
    c.0.write_all(&[0, 0, 0, 3, 0, 0, 0, 0, b'{', b'x', b'}']).unwrap();
    assert_eq!(error_code(&c.recv().0), ErrorCode::Protocol);
    // The server still answers others.
    let mut c = a.connect();
    assert_eq!(code_of(&c.exec(shell("true")).0), 0);
}

#[test]
fn timeout_and_cancel_kill_grandchildren() {
    let a = Agent::start("serve");
    let mut c = a.connect();
    // The grandchild leaves the process group with setsid; the marker still finds it.
    let req = ExecRequest {
        shell: Some("sleep 300 & echo $!; setsid sleep 301 & sleep 0.1; echo $!; wait".into()),
        env: vec![("MARK".into(), "t1".into())],
        kill_marker: Some("MARK=t1".into()),
        timeout_ms: Some(400),
        ..Default::default()
    };
    let t = Instant::now();
    let (exit, out, _) = c.exec(req);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    match exit {
        Response::Exit {
            timed_out, cancelled, ..
        } => assert!(timed_out && !cancelled),
        other => panic!("{other:?}"),
    }
    for pid in out.lines().map(|l| l.parse::<u32>().unwrap()) {
        assert!(wait_gone(pid), "grandchild {pid} survived the timeout");
    }

    c.send(&Request::Exec(shell("sleep 300 & echo $!; wait")), b"");
    let (started, _) = c.recv();
    assert!(matches!(started, Response::Started { .. }), "{started:?}");
    let (first, pid) = c.recv();
    assert_eq!(first, Response::Stdout);
    let pid: u32 = String::from_utf8(pid).unwrap().trim().parse().unwrap();
    c.send(&Request::Cancel, b"");
    let (exit, _, _) = c.collect();
    match exit {
        Response::Exit { cancelled, code, .. } => assert!(cancelled && code == 137, "{exit:?}"),
        other => panic!("{other:?}"),
    }
    assert!(wait_gone(pid), "grandchild {pid} survived the cancel");

    // Hanging up cancels too.
    let mut c2 = a.connect();
    c2.send(&Request::Exec(shell("sleep 300 & echo $!; wait")), b"");
    c2.recv();
    let pid: u32 = String::from_utf8(c2.recv().1).unwrap().trim().parse().unwrap();
    drop(c2);
    assert!(wait_gone(pid), "grandchild {pid} survived the hang-up");
}

#[test]
fn large_output_streams() {
    let a = Agent::start("serve");
    let mut c = a.connect();
    c.send(&Request::Exec(shell("head -c 20000000 /dev/zero")), b"");
    let mut total = 0usize;
    loop {
        match c.recv() {
            (Response::Stdout, d) => total += d.len(),
            (Response::Started { .. }, _) => {}
            (Response::Exit { code, .. }, _) => {
                assert_eq!(code, 0);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(total, 20_000_000);
}

#[test]
fn file_operations_stay_inside_the_root() {
    let a = Agent::start("serve");
    let outside = a.root.parent().unwrap().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "s").unwrap();
    std::os::unix::fs::symlink(&outside, a.root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside", a.root.join("rel-link")).unwrap();
    std::fs::create_dir(a.root.join("d")).unwrap();
    std::os::unix::fs::symlink("../d", a.root.join("d/up")).unwrap();
    let mut c = a.connect();
    let root = a.root.to_str().unwrap().to_string();

    c.send(
        &Request::Write {
            path: "new/dir/f.txt".into(),
            mode: Some(0o600),
            append: false,
            create_dirs: true,
        },
        b"",
    );
    c.send(&Request::Data, b"hello ");
    c.send(&Request::Data, b"world");
    c.send(&Request::Eof, b"");
    assert_eq!(c.recv().0, Response::Done { size: 11 });
    assert_eq!(
        std::fs::read_to_string(a.root.join("new/dir/f.txt")).unwrap(),
        "hello world"
    );

    c.send(
        &Request::Read {
            path: format!("{root}/new/dir/f.txt"),
        },
        b"",
    );
    let (m, d) = c.recv();
    assert_eq!((m, d.as_slice()), (Response::Data, &b"hello world"[..]));
    assert_eq!(c.recv().0, Response::Eof { size: 11 });

    match c.op(Request::Stat {
        path: "new/dir/f.txt".into(),
    }) {
        Response::Stat(s) => assert_eq!((s.kind, s.size, s.mode), (FileKind::File, 11, 0o600)),
        other => panic!("{other:?}"),
    }
    match c.op(Request::List {
        path: "/".replace('/', &root),
    }) {
        Response::List { entries } => {
            let names: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
            assert!(names.contains(&("abs-link", FileKind::Symlink)), "{names:?}");
            assert!(names.contains(&("new", FileKind::Dir)), "{names:?}");
        }
        other => panic!("{other:?}"),
    }
    // A link that stays inside is followed.
    assert!(matches!(c.op(Request::Stat { path: "d/up".into() }), Response::Stat(_)));

    for (path, code) in [
        ("../outside/secret", ErrorCode::InvalidPath),
        ("new/../../outside/secret", ErrorCode::InvalidPath),
        ("/etc/passwd", ErrorCode::OutsideRoot),
        ("abs-link/secret", ErrorCode::OutsideRoot),
        ("rel-link/secret", ErrorCode::OutsideRoot),
        ("a\0b", ErrorCode::InvalidPath),
        ("missing", ErrorCode::NotFound),
    ] {
        assert_eq!(
            error_code(&c.op(Request::Read { path: path.into() })),
            code,
            "read {path:?}"
        );
        assert_eq!(
            error_code(&c.op(Request::Stat { path: path.into() })),
            code,
            "stat {path:?}"
        );
    }
    let long = "x/".repeat(3000);
    assert_eq!(error_code(&c.op(Request::Stat { path: long })), ErrorCode::InvalidPath);
    // Writing through a link to outside is refused and writes nothing.
    c.send(
        &Request::Write {
            path: "abs-link/evil".into(),
            mode: None,
            append: false,
            create_dirs: false,
        },
        b"",
    );
    c.send(&Request::Data, b"x");
    c.send(&Request::Eof, b"");
    assert_eq!(error_code(&c.recv().0), ErrorCode::OutsideRoot);
    assert!(!outside.join("evil").exists());
    // Deleting a link deletes the link, not its target.
    assert_eq!(
        c.op(Request::Delete {
            path: "abs-link".into(),
            recursive: false
        }),
        Response::Done { size: 0 }
    );
    assert!(outside.join("secret").exists());
    assert_eq!(
        error_code(&c.op(Request::Delete {
            path: "new".into(),
            recursive: false
        })),
        ErrorCode::DirectoryNotEmpty
    );
    assert_eq!(
        c.op(Request::Delete {
            path: "new".into(),
            recursive: true
        }),
        Response::Done { size: 0 }
    );
    assert!(!a.root.join("new").exists());
    assert_eq!(
        error_code(&c.op(Request::Delete {
            path: root.clone(),
            recursive: true
        })),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        error_code(&c.op(Request::Read { path: "d".into() })),
        ErrorCode::IsADirectory
    );
}

fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn init_reaps_orphans_forwards_sigterm_and_survives_its_server() {
    let mut a = Agent::start("init");
    let init_pid = a.child.id();
    let mut c = a.connect();
    // The background sleep is orphaned when its shell exits; init (a subreaper here, PID 1
    // in a container) must reap it when it exits.
    let (exit, out, _) = c.exec(shell("sleep 0.3 >/dev/null 2>&1 & echo $!"));
    assert_eq!(code_of(&exit), 0);
    let orphan: u32 = out.trim().parse().unwrap();
    assert!(wait_gone(orphan), "orphan {orphan} stayed a zombie");
    // It may still be a zombie for a moment: init reaps it when its SIGCHLD comes.
    assert!(
        wait_until(|| !Path::new(&format!("/proc/{orphan}")).exists()),
        "orphan {orphan} was not reaped"
    );

    // Killing the server leaves init running.
    let server = children_of(init_pid);
    assert_eq!(server.len(), 1, "{server:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(server[0]));
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.child.try_wait().unwrap().is_none(), "init must outlive its server");
    assert!(UnixStream::connect(&a.socket).is_err());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "init did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn commands_started_under_init_do_not_inherit_its_blocked_signals() {
    let mut a = Agent::start("init");
    let (exit, out, _) = a.connect().exec(ExecRequest {
        argv: Some(vec!["grep".into(), "^SigBlk:".into(), "/proc/self/status".into()]),
        ..Default::default()
    });
    assert_eq!(code_of(&exit), 0);
    let mask = u64::from_str_radix(out.trim().trim_start_matches("SigBlk:").trim(), 16).unwrap();
    for sig in [
        libc_sig::SIGINT,
        libc_sig::SIGTERM,
        libc_sig::SIGCHLD,
        libc_sig::SIGALRM,
    ] {
        assert_eq!(
            mask & (1 << (sig - 1)),
            0,
            "signal {sig} is blocked in a command: {out}"
        );
    }
    a.stop();
}

/// Signal numbers on Linux.
mod libc_sig {
    pub const SIGINT: u32 = 2;
    pub const SIGALRM: u32 = 14;
    pub const SIGTERM: u32 = 15;
    pub const SIGCHLD: u32 = 17;
}

impl common::Client {
    /// Sends a `write` with `data` in two frames; returns the answer.
    fn upload(&mut self, path: &str, mode: Option<u32>, append: bool, data: &[u8]) -> Response {
        self.send(
            &Request::Write {
                path: path.into(),
                mode,
                append,
                create_dirs: false,
            },
            b"",
        );
        let (a, b) = data.split_at(data.len() / 2);
        self.send(&Request::Data, a);
        self.send(&Request::Data, b);
        self.send(&Request::Eof, b"");
        self.recv().0
    }
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Names in `dir` that look like an upload's temporary file.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".conductor-"))
        .collect()
}

/// Waits until the agent removed the temporaries of `dir` (it does so once it sees the
/// client gone).
fn no_temporaries(dir: &Path) {
    let t = Instant::now();
    while !temporaries(dir).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", temporaries(dir));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn raw_writes_replace_the_whole_file_or_leave_it_as_it_was() {
    let a = Agent::start("serve");
    let (root, f) = (a.root.clone(), a.root.join("f"));
    let outside = root.parent().unwrap().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut c = a.connect();

    // A new file: 0644 less the umask (022 here); a replaced one keeps its permissions.
    assert_eq!(c.upload("f", None, false, b"first"), Response::Done { size: 5 });
    assert_eq!(mode_of(&f), 0o644);
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(c.upload("f", None, false, b"second!"), Response::Done { size: 7 });
    assert_eq!(
        (std::fs::read_to_string(&f).unwrap(), mode_of(&f)),
        ("second!".into(), 0o600)
    );
    // A given mode is applied as given (not less the umask), set-id bits dropped, to an
    // existing file too, appending as well.
    assert_eq!(c.upload("f", Some(0o777), false, b"third"), Response::Done { size: 5 });
    assert_eq!(mode_of(&f), 0o777);
    assert_eq!(
        c.upload("f", Some(0o6751), false, b"fourth"),
        Response::Done { size: 6 }
    );
    assert_eq!(mode_of(&f), 0o751);
    assert_eq!(c.upload("f", Some(0o640), true, b"+more"), Response::Done { size: 5 });
    assert_eq!(
        (std::fs::read_to_string(&f).unwrap(), mode_of(&f)),
        ("fourth+more".into(), 0o640)
    );
    assert!(temporaries(&root).is_empty(), "{:?}", temporaries(&root));

    // A client that hangs up midway: the old contents stay, the temporary goes.
    {
        let mut c2 = a.connect();
        c2.send(
            &Request::Write {
                path: "f".into(),
                mode: Some(0o600),
                append: false,
                create_dirs: false,
            },
            b"",
        );
        c2.send(&Request::Data, &vec![b'x'; 1 << 20]);
        // The agent is writing the temporary file.
        let t = Instant::now();
        while temporaries(&root).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "no temporary file");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    no_temporaries(&root);
    assert_eq!(
        (std::fs::read_to_string(&f).unwrap(), mode_of(&f)),
        ("fourth+more".into(), 0o640)
    );
    // A protocol error midway: the same.
    let mut c3 = a.connect();
    c3.send(
        &Request::Write {
            path: "f".into(),
            mode: None,
            append: false,
            create_dirs: false,
        },
        b"",
    );
    c3.send(&Request::Data, b"partial");
    c3.send(&Request::Stat { path: "f".into() }, b"");
    assert_eq!(error_code(&c3.recv().0), ErrorCode::Protocol);
    no_temporaries(&root);
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "fourth+more");

    // A link to a file inside is followed: the file is replaced, the link stays.
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/target"), "old").unwrap();
    std::os::unix::fs::symlink("d/target", root.join("link")).unwrap();
    assert_eq!(c.upload("link", None, false, b"new"), Response::Done { size: 3 });
    assert_eq!(std::fs::read_to_string(root.join("d/target")).unwrap(), "new");
    assert!(std::fs::symlink_metadata(root.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(temporaries(&root.join("d")).is_empty());
    // A dangling one is replaced by the file.
    std::os::unix::fs::symlink("d/missing", root.join("dangling")).unwrap();
    assert_eq!(c.upload("dangling", None, false, b"here"), Response::Done { size: 4 });
    assert!(std::fs::symlink_metadata(root.join("dangling")).unwrap().is_file());
    assert!(!root.join("d/missing").exists());
    // One that leads outside is refused, and nothing is written there.
    std::fs::write(outside.join("secret"), "s").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("out")).unwrap();
    assert_eq!(
        error_code(&c.upload("out", None, false, b"evil")),
        ErrorCode::OutsideRoot
    );
    assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "s");
    // Wrong kinds are refused up front, with nothing left behind.
    assert_eq!(error_code(&c.upload("d", None, false, b"x")), ErrorCode::IsADirectory);
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    assert_eq!(
        error_code(&c.upload("fifo", None, false, b"x")),
        ErrorCode::NotARegularFile
    );
    assert_eq!(
        error_code(&c.upload("fifo", None, true, b"x")),
        ErrorCode::NotARegularFile
    );
    assert!(temporaries(&root).is_empty(), "{:?}", temporaries(&root));
    // The connection is still in step after all that.
    assert!(matches!(c.op(Request::Stat { path: "f".into() }), Response::Stat(_)));
}

#[test]
fn a_deep_tree_is_deleted_without_exhausting_the_agent() {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let a = Agent::start("serve");
    let outside = a.root.parent().unwrap().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), "k").unwrap();
    // 5000 nested directories (deeper than PATH_MAX allows to name), with a file every 500
    // levels and a link to outside at the bottom.
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd = open(&a.root, dir_flags, Mode::empty()).unwrap();
    let dir_mode = Mode::from_bits_truncate(0o755);
    mkdirat(&fd, "deep", dir_mode).unwrap();
    fd = openat(&fd, "deep", dir_flags, Mode::empty()).unwrap();
    for level in 0..5000 {
        mkdirat(&fd, "d", dir_mode).unwrap();
        if level % 500 == 0 {
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC;
            openat(&fd, "file", flags, Mode::from_bits_truncate(0o644)).unwrap();
            mkdirat(&fd, "side", dir_mode).unwrap();
        }
        fd = openat(&fd, "d", dir_flags, Mode::empty()).unwrap();
    }
    nix::unistd::symlinkat(&outside, &fd, "out").unwrap();
    drop(fd);

    let mut c = a.connect();
    assert_eq!(
        error_code(&c.op(Request::Delete {
            path: "deep".into(),
            recursive: false
        })),
        ErrorCode::DirectoryNotEmpty
    );
    assert_eq!(
        c.op(Request::Delete {
            path: "deep".into(),
            recursive: true
        }),
        Response::Done { size: 0 }
    );
    assert!(!a.root.join("deep").exists());
    assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "k");
    // The agent is alive and this connection in step.
    assert!(matches!(c.op(Request::Stat { path: ".".into() }), Response::Stat(_)));
    assert!(matches!(
        a.connect().op(Request::List { path: ".".into() }),
        Response::List { .. }
    ));
}
