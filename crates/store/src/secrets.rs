//! The `secrets` table: credentials the egress proxy injects into a workspace's requests,
//! each a name, its injection rules (JSON, see `conductor_core::secrets::SecretSpec`) and
//! its value, encrypted at rest.
//!
//! Values are sealed with XChaCha20-Poly1305 under a [`SecretKey`] the caller gives each
//! call (loaded once from a key file readable by its owner only, see
//! [`SecretKey::load_or_create`]), with a random 24-byte nonce per write and the secret's
//! name as associated data: a row copied under another name, a wrong key or an altered
//! row fails to decrypt ([`StoreError::Corrupt`]) instead of giving garbage. Rotating a
//! secret (writing it again) bumps its `version`. Nothing here returns a value except
//! [`Store::get_secret_value`], and that as a [`SecretValue`], zeroed on drop and
//! `<redacted>` in `Debug`.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rusqlite::{params, Row};
use zeroize::{Zeroize, Zeroizing};

use crate::{query_all, query_opt, Decoder, Result, Store, StoreError};

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Bytes of a nonce (XChaCha20).
const NONCE_LEN: usize = 24;

/// The key sealing secret values. Zeroed on drop; `Debug` shows nothing of it.
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SecretKey {
        SecretKey(bytes)
    }

    /// A fresh random key from the operating system.
    pub fn generate() -> io::Result<SecretKey> {
        let mut key = SecretKey([0; KEY_LEN]);
        getrandom::fill(&mut key.0)?;
        Ok(key)
    }

    /// Loads the key file at `path`, or creates it with a fresh random key when there is
    /// none. A created file is mode 0600 and appears whole or not at all (written under a
    /// temporary name, then hard-linked into place, so a concurrent creator's key is never
    /// overwritten: the loser loads the winner's). Refuses (`PermissionDenied`) a key file
    /// any group or other permission bit is set on, and (`InvalidData`) one that does not
    /// hold 64 hex digits.
    pub fn load_or_create(path: &Path) -> io::Result<SecretKey> {
        match SecretKey::load(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let key = SecretKey::generate()?;
        match key.write_new(path) {
            Ok(()) => Ok(key),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => SecretKey::load(path),
            Err(e) => Err(e),
        }
    }

    /// Loads an existing key file: 64 hex digits (surrounding whitespace ignored), mode
    /// 0600 or stricter.
    pub fn load(path: &Path) -> io::Result<SecretKey> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("secret key {}: not a regular file", path.display()),
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "secret key {}: mode {mode:04o} gives group or others access; it must be readable by its owner only (chmod 600 {})",
                    path.display(),
                    path.display()
                ),
            ));
        }
        let mut text = Zeroizing::new(String::new());
        file.take(1024).read_to_string(&mut text).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("secret key {}: cannot read it as text: {e}", path.display()),
            )
        })?;
        let mut key = SecretKey([0; KEY_LEN]);
        hex::decode_to_slice(text.trim(), &mut key.0).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "secret key {}: not a key (expected {} hex digits)",
                    path.display(),
                    KEY_LEN * 2
                ),
            )
        })?;
        Ok(key)
    }

    /// Writes the key to `path`, which must not exist (`AlreadyExists` otherwise).
    fn write_new(&self, path: &Path) -> io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let file_name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("secret key {}: not a file path", path.display()),
            )
        })?;
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag)?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            hex::encode(tag)
        ));
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        let written = (|| {
            // The mode given at creation is masked by the umask, which can only remove bits;
            // set it again in case the file system ignores it.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            let mut text = Zeroizing::new(hex::encode(self.0));
            text.push('\n');
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::hard_link(&tmp, path)?;
            File::open(dir)?.sync_all()
        })();
        let _ = fs::remove_file(&tmp);
        written
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        // The key is KEY_LEN bytes, the length the cipher takes.
        XChaCha20Poly1305::new_from_slice(&self.0).expect("a 32-byte key")
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A decrypted secret value. Zeroed on drop; `Debug` prints `<redacted>`.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// The value itself, for the proxy to inject. Never log it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret as listed: everything but its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretMeta {
    pub name: String,
    /// The injection rules, as JSON.
    pub rules_json: String,
    /// When it was first written, unix milliseconds.
    pub created_at: i64,
    /// When it was last written (rotated), unix milliseconds.
    pub updated_at: i64,
    /// 1 when first written, then one more per rotation.
    pub version: u32,
}

fn decode_meta(row: &Row<'_>) -> Result<SecretMeta> {
    let name: String = row.get("name")?;
    let d = Decoder::new(row, format!("secrets row '{name}'"));
    Ok(SecretMeta {
        rules_json: d.get("rules_json")?,
        created_at: d.get("created_at")?,
        updated_at: d.get("updated_at")?,
        version: d.get("version")?,
        name,
    })
}

impl Store {
    /// Stores `value` as secret `name` with its rules (JSON, stored as given): a new
    /// secret gets version 1, an existing one is rotated (new value and rules, a new
    /// nonce, `updated_at = now_ms`, version + 1). Returns the version written.
    pub fn put_secret(&self, key: &SecretKey, name: &str, value: &[u8], rules_json: &str, now_ms: i64) -> Result<u32> {
        let mut nonce = [0u8; NONCE_LEN];
        // The operating system's generator does not fail on any platform conductor runs
        // on; if it ever did, no secret could be stored safely.
        getrandom::fill(&mut nonce).expect("the operating system's random number generator failed");
        let ciphertext = key
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Corrupt {
                what: format!("secret '{name}'"),
                detail: "cannot encrypt the value (too long)".to_owned(),
            })?;
        let conn = self.conn();
        let version = conn
            .prepare_cached(
                "INSERT INTO secrets (name, ciphertext, nonce, rules_json, created_at, updated_at, version) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, 1) \
                 ON CONFLICT (name) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce, \
                 rules_json = excluded.rules_json, updated_at = excluded.updated_at, version = version + 1 \
                 RETURNING version",
            )?
            .query_row(params![name, ciphertext, nonce.as_slice(), rules_json, now_ms], |row| {
                row.get::<_, u32>(0)
            })?;
        Ok(version)
    }

    /// The value, rules and version of secret `name`, if it exists. A row that does not
    /// decrypt under `key` (another key, an altered row, a row copied from another name)
    /// is [`StoreError::Corrupt`], never garbage.
    pub fn get_secret_value(&self, key: &SecretKey, name: &str) -> Result<Option<(SecretValue, String, u32)>> {
        let row = query_opt(
            &self.conn(),
            "SELECT name, ciphertext, nonce, rules_json, created_at, updated_at, version \
             FROM secrets WHERE name = ?1",
            [name],
            |row| {
                let d = Decoder::new(row, format!("secrets row '{name}'"));
                Ok((
                    d.get::<Vec<u8>>("ciphertext")?,
                    d.get::<Vec<u8>>("nonce")?,
                    decode_meta(row)?,
                ))
            },
        )?;
        let Some((ciphertext, nonce, meta)) = row else {
            return Ok(None);
        };
        let nonce: [u8; NONCE_LEN] = nonce.as_slice().try_into().map_err(|_| StoreError::Corrupt {
            what: format!("secrets row '{name}', column nonce"),
            detail: format!("{} bytes; a nonce is {NONCE_LEN}", nonce.len()),
        })?;
        let plain = key
            .cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Corrupt {
                what: format!("secrets row '{name}', column ciphertext"),
                detail: "cannot decrypt: the key is not the one it was stored with, or the row was altered \
                         or copied from another secret"
                    .to_owned(),
            })?;
        Ok(Some((
            SecretValue(Zeroizing::new(plain)),
            meta.rules_json,
            meta.version,
        )))
    }

    /// Every secret, by name, without values.
    pub fn list_secrets(&self) -> Result<Vec<SecretMeta>> {
        query_all(
            &self.conn(),
            "SELECT name, rules_json, created_at, updated_at, version FROM secrets ORDER BY name",
            [],
            decode_meta,
        )
    }

    /// Deletes secret `name`; whether it existed.
    pub fn delete_secret(&self, name: &str) -> Result<bool> {
        let changed = self
            .conn()
            .prepare_cached("DELETE FROM secrets WHERE name = ?1")?
            .execute([name])?;
        Ok(changed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrations::MIGRATIONS;
    use crate::test_util::file_store;

    const RULES: &str = r#"[{"host":"github.com","inject":{"type":"basic","username":"git"}}]"#;

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_bytes([byte; KEY_LEN])
    }

    fn value(store: &Store, key: &SecretKey, name: &str) -> Option<(Vec<u8>, String, u32)> {
        store
            .get_secret_value(key, name)
            .unwrap()
            .map(|(v, rules, version)| (v.expose().to_vec(), rules, version))
    }

    fn raw_row(store: &Store, name: &str) -> (Vec<u8>, Vec<u8>) {
        store
            .conn()
            .query_row("SELECT ciphertext, nonce FROM secrets WHERE name = ?1", [name], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .unwrap()
    }

    fn assert_undecryptable(err: StoreError, name: &str) {
        match err {
            StoreError::Corrupt { what, detail } => {
                assert_eq!(what, format!("secrets row '{name}', column ciphertext"));
                assert!(detail.starts_with("cannot decrypt"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn put_and_get_round_trip() {
        let (_dir, store) = file_store();
        let k = key(7);
        assert_eq!(store.get_secret_value(&k, "github").unwrap().map(|_| ()), None);
        assert_eq!(store.put_secret(&k, "github", b"ghp_secret", RULES, 1_000).unwrap(), 1);
        assert_eq!(
            value(&store, &k, "github"),
            Some((b"ghp_secret".to_vec(), RULES.to_owned(), 1))
        );
        // Empty and binary values survive too.
        store.put_secret(&k, "empty", b"", "[]", 1_000).unwrap();
        assert_eq!(value(&store, &k, "empty").unwrap().0, b"");
        store.put_secret(&k, "binary", &[0, 255, 10, 13], "[]", 1_000).unwrap();
        assert_eq!(value(&store, &k, "binary").unwrap().0, [0, 255, 10, 13]);
        let (ciphertext, nonce) = raw_row(&store, "github");
        assert_eq!(nonce.len(), NONCE_LEN);
        assert_eq!(ciphertext.len(), b"ghp_secret".len() + 16, "the value and its tag");
    }

    #[test]
    fn the_value_is_not_in_the_database_file() {
        let (dir, store) = file_store();
        let secret = b"plain-value-that-must-not-be-stored";
        store.put_secret(&key(1), "s", secret, RULES, 1).unwrap();
        let mut found = false;
        for entry in fs::read_dir(dir.path()).unwrap() {
            let bytes = fs::read(entry.unwrap().path()).unwrap();
            found |= bytes.windows(secret.len()).any(|w| w == secret);
        }
        assert!(!found, "the plaintext reached the database or its WAL");
    }

    #[test]
    fn rotation_bumps_the_version_and_changes_the_ciphertext() {
        let (_dir, store) = file_store();
        let k = key(7);
        store.put_secret(&k, "github", b"one", RULES, 1_000).unwrap();
        let first = raw_row(&store, "github");
        // The same value again still gets a new nonce, hence a new ciphertext.
        assert_eq!(store.put_secret(&k, "github", b"one", RULES, 2_000).unwrap(), 2);
        let second = raw_row(&store, "github");
        assert_ne!(first.0, second.0);
        assert_ne!(first.1, second.1);
        assert_eq!(store.put_secret(&k, "github", b"two", "[]", 3_000).unwrap(), 3);
        assert_eq!(value(&store, &k, "github"), Some((b"two".to_vec(), "[]".to_owned(), 3)));
        assert_eq!(
            store.list_secrets().unwrap(),
            vec![SecretMeta {
                name: "github".into(),
                rules_json: "[]".into(),
                created_at: 1_000,
                updated_at: 3_000,
                version: 3,
            }]
        );
    }

    #[test]
    fn a_wrong_key_is_a_clear_error() {
        let (_dir, store) = file_store();
        store.put_secret(&key(1), "github", b"ghp_secret", RULES, 1).unwrap();
        let err = store.get_secret_value(&key(2), "github").unwrap_err();
        assert!(
            err.to_string().contains("the key is not the one it was stored with"),
            "{err}"
        );
        assert_undecryptable(err, "github");
    }

    #[test]
    fn rows_moved_between_names_or_altered_do_not_decrypt() {
        let (_dir, store) = file_store();
        let k = key(3);
        store.put_secret(&k, "github", b"github-token", RULES, 1).unwrap();
        store.put_secret(&k, "npm", b"npm-token", RULES, 1).unwrap();
        let (ciphertext, nonce) = raw_row(&store, "github");
        store
            .conn()
            .execute(
                "UPDATE secrets SET ciphertext = ?1, nonce = ?2 WHERE name = 'npm'",
                params![ciphertext, nonce],
            )
            .unwrap();
        assert_undecryptable(store.get_secret_value(&k, "npm").unwrap_err(), "npm");
        assert_eq!(value(&store, &k, "github").unwrap().0, b"github-token");

        // One flipped bit, or a nonce of the wrong size.
        let mut flipped = ciphertext.clone();
        flipped[0] ^= 1;
        store
            .conn()
            .execute("UPDATE secrets SET ciphertext = ?1 WHERE name = 'github'", [flipped])
            .unwrap();
        assert_undecryptable(store.get_secret_value(&k, "github").unwrap_err(), "github");
        store
            .conn()
            .execute("UPDATE secrets SET nonce = x'00' WHERE name = 'github'", [])
            .unwrap();
        match store.get_secret_value(&k, "github").unwrap_err() {
            StoreError::Corrupt { what, .. } => assert_eq!(what, "secrets row 'github', column nonce"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn list_and_delete_never_show_values() {
        let (_dir, store) = file_store();
        let k = key(9);
        assert_eq!(store.list_secrets().unwrap(), vec![]);
        store.put_secret(&k, "npm", b"npm-value", "[1]", 5).unwrap();
        store.put_secret(&k, "github", b"github-value", "[2]", 6).unwrap();
        let list = store.list_secrets().unwrap();
        assert_eq!(
            list.iter().map(|m| (m.name.as_str(), m.version)).collect::<Vec<_>>(),
            [("github", 1), ("npm", 1)]
        );
        let shown = format!("{list:?} {}", serde_json::to_string(&list).unwrap());
        assert!(!shown.contains("value") && !shown.contains("cipher"), "{shown}");

        let (v, _, _) = store.get_secret_value(&k, "npm").unwrap().unwrap();
        assert_eq!(format!("{v:?}"), "<redacted>");
        assert_eq!(format!("{k:?}"), "SecretKey(<redacted>)");

        assert!(store.delete_secret("npm").unwrap());
        assert!(!store.delete_secret("npm").unwrap());
        assert_eq!(value(&store, &k, "npm"), None);
        assert_eq!(store.list_secrets().unwrap().len(), 1);
    }

    #[test]
    fn key_file_is_created_0600_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let created = SecretKey::load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(text.trim(), hex::encode(created.0));
        // Only the key file is left behind, no temporary.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let loaded = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(loaded.0, created.0);
        // A key sealed with the one decrypts with the other.
        let store = Store::open_in_memory().unwrap();
        store.put_secret(&created, "s", b"v", "[]", 1).unwrap();
        assert_eq!(value(&store, &loaded, "s").unwrap().0, b"v");
        // Another file gets another key.
        let other = SecretKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert_ne!(other.0, created.0);
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        drop(SecretKey::load_or_create(&path).unwrap());
        let before = fs::read(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = SecretKey::load_or_create(&path).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{mode:o}");
            assert!(err.to_string().contains(&format!("mode {mode:04o}")), "{err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        // The refused file was not replaced.
        assert_eq!(fs::read(&path).unwrap(), before);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        SecretKey::load_or_create(&path).unwrap();
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        for content in ["", "abc", &"g".repeat(64), &"ab".repeat(33)] {
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = SecretKey::load_or_create(&path).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{content:?}");
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
        fs::write(&path, format!("  {}\n\n", "ab".repeat(32))).unwrap();
        assert_eq!(SecretKey::load(&path).unwrap().0, [0xab; KEY_LEN]);
        let err = SecretKey::load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        let err = SecretKey::load_or_create(&dir.path().join("missing/secrets.key")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn migration_adds_the_table_to_a_database_at_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conductor.db");
        // The version before the script that made the table.
        let previous = MIGRATIONS
            .iter()
            .position(|sql| sql.contains("CREATE TABLE secrets"))
            .unwrap();
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..previous] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", previous).unwrap();
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('instance_id', 'abcdef012345')",
                [],
            )
            .unwrap();
            let secrets: i64 = conn
                .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'secrets'", [], |row| {
                    row.get(0)
                })
                .unwrap();
            assert_eq!(secrets, 0);
        }
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(store.instance_id().unwrap(), "abcdef012345", "old data kept");
        assert_eq!(store.put_secret(&key(1), "github", b"v", RULES, 1).unwrap(), 1);
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(value(&store, &key(1), "github").unwrap().2, 1);
        // The table is STRICT: a value of the wrong type is refused on write.
        let err = store
            .conn()
            .execute("UPDATE secrets SET version = 'two' WHERE name = 'github'", [])
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot store TEXT value in INTEGER column"),
            "{err}"
        );
    }
}
