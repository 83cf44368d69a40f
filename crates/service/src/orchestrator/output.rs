//! A command's output on its way to the task log and the command's result: each stream is
//! decoded as UTF-8 without splitting characters across chunks, written to the task log
//! within the task's log budget, and captured up to its last [`MAX_CAPTURE`] bytes.

use conductor_core::engine::OutputChunk;
use tokio::sync::mpsc;

use crate::tasks::TaskLog;

/// Output of one command kept in its result (the end is kept; the log has everything).
const MAX_CAPTURE: usize = 1 << 20;
/// Log bytes stored per task; output beyond it is only counted.
const MAX_LOG_BYTES: usize = 16 << 20;

/// Streams a command's output into the task log (within the log budget) and returns the
/// captured stdout and stderr (their last [`MAX_CAPTURE`] bytes each).
pub(super) async fn collect_output(
    mut rx: mpsc::Receiver<OutputChunk>,
    log: &TaskLog,
    log_bytes: &mut usize,
) -> (String, String) {
    let mut out = Capture::default();
    let mut err = Capture::default();
    let (mut out_text, mut err_text) = (Utf8Stream::default(), Utf8Stream::default());
    let write = |stream: &str, text: String, log_bytes: &mut usize| {
        if text.is_empty() {
            return;
        }
        if *log_bytes >= MAX_LOG_BYTES {
            return;
        }
        *log_bytes += text.len();
        if let Err(error) = log.write(stream, &text) {
            tracing::warn!(%error, "cannot write the task log");
        }
        if *log_bytes >= MAX_LOG_BYTES {
            log.system(&format!(
                "log limit of {} MiB reached; further output is not logged (each command keeps the end of its own)",
                MAX_LOG_BYTES >> 20
            ));
        }
    };
    while let Some(chunk) = rx.recv().await {
        match chunk {
            OutputChunk::Stdout(b) => {
                out.push(&b);
                write("stdout", out_text.push(&b), log_bytes);
            }
            OutputChunk::Stderr(b) => {
                err.push(&b);
                write("stderr", err_text.push(&b), log_bytes);
            }
        }
    }
    write("stdout", out_text.finish(), log_bytes);
    write("stderr", err_text.finish(), log_bytes);
    (out.into_string(), err.into_string())
}

/// The end of a byte stream, at most [`MAX_CAPTURE`] bytes.
#[derive(Default)]
struct Capture {
    buf: Vec<u8>,
    dropped: u64,
}

impl Capture {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > 2 * MAX_CAPTURE {
            let cut = self.buf.len() - MAX_CAPTURE;
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    fn into_string(mut self) -> String {
        if self.buf.len() > MAX_CAPTURE {
            let cut = self.buf.len() - MAX_CAPTURE;
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        if self.dropped > 0 {
            format!("[... {} bytes not kept; see the task log ...]\n{text}", self.dropped)
        } else {
            text
        }
    }
}

/// Decodes a byte stream as UTF-8 chunk by chunk without splitting a character that
/// straddles two chunks (invalid bytes become U+FFFD).
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete character at the end: keep it for the next chunk.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => {
                // Invalid bytes somewhere: keep only a possibly incomplete tail.
                let tail = self.pending.len().saturating_sub(3);
                (tail..self.pending.len())
                    .find(|&i| std::str::from_utf8(&self.pending[i..]).is_err_and(|e| e.error_len().is_none()))
                    .map_or(0, |i| self.pending.len() - i)
            }
        };
        let rest = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_characters_split_across_chunks_survive() {
        let mut s = Utf8Stream::default();
        let bytes = "héllo ✓".as_bytes();
        let mut text = String::new();
        for b in bytes {
            text.push_str(&s.push(std::slice::from_ref(b)));
        }
        text.push_str(&s.finish());
        assert_eq!(text, "héllo ✓");
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(s.push(&[0xe2, 0x9c]), "");
        assert_eq!(s.push(&[0x93]), "✓");
    }

    #[test]
    fn captures_keep_the_end() {
        let mut c = Capture::default();
        c.push(b"start\n");
        c.push(&vec![b'x'; 2 * MAX_CAPTURE]);
        c.push(b"\nend\n");
        let s = c.into_string();
        assert!(s.starts_with("[... "), "{}", &s[..40]);
        assert!(s.ends_with("x\nend\n"));
        assert!(s.len() < MAX_CAPTURE + 100);
        let mut small = Capture::default();
        small.push(b"ok\n");
        assert_eq!(small.into_string(), "ok\n");
    }
}
