//! Bounded capture of command output for tool results.
//!
//! A tool result goes into a model's context, so a command that prints megabytes must not
//! be returned whole (nor held whole in memory). [`Tail`] keeps the last bytes of a stream
//! while counting all of them; [`Tail::finish`] turns them into text that says how much was
//! left out. The end of the output is what matters most for a failing build or test run.

/// What a tool result keeps of each of stdout and stderr.
pub const KEEP_BYTES: usize = 64 * 1024;

/// The end of a byte stream: at most `limit` bytes, plus the count of all bytes seen.
#[derive(Debug)]
pub struct Tail {
    buf: Vec<u8>,
    total: u64,
    limit: usize,
}

/// A finished [`Tail`]: the kept text and how many bytes came before it.
#[derive(Debug, PartialEq, Eq)]
pub struct Kept {
    pub text: String,
    pub total: u64,
    pub dropped: u64,
}

impl Tail {
    pub fn new(limit: usize) -> Self {
        Tail {
            buf: Vec::new(),
            total: 0,
            limit,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
        // Trim in batches so that many small chunks do not move the buffer each time.
        if self.buf.len() > 2 * self.limit.max(4096) {
            let cut = self.buf.len() - self.limit;
            self.buf.drain(..cut);
        }
    }

    /// All kept bytes (for callers that bounded the output themselves).
    pub fn into_bytes(self) -> (Vec<u8>, u64) {
        (self.buf, self.total)
    }

    /// The last `limit` bytes as text. A cut through a multi-byte character drops its
    /// remaining bytes rather than showing a replacement character; invalid UTF-8 elsewhere
    /// is replaced.
    pub fn finish(mut self) -> Kept {
        if self.buf.len() > self.limit {
            let cut = self.buf.len() - self.limit;
            self.buf.drain(..cut);
        }
        let mut start = 0;
        let dropped_before = self.total - self.buf.len() as u64;
        if dropped_before > 0 {
            while start < self.buf.len().min(3) && (self.buf[start] & 0b1100_0000) == 0b1000_0000 {
                start += 1;
            }
        }
        Kept {
            text: String::from_utf8_lossy(&self.buf[start..]).into_owned(),
            total: self.total,
            dropped: dropped_before + start as u64,
        }
    }
}

impl Kept {
    /// The text under a `name:` heading, with a note when the start was cut off.
    pub fn render(&self, name: &str) -> String {
        if self.total == 0 {
            return format!("{name}: (empty)\n");
        }
        let mut out = format!("{name}:\n");
        if self.dropped > 0 {
            out.push_str(&format!(
                "[{name} truncated: the first {} of {} bytes are not shown, only the last {} bytes; \
                 redirect the output to a file and search it with grep/head/tail to see more]\n",
                self.dropped,
                self.total,
                self.total - self.dropped
            ));
        }
        out.push_str(&self.text);
        if !self.text.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_kept_whole() {
        let mut t = Tail::new(16);
        t.push(b"hello ");
        t.push(b"world\n");
        let k = t.finish();
        assert_eq!(
            k,
            Kept {
                text: "hello world\n".into(),
                total: 12,
                dropped: 0
            }
        );
        assert_eq!(k.render("stdout"), "stdout:\nhello world\n");
    }

    #[test]
    fn long_output_keeps_the_end_and_says_so() {
        let mut t = Tail::new(10);
        for i in 0..10_000 {
            t.push(format!("{}\n", i % 10).as_bytes());
        }
        let k = t.finish();
        assert_eq!(k.total, 20_000);
        assert_eq!(k.dropped, 19_990);
        assert_eq!(k.text, "5\n6\n7\n8\n9\n");
        let shown = k.render("stderr");
        assert!(
            shown.starts_with("stderr:\n[stderr truncated: the first 19990 of 20000 bytes"),
            "{shown}"
        );
        assert!(shown.ends_with("8\n9\n"), "{shown}");
    }

    #[test]
    fn a_cut_through_a_character_drops_its_tail_bytes() {
        let mut t = Tail::new(4);
        t.push("aé€".as_bytes()); // 1 + 2 + 3 bytes; the last 4 are é's second byte and €.
        let k = t.finish();
        assert_eq!(k.text, "€");
        assert_eq!(k.dropped, 3);
    }

    #[test]
    fn empty_output_is_named_empty() {
        assert_eq!(Tail::new(8).finish().render("stdout"), "stdout: (empty)\n");
    }
}
