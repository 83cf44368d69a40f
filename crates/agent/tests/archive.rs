//! The agent binary on the host: `mkdir`, `archive` and `extract` (tar streams), with the
//! member checks that keep an extract beneath the root.

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{error_code, Agent, Client};
use conductor_agent_protocol::{ErrorCode, Request, Response, FEATURE_ARCHIVE};

/// A serving agent that announces the archive requests.
fn serve() -> Agent {
    Agent::start("serve").needing(FEATURE_ARCHIVE)
}

impl Agent {
    fn outside(&self) -> &Path {
        self.dir.path()
    }
}

impl Client {
    /// The tar of `path`, or the error.
    fn archive(&mut self, path: &str) -> Result<Vec<u8>, (ErrorCode, String)> {
        self.send(&Request::Archive { path: path.into() }, b"");
        let mut out = Vec::new();
        loop {
            match self.recv() {
                (Response::Data, d) => out.extend(d),
                (Response::Eof { size }, _) => {
                    assert_eq!(size, out.len() as u64);
                    return Ok(out);
                }
                (Response::Error { code, message }, _) => return Err((code, message)),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Sends a tar to `extract` in small frames; the answer.
    fn extract(&mut self, path: &str, tar: &[u8]) -> Response {
        self.send(&Request::Extract { path: path.into() }, b"");
        for chunk in tar.chunks(1000) {
            self.send(&Request::Data, chunk);
        }
        self.send(&Request::Eof, b"");
        self.recv().0
    }
}

fn error_message(r: &Response) -> String {
    match r {
        Response::Error { message, .. } => message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// (name, kind, contents or link target, mode) of every member.
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

/// A header named `name` (raw bytes, no checks: for names the tar crate refuses to write).
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_cksum();
    h
}

fn tar_of(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (h, data) in entries {
        b.append(h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn archive_streams_files_and_trees_without_following_links_below_the_top() {
    let agent = serve();
    let root = &agent.root;
    std::fs::create_dir_all(root.join("src/sub")).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("src/big.bin"), &big).unwrap();
    std::fs::write(root.join("src/sub/b.txt"), b"bee").unwrap();
    std::fs::set_permissions(root.join("src/sub/b.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("src/etc-link")).unwrap();
    std::os::unix::fs::symlink("src", root.join("src-link")).unwrap();
    let mut c = agent.connect();

    let tar = c.archive("src").unwrap();
    let m = members(&tar);
    let names: Vec<&str> = m.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        ["src/", "src/big.bin", "src/etc-link", "src/sub/", "src/sub/b.txt"]
    );
    assert_eq!(m[1].2, big);
    assert_eq!((m[2].1, m[2].2.as_slice()), (tar::EntryType::Symlink, &b"/etc"[..]));
    assert_eq!((m[4].2.as_slice(), m[4].3), (&b"bee"[..], 0o600));

    // One file: one member named after it. The top is followed while it stays inside.
    let m = members(&c.archive("src/sub/b.txt").unwrap());
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].0.as_str(), m[0].2.as_slice()), ("b.txt", &b"bee"[..]));
    let m = members(&c.archive("src-link").unwrap());
    assert_eq!(m[0].0, "src-link/");
    assert_eq!(m.len(), 5);
    // The root itself is named after its directory.
    let m = members(&c.archive(".").unwrap());
    assert_eq!(m[0].0, "root/");

    // Refused: links leading outside, missing paths, bad paths.
    assert_eq!(c.archive("src/etc-link").unwrap_err().0, ErrorCode::OutsideRoot);
    assert_eq!(c.archive("src/etc-link/passwd").unwrap_err().0, ErrorCode::OutsideRoot);
    assert_eq!(c.archive("nope").unwrap_err().0, ErrorCode::NotFound);
    assert_eq!(c.archive("../x").unwrap_err().0, ErrorCode::InvalidPath);
    // The connection stays usable.
    assert!(matches!(c.op(Request::Stat { path: "src".into() }), Response::Stat(_)));
}

#[test]
fn extract_unpacks_files_dirs_and_links_as_the_agent_user_without_set_id_bits() {
    let agent = serve();
    let mut c = agent.connect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o750);
    h.set_size(0);
    b.append_data(&mut h, "proj/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o4755);
    h.set_size(4);
    h.set_mtime(1_000_000_000);
    b.append_data(&mut h, "proj/run.sh", &b"#!x\n"[..]).unwrap();
    let long = format!("proj/{}/deep.txt", "d".repeat(200));
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(2);
    b.append_data(&mut h, &long, &b"ok"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "proj/link", "run.sh").unwrap();
    let tar = b.into_inner().unwrap();

    // The target directory is made with mkdir first (extract needs it to exist).
    assert_eq!(
        error_code(&c.extract("dest", &tar)),
        ErrorCode::NotFound,
        "extract into a missing directory"
    );
    let r = c.op(Request::Mkdir {
        path: "dest/inner".into(),
        mode: None,
        parents: true,
    });
    assert!(matches!(r, Response::Done { .. }), "{r:?}");
    let r = c.extract("dest/inner", &tar);
    assert_eq!(r, Response::Done { size: 6 });

    let base = agent.root.join("dest/inner/proj");
    let meta = std::fs::metadata(base.join("run.sh")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755, "set-uid dropped");
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());
    assert_eq!(meta.mtime(), 1_000_000_000);
    assert_eq!(std::fs::read(base.join("run.sh")).unwrap(), b"#!x\n");
    assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::read_link(base.join("link")).unwrap(), Path::new("run.sh"));
    assert_eq!(std::fs::read(agent.root.join("dest/inner").join(&long)).unwrap(), b"ok");

    // Extracting again replaces files and links (never writes through them).
    std::fs::remove_file(base.join("run.sh")).unwrap();
    std::os::unix::fs::symlink(agent.outside().join("victim"), base.join("run.sh")).unwrap();
    assert_eq!(c.extract("dest/inner", &tar), Response::Done { size: 6 });
    assert!(!agent.outside().join("victim").exists());
    assert!(std::fs::symlink_metadata(base.join("run.sh")).unwrap().is_file());

    // mkdir over a file.
    let r = c.op(Request::Mkdir {
        path: "dest/inner/proj/run.sh".into(),
        mode: None,
        parents: false,
    });
    assert_eq!(error_code(&r), ErrorCode::NotADirectory);
}

#[test]
fn extract_refuses_members_that_would_leave_the_root_and_names_them() {
    let agent = serve();
    let mut c = agent.connect();
    let outside = agent.outside();
    let file = |name: &[u8]| raw_header(name, tar::EntryType::Regular, 3, 0o644);

    for (name, why) in [
        (&b"../escape.txt"[..], ".."),
        (b"a/../../escape.txt", ".."),
        (b"/tmp/escape.txt", "absolute"),
    ] {
        let tar = tar_of(&[(file(name), b"bad")]);
        let r = c.extract(".", &tar);
        assert_eq!(error_code(&r), ErrorCode::InvalidArchive, "{r:?}");
        let m = error_message(&r);
        assert!(m.contains(&*String::from_utf8_lossy(name)) && m.contains(why), "{m}");
    }
    assert!(!outside.join("escape.txt").exists());

    // A symlink member leading outside, then a member through it.
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_link_name(outside).unwrap();
    link.set_path("evil").unwrap();
    link.set_cksum();
    let tar = tar_of(&[(link, b""), (file(b"evil/escape.txt"), b"bad")]);
    let r = c.extract(".", &tar);
    assert_eq!(error_code(&r), ErrorCode::OutsideRoot, "{r:?}");
    assert!(error_message(&r).contains("evil/escape.txt"), "{r:?}");
    assert!(!outside.join("escape.txt").exists());
    // A link already in the root, relative this time.
    std::os::unix::fs::symlink("..", agent.root.join("up")).unwrap();
    let r = c.extract(".", &tar_of(&[(file(b"up/escape.txt"), b"bad")]));
    assert_eq!(error_code(&r), ErrorCode::OutsideRoot, "{r:?}");
    assert!(!outside.join("escape.txt").exists());
    // The target itself through a link outside.
    let r = c.extract("evil", &tar_of(&[(file(b"x"), b"bad")]));
    assert_eq!(error_code(&r), ErrorCode::OutsideRoot, "{r:?}");

    // Hard links, FIFOs and devices are refused by member name.
    let mut hard = raw_header(b"hard", tar::EntryType::Link, 0, 0o644);
    hard.set_link_name("/etc/passwd").unwrap();
    hard.set_cksum();
    for (h, what) in [
        (hard, "hard links"),
        (raw_header(b"fifo", tar::EntryType::Fifo, 0, 0o644), "Fifo"),
        (raw_header(b"dev", tar::EntryType::Char, 0, 0o644), "Char"),
    ] {
        let name = String::from_utf8_lossy(h.path_bytes().as_ref()).into_owned();
        let r = c.extract(".", &tar_of(&[(h, b"")]));
        assert_eq!(error_code(&r), ErrorCode::InvalidArchive, "{r:?}");
        let m = error_message(&r);
        assert!(m.contains(&name) && m.contains(what), "{m}");
    }
    // Not a tar at all.
    let r = c.extract(".", &[7u8; 2000]);
    assert_eq!(error_code(&r), ErrorCode::InvalidArchive, "{r:?}");

    // After all that the connection is in step and the root holds only what was made.
    assert!(matches!(c.op(Request::Stat { path: ".".into() }), Response::Stat(_)));
    let mut left: Vec<String> = std::fs::read_dir(&agent.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["evil", "up"]);
}

#[test]
fn a_failed_write_is_answered_at_once_and_the_connection_stays_in_step() {
    let agent = serve();
    std::fs::create_dir(agent.root.join("d")).unwrap();
    let mut c = agent.connect();
    c.send(
        &Request::Write {
            path: "d".into(),
            mode: None,
            append: false,
            create_dirs: false,
        },
        b"",
    );
    // The error comes before the contents are sent.
    let r = c.recv().0;
    assert_eq!(error_code(&r), ErrorCode::IsADirectory);
    c.send(&Request::Data, &[1u8; 5000]);
    c.send(&Request::Eof, b"");
    assert!(matches!(c.op(Request::Stat { path: "d".into() }), Response::Stat(_)));
}

#[test]
fn extract_refuses_oversized_long_name_and_pax_entries_without_buffering_them() {
    let agent = serve();
    let mut c = agent.connect();
    for kind in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
        // A header announcing 1 GiB of extension data, then 4 MiB of it: refused at the
        // header (the tar crate would otherwise read it all into memory).
        let mut tar = raw_header(b"././@LongLink", kind, 1 << 30, 0o644).as_bytes().to_vec();
        tar.extend(std::iter::repeat_n(b'a', 4 << 20));
        let r = c.extract(".", &tar);
        assert_eq!(error_code(&r), ErrorCode::InvalidArchive, "{kind:?}: {r:?}");
        let m = error_message(&r);
        assert!(m.contains("64 KiB") && m.contains("1073741824"), "{m}");
    }
    // Long names within the limit are fine; the connection stayed in step.
    let long = format!("top/{}/{}.txt", "n".repeat(250), "m".repeat(250));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(2);
    b.append_data(&mut h, &long, &b"ok"[..]).unwrap();
    let r = c.extract(".", &b.into_inner().unwrap());
    assert!(matches!(r, Response::Done { size: 2 }), "{r:?}");
    assert_eq!(std::fs::read(agent.root.join(&long)).unwrap(), b"ok");
}
