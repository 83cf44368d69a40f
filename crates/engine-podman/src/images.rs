//! Images: inspect, pull, build from a Containerfile, import a root file system, commit a
//! container, remove.
//!
//! Builds go through `POST /build` with a tar context made in memory. Their output is
//! passed line by line to the progress sink, and only the last [`LOG_TAIL_LINES`] lines are
//! kept for the error, so a chatty build costs no memory. Podman 4.3 quirks handled here:
//! `POST /images/create?fromSrc=-` ignores `tag` (the tag must be part of `repo`), and
//! `POST /commit` ignores the `Labels` of the body (labels go in as `LABEL` changes).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use bollard::models::ContainerConfig;
use bollard::query_parameters::{
    BuildImageOptions, CommitContainerOptions, CreateImageOptions, ListImagesOptions, RemoveImageOptions,
    TagImageOptions,
};
use bollard::{body_full, body_try_stream, Docker};
use bytes::Bytes;
use conductor_core::engine::{BuildSpec, EngineError, EngineResult, ImageInfo, Labels, Progress, ProgressSink};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use crate::error::api_error;

/// Lines of build output quoted by a build failure.
const LOG_TAIL_LINES: usize = 20;
/// Read size when streaming a root file system tarball to Podman.
const IMPORT_CHUNK: usize = 256 * 1024;

fn object(reference: &str) -> String {
    format!("image '{reference}'")
}

pub(crate) async fn inspect(docker: &Docker, reference: &str) -> EngineResult<Option<ImageInfo>> {
    match docker.inspect_image(reference).await {
        Ok(image) => Ok(Some(ImageInfo {
            id: image.id.unwrap_or_default(),
            size_bytes: image.size.and_then(|size| u64::try_from(size).ok()).unwrap_or(0),
            labels: image
                .config
                .and_then(|config| config.labels)
                .unwrap_or_default()
                .into_iter()
                .collect(),
        })),
        Err(e) => match api_error(format!("inspect image '{reference}'"), Some(&object(reference)), e) {
            EngineError::NotFound { .. } => Ok(None),
            other => Err(other),
        },
    }
}

/// Inspects an image that an operation `op` has just made.
async fn inspect_made(docker: &Docker, reference: &str, op: &str) -> EngineResult<ImageInfo> {
    inspect(docker, reference).await?.ok_or_else(|| {
        EngineError::failed(
            op,
            format!("Podman reported success but image '{reference}' does not exist"),
        )
    })
}

pub(crate) async fn pull(docker: &Docker, reference: &str, progress: ProgressSink) -> EngineResult<ImageInfo> {
    let op = format!("pull image '{reference}'");
    let options = CreateImageOptions {
        from_image: Some(reference.to_string()),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| api_error(&op, None, e))?;
        let line = [info.id, info.status]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        if !line.is_empty() {
            progress(Progress::Line(line));
        }
    }
    inspect_made(docker, reference, &op).await
}

/// Parses "STEP 3/7: RUN apt-get …" into a [`Progress::Step`].
fn parse_step(line: &str) -> Option<Progress> {
    let rest = line.strip_prefix("STEP ")?;
    let (numbers, text) = rest.split_once(": ")?;
    let (index, total) = numbers.split_once('/')?;
    Some(Progress::Step {
        index: index.parse().ok()?,
        total: total.parse().ok()?,
        text: text.to_string(),
    })
}

/// The tar build context: the Containerfile as `Dockerfile` plus the extra files.
fn build_context(spec: &BuildSpec) -> std::io::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: &str, content: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut header, path, content)
    };
    add("Dockerfile", spec.containerfile.as_bytes(), 0o644)?;
    for (path, content, mode) in &spec.context_files {
        add(path, content, *mode)?;
    }
    archive.into_inner()
}

pub(crate) async fn build(docker: &Docker, spec: BuildSpec, progress: ProgressSink) -> EngineResult<ImageInfo> {
    let op = format!("build image '{}'", spec.tag);
    let context =
        build_context(&spec).map_err(|e| EngineError::failed(&op, format!("cannot make the build context: {e}")))?;
    let options = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(spec.tag.clone()),
        labels: Some(spec.labels.clone().into_iter().collect()),
        buildargs: Some(spec.build_args.clone().into_iter().collect::<HashMap<_, _>>()),
        networkmode: spec.host_network.then(|| "host".to_string()),
        rm: true,
        // Also remove the container of a failed step.
        forcerm: true,
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(body_full(Bytes::from(context))));
    let mut tail: VecDeque<String> = VecDeque::with_capacity(LOG_TAIL_LINES);
    let mut current_step: Option<String> = None;
    let mut remember = |line: &str| {
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    };
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(info) => info,
            Err(error) => {
                let message = match error {
                    bollard::errors::Error::DockerStreamError { error } => error.trim().to_string(),
                    other => match api_error(&op, None, other) {
                        unavailable @ EngineError::Unavailable(_) => return Err(unavailable),
                        failed => failed.to_string(),
                    },
                };
                remember(&message);
                return Err(EngineError::BuildFailed {
                    image: spec.tag,
                    step: current_step.unwrap_or_else(|| "(before the first step)".into()),
                    log_tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
                });
            }
        };
        for line in info.stream.iter().flat_map(|text| text.lines()) {
            if let Some(step) = parse_step(line) {
                current_step = Some(line.trim_start_matches("STEP ").to_string());
                progress(step);
            }
            remember(line);
            progress(Progress::Line(line.to_string()));
        }
    }
    inspect_made(docker, &spec.tag, &op).await
}

/// Splits `repo[:tag]` at the tag's colon (not a registry port's).
fn split_reference(reference: &str) -> (&str, Option<&str>) {
    let name_start = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_start..].rfind(':') {
        Some(colon) => (
            &reference[..name_start + colon],
            Some(&reference[name_start + colon + 1..]),
        ),
        None => (reference, None),
    }
}

pub(crate) async fn import(
    docker: &Docker,
    rootfs_tar: PathBuf,
    reference: &str,
    progress: ProgressSink,
) -> EngineResult<ImageInfo> {
    let op = format!("import image '{reference}' from {}", rootfs_tar.display());
    let file = tokio::fs::File::open(&rootfs_tar)
        .await
        .map_err(|e| EngineError::failed(&op, e))?;
    // Streamed in chunks: root file systems are hundreds of megabytes.
    let chunks = futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buffer = Vec::with_capacity(IMPORT_CHUNK);
        let read = (&mut file).take(IMPORT_CHUNK as u64).read_to_end(&mut buffer).await?;
        Ok::<_, std::io::Error>((read > 0).then(|| (Bytes::from(buffer), file)))
    });
    // Podman 4.3 ignores `tag` here but parses a tag inside `repo`.
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(reference.to_string()),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(options), Some(body_try_stream(chunks)), None);
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| api_error(&op, None, e))?;
        if let Some(status) = info.status.filter(|status| !status.is_empty()) {
            progress(Progress::Line(status));
        }
    }
    inspect_made(docker, reference, &op).await
}

pub(crate) async fn remove(docker: &Docker, reference: &str) -> EngineResult<()> {
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
        ..Default::default()
    };
    docker
        .remove_image(reference, Some(options), None)
        .await
        .map(|_| ())
        .map_err(|e| api_error(format!("remove image '{reference}'"), Some(&object(reference)), e))
}

pub(crate) async fn tag(docker: &Docker, source: &str, reference: &str) -> EngineResult<()> {
    let (repo, tag) = split_reference(reference);
    let options = TagImageOptions {
        repo: Some(repo.to_string()),
        tag: tag.map(str::to_string),
    };
    docker.tag_image(source, Some(options)).await.map_err(|e| {
        api_error(
            format!("tag image '{source}' as '{reference}'"),
            Some(&object(source)),
            e,
        )
    })
}

/// A `LABEL "key"="value"` change for `POST /commit`.
///
/// Podman 4.3 parses changes one per line and strips one pair of quotes around key and
/// value without unescaping anything, so the value is taken verbatim; only a line break
/// (or a key with `=` or `"`) cannot be expressed.
fn label_change(key: &str, value: &str) -> Result<String, String> {
    if key.contains(['=', '"', '\n']) || value.contains('\n') {
        return Err(format!(
            "label '{key}' cannot be set by a commit (line break, '=' or '\"' in it)"
        ));
    }
    Ok(format!("LABEL \"{key}\"=\"{value}\""))
}

pub(crate) async fn commit(
    docker: &Docker,
    container: &str,
    reference: &str,
    labels: Labels,
) -> EngineResult<ImageInfo> {
    let op = format!("commit container '{container}' as image '{reference}'");
    let (repo, tag) = split_reference(reference);
    let changes = labels
        .iter()
        .map(|(key, value)| label_change(key, value))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::failed(&op, e))?;
    let options = CommitContainerOptions {
        container: Some(container.to_string()),
        repo: Some(repo.to_string()),
        tag: tag.map(str::to_string),
        pause: true,
        changes: (!changes.is_empty()).then(|| changes.join("\n")),
        ..Default::default()
    };
    for attempt in 0..2 {
        docker
            .commit_container(options.clone(), ContainerConfig::default())
            .await
            .map_err(|e| api_error(&op, Some(&format!("container '{container}'")), e))?;
        match inspect_made(docker, reference, &op).await {
            Err(e) if attempt == 0 => match unreadable_image(&e.to_string()) {
                // The commit named an image an interrupted commit left behind: remove it
                // and commit again.
                Some(id) => {
                    tracing::warn!(image = %id, "commit {reference} met an image without a manifest; removing it and committing again");
                    remove_unreadable(docker, &id).await?;
                }
                None => return Err(e),
            },
            done => return done,
        }
    }
    unreachable!("the second attempt returns")
}

/// The id of the image a Podman error says has no manifest (`locating item named
/// "manifest" for image with ID "<id>"`).
fn unreadable_image(message: &str) -> Option<String> {
    let marker = r#"locating item named \"manifest\" for image with ID \""#;
    let plain = r#"locating item named "manifest" for image with ID ""#;
    let rest = message
        .split_once(marker)
        .or_else(|| message.split_once(plain))
        .map(|(_, rest)| rest)?;
    let id: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (id.len() == 64).then_some(id)
}

async fn remove_unreadable(docker: &Docker, id: &str) -> EngineResult<()> {
    let options = RemoveImageOptions {
        force: true,
        noprune: false,
        ..Default::default()
    };
    match docker.remove_image(id, Some(options), None).await {
        Ok(_) => Ok(()),
        Err(e) => match api_error(format!("remove unreadable image '{id}'"), Some(&object(id)), e) {
            EngineError::NotFound { .. } => Ok(()),
            other => Err(other),
        },
    }
}

/// Removes the images an interrupted commit left without a manifest. Podman 4.3 records a
/// committed image before it writes the image's manifest; when its service dies in between
/// (conductor's private service dies with conductor), the record stays, unreadable, and
/// every image listing fails on it (`podman images` included) until it is removed.
pub(crate) async fn repair(docker: &Docker) -> EngineResult<Vec<String>> {
    let mut removed = Vec::new();
    let mut other_failures = 0;
    // Each listing names one broken image; a crash leaves at most a few.
    for _ in 0..16 {
        let options = ListImagesOptions {
            all: true,
            ..Default::default()
        };
        match docker.list_images(Some(options)).await {
            Ok(_) => return Ok(removed),
            Err(e) => {
                let e = api_error("list images", None, e);
                match unreadable_image(&e.to_string()) {
                    Some(id) if !removed.contains(&id) => {
                        remove_unreadable(docker, &id).await?;
                        removed.push(id);
                    }
                    // A listing also fails when another process removes an image meanwhile
                    // ("image not known"): try again.
                    _ if other_failures < 3 => {
                        other_failures += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_images_are_found_in_podmans_messages() {
        let id = "6beebbad6273b7ad6eafab96ffddaee2cc50642a941b5b00c9a16927b036c50c";
        let listing = format!(
            r#"list images: Docker responded with status code 500: checking if image "a01a" is dangling: locating item named "manifest" for image with ID "{id}" (consider removing the image to resolve the issue): file does not exist"#
        );
        assert_eq!(unreadable_image(&listing).as_deref(), Some(id));
        let escaped =
            format!(r#"{{"message":"locating item named \"manifest\" for image with ID \"{id}\" (consider"}}"#);
        assert_eq!(unreadable_image(&escaped).as_deref(), Some(id));
        assert_eq!(unreadable_image("image not known"), None);
        assert_eq!(
            unreadable_image(r#"locating item named "manifest" for image with ID "abc""#),
            None,
            "not a full id"
        );
    }

    #[test]
    fn step_lines_are_parsed() {
        assert_eq!(
            parse_step("STEP 3/7: RUN apt-get install -y x"),
            Some(Progress::Step {
                index: 3,
                total: 7,
                text: "RUN apt-get install -y x".into()
            })
        );
        assert_eq!(parse_step("--> 0e8db46f256"), None);
        assert_eq!(parse_step("STEP x/7: RUN"), None);
    }

    #[test]
    fn references_split_at_the_tag_not_the_port() {
        assert_eq!(
            split_reference("localhost:5000/a/b:t1"),
            ("localhost:5000/a/b", Some("t1"))
        );
        assert_eq!(split_reference("localhost:5000/a/b"), ("localhost:5000/a/b", None));
        assert_eq!(split_reference("b:latest"), ("b", Some("latest")));
    }

    #[test]
    fn label_changes_quote_without_escaping() {
        assert_eq!(
            label_change("io.x", r#"a "b" \c"#).unwrap(),
            r#"LABEL "io.x"="a "b" \c""#
        );
        assert!(label_change("io.x", "two\nlines").is_err());
        assert!(label_change("a=b", "v").is_err());
    }

    #[test]
    fn the_build_context_holds_the_containerfile_and_files() {
        let spec = BuildSpec {
            tag: "t".into(),
            containerfile: "FROM x\n".into(),
            context_files: vec![("bin/run.sh".into(), b"#!/bin/sh\n".to_vec(), 0o755)],
            ..Default::default()
        };
        let bytes = build_context(&spec).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let entries: Vec<(String, u32)> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (
                    entry.path().unwrap().display().to_string(),
                    entry.header().mode().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![("Dockerfile".into(), 0o644), ("bin/run.sh".into(), 0o755)]
        );
    }
}
