//! Files in and out of containers through Podman's archive endpoints
//! (`PUT`/`GET /containers/{id}/archive`): tar streams, never buffered whole.
//!
//! Podman resolves a path on a bind mount (such as `/workspace`) beneath the mount's host
//! directory and unpacks chrooted into it, so a symlink in the tree cannot lead outside the
//! mount. With `copyUIDGID`, unpacked members belong to the container's user.

use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use bollard::Docker;
use bytes::Bytes;
use conductor_core::engine::{ByteStream, EngineResult};
use futures_util::{StreamExt, TryStreamExt};

use crate::error::api_error;

pub(crate) async fn copy_in(docker: &Docker, id: &str, dir: &str, archive: ByteStream) -> EngineResult<()> {
    let options = UploadToContainerOptions {
        path: dir.to_string(),
        // A directory never replaces a file nor the other way round.
        no_overwrite_dir_non_dir: Some("true".into()),
        copy_uidgid: Some("true".into()),
    };
    docker
        .upload_to_container(id, Some(options), bollard::body_try_stream(archive))
        .await
        .map_err(|e| {
            api_error(
                format!("copy into '{dir}' of container '{id}'"),
                Some(&format!("'{dir}' in container '{id}'")),
                e,
            )
        })
}

pub(crate) async fn copy_out(docker: &Docker, id: &str, path: &str) -> EngineResult<ByteStream> {
    let options = DownloadFromContainerOptions { path: path.to_string() };
    let mut stream = docker.download_from_container(id, Some(options));
    // The first chunk (or error) tells a missing path from a running download.
    let first: Bytes = match stream.next().await {
        None => Bytes::new(),
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            return Err(api_error(
                format!("copy '{path}' out of container '{id}'"),
                Some(&format!("'{path}' in container '{id}'")),
                e,
            ))
        }
    };
    let rest = stream.map_err(std::io::Error::other);
    Ok(Box::pin(
        futures_util::stream::once(async move { Ok(first) }).chain(rest),
    ))
}
