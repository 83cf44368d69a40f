//! The `sandbox_leases` table: what the E2B-compatible API keeps beside a workspace it made
//! (the template name asked for, the client's metadata, the expiry and what happens then).
//! A lease row lives as long as its workspace; the service deletes it with the workspace.
//! Also the `workspace_forks` table: which workspace each fork was made from.

use std::collections::BTreeMap;

use rusqlite::{params, Row};

use crate::{expect_row, query_all, query_opt, Decoder, Result, Store, StoreError};

const COLUMNS: &str = "workspace_id, template, metadata_json, started_at, end_at, on_timeout, auto_resume";

/// What happens to a sandbox when its lease expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// The workspace is removed, data included.
    Kill,
    /// The workspace is paused (E2B's `autoPause`).
    Pause,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Kill => "kill",
            OnTimeout::Pause => "pause",
        }
    }
}

/// A sandbox lease as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub workspace_id: String,
    /// The template name the client asked for (`base`, `python-dev`, …).
    pub template: String,
    pub metadata: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds; the lease reaper acts once this has passed.
    pub end_at: i64,
    pub on_timeout: OnTimeout,
    /// Whether work on a paused sandbox resumes it.
    pub auto_resume: bool,
}

fn decode(row: &Row<'_>) -> Result<LeaseRecord> {
    let workspace_id: String = row.get("workspace_id")?;
    let what = format!("sandbox_leases row '{workspace_id}'");
    let d = Decoder::new(row, what.clone());
    let metadata_json: String = d.get("metadata_json")?;
    let metadata = serde_json::from_str(&metadata_json).map_err(|e| StoreError::Corrupt {
        what: format!("{what} column metadata_json"),
        detail: e.to_string(),
    })?;
    let on_timeout: String = d.get("on_timeout")?;
    let on_timeout = match on_timeout.as_str() {
        "kill" => OnTimeout::Kill,
        "pause" => OnTimeout::Pause,
        other => {
            return Err(StoreError::Corrupt {
                what: format!("{what} column on_timeout"),
                detail: format!("unknown value '{other}'"),
            })
        }
    };
    Ok(LeaseRecord {
        template: d.get("template")?,
        metadata,
        started_at: d.get("started_at")?,
        end_at: d.get("end_at")?,
        on_timeout,
        auto_resume: d.get("auto_resume")?,
        workspace_id,
    })
}

impl Store {
    /// Records the lease of a new sandbox (replacing one of the same workspace).
    pub fn put_lease(&self, lease: &LeaseRecord) -> Result<()> {
        let metadata = serde_json::to_string(&lease.metadata).map_err(|e| StoreError::Corrupt {
            what: "sandbox lease metadata".into(),
            detail: e.to_string(),
        })?;
        self.conn()
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO sandbox_leases ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?
            .execute(params![
                lease.workspace_id,
                lease.template,
                metadata,
                lease.started_at,
                lease.end_at,
                lease.on_timeout.as_str(),
                lease.auto_resume,
            ])?;
        Ok(())
    }

    pub fn get_lease(&self, workspace_id: &str) -> Result<Option<LeaseRecord>> {
        query_opt(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM sandbox_leases WHERE workspace_id = ?1"),
            [workspace_id],
            decode,
        )
    }

    /// Every lease, oldest first.
    pub fn list_leases(&self) -> Result<Vec<LeaseRecord>> {
        query_all(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM sandbox_leases ORDER BY started_at, workspace_id"),
            [],
            decode,
        )
    }

    /// The leases whose end is at or before `now_ms`.
    pub fn expired_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>> {
        query_all(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM sandbox_leases WHERE end_at <= ?1 ORDER BY end_at"),
            [now_ms],
            decode,
        )
    }

    /// Moves a lease's end.
    pub fn set_lease_end(&self, workspace_id: &str, end_at: i64) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE sandbox_leases SET end_at = ?2 WHERE workspace_id = ?1")?
            .execute(params![workspace_id, end_at])?;
        expect_row(changed, || format!("sandbox lease '{workspace_id}'"))
    }

    /// Deletes a lease (absent is fine).
    pub fn delete_lease(&self, workspace_id: &str) -> Result<()> {
        self.conn()
            .prepare_cached("DELETE FROM sandbox_leases WHERE workspace_id = ?1")?
            .execute([workspace_id])?;
        Ok(())
    }
}

impl Store {
    /// Records that `copies` were forked from `source`.
    pub fn record_forks(&self, source: &str, copies: &[String]) -> Result<()> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("INSERT OR REPLACE INTO workspace_forks (workspace_id, source_id) VALUES (?1, ?2)")?;
        for c in copies {
            stmt.execute(params![c, source])?;
        }
        Ok(())
    }

    /// The workspaces forked from `source`, in the order they were recorded.
    pub fn forks_of(&self, source: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT workspace_id FROM workspace_forks WHERE source_id = ?1 ORDER BY rowid")?;
        let rows = stmt.query_map([source], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    /// The workspace `id` was forked from, if it is a fork.
    pub fn fork_source(&self, id: &str) -> Result<Option<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT source_id FROM workspace_forks WHERE workspace_id = ?1")?;
        let mut rows = stmt.query([id])?;
        Ok(match rows.next()? {
            Some(r) => Some(r.get(0)?),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_trip_expire_and_go() {
        let store = Store::open_in_memory().unwrap();
        let mut lease = LeaseRecord {
            workspace_id: "w1".into(),
            template: "base".into(),
            metadata: BTreeMap::from([("owner".to_string(), "ci".to_string())]),
            started_at: 1_000,
            end_at: 5_000,
            on_timeout: OnTimeout::Kill,
            auto_resume: true,
        };
        store.put_lease(&lease).unwrap();
        assert_eq!(store.get_lease("w1").unwrap().as_ref(), Some(&lease));
        assert!(store.expired_leases(4_999).unwrap().is_empty());
        assert_eq!(store.expired_leases(5_000).unwrap(), vec![lease.clone()]);
        store.set_lease_end("w1", 9_000).unwrap();
        lease.end_at = 9_000;
        assert_eq!(store.list_leases().unwrap(), vec![lease]);
        assert!(store.set_lease_end("nope", 1).is_err());
        store.delete_lease("w1").unwrap();
        assert_eq!(store.get_lease("w1").unwrap(), None);
    }

    #[test]
    fn forks_remember_their_source() {
        let store = Store::open_in_memory().unwrap();
        store
            .record_forks("src", &["f1".to_string(), "f2".to_string()])
            .unwrap();
        assert_eq!(store.forks_of("src").unwrap(), vec!["f1", "f2"]);
        assert_eq!(store.fork_source("f2").unwrap().as_deref(), Some("src"));
        assert_eq!(store.fork_source("src").unwrap(), None);
        assert!(store.forks_of("f1").unwrap().is_empty());
    }
}
