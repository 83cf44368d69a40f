//! Watching a directory: a poller lists the directory (and, when recursive, what is below
//! it) every [`POLL`] through the service's file API and reports what changed: a new entry
//! is `create`, a changed size or mtime `write`, changed permission bits `chmod`, a vanished
//! entry `remove` (a rename shows as `remove` + `create`). Polling through the file API
//! works on any backend and needs nothing inside the workspace; the cost is a listing per
//! watched directory every quarter second, and events within one poll are coalesced.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conductor_service::files::{FileEntry, FileKind};
use futures_util::Stream;

use super::filesystem::{absolute, entry_info};
use super::Sandbox;
use crate::connect::{Code, RpcError};
use crate::pb::filesystem as pb;
use pb::watch_dir_response::{Event, KeepAlive, StartEvent};

/// How often a watched directory is listed.
const POLL: Duration = Duration::from_millis(250);
/// Keep-alive interval of a quiet `WatchDir` stream.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Most entries a watch follows; beyond it the watch fails.
const MAX_WATCHED: usize = 20_000;
/// Most events a watcher (the polled kind) keeps until they are fetched.
const MAX_PENDING: usize = 10_000;
/// Most watchers (the polled kind) at once.
const MAX_WATCHERS: usize = 256;

/// What a poll sees of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    dir: bool,
    size: u64,
    mtime_ms: i64,
    mode: u32,
}

/// The entries under a directory, by path relative to it.
pub(crate) type Tree = BTreeMap<String, Seen>;

/// The events that turn `old` into `new`, in path order.
pub(crate) fn diff(old: &Tree, new: &Tree) -> Vec<(String, pb::EventType)> {
    let mut events = Vec::new();
    for (path, seen) in new {
        match old.get(path) {
            None => events.push((path.clone(), pb::EventType::Create)),
            Some(was) if !seen.dir && (was.size != seen.size || was.mtime_ms != seen.mtime_ms) => {
                events.push((path.clone(), pb::EventType::Write))
            }
            Some(was) if was.mode != seen.mode => events.push((path.clone(), pb::EventType::Chmod)),
            Some(_) => {}
        }
    }
    for path in old.keys() {
        if !new.contains_key(path) {
            events.push((path.clone(), pb::EventType::Remove));
        }
    }
    events
}

/// Lists `root` (recursively when asked) into a [`Tree`], with each entry's facts.
async fn snapshot(s: &Sandbox, root: &str, recursive: bool) -> Result<(Tree, HashMap<String, FileEntry>), RpcError> {
    let mut tree = Tree::new();
    let mut facts = HashMap::new();
    let mut dirs = vec![String::new()];
    while let Some(rel) = dirs.pop() {
        let abs = if rel.is_empty() {
            root.to_string()
        } else {
            format!("{root}/{rel}")
        };
        let entries = match s.e2b.conductor.list_files(&s.id, &abs).await {
            Ok(e) => e,
            // A subdirectory removed between two listings: its entries are gone.
            Err(conductor_service::ServiceError::NotFound { .. }) if !rel.is_empty() => continue,
            Err(e) => return Err(e.into()),
        };
        for e in entries {
            let path = if rel.is_empty() {
                e.name.clone()
            } else {
                format!("{rel}/{}", e.name)
            };
            let dir = e.kind == FileKind::Dir;
            if dir && recursive {
                dirs.push(path.clone());
            }
            tree.insert(
                path.clone(),
                Seen {
                    dir,
                    size: e.size,
                    mtime_ms: e.mtime_ms,
                    mode: e.mode,
                },
            );
            facts.insert(path, e);
            if tree.len() > MAX_WATCHED {
                return Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("more than {MAX_WATCHED} entries to watch: watch a smaller directory"),
                ));
            }
        }
    }
    Ok((tree, facts))
}

/// A watch of one directory: its last listing.
struct Poller {
    sandbox: Sandbox,
    root: String,
    recursive: bool,
    include_entry: bool,
    last: Tree,
}

impl Poller {
    async fn start(s: &Sandbox, path: &str, recursive: bool, include_entry: bool) -> Result<Poller, RpcError> {
        let root = absolute(path, "path")?;
        let top = s.e2b.conductor.stat_file(&s.id, &root).await?;
        if top.kind != FileKind::Dir {
            return Err(RpcError::invalid(format!("path: {root} is not a directory")));
        }
        let (last, _) = snapshot(s, &root, recursive).await?;
        Ok(Poller {
            sandbox: s.clone(),
            root,
            recursive,
            include_entry,
            last,
        })
    }

    /// The events since the last poll.
    async fn poll(&mut self) -> Result<Vec<pb::FilesystemEvent>, RpcError> {
        let (now, facts) = snapshot(&self.sandbox, &self.root, self.recursive).await?;
        let events = diff(&self.last, &now)
            .into_iter()
            .map(|(name, kind)| {
                let entry = match (self.include_entry, facts.get(&name)) {
                    (true, Some(e)) if kind != pb::EventType::Remove => {
                        Some(entry_info(e, &format!("{}/{name}", self.root)))
                    }
                    _ => None,
                };
                pb::FilesystemEvent {
                    name,
                    r#type: kind as i32,
                    entry,
                }
            })
            .collect();
        self.last = now;
        Ok(events)
    }
}

/// `WatchDir`: the start event, then events as polls find them (keep-alives while quiet),
/// until the client goes or the directory does.
pub(crate) async fn stream(
    s: &Sandbox,
    req: pb::WatchDirRequest,
) -> Result<impl Stream<Item = Result<pb::WatchDirResponse, RpcError>> + Send + 'static, RpcError> {
    let poller = Poller::start(s, &req.path, req.recursive, req.include_entry).await?;
    let first = pb::WatchDirResponse {
        event: Some(Event::Start(StartEvent {})),
    };
    let state = (
        poller,
        std::collections::VecDeque::from([first]),
        tokio::time::Instant::now(),
        false,
    );
    Ok(futures_util::stream::unfold(
        state,
        |(mut p, mut queue, mut quiet_since, ended)| async move {
            if ended {
                return None;
            }
            loop {
                if let Some(next) = queue.pop_front() {
                    return Some((Ok(next), (p, queue, quiet_since, false)));
                }
                tokio::time::sleep(POLL).await;
                match p.poll().await {
                    Ok(events) if events.is_empty() => {
                        if quiet_since.elapsed() >= KEEPALIVE {
                            quiet_since = tokio::time::Instant::now();
                            queue.push_back(pb::WatchDirResponse {
                                event: Some(Event::Keepalive(KeepAlive {})),
                            });
                        }
                    }
                    Ok(events) => {
                        quiet_since = tokio::time::Instant::now();
                        queue.extend(events.into_iter().map(|e| pb::WatchDirResponse {
                            event: Some(Event::Filesystem(e)),
                        }));
                    }
                    Err(e) => return Some((Err(e), (p, queue, quiet_since, true))),
                }
            }
        },
    ))
}

/// A polled watcher (`CreateWatcher`): events pile up until fetched.
struct Watcher {
    sandbox: String,
    pending: Arc<Mutex<Result<Vec<pb::FilesystemEvent>, RpcError>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The polled watchers, by id.
#[derive(Default)]
pub(crate) struct Watchers {
    inner: Mutex<HashMap<String, Watcher>>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops and forgets the watchers of a removed sandbox.
    pub(crate) fn forget_sandbox(&self, sandbox: &str) {
        self.lock().retain(|_, w| {
            let keep = w.sandbox != sandbox;
            if !keep {
                w.task.abort();
            }
            keep
        });
    }
}

pub(crate) async fn create(s: &Sandbox, req: pb::CreateWatcherRequest) -> Result<pb::CreateWatcherResponse, RpcError> {
    // Watchers whose poller stopped (their directory or sandbox went) and whose error
    // nobody fetched no longer count.
    s.e2b.watchers.lock().retain(|_, w| !w.task.is_finished());
    if s.e2b.watchers.lock().len() >= MAX_WATCHERS {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("{MAX_WATCHERS} watchers exist: remove some first"),
        ));
    }
    let mut poller = Poller::start(s, &req.path, req.recursive, req.include_entry).await?;
    let pending = Arc::new(Mutex::new(Ok(Vec::new())));
    let sink = pending.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            let result = poller.poll().await;
            let mut p = sink.lock().unwrap_or_else(PoisonError::into_inner);
            match (result, &mut *p) {
                (Ok(events), Ok(list)) => {
                    list.extend(events);
                    if list.len() > MAX_PENDING {
                        let drop = list.len() - MAX_PENDING;
                        list.drain(..drop);
                    }
                }
                (Err(e), slot) => {
                    *slot = Err(e);
                    return;
                }
                (Ok(_), Err(_)) => return,
            }
        }
    });
    let id = uuid::Uuid::new_v4().simple().to_string();
    s.e2b.watchers.lock().insert(
        id.clone(),
        Watcher {
            sandbox: s.id.clone(),
            pending,
            task,
        },
    );
    Ok(pb::CreateWatcherResponse { watcher_id: id })
}

fn not_found(id: &str) -> RpcError {
    RpcError::not_found(format!("watcher '{id}' was not found"))
}

pub(crate) fn events(s: &Sandbox, req: pb::GetWatcherEventsRequest) -> Result<pb::GetWatcherEventsResponse, RpcError> {
    let watchers = s.e2b.watchers.lock();
    let w = watchers
        .get(&req.watcher_id)
        .filter(|w| w.sandbox == s.id)
        .ok_or_else(|| not_found(&req.watcher_id))?;
    let mut p = w.pending.lock().unwrap_or_else(PoisonError::into_inner);
    match &mut *p {
        Ok(list) => Ok(pb::GetWatcherEventsResponse {
            events: std::mem::take(list),
        }),
        Err(e) => Err(e.clone()),
    }
}

pub(crate) fn remove(s: &Sandbox, req: pb::RemoveWatcherRequest) -> Result<pb::RemoveWatcherResponse, RpcError> {
    let mut watchers = s.e2b.watchers.lock();
    match watchers.get(&req.watcher_id) {
        Some(w) if w.sandbox == s.id => {
            w.task.abort();
            watchers.remove(&req.watcher_id);
            Ok(pb::RemoveWatcherResponse {})
        }
        _ => Err(not_found(&req.watcher_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(size: u64, mtime_ms: i64, mode: u32) -> Seen {
        Seen {
            dir: false,
            size,
            mtime_ms,
            mode,
        }
    }

    #[test]
    fn polls_turn_into_create_write_chmod_remove() {
        let old = Tree::from([
            ("a".to_string(), seen(1, 10, 0o644)),
            ("b".to_string(), seen(1, 10, 0o644)),
            ("c".to_string(), seen(1, 10, 0o644)),
        ]);
        let new = Tree::from([
            ("a".to_string(), seen(2, 11, 0o644)),
            ("c".to_string(), seen(1, 10, 0o600)),
            ("d".to_string(), seen(0, 12, 0o644)),
        ]);
        assert_eq!(
            diff(&old, &new),
            vec![
                ("a".to_string(), pb::EventType::Write),
                ("c".to_string(), pb::EventType::Chmod),
                ("d".to_string(), pb::EventType::Create),
                ("b".to_string(), pb::EventType::Remove),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
