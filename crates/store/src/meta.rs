//! Instance metadata: small key/value facts about this conductor installation.

use rusqlite::OptionalExtension;

use crate::{Result, Store};

const INSTANCE_ID: &str = "instance_id";

impl Store {
    /// The id of this conductor instance (12 lowercase hex characters), used to label the
    /// engine resources it owns. Generated on first use and persisted, so every later open of
    /// the same database file returns the same value.
    pub fn instance_id(&self) -> Result<String> {
        let conn = self.conn();
        let select = "SELECT value FROM meta WHERE key = ?1";
        if let Some(id) = conn.query_row(select, [INSTANCE_ID], |row| row.get(0)).optional()? {
            return Ok(id);
        }
        let mut fresh = uuid::Uuid::new_v4().simple().to_string();
        fresh.truncate(12);
        // Another process may have won the race; then its value is the one we return.
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            [INSTANCE_ID, &fresh],
        )?;
        Ok(conn.query_row(select, [INSTANCE_ID], |row| row.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::file_store;
    use crate::Store;

    #[test]
    fn instance_id_is_short_hex_and_stable() {
        let store = Store::open_in_memory().unwrap();
        let id = store.instance_id().unwrap();
        assert_eq!(id.len(), 12);
        assert!(
            id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{id}"
        );
        assert_eq!(store.instance_id().unwrap(), id);
    }

    #[test]
    fn instance_id_survives_reopen_and_differs_between_databases() {
        let (dir, store) = file_store();
        let id = store.instance_id().unwrap();
        drop(store);
        let reopened = Store::open(&dir.path().join("conductor.db")).unwrap();
        assert_eq!(reopened.instance_id().unwrap(), id);

        let (_other_dir, other) = file_store();
        assert_ne!(other.instance_id().unwrap(), id);
    }
}
