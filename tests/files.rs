//! Files of a workspace against real Podman: raw upload and download, tars both ways,
//! listing and deleting, ownership, confinement to /workspace (`..`, absolute paths,
//! symlinks leading out, NUL, over-long paths, tar members), the storage limit, the
//! Podman fallback when the agent is gone, the HTTP endpoints of the real server and
//! `conductor ws cp` of the real binary.
//!
//! Needs the static agent binary (see tests/agent.rs).

mod common;

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use common::{agent_workspace, server_pid, TestEnv};
use conductor_core::engine::ByteStream;
use conductor_core::size::ByteSize;
use conductor_service::agent_client;
use conductor_service::exec::{ExecPath, ExecRequest};
use conductor_service::files::{DownloadKind, PutOptions};
use conductor_service::workspaces::WorkspaceInfo;
use conductor_service::{Conductor, ServiceError};
use futures_util::StreamExt;
use serde_json::{json, Value};

async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String) {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    (o.exit_code, out + &err)
}

/// A body in chunks of 100 KiB.
fn body(data: &[u8]) -> ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = data.chunks(100 << 10).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Box::pin(futures_util::stream::iter(chunks))
}

/// `n` bytes of every value.
/// Options of an upload that declares its size (as `Content-Length` does).
fn sized(n: u64) -> PutOptions {
    PutOptions {
        mode: None,
        size: Some(n),
    }
}

fn binary(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + i / 251) % 256) as u8).collect()
}

async fn collect(mut stream: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("download chunk"));
    }
    out
}

/// The field of an `Invalid` error, or a panic naming what came instead.
#[track_caller]
fn invalid_field<T: std::fmt::Debug>(r: Result<T, ServiceError>) -> String {
    match r {
        Err(ServiceError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

/// (name, kind, contents or link target, mode) of every member of a tar.
fn members(tar: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>, u32)> {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap();
            let mut data = Vec::new();
            if kind == tar::EntryType::Symlink {
                data = e.link_name_bytes().unwrap().into_owned();
            } else {
                e.read_to_end(&mut data).unwrap();
            }
            (name, kind, data, mode)
        })
        .collect()
}

/// A project tree as a tar: `proj/`, `proj/a.txt`, `proj/run.sh` (set-uid asked),
/// `proj/sub/big.bin` (`big`), `proj/link -> a.txt`.
fn project_tar(big: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "proj/", std::io::empty()).unwrap();
    for (name, data, mode) in [
        ("proj/a.txt", &b"alpha\n"[..], 0o644),
        ("proj/run.sh", &b"#!/bin/sh\necho run\n"[..], 0o4755),
        ("proj/sub/big.bin", big, 0o600),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "proj/link", "a.txt").unwrap();
    b.into_inner().unwrap()
}

/// A tar with raw (unchecked) member names, for the members the tar crate refuses to write.
/// A raw member: name, kind, contents, link target.
type RawMember<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a str>);

fn raw_tar(entries: &[RawMember]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Kills the agent's server in the workspace (its init and the workspace stay up).
async fn kill_agent(c: &Conductor, w: &WorkspaceInfo) {
    let server = server_pid(c, w).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server), nix::sys::signal::Signal::SIGKILL).unwrap();
    let dir = agent_client::socket_dir(&c.paths, &w.id);
    for _ in 0..50 {
        if !agent_client::answers(&dir).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the agent still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_files_round_trip_as_the_workspace_user_list_and_delete() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "files1", None).await;

    // A few MiB of every byte value, into a directory that does not exist yet.
    let data = binary(3 << 20 | 12345);
    let written = c
        .put_file(&w.id, "data/blob.bin", body(&data), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (written.path.as_str(), written.size, written.via),
        ("/workspace/data/blob.bin", data.len() as u64, ExecPath::Agent)
    );
    let (code, out) = sh(
        c,
        &w.id,
        "stat -c '%u:%g %a %n' /workspace/data /workspace/data/blob.bin",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "1000:1000 755 /workspace/data\n1000:1000 644 /workspace/data/blob.bin\n"
    );
    let d = c.get_file(&w.id, "/workspace/data/blob.bin").await.unwrap();
    assert_eq!(
        (d.kind, d.size, d.via),
        (DownloadKind::File, Some(data.len() as u64), ExecPath::Agent)
    );
    assert!(collect(d.stream).await == data, "the download differs from the upload");

    // Mode, replace, empty file.
    let opts = PutOptions {
        mode: Some(0o755),
        size: Some(10),
    };
    c.put_file(&w.id, "data/run.sh", body(b"#!/bin/sh\n"), opts)
        .await
        .unwrap();
    c.put_file(&w.id, "data/empty", body(b""), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        collect(c.get_file(&w.id, "data/empty").await.unwrap().stream).await,
        b""
    );
    let (_, out) = sh(c, &w.id, "stat -c '%a %s' /workspace/data/run.sh").await;
    assert_eq!(out, "755 10\n");
    assert_eq!(
        invalid_field(
            c.put_file(
                &w.id,
                "data/x",
                body(b""),
                PutOptions {
                    mode: Some(0o4755),
                    size: None
                }
            )
            .await
        ),
        "mode"
    );

    // Listing: sorted, with kind, size, mode, owner, and links not followed.
    sh(c, &w.id, "ln -s blob.bin /workspace/data/link").await;
    let list = c.list_files(&w.id, "data").await.unwrap();
    let got: Vec<(&str, &str, u64, u32, u32)> = list
        .iter()
        .map(|e| {
            (
                e.name.as_str(),
                match e.kind {
                    conductor_agent_protocol::FileKind::File => "file",
                    conductor_agent_protocol::FileKind::Dir => "dir",
                    conductor_agent_protocol::FileKind::Symlink => "symlink",
                    conductor_agent_protocol::FileKind::Other => "other",
                },
                if e.name == "link" { 0 } else { e.size },
                e.mode,
                e.uid,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("blob.bin", "file", data.len() as u64, 0o644, 1000),
            ("empty", "file", 0, 0o644, 1000),
            ("link", "symlink", 0, 0o777, 1000),
            ("run.sh", "file", 10, 0o755, 1000),
        ]
    );
    assert_eq!(list[2].link_target.as_deref(), Some("blob.bin"));
    assert!(list[0].mtime_ms > 1_600_000_000_000);
    assert!(c
        .list_files(&w.id, "/workspace")
        .await
        .unwrap()
        .iter()
        .any(|e| e.name == "data"));

    // Wrong kinds: 409; missing: 404.
    assert!(matches!(
        c.put_file(&w.id, "data", body(b"x"), PutOptions::default()).await,
        Err(ServiceError::Conflict(_))
    ));
    assert!(matches!(
        c.list_files(&w.id, "data/blob.bin").await,
        Err(ServiceError::Conflict(_))
    ));
    assert!(matches!(
        c.get_file(&w.id, "data/missing").await,
        Err(ServiceError::NotFound { .. })
    ));
    assert!(matches!(
        c.get_file("ws-nosuchthing", "a").await,
        Err(ServiceError::NotFound { .. })
    ));

    // Delete: a link (not its target), a file, a non-empty directory only recursively,
    // never the root.
    c.delete_file(&w.id, "data/link", false).await.unwrap();
    c.delete_file(&w.id, "data/empty", false).await.unwrap();
    assert!(matches!(
        c.delete_file(&w.id, "data", false).await,
        Err(ServiceError::Conflict(_))
    ));
    c.delete_file(&w.id, "data", true).await.unwrap();
    assert!(matches!(
        c.delete_file(&w.id, "data", true).await,
        Err(ServiceError::NotFound { .. })
    ));
    for root in ["/workspace", ".", "/workspace/"] {
        assert_eq!(invalid_field(c.delete_file(&w.id, root, true).await), "path");
    }
    let (_, out) = sh(c, &w.id, "ls -A /workspace | wc -l").await;
    assert_eq!(out.trim(), "0");

    // A stopped workspace: 409 naming its state.
    c.stop_workspace(&w.id).await.unwrap();
    match c.get_file(&w.id, "x").await {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("stopped"), "{m}"),
        other => panic!("{:?}", other.map(|d| d.kind)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tars_extract_and_download_round_trip() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "files2", None).await;
    let big = binary(1 << 20);

    // Into a directory that does not exist yet.
    let written = c
        .put_archive(&w.id, "dest/inner", body(&project_tar(&big)), None)
        .await
        .unwrap();
    assert_eq!(
        (written.size, written.via),
        (6 + 19 + big.len() as u64, ExecPath::Agent)
    );
    let (code, out) = sh(
        c,
        &w.id,
        "cd /workspace/dest && find . -printf '%p %U:%G %y %m\\n' | sort; readlink inner/proj/link",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        ". 1000:1000 d 755\n./inner 1000:1000 d 755\n./inner/proj 1000:1000 d 755\n\
         ./inner/proj/a.txt 1000:1000 f 644\n./inner/proj/link 1000:1000 l 777\n\
         ./inner/proj/run.sh 1000:1000 f 755\n./inner/proj/sub 1000:1000 d 755\n\
         ./inner/proj/sub/big.bin 1000:1000 f 600\na.txt\n",
        "owner, modes (set-uid dropped), link"
    );

    // The directory back as a tar, named from its base name; links stay links.
    let d = c.get_file(&w.id, "dest/inner/proj").await.unwrap();
    assert_eq!((d.kind, d.size), (DownloadKind::Archive, None));
    let m = members(&collect(d.stream).await);
    let names: Vec<&str> = m.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "proj/",
            "proj/a.txt",
            "proj/link",
            "proj/run.sh",
            "proj/sub/",
            "proj/sub/big.bin"
        ]
    );
    assert_eq!(m[1].2, b"alpha\n");
    assert_eq!((m[2].1, m[2].2.as_slice()), (tar::EntryType::Symlink, &b"a.txt"[..]));
    assert_eq!((m[3].3, m[5].3), (0o755, 0o600));
    assert!(m[5].2 == big);

    // The whole workspace is named "workspace".
    let m = members(&collect(c.get_file(&w.id, "/workspace").await.unwrap().stream).await);
    assert_eq!(m[0].0, "workspace/");

    // An existing file is not a directory to extract into.
    assert!(matches!(
        c.put_archive(&w.id, "dest/inner/proj/a.txt", body(&project_tar(b"")), None)
            .await,
        Err(ServiceError::Conflict(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_members_leaving_the_workspace_are_refused() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "files3", None).await;
    let (code, _) = sh(c, &w.id, "ln -s /etc /workspace/etc-link && mkdir /workspace/ok").await;
    assert_eq!(code, 0);
    let long = "a/".repeat(2500);
    for bad in [
        "../etc/passwd",
        "ok/../../etc/passwd",
        "/etc/passwd",
        "/workspace/../etc/passwd",
        "etc-link/passwd",
        "/workspace/etc-link/passwd",
        "a\0b",
        long.as_str(),
        "",
    ] {
        assert_eq!(
            invalid_field(c.get_file(&w.id, bad).await.map(|d| d.kind)),
            "path",
            "{bad:?}"
        );
        assert_eq!(
            invalid_field(c.put_file(&w.id, bad, body(b"x"), PutOptions::default()).await),
            "path",
            "{bad:?}"
        );
        assert_eq!(invalid_field(c.list_files(&w.id, bad).await), "path", "{bad:?}");
        assert_eq!(invalid_field(c.delete_file(&w.id, bad, true).await), "path", "{bad:?}");
    }
    assert_eq!(invalid_field(c.list_files(&w.id, "etc-link").await), "path");
    assert_eq!(
        invalid_field(c.put_archive(&w.id, "etc-link/x", body(&project_tar(b"")), None).await),
        "path"
    );
    assert_eq!(
        invalid_field(c.put_archive(&w.id, "etc-link", body(&project_tar(b"")), None).await),
        "path"
    );

    // Tar members: `..`, absolute, through a symlink member or an existing link leading
    // out, hard links. The error names the member; field `body`.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            raw_tar(&[(b"../escape", tar::EntryType::Regular, b"x", None)]),
            "../escape",
        ),
        (
            raw_tar(&[(b"ok/../../escape", tar::EntryType::Regular, b"x", None)]),
            "ok/../../escape",
        ),
        (
            raw_tar(&[(b"/tmp/escape", tar::EntryType::Regular, b"x", None)]),
            "/tmp/escape",
        ),
        (
            raw_tar(&[
                (b"evil", tar::EntryType::Symlink, b"", Some("/tmp")),
                (b"evil/escape", tar::EntryType::Regular, b"x", None),
            ]),
            "evil/escape",
        ),
        (
            raw_tar(&[(b"etc-link/escape", tar::EntryType::Regular, b"x", None)]),
            "etc-link/escape",
        ),
        (
            raw_tar(&[(b"hard", tar::EntryType::Link, b"", Some("/etc/passwd"))]),
            "hard",
        ),
    ];
    for (tar, member) in &cases {
        match c.put_archive(&w.id, ".", body(tar), None).await {
            Err(ServiceError::Invalid { field, message }) => {
                assert_eq!(field, "body", "{message}");
                assert!(message.contains(member), "{member}: {message}");
            }
            other => panic!("{member}: {other:?}"),
        }
    }
    let (_, out) = sh(c, &w.id, "ls /tmp /etc | grep -c escape; ls -A /workspace").await;
    assert_eq!(out, "0\netc-link\nevil\nok\n", "nothing was written outside");

    // The link itself can be deleted; its target is untouched.
    c.delete_file(&w.id, "etc-link", false).await.unwrap();
    let (code, _) = sh(c, &w.id, "test -f /etc/passwd").await;
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_limit_is_enforced_and_the_workspace_keeps_working() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "files4", Some(ByteSize::mib(16))).await;

    // Declared too large: refused before anything is read or written.
    let declared = sized(32 << 20);
    match c.put_file(&w.id, "big", body(b""), declared).await {
        Err(ServiceError::TooLarge(m)) => assert!(m.contains("storage limit"), "{m}"),
        other => panic!("{other:?}"),
    }
    match c.put_archive(&w.id, "d", body(b""), Some(32 << 20)).await {
        Err(ServiceError::TooLarge(_)) => {}
        other => panic!("{other:?}"),
    }
    // A file that the failed uploads below try to replace.
    c.put_file(&w.id, "big", body(b"previous"), PutOptions::default())
        .await
        .unwrap();
    // Undeclared and larger than the limit: stopped at the limit.
    match c
        .put_file(&w.id, "big", body(&binary(20 << 20)), PutOptions::default())
        .await
    {
        Err(ServiceError::TooLarge(_) | ServiceError::NoSpace(_)) => {}
        other => panic!("{other:?}"),
    }
    // Within the limit, but the volume (ext4 overhead, other files) is full: ENOSPC.
    let almost = binary(15 << 20);
    match c
        .put_file(&w.id, "big", body(&almost), sized(almost.len() as u64))
        .await
    {
        Err(ServiceError::NoSpace(m)) => assert!(m.contains("full"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(almost.len() as u64);
    h.set_mode(0o644);
    tar.append_data(&mut h, "big2", &almost[..]).unwrap();
    match c.put_archive(&w.id, "d", body(&tar.into_inner().unwrap()), None).await {
        Err(ServiceError::NoSpace(_)) => {}
        other => panic!("{other:?}"),
    }

    // The workspace still works; freeing space makes room again.
    let (code, out) = sh(c, &w.id, "echo alive").await;
    assert_eq!((code, out.as_str()), (0, "alive\n"));
    // A failed raw upload leaves the previous file as it was, and its temporary file is
    // gone (the agent removes it once it sees the failure or the hang-up); a failed tar
    // leaves its members.
    assert_eq!(
        collect(c.get_file(&w.id, "big").await.unwrap().stream).await,
        b"previous"
    );
    let (_, out) = sh(
        c,
        &w.id,
        "for i in $(seq 50); do ls -A /workspace | grep -q conductor- || break; sleep 0.1; done; \
         ls -A /workspace | grep -v '^lost+found$'",
    )
    .await;
    assert_eq!(out, "big\nd\n");
    c.delete_file(&w.id, "d", true).await.unwrap();
    let small = binary(4 << 20);
    c.put_file(&w.id, "small", body(&small), PutOptions::default())
        .await
        .unwrap();
    assert!(collect(c.get_file(&w.id, "small").await.unwrap().stream).await == small);

    // The same through Podman: a full volume fails the upload, the previous file stays
    // and the temporary file is removed.
    kill_agent(c, &w).await;
    match c
        .put_file(&w.id, "small", body(&almost), sized(almost.len() as u64))
        .await
    {
        Err(ServiceError::NoSpace(m)) => assert!(m.contains("full"), "{m}"),
        other => panic!("{other:?}"),
    }
    let d = c.get_file(&w.id, "small").await.unwrap();
    assert_eq!(d.via, ExecPath::Podman);
    assert!(collect(d.stream).await == small);
    let (_, out) = sh(
        c,
        &w.id,
        "for i in $(seq 50); do ls -A /workspace | grep -q conductor- || break; sleep 0.1; done; \
         ls -A /workspace | grep -v '^lost+found$'",
    )
    .await;
    assert_eq!(out, "big\nsmall\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_through_podman_when_the_agent_is_gone() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "files5", None).await;
    sh(
        c,
        &w.id,
        "ln -s /etc /workspace/etc-link; mkdir -p /workspace/real; ln -s real /workspace/inside-link",
    )
    .await;
    kill_agent(c, &w).await;

    // Raw file with a known size, and without (spooled first).
    let data = binary(2 << 20);
    let written = c
        .put_file(
            &w.id,
            "fb/nested/blob.bin",
            body(&data),
            PutOptions {
                mode: Some(0o640),
                size: Some(data.len() as u64),
            },
        )
        .await
        .unwrap();
    assert_eq!((written.size, written.via), (data.len() as u64, ExecPath::Podman));
    let w2 = c
        .put_file(
            &w.id,
            "inside-link/streamed.txt",
            body(b"no size\n"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((w2.size, w2.via), (8, ExecPath::Podman));
    let (code, out) = sh(
        c,
        &w.id,
        "stat -c '%u:%g %a %n' /workspace/fb /workspace/fb/nested /workspace/fb/nested/blob.bin /workspace/real/streamed.txt",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "1000:1000 755 /workspace/fb\n1000:1000 755 /workspace/fb/nested\n\
         1000:1000 640 /workspace/fb/nested/blob.bin\n1000:1000 644 /workspace/real/streamed.txt\n"
    );
    let d = c.get_file(&w.id, "fb/nested/blob.bin").await.unwrap();
    assert_eq!(
        (d.kind, d.size, d.via),
        (DownloadKind::File, Some(data.len() as u64), ExecPath::Podman)
    );
    assert!(collect(d.stream).await == data);

    // Replacing: a complete upload replaces the file (its mode stays); one that breaks off
    // leaves the previous file whole and no temporary file behind.
    c.put_file(&w.id, "fb/nested/blob.bin", body(b"v2\n"), PutOptions::default())
        .await
        .unwrap();
    let short = c
        .put_file(&w.id, "fb/nested/blob.bin", body(b"only ten b"), sized(100))
        .await;
    assert!(short.is_err(), "a body shorter than its size is refused: {short:?}");
    // (The temporary file is removed on a task of its own, at once and again 1 s later.)
    let (_, out) = sh(
        c,
        &w.id,
        "stat -c '%a' /workspace/fb/nested/blob.bin; cat /workspace/fb/nested/blob.bin; \
         for i in $(seq 50); do ls -A /workspace/fb/nested | grep -q conductor- || break; sleep 0.1; done; \
         ls -A /workspace/fb/nested",
    )
    .await;
    assert_eq!(out, "640\nv2\nblob.bin\n");
    // Podman writes as root, but what the workspace user cannot write is refused, as
    // through the agent.
    sh(c, &w.id, "mkdir /workspace/ro && chmod 555 /workspace/ro").await;
    match c.put_file(&w.id, "ro/x", body(b"x"), PutOptions::default()).await {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("permission denied"), "{m}"),
        other => panic!("{other:?}"),
    }
    let (_, out) = sh(c, &w.id, "ls -A /workspace/ro; rmdir /workspace/ro").await;
    assert_eq!(out, "");

    // Tars both ways.
    let big = binary(300_000);
    let written = c
        .put_archive(&w.id, "tree", body(&project_tar(&big)), None)
        .await
        .unwrap();
    assert_eq!(written.via, ExecPath::Podman);
    let (_, out) = sh(
        c,
        &w.id,
        "cd /workspace/tree && find . -printf '%p %U:%G %y %m\\n' | sort",
    )
    .await;
    assert_eq!(
        out,
        ". 1000:1000 d 755\n./proj 1000:1000 d 755\n./proj/a.txt 1000:1000 f 644\n\
         ./proj/link 1000:1000 l 777\n./proj/run.sh 1000:1000 f 755\n./proj/sub 1000:1000 d 755\n\
         ./proj/sub/big.bin 1000:1000 f 600\n"
    );
    let d = c.get_file(&w.id, "tree/proj").await.unwrap();
    assert_eq!((d.kind, d.via), (DownloadKind::Archive, ExecPath::Podman));
    let m = members(&collect(d.stream).await);
    let file = m
        .iter()
        .find(|e| e.0 == "proj/sub/big.bin")
        .expect("big.bin in the tar");
    assert!(file.2 == big);
    assert!(m.iter().any(|e| e.0 == "proj/link" && e.1 == tar::EntryType::Symlink));
    // Through a symlink, Podman names the entries after its target: `name` says so.
    sh(c, &w.id, "echo in > /workspace/real/in.txt").await;
    let d = c.get_file(&w.id, "inside-link").await.unwrap();
    assert_eq!((d.kind, d.name.as_str()), (DownloadKind::Archive, "real"));
    let m = members(&collect(d.stream).await);
    assert!(m.iter().any(|e| e.0 == "real/in.txt"), "{m:?}");
    assert!(m.iter().all(|e| e.0 == "real" || e.0.starts_with("real/")), "{m:?}");
    sh(c, &w.id, "rm /workspace/real/in.txt").await;

    // List, stat, delete.
    let names: Vec<String> = c
        .list_files(&w.id, "tree/proj")
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{}:{:?}:{}", e.name, e.kind, e.uid))
        .collect();
    assert_eq!(
        names,
        [
            "a.txt:File:1000",
            "link:Symlink:1000",
            "run.sh:File:1000",
            "sub:Dir:1000"
        ]
    );
    assert_eq!(c.stat_file(&w.id, "tree/proj/a.txt").await.unwrap().size, 6);
    assert!(matches!(
        c.delete_file(&w.id, "tree", false).await,
        Err(ServiceError::Conflict(_))
    ));
    c.delete_file(&w.id, "tree", true).await.unwrap();
    c.delete_file(&w.id, "inside-link", false).await.unwrap();
    let (_, out) = sh(c, &w.id, "ls -A /workspace; ls /workspace/real").await;
    assert_eq!(
        out, "etc-link\nfb\nreal\nstreamed.txt\n",
        "the link went, not its target"
    );

    // The same refusals as with the agent.
    for bad in ["etc-link/passwd", "/etc/passwd", "../x"] {
        assert_eq!(
            invalid_field(c.get_file(&w.id, bad).await.map(|d| d.kind)),
            "path",
            "{bad}"
        );
        assert_eq!(
            invalid_field(c.put_file(&w.id, bad, body(b"x"), PutOptions::default()).await),
            "path",
            "{bad}"
        );
    }
    assert_eq!(invalid_field(c.list_files(&w.id, "etc-link").await), "path");
    let evil = raw_tar(&[
        (b"evil", tar::EntryType::Symlink, b"", Some("/etc")),
        (b"evil/passwd", tar::EntryType::Regular, b"x", None),
    ]);
    assert_eq!(
        invalid_field(c.put_archive(&w.id, ".", body(&evil), None).await),
        "body"
    );
    let dotdot = raw_tar(&[(b"../x", tar::EntryType::Regular, b"x", None)]);
    assert_eq!(
        invalid_field(c.put_archive(&w.id, ".", body(&dotdot), None).await),
        "body"
    );
    let (_, out) = sh(c, &w.id, "grep -c '^x$' /etc/passwd || true").await;
    assert_eq!(out.trim(), "0");
}

// ---------------------------------------------------------------------------------------
// The real binary: HTTP and `ws cp`.

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.expect("send request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("read body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[track_caller]
fn assert_error(got: &(u16, Value), status: u16, code: &str, field: Option<&str>) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["field"].as_str(), field, "{body}");
}

/// A data directory driven only through the real binary (a second conductor on the same
/// directory would replace its private Podman socket). Dropping it removes the workspaces
/// it was told about, checks that no container of its instance is left, and unmounts.
struct BinaryEnv {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    workspaces: std::sync::Mutex<Vec<String>>,
}

impl BinaryEnv {
    fn new() -> BinaryEnv {
        let dir = tempfile::Builder::new()
            .prefix("conductor-files-")
            .tempdir_in(common::test_root())
            .unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, common::config_text(dir.path(), "")).unwrap();
        BinaryEnv {
            dir,
            config,
            workspaces: Default::default(),
        }
    }

    fn remove_later(&self, id: &str) {
        self.workspaces.lock().unwrap().push(id.to_string());
    }

    /// Runs the binary; (success, stdout, stderr).
    fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
        common::cli(&self.config, args, stdin)
    }

    /// Runs the binary and expects success; its stdout.
    fn ok(&self, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        let (ok, out, err) = self.cli(args, stdin);
        assert!(ok, "conductor {args:?} failed: {err}");
        out
    }

    fn leftovers(&self) -> String {
        common::leftover_containers(&self.dir.path().join("conductor.db"))
    }
}

impl Drop for BinaryEnv {
    fn drop(&mut self) {
        for id in self.workspaces.lock().unwrap().iter() {
            let _ = self.cli(&["ws", "rm", id, "--purge"], None);
        }
        common::unmount_under(self.dir.path());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_of_the_real_server() {
    let env = BinaryEnv::new();
    let served = common::serve(&env.config);
    let base = served.base.clone();
    let http = reqwest::Client::new();
    let (s, w) = send(http.post(format!("{base}/workspaces")).json(&json!({
        "agent_id": "files6", "environment": "minimal", "limits": {"volume_size": "16Mi"}
    })))
    .await;
    assert_eq!(s, 201, "{w}");
    let id = w["id"].as_str().unwrap().to_string();
    env.remove_later(&id);
    let files = format!("{base}/workspaces/{id}/files");

    // Raw round trip (binary, a few MiB).
    let data = binary(3 << 20);
    let (s, r) = send(
        http.put(format!("{files}?path=up/blob.bin&mode=600"))
            .body(data.clone()),
    )
    .await;
    assert_eq!(
        (s, &r),
        (200, &json!({"path": "/workspace/up/blob.bin", "size": data.len()}))
    );
    let resp = http.get(format!("{files}?path=up/blob.bin")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-conductor-file-kind"], "file");
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.content_length(), Some(data.len() as u64));
    assert!(resp.bytes().await.unwrap() == data);

    // A streamed (chunked) upload, no Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(b"chunk one, ".to_vec()), Ok(b"chunk two".to_vec())];
    let (s, r) = send(
        http.put(format!("{files}?path=/workspace/up/chunked.txt"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))),
    )
    .await;
    assert_eq!((s, r["size"].as_u64()), (200, Some(20)), "{r}");

    // A tar in, a tar out, a listing.
    let big = binary(200_000);
    let (s, r) = send(
        http.put(format!("{files}?path=tree&extract=true"))
            .body(project_tar(&big)),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let resp = http.get(format!("{files}?path=tree/proj")).send().await.unwrap();
    assert_eq!(resp.headers()["x-conductor-file-kind"], "directory");
    assert_eq!(resp.headers()["content-type"], "application/x-tar");
    let m = members(&resp.bytes().await.unwrap());
    assert_eq!(m.len(), 6);
    assert!(m.iter().any(|e| e.0 == "proj/sub/big.bin" && e.2 == big));
    let (s, list) = send(http.get(format!("{files}?path=up&list=true"))).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["path"], "up");
    let entries = list["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{list}");
    assert_eq!(
        (
            &entries[0]["name"],
            &entries[0]["kind"],
            &entries[0]["mode"],
            &entries[0]["uid"]
        ),
        (&json!("blob.bin"), &json!("file"), &json!(0o600), &json!(1000))
    );

    // Delete.
    let r = http
        .delete(format!("{files}?path=up/chunked.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_error(
        &send(http.delete(format!("{files}?path=tree"))).await,
        409,
        "conflict",
        None,
    );
    let r = http
        .delete(format!("{files}?path=tree&recursive=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_error(
        &send(http.get(format!("{files}?path=tree"))).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &send(http.delete(format!("{files}?path=/workspace&recursive=true"))).await,
        400,
        "invalid_request",
        Some("path"),
    );

    // Refusals: 400 naming `path`.
    let (s, r) = send(
        http.post(format!("{base}/workspaces/{id}/exec"))
            .json(&json!({"command": "ln -s /etc /workspace/etc-link"})),
    )
    .await;
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)), "{r}");
    let long = "a/".repeat(2500);
    for bad in [
        "..%2Fetc%2Fpasswd",
        "/etc/passwd",
        "etc-link/passwd",
        "a%00b",
        long.as_str(),
    ] {
        let got = send(http.get(format!("{files}?path={bad}"))).await;
        assert_error(&got, 400, "invalid_request", Some("path"));
        let got = send(http.put(format!("{files}?path={bad}")).body("x")).await;
        assert_error(&got, 400, "invalid_request", Some("path"));
    }
    let got = send(http.put(format!("{files}?path=x&extract=true")).body(raw_tar(&[(
        b"../x",
        tar::EntryType::Regular,
        b"x",
        None,
    )])))
    .await;
    assert_error(&got, 400, "invalid_request", Some("body"));
    assert_error(&send(http.get(&files)).await, 400, "invalid_request", Some("path"));
    assert_error(
        &send(http.get(format!("{files}?path=a&bogus=1"))).await,
        400,
        "invalid_request",
        Some("bogus"),
    );
    assert_error(
        &send(http.get(format!("{base}/workspaces/ws-nosuchthing/files?path=a"))).await,
        404,
        "not_found",
        None,
    );

    // The storage limit: a declared body above it is refused at once (413); a body that
    // does not fit is refused when the volume is full (507).
    let got = send(http.put(format!("{files}?path=big")).body(vec![0u8; 17 << 20])).await;
    assert_error(&got, 413, "payload_too_large", None);
    // curl waits for `100 Continue` before sending a large body: it gets the 413 instead.
    let big_file = env.dir.path().join("big-upload");
    std::fs::write(&big_file, vec![0u8; 17 << 20]).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T"])
        .arg(&big_file)
        .arg(format!("{files}?path=big"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "413",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = send(http.put(format!("{files}?path=big")).body(binary(15 << 20))).await;
    assert_error(&got, 507, "insufficient_storage", None);
    let (s, r) = send(http.put(format!("{files}?path=after.txt")).body("still works")).await;
    assert_eq!(s, 200, "{r}");

    // With curl, as a user would.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", &format!("{files}?path=after.txt")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still works");

    let r = http
        .delete(format!("{base}/workspaces/{id}?keep_volumes=false"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let status = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(env.leftovers(), "", "containers left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_cp_copies_both_ways() {
    let env = BinaryEnv::new();
    let created = env.ok(&["ws", "create", "--agent", "files7", "--env", "minimal"], None);
    let id = String::from_utf8(created).unwrap().trim().to_string();
    env.remove_later(&id);
    let id = id.as_str();
    let local = tempfile::Builder::new()
        .prefix("cp-")
        .tempdir_in(common::test_root())
        .unwrap();
    let src = local.path().join("proj");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let big = binary(2 << 20);
    std::fs::write(src.join("sub/big.bin"), &big).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    std::fs::write(local.path().join("single.txt"), "single\n").unwrap();

    let run = |args: &[&str], stdin: Option<&[u8]>| env.ok(args, stdin);
    let local_path = |p: &str| local.path().join(p).to_string_lossy().into_owned();

    // Host -> workspace: a file to a new name, a file into a directory, a directory to a
    // new path and into an existing directory, stdin.
    run(
        &["ws", "cp", &local_path("single.txt"), &format!("{id}:renamed.txt")],
        None,
    );
    run(&["ws", "cp", &local_path("proj"), &format!("{id}:copy")], None);
    run(
        &["ws", "cp", &local_path("proj"), &format!("{id}:/workspace/copy")],
        None,
    );
    run(&["ws", "cp", &local_path("single.txt"), &format!("{id}:copy")], None);
    run(&["ws", "cp", "-", &format!("{id}:from-stdin.txt")], Some(b"piped\n"));
    let out = run(
        &[
            "ws",
            "exec",
            id,
            "--",
            "cd /workspace && find . -printf '%p %U %y\\n' | sort && cat renamed.txt from-stdin.txt && cmp copy/sub/big.bin copy/proj/sub/big.bin && echo same",
        ],
        None,
    );
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        out,
        ". 1000 d\n./copy 1000 d\n./copy/a.txt 1000 f\n./copy/link 1000 l\n./copy/proj 1000 d\n\
         ./copy/proj/a.txt 1000 f\n./copy/proj/link 1000 l\n./copy/proj/sub 1000 d\n\
         ./copy/proj/sub/big.bin 1000 f\n./copy/single.txt 1000 f\n./copy/sub 1000 d\n\
         ./copy/sub/big.bin 1000 f\n./from-stdin.txt 1000 f\n./renamed.txt 1000 f\n\
         single\npiped\nsame\n"
    );

    // Workspace -> host: a directory to a new path and into an existing one, a file, stdout.
    run(&["ws", "cp", &format!("{id}:copy"), &local_path("back")], None);
    run(&["ws", "cp", &format!("{id}:copy/sub"), &local_path("back")], None);
    run(&["ws", "cp", &format!("{id}:renamed.txt"), &local_path("back")], None);
    let back = local.path().join("back");
    assert!(std::fs::read(back.join("sub/big.bin")).unwrap() == big);
    assert!(std::fs::read(back.join("proj/sub/big.bin")).unwrap() == big);
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        std::path::Path::new("a.txt")
    );
    assert_eq!(std::fs::read_to_string(back.join("renamed.txt")).unwrap(), "single\n");
    // Set-id and sticky bits made in the workspace do not reach the host, nor does the
    // workspace user's ownership: the copy belongs to whoever ran `ws cp`.
    let out = run(
        &[
            "ws",
            "exec",
            id,
            "--",
            "mkdir -p /workspace/suid/sub && printf x > /workspace/suid/s && chmod 4755 /workspace/suid/s \
             && chmod 2775 /workspace/suid && chmod 1777 /workspace/suid/sub && stat -c '%a' /workspace/suid/s /workspace/suid",
        ],
        None,
    );
    assert_eq!(out, b"4755\n2775\n", "the bits are set in the workspace");
    run(&["ws", "cp", &format!("{id}:suid"), &local_path("suid-back")], None);
    run(&["ws", "cp", &format!("{id}:suid"), &local_path("back")], None);
    let me = nix::unistd::geteuid().as_raw();
    for dir in [local.path().join("suid-back"), back.join("suid")] {
        let mode = |p: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.mode() & 0o7777, m.uid())
        };
        assert_eq!(mode(&dir.join("s")), (0o755, me), "{}", dir.display());
        assert_eq!(mode(&dir), (0o775, me));
        assert_eq!(mode(&dir.join("sub")), (0o777, me));
        assert_eq!(std::fs::read(dir.join("s")).unwrap(), b"x");
    }
    // No temporary directory is left beside the copies.
    let mut left: Vec<String> = std::fs::read_dir(local.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["back", "proj", "single.txt", "suid-back"]);
    let out = run(&["ws", "cp", &format!("{id}:copy/a.txt"), "-"], None);
    assert_eq!(out, b"alpha\n");
    let out = run(&["ws", "cp", &format!("{id}:copy/sub"), "-"], None);
    let m = members(&out);
    assert_eq!(m[0].0, "sub/");

    // Errors are reported, not panicked on.
    let (ok, _, err) = env.cli(&["ws", "cp", &local_path("single.txt"), "/tmp/x"], None);
    assert!(!ok && err.contains("WORKSPACE:PATH"), "{err}");
    let (ok, _, err) = env.cli(&["ws", "cp", &local_path("single.txt"), &format!("{id}:../x")], None);
    assert!(!ok && err.contains("path"), "{err}");

    env.ok(&["ws", "rm", id, "--purge"], None);
    assert_eq!(env.leftovers(), "", "containers left behind");
}
