//! The socket server: one thread per connection, requests one at a time per connection.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use conductor_agent_protocol::{ErrorCode, Request, Response, FEATURE_ARCHIVE, FEATURE_SESSIONS, VERSION};
use nix::sys::stat::{umask, Mode};

use crate::conn::Conn;
use crate::{archive, exec, files, session, Options};

/// Stack of connection threads: they only shuffle buffers.
const STACK: usize = 256 << 10;

/// Binds the socket (replacing a stale one from a previous start) and serves forever.
pub fn run(opts: &Options) -> io::Result<()> {
    let listener = bind(&opts.socket)?;
    session::set_dir(opts.socket.with_file_name("sessions"));
    serve(listener, opts.root.clone())
}

/// Binds `path`, reachable by the owner only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let old = umask(Mode::from_bits_truncate(0o077));
    let listener = UnixListener::bind(path);
    umask(old);
    listener
}

/// Accepts connections until the listener fails.
pub fn serve(listener: UnixListener, root: std::path::PathBuf) -> io::Result<()> {
    let root = Arc::new(root);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("conductor-agent: accept failed: {e}");
                continue;
            }
        };
        let root = root.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(STACK)
            .spawn(move || {
                // A client that goes away is not an error worth reporting.
                let _ = handle(stream, &root);
            });
        if let Err(e) = spawned {
            eprintln!("conductor-agent: cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

fn handle(stream: UnixStream, root: &Path) -> io::Result<()> {
    let mut conn = Conn::new(stream);
    match conn.recv()? {
        Some(Ok((Request::Hello { version }, _))) if version == VERSION => {
            let hello = Response::Hello {
                version: VERSION,
                agent: format!("conductor-agent {}", env!("CARGO_PKG_VERSION")),
                pid: std::process::id(),
                features: vec![FEATURE_ARCHIVE.to_string(), FEATURE_SESSIONS.to_string()],
            };
            conn.send(&hello, &[])?;
        }
        Some(Ok((Request::Hello { version }, _))) => {
            return conn.send_error(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this agent speaks {VERSION}"),
            );
        }
        Some(Ok(_)) => return conn.send_error(ErrorCode::Protocol, "the first message must be hello"),
        Some(Err(m)) => return conn.send_error(ErrorCode::Protocol, m.0),
        None => return Ok(()),
    }
    loop {
        let (req, _data) = match conn.recv()? {
            Some(Ok(f)) => f,
            Some(Err(m)) => return conn.send_error(ErrorCode::Protocol, m.0),
            None => return Ok(()),
        };
        match req {
            Request::Exec(e) => exec::run(&mut conn, e)?,
            Request::Write {
                path,
                mode,
                append,
                create_dirs,
            } => files::write(&mut conn, root, &path, mode, append, create_dirs)?,
            Request::Read { path } => files::read(&mut conn, root, &path)?,
            Request::List { path } => files::list(&mut conn, root, &path)?,
            Request::Stat { path } => files::stat(&mut conn, root, &path)?,
            Request::Delete { path, recursive } => files::delete(&mut conn, root, &path, recursive)?,
            Request::Mkdir { path, mode, parents } => files::mkdir(&mut conn, root, &path, mode, parents)?,
            Request::Archive { path } => archive::archive(&mut conn, root, &path)?,
            Request::Extract { path } => archive::extract(&mut conn, root, &path)?,
            Request::EndSession { session } => session::end(&mut conn, &session)?,
            // Left over from a command that ended before they were read (stdin it never
            // read, a cancel that crossed its exit): nothing to do.
            Request::Data | Request::Eof | Request::Cancel => {}
            Request::Hello { .. } => {
                return conn.send_error(ErrorCode::Protocol, "hello may only be sent once");
            }
        }
    }
}
