//! A command's output pipes in the poll loops of [`crate::exec`] and [`crate::session`]:
//! one `poll` over the pipes still open and the loop's other descriptors, and the
//! forwarding of what a ready pipe holds as a `stdout` or `stderr` frame.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{ChildStderr, ChildStdout};
use std::time::Instant;

use conductor_agent_protocol::Response;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::conn::Conn;

/// A command's stdout and stderr; each `None` once it reached its end.
pub(crate) struct Output {
    pub out: Option<ChildStdout>,
    pub err: Option<ChildStderr>,
}

/// One of the two output pipes.
#[derive(Clone, Copy)]
pub(crate) enum Pipe {
    Stdout,
    Stderr,
}

/// What a poll found ready, in the order to handle it.
#[derive(Clone, Copy)]
pub(crate) enum Ready<T> {
    Pipe(Pipe),
    /// One of the other descriptors, by its tag.
    Other(T),
}

impl Output {
    /// Whether both pipes reached their end.
    pub fn closed(&self) -> bool {
        self.out.is_none() && self.err.is_none()
    }

    /// Polls for input on the pipes still open, then on `others` (each with its tag), for at
    /// most `timeout`; what is ready in that order, nothing when the timeout passed first.
    pub fn poll<T: Copy>(&self, others: &[(BorrowedFd<'_>, T)], timeout: PollTimeout) -> nix::Result<Vec<Ready<T>>> {
        let mut fds = Vec::with_capacity(2 + others.len());
        let mut which = Vec::with_capacity(2 + others.len());
        if let Some(o) = &self.out {
            fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
            which.push(Ready::Pipe(Pipe::Stdout));
        }
        if let Some(e) = &self.err {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
            which.push(Ready::Pipe(Pipe::Stderr));
        }
        for (fd, tag) in others {
            fds.push(PollFd::new(*fd, PollFlags::POLLIN));
            which.push(Ready::Other(*tag));
        }
        if poll(&mut fds, timeout)? == 0 {
            return Ok(Vec::new());
        }
        Ok(fds
            .iter()
            .zip(which)
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| w)
            .collect())
    }

    /// Reads once from `pipe` (found ready by [`Output::poll`]) into `buf` and sends what
    /// came to the client in a frame of its kind. At the pipe's end, or on a read error, the
    /// pipe is dropped; an interrupted read does nothing (the next poll finds the pipe ready
    /// again). An error only when sending failed.
    pub fn forward(&mut self, pipe: Pipe, buf: &mut [u8], conn: &mut Conn) -> io::Result<()> {
        let (reader, msg): (&mut dyn Read, _) = match pipe {
            Pipe::Stdout => (self.out.as_mut().expect("polled"), Response::Stdout),
            Pipe::Stderr => (self.err.as_mut().expect("polled"), Response::Stderr),
        };
        let got = match reader.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(_) => 0,
        };
        if got > 0 {
            return conn.send(&msg, &buf[..got]);
        }
        match pipe {
            Pipe::Stdout => self.out = None,
            Pipe::Stderr => self.err = None,
        }
        Ok(())
    }
}

/// A poll timeout that ends just after `t` (at most a minute: the loop then polls again).
pub(crate) fn timeout_until(t: Instant, now: Instant) -> PollTimeout {
    let left = t.saturating_duration_since(now).as_millis() + 1;
    PollTimeout::try_from(left.min(60_000)).unwrap_or(PollTimeout::NONE)
}
