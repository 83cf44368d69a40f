//! The `snapshots` table. A snapshot row is written in state `creating` before any image is
//! committed and becomes `complete` only once its images exist, so after a crash the
//! reconciler finds unfinished ones with [`Store::list_snapshots_in_state`]. Names are
//! unique per workspace, whatever the state.

use conductor_core::lifecycle::SnapshotState;
use rusqlite::{params, Row};

use crate::{expect_row, query_all, query_opt, Decoder, Result, Store};

const COLUMNS: &str = "id, workspace_id, name, state, rootfs_image, data_ref, bytes, created_at";

/// A snapshot as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Conductor's id of the snapshot.
    pub id: String,
    /// The workspace it was taken from.
    pub workspace_id: String,
    /// User-given name, unique within the workspace.
    pub name: String,
    /// Lifecycle state; only `complete` snapshots are restorable.
    pub state: SnapshotState,
    /// Image holding the container's root filesystem, once committed.
    pub rootfs_image: Option<String>,
    /// Reference to the saved data volumes (image or archive), once written.
    pub data_ref: Option<String>,
    /// Total size in bytes.
    pub bytes: u64,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
}

fn decode(row: &Row<'_>) -> Result<SnapshotRecord> {
    let id: String = row.get("id")?;
    let d = Decoder::new(row, format!("snapshots row '{id}'"));
    Ok(SnapshotRecord {
        workspace_id: d.get("workspace_id")?,
        name: d.get("name")?,
        state: d.parse("state")?,
        rootfs_image: d.get("rootfs_image")?,
        data_ref: d.get("data_ref")?,
        bytes: d.get("bytes")?,
        created_at: d.get("created_at")?,
        id,
    })
}

fn not_found(id: &str) -> impl FnOnce() -> String + '_ {
    move || format!("snapshot '{id}'")
}

impl Store {
    /// Records a new snapshot. A duplicate id, or a name already used in the same workspace,
    /// fails with a uniqueness violation ([`crate::StoreError::is_conflict`]).
    pub fn insert_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()> {
        self.conn()
            .prepare_cached(&format!(
                "INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))?
            .execute(params![
                snapshot.id,
                snapshot.workspace_id,
                snapshot.name,
                snapshot.state.as_str(),
                snapshot.rootfs_image,
                snapshot.data_ref,
                snapshot.bytes,
                snapshot.created_at,
            ])?;
        Ok(())
    }

    /// The workspace's snapshot called `name`, in any state.
    pub fn get_snapshot_by_name(&self, workspace_id: &str, name: &str) -> Result<Option<SnapshotRecord>> {
        query_opt(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM snapshots WHERE workspace_id = ?1 AND name = ?2"),
            [workspace_id, name],
            decode,
        )
    }

    /// The workspace's snapshots, oldest first; with `only_complete`, just the restorable
    /// ones.
    pub fn list_snapshots(&self, workspace_id: &str, only_complete: bool) -> Result<Vec<SnapshotRecord>> {
        query_all(
            &self.conn(),
            &format!(
                "SELECT {COLUMNS} FROM snapshots WHERE workspace_id = ?1 \
                 AND (?2 = 0 OR state = ?3) ORDER BY created_at, id"
            ),
            params![workspace_id, only_complete, SnapshotState::Complete.as_str()],
            decode,
        )
    }

    /// Sets the state and, when given, the size in bytes (`None` keeps the stored size).
    pub fn set_snapshot_state(&self, id: &str, state: SnapshotState, bytes: Option<u64>) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE snapshots SET state = ?2, bytes = COALESCE(?3, bytes) WHERE id = ?1")?
            .execute(params![id, state.as_str(), bytes])?;
        expect_row(changed, not_found(id))
    }

    /// Sets both image references as given (`None` clears one).
    pub fn update_snapshot_refs(&self, id: &str, rootfs_image: Option<&str>, data_ref: Option<&str>) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE snapshots SET rootfs_image = ?2, data_ref = ?3 WHERE id = ?1")?
            .execute(params![id, rootfs_image, data_ref])?;
        expect_row(changed, not_found(id))
    }

    /// Deletes the row (the service removes the images first).
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("DELETE FROM snapshots WHERE id = ?1")?
            .execute([id])?;
        expect_row(changed, not_found(id))
    }

    /// All snapshots in `state` across workspaces, oldest first (crash recovery looks for
    /// `creating` and `deleting`).
    pub fn list_snapshots_in_state(&self, state: SnapshotState) -> Result<Vec<SnapshotRecord>> {
        query_all(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM snapshots WHERE state = ?1 ORDER BY created_at, id"),
            [state.as_str()],
            decode,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::file_store;
    use crate::StoreError;

    fn snap(id: &str, workspace_id: &str, name: &str, created_at: i64) -> SnapshotRecord {
        SnapshotRecord {
            id: id.to_owned(),
            workspace_id: workspace_id.to_owned(),
            name: name.to_owned(),
            state: SnapshotState::Creating,
            rootfs_image: None,
            data_ref: None,
            bytes: 0,
            created_at,
        }
    }

    fn names(records: Vec<SnapshotRecord>) -> Vec<String> {
        records.into_iter().map(|s| s.name).collect()
    }

    #[test]
    fn lifecycle_round_trip() {
        let (_dir, store) = file_store();
        store.insert_snapshot(&snap("s1", "w1", "before", 10)).unwrap();
        store
            .update_snapshot_refs("s1", Some("localhost/conductor/snap-s1"), Some("vol-s1"))
            .unwrap();
        store
            .set_snapshot_state("s1", SnapshotState::Complete, Some(5 << 30))
            .unwrap();
        let got = store.get_snapshot_by_name("w1", "before").unwrap().unwrap();
        assert_eq!(
            got,
            SnapshotRecord {
                state: SnapshotState::Complete,
                rootfs_image: Some("localhost/conductor/snap-s1".into()),
                data_ref: Some("vol-s1".into()),
                bytes: 5 << 30,
                ..snap("s1", "w1", "before", 10)
            }
        );
        // No size given: the stored one stays.
        store.set_snapshot_state("s1", SnapshotState::Deleting, None).unwrap();
        let got = store.get_snapshot_by_name("w1", "before").unwrap().unwrap();
        assert_eq!((got.state, got.bytes), (SnapshotState::Deleting, 5 << 30));

        store.update_snapshot_refs("s1", None, None).unwrap();
        let got = store.get_snapshot_by_name("w1", "before").unwrap().unwrap();
        assert_eq!((got.rootfs_image, got.data_ref), (None, None));

        store.delete_snapshot("s1").unwrap();
        assert_eq!(store.get_snapshot_by_name("w1", "before").unwrap(), None);
    }

    #[test]
    fn names_are_unique_per_workspace() {
        let store = Store::open_in_memory().unwrap();
        store.insert_snapshot(&snap("s1", "w1", "base", 1)).unwrap();
        let err = store.insert_snapshot(&snap("s2", "w1", "base", 2)).unwrap_err();
        assert!(err.is_conflict(), "{err:?}");
        // The same name in another workspace is fine.
        store.insert_snapshot(&snap("s3", "w2", "base", 3)).unwrap();
        assert_eq!(store.get_snapshot_by_name("w2", "base").unwrap().unwrap().id, "s3");
        assert_eq!(store.get_snapshot_by_name("w1", "other").unwrap(), None);
    }

    #[test]
    fn listing_filters_complete_and_orders_by_creation() {
        let store = Store::open_in_memory().unwrap();
        store.insert_snapshot(&snap("s3", "w1", "third", 30)).unwrap();
        store.insert_snapshot(&snap("s1", "w1", "first", 10)).unwrap();
        store.insert_snapshot(&snap("s2", "w1", "second", 20)).unwrap();
        store.insert_snapshot(&snap("s9", "w2", "elsewhere", 5)).unwrap();
        store
            .set_snapshot_state("s1", SnapshotState::Complete, Some(1))
            .unwrap();
        store
            .set_snapshot_state("s3", SnapshotState::Complete, Some(3))
            .unwrap();
        store.set_snapshot_state("s9", SnapshotState::Deleting, None).unwrap();

        assert_eq!(
            names(store.list_snapshots("w1", false).unwrap()),
            ["first", "second", "third"]
        );
        assert_eq!(names(store.list_snapshots("w1", true).unwrap()), ["first", "third"]);
        assert_eq!(store.list_snapshots("w3", false).unwrap(), vec![]);
        assert_eq!(
            names(store.list_snapshots_in_state(SnapshotState::Creating).unwrap()),
            ["second"]
        );
        assert_eq!(
            names(store.list_snapshots_in_state(SnapshotState::Deleting).unwrap()),
            ["elsewhere"]
        );
    }

    #[test]
    fn updates_of_missing_rows_are_not_found() {
        let store = Store::open_in_memory().unwrap();
        let expect_not_found = |r: Result<()>| match r {
            Err(StoreError::NotFound { what }) => assert_eq!(what, "snapshot 'ghost'"),
            other => panic!("expected NotFound, got {other:?}"),
        };
        expect_not_found(store.set_snapshot_state("ghost", SnapshotState::Complete, None));
        expect_not_found(store.update_snapshot_refs("ghost", None, None));
        expect_not_found(store.delete_snapshot("ghost"));
    }

    #[test]
    fn unknown_state_is_corrupt_naming_the_table_and_row() {
        let (_dir, store) = file_store();
        store.insert_snapshot(&snap("s1", "w1", "base", 1)).unwrap();
        store
            .conn()
            .execute("UPDATE snapshots SET state = 'half' WHERE id = 's1'", [])
            .unwrap();
        match store.list_snapshots("w1", false).unwrap_err() {
            StoreError::Corrupt { what, detail } => {
                assert_eq!(what, "snapshots row 's1', column state");
                assert!(detail.contains("\"half\""), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
