//! One client connection: frame reading and writing over a Unix stream.
//!
//! Writes block (so a slow reader slows the command's output down instead of filling the
//! agent's memory). Reads go through a buffer filled by single `read` calls, which lets the
//! exec loop read only when `poll` says the socket is readable and never block there.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use conductor_agent_protocol::{encode, parse_prefix, ErrorCode, Request, Response};

pub struct Conn {
    pub stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

/// A request that could not be decoded: the connection must close.
#[derive(Debug)]
pub struct Malformed(pub String);

/// A decoded frame: the message and its data.
pub type Frame = (Request, Vec<u8>);

impl Conn {
    pub fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            rbuf: Vec::with_capacity(8 << 10),
            wbuf: Vec::with_capacity(8 << 10),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, msg: &Response, data: &[u8]) -> io::Result<()> {
        self.wbuf.clear();
        encode(msg, data, &mut self.wbuf);
        self.stream.write_all(&self.wbuf)
    }

    pub fn send_error(&mut self, code: ErrorCode, message: impl Into<String>) -> io::Result<()> {
        self.send(
            &Response::Error {
                code,
                message: message.into(),
            },
            &[],
        )
    }

    /// One `read` into the buffer; returns the bytes read (0 at end of stream).
    pub fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 << 10];
        let n = self.stream.read(&mut chunk)?;
        self.rbuf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Takes one complete frame out of the buffer, if there is one.
    pub fn take_frame(&mut self) -> Result<Option<Frame>, Malformed> {
        if self.rbuf.len() < 8 {
            return Ok(None);
        }
        let prefix: [u8; 8] = self.rbuf[..8].try_into().expect("8 bytes");
        let (h, d) = parse_prefix(&prefix).map_err(|e| Malformed(e.0))?;
        if self.rbuf.len() < 8 + h + d {
            return Ok(None);
        }
        let req: Request =
            serde_json::from_slice(&self.rbuf[8..8 + h]).map_err(|e| Malformed(format!("bad request header: {e}")))?;
        let data = self.rbuf[8 + h..8 + h + d].to_vec();
        self.rbuf.drain(..8 + h + d);
        Ok(Some((req, data)))
    }

    /// Blocks for the next frame; `Ok(None)` at a clean end of stream.
    pub fn recv(&mut self) -> io::Result<Option<Result<Frame, Malformed>>> {
        loop {
            match self.take_frame() {
                Ok(Some(f)) => return Ok(Some(Ok(f))),
                Ok(None) => {}
                Err(m) => return Ok(Some(Err(m))),
            }
            if self.read_more()? == 0 {
                return Ok(None);
            }
        }
    }
}
