//! The instance lock: `conductor serve` holds an exclusive lock on
//! `<storage.base_path>/conductor.lock` while it runs, so a second service of the same
//! configuration, or a `conductor reconcile` beside it (which would undo the service's own
//! half-done work: a workspace it is creating looks like one a crash left), is refused with
//! a clear message instead of racing it. The lock is the kernel's (`flock`): it is released
//! when the process dies, even by `kill -9`, so a stale file never blocks a start.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::{Result, ServiceError};

/// File name of the lock in `storage.base_path`.
pub const LOCK_FILE: &str = "conductor.lock";

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

fn open(base: &Path) -> Result<File> {
    let path = base.join(LOCK_FILE);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ServiceError::host(format!("open {}", path.display()), e))
}

fn holder(file: &mut File) -> String {
    let mut pid = String::new();
    let _ = file.read_to_string(&mut pid);
    match pid.trim() {
        "" => "another process".to_string(),
        pid => format!("pid {pid}"),
    }
}

impl InstanceLock {
    /// Takes the lock for the running service, or fails naming the process that holds it.
    pub fn acquire(base: &Path) -> Result<InstanceLock> {
        let mut file = open(base)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(ServiceError::Conflict(format!(
                    "conductor serve is already running for this configuration ({}; lock {})",
                    holder(&mut file),
                    base.join(LOCK_FILE).display()
                )))
            }
            Err(TryLockError::Error(e)) => return Err(ServiceError::host("lock the instance", e)),
        }
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(InstanceLock { _file: file })
    }

    /// Fails when a service holds the lock: `what` must not run beside it.
    pub fn ensure_no_service(base: &Path, what: &str) -> Result<()> {
        let mut file = open(base)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(()),
            Err(TryLockError::WouldBlock) => Err(ServiceError::Conflict(format!(
                "conductor serve is running for this configuration ({}); it does {what} itself at \
                 its start: stop it first (./scripts/start-isolated.sh stop)",
                holder(&mut file)
            ))),
            Err(TryLockError::Error(e)) => Err(ServiceError::host("check the instance lock", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_service_at_a_time_and_no_reconcile_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        InstanceLock::ensure_no_service(dir.path(), "reconcile").unwrap();
        let held = InstanceLock::acquire(dir.path()).unwrap();
        let err = InstanceLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        let err = InstanceLock::ensure_no_service(dir.path(), "reconcile")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stop it first"), "{err}");
        drop(held);
        InstanceLock::ensure_no_service(dir.path(), "reconcile").unwrap();
        InstanceLock::acquire(dir.path()).unwrap();
    }
}
