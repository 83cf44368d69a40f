//! Adapters between async byte streams ([`ByteStream`]) and what the file paths need:
//! blocking `Read`/`Write` for the tar crate, which runs on blocking threads, in-memory
//! bytes, a size limit, a spool file, and the first member of a tar.
//!
//! Nothing here holds a stream whole in memory: data moves in chunks of [`CHUNK`] bytes
//! through channels of a few chunks, so a slow consumer slows the producer down. The
//! blocking ends ([`blocking_reader`], the writer handed to [`writer_stream`]) may only be
//! used on blocking threads (`spawn_blocking`), never on the runtime's own.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use conductor_agent_protocol::{TarGuard, CHUNK};
use conductor_core::engine::ByteStream;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Result, ServiceError};

/// A stream of `data`, in one chunk.
pub fn from_bytes(data: impl Into<Bytes>) -> ByteStream {
    let data = data.into();
    Box::pin(futures_util::stream::once(async move { Ok(data) }))
}

/// The first `limit` bytes of `stream` (fewer when it ends before); the rest is not read.
pub async fn read_prefix(mut stream: ByteStream, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < limit {
        match stream.next().await {
            Some(chunk) => {
                let chunk = chunk?;
                out.extend_from_slice(&chunk[..chunk.len().min(limit - out.len())]);
            }
            None => break,
        }
    }
    Ok(out)
}

/// A stream of the bytes `reader` yields, read on a blocking thread in chunks.
pub fn reader_stream(mut reader: impl Read + Send + 'static) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let item = match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    Box::pin(receiver_stream(rx))
}

/// A stream of what `produce` writes, run on a blocking thread; its error ends the stream.
pub fn writer_stream<F>(produce: F) -> ByteStream
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
{
    piped(move |out| {
        produce(out)?;
        out.flush()
    })
    .0
}

/// A stream of what `produce` writes on a blocking thread, and the handle of its result.
/// An error of `produce` also ends the stream, with its message. `produce` flushes what it
/// wrote last (the writer sends in chunks of [`CHUNK`] bytes).
pub(crate) fn piped<T, E, F>(produce: F) -> (ByteStream, JoinHandle<std::result::Result<T, E>>)
where
    F: FnOnce(&mut dyn Write) -> std::result::Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let handle = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter::new(tx.clone());
        let result = produce(&mut out);
        if let Err(e) = &result {
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
        result
    });
    (Box::pin(receiver_stream(rx)), handle)
}

/// A blocking reader of `stream` (polled by a task on the runtime); for use on a blocking
/// thread only.
pub fn blocking_reader(mut stream: ByteStream) -> impl Read + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    ChannelReader { rx, cur: Bytes::new() }
}

/// The contents of the first member of the tar `archive` (a file's tar from Podman),
/// unwrapped on a blocking thread; the tar is read through a [`TarGuard`].
pub(crate) fn first_member(archive: ByteStream) -> ByteStream {
    let input = blocking_reader(archive);
    piped(move |out| {
        let mut ar = tar::Archive::new(TarGuard::new(input));
        let mut entry = ar
            .entries()?
            .next()
            .ok_or_else(|| io::Error::other("the archive is empty"))??;
        io::copy(&mut entry, out)?;
        out.flush()
    })
    .0
}

/// Counts what passes and ends the stream with an error past `limit` bytes; `over` tells
/// afterwards why it ended.
pub(crate) fn limited(body: ByteStream, limit: u64, over: Arc<AtomicBool>) -> ByteStream {
    let mut seen = 0u64;
    Box::pin(body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit {
            over.store(true, Ordering::Relaxed);
            return Err(io::Error::other("the upload exceeds the storage limit"));
        }
        Ok(chunk)
    }))
}

/// Writes the body to an unnamed temporary file under `dir`; returns its size and a
/// stream of it.
pub(crate) async fn spool(mut body: ByteStream, dir: &std::path::Path) -> Result<(u64, ByteStream)> {
    use tokio::io::AsyncWriteExt;
    let file = tempfile::tempfile_in(dir).map_err(|e| ServiceError::host("create a spool file", e))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ServiceError::host("read the upload", e))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| ServiceError::host("write the spool file", e))?;
        size += chunk.len() as u64;
    }
    file.flush()
        .await
        .map_err(|e| ServiceError::host("write the spool file", e))?;
    let mut file = file.into_std().await;
    io::Seek::rewind(&mut file).map_err(|e| ServiceError::host("rewind the spool file", e))?;
    Ok((size, reader_stream(file)))
}

struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Sends what is written to it in chunks of [`CHUNK`] bytes; for blocking threads only.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader of the stream is gone"))
    }
}

/// The items of `rx` as a stream.
fn receiver_stream(rx: mpsc::Receiver<io::Result<Bytes>>) -> impl futures_util::Stream<Item = io::Result<Bytes>> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap()
    }

    #[test]
    fn uploads_past_the_limit_end_the_stream() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let over = Arc::new(AtomicBool::new(false));
        let body: ByteStream = Box::pin(futures_util::stream::iter(
            (0..3).map(|_| Ok(Bytes::from_static(&[0u8; 10]))),
        ));
        let items: Vec<io::Result<Bytes>> = rt.block_on(limited(body, 25, over.clone()).collect());
        assert!(items[0].is_ok() && items[1].is_ok() && items[2].is_err());
        assert!(over.load(Ordering::Relaxed));
    }

    #[test]
    fn blocking_and_async_ends_pass_everything_and_errors() {
        let data: Vec<u8> = (0..(3 * CHUNK + 17) as u32).map(|i| (i % 251) as u8).collect();
        runtime().block_on(async move {
            let copy = data.clone();
            let mut reader = blocking_reader(writer_stream(move |out| out.write_all(&copy)));
            let back = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                reader.read_to_end(&mut out).map(|_| out)
            })
            .await
            .unwrap();
            assert!(back.unwrap() == data);
            let prefix = read_prefix(reader_stream(io::Cursor::new(data.clone())), 100).await;
            assert_eq!(prefix.unwrap(), &data[..100]);
            // An error of the producer ends the stream with its message; its result says so too.
            let (stream, handle) = piped(|out| {
                out.write_all(b"abc")?;
                out.flush()?;
                Err::<(), io::Error>(io::Error::other("broken tar"))
            });
            let items: Vec<io::Result<Bytes>> = stream.collect().await;
            assert_eq!(items[0].as_ref().unwrap(), &b"abc"[..]);
            assert!(items[1].as_ref().unwrap_err().to_string().contains("broken tar"));
            assert!(handle.await.unwrap().is_err());
        });
    }

    #[test]
    fn the_first_member_of_a_tar_is_unwrapped() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "f.txt", &b"hello"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        runtime().block_on(async move {
            let got = read_prefix(first_member(from_bytes(tar)), 1 << 20).await;
            assert_eq!(got.unwrap(), b"hello");
            let got = read_prefix(first_member(from_bytes(vec![0u8; 1024])), 1 << 20).await;
            assert!(got.unwrap_err().to_string().contains("empty"));
        });
    }
}
