//! The `workspaces` table: one row per workspace container conductor created, kept after
//! removal (state `removed`) until the service deletes it.
//!
//! The service records intent before acting (`creating` before the engine is called,
//! `removing` before the container is removed), so after a crash the reconciler can tell
//! from these rows what was half done.

use conductor_core::config::NetworkMode;
use conductor_core::egress::ResolvedNetwork;
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::resources::WorkspaceLimits;
use conductor_core::secrets::SecretBinding;
use rusqlite::{params, Row};

use crate::{expect_row, query_all, query_opt, Decoder, Result, Store, Where};

const COLUMNS: &str = "id, agent_id, environment, image, container_name, container_id, \
     network, state, limits_json, volume_dir, created_at, last_used_at, error, network_policy_json, secrets_json";

/// A workspace as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    /// Conductor's id of the workspace.
    pub id: String,
    /// The agent that owns it.
    pub agent_id: String,
    /// Name of the environment it was created from.
    pub environment: String,
    /// Image reference the container runs.
    pub image: String,
    /// Engine container name (`claude-agent-<agent>-<short>`), known before the container is.
    pub container_name: String,
    /// Engine container id, once created.
    pub container_id: Option<String>,
    /// Engine network the container is attached to, if any.
    pub network: Option<String>,
    /// The network policy it was made with (a JSON column).
    pub network_policy: ResolvedNetwork,
    /// Lifecycle state.
    pub state: WorkspaceState,
    /// Resource limits (a JSON column).
    pub limits: WorkspaceLimits,
    /// Host directory holding the workspace's volumes.
    pub volume_dir: String,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// Last time a task or exec used it, unix milliseconds (drives idle cleanup).
    pub last_used_at: i64,
    /// Why the workspace failed or was lost, if it did.
    pub error: Option<String>,
    /// The secrets it may use and their placeholders (a JSON column; none for rows made
    /// before secrets). Names and placeholders only: values stay in the `secrets` table.
    pub secrets: Vec<SecretBinding>,
}

/// Which workspaces [`Store::list_workspaces`] returns. The default matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkspaceFilter {
    /// Only this agent's workspaces.
    pub agent_id: Option<String>,
    /// Only workspaces of this environment.
    pub environment: Option<String>,
    /// Only workspaces in one of these states; empty means any state.
    pub states: Vec<WorkspaceState>,
}

fn decode(row: &Row<'_>) -> Result<WorkspaceRecord> {
    let id: String = row.get("id")?;
    let d = Decoder::new(row, format!("workspaces row '{id}'"));
    Ok(WorkspaceRecord {
        agent_id: d.get("agent_id")?,
        environment: d.get("environment")?,
        image: d.get("image")?,
        container_name: d.get("container_name")?,
        container_id: d.get("container_id")?,
        network_policy: match d.get::<Option<String>>("network_policy_json")? {
            Some(_) => d.json("network_policy_json")?,
            // Made before proxy mode: a bridge network means `egress`.
            None => ResolvedNetwork {
                mode: if d.get::<Option<String>>("network")?.is_some() {
                    NetworkMode::Egress
                } else {
                    NetworkMode::Isolated
                },
                ..Default::default()
            },
        },
        network: d.get("network")?,
        state: d.parse("state")?,
        limits: d.json("limits_json")?,
        volume_dir: d.get("volume_dir")?,
        created_at: d.get("created_at")?,
        last_used_at: d.get("last_used_at")?,
        error: d.get("error")?,
        secrets: match d.get::<Option<String>>("secrets_json")? {
            Some(_) => d.json("secrets_json")?,
            None => Vec::new(),
        },
        id,
    })
}

impl WorkspaceRecord {
    /// What names its container to the engine: the engine's id once known, else the name.
    pub fn container(&self) -> &str {
        self.container_id.as_deref().unwrap_or(&self.container_name)
    }
}

fn not_found(id: &str) -> impl FnOnce() -> String + '_ {
    move || format!("workspace '{id}'")
}

/// Inserts one row on `conn` (a connection or a transaction).
fn insert_row(conn: &rusqlite::Connection, ws: &WorkspaceRecord) -> Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO workspaces ({COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))?
    .execute(params![
        ws.id,
        ws.agent_id,
        ws.environment,
        ws.image,
        ws.container_name,
        ws.container_id,
        ws.network,
        ws.state.as_str(),
        serde_json::to_string(&ws.limits).map_err(|e| crate::StoreError::Corrupt {
            what: format!("limits of workspace '{}'", ws.id),
            detail: e.to_string(),
        })?,
        ws.volume_dir,
        ws.created_at,
        ws.last_used_at,
        ws.error,
        serde_json::to_string(&ws.network_policy).map_err(|e| crate::StoreError::Corrupt {
            what: format!("network policy of workspace '{}'", ws.id),
            detail: e.to_string(),
        })?,
        if ws.secrets.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&ws.secrets).map_err(|e| crate::StoreError::Corrupt {
                    what: format!("secrets of workspace '{}'", ws.id),
                    detail: e.to_string(),
                })?,
            )
        },
    ])?;
    Ok(())
}

impl Store {
    /// Records a new workspace. Fails with a uniqueness violation
    /// ([`crate::StoreError::is_conflict`]) if the id exists.
    pub fn insert_workspace(&self, ws: &WorkspaceRecord) -> Result<()> {
        insert_row(&self.conn(), ws)
    }

    /// Records several new workspaces in one transaction: all of them or none (a fork's
    /// copies, recorded `creating` before anything is made).
    pub fn insert_workspaces(&self, rows: &[WorkspaceRecord]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for ws in rows {
            insert_row(&tx, ws)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves every workspace of `ids` from `creating` to `running` in one transaction, or
    /// none of them (returning false) when one is not `creating` any more.
    pub fn start_created_workspaces(&self, ids: &[String]) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut changed = 0;
        for id in ids {
            changed += tx
                .prepare_cached(
                    "UPDATE workspaces SET state = 'running', error = NULL WHERE id = ?1 AND state = 'creating'",
                )?
                .execute([id])?;
        }
        if changed != ids.len() {
            return Ok(false);
        }
        tx.commit()?;
        Ok(true)
    }

    /// The workspace with this id, if any.
    pub fn get_workspace(&self, id: &str) -> Result<Option<WorkspaceRecord>> {
        query_opt(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM workspaces WHERE id = ?1"),
            [id],
            decode,
        )
    }

    /// Workspaces matching `filter`, oldest first.
    pub fn list_workspaces(&self, filter: &WorkspaceFilter) -> Result<Vec<WorkspaceRecord>> {
        let mut w = Where::default();
        w.eq("agent_id", filter.agent_id.as_deref());
        w.eq("environment", filter.environment.as_deref());
        w.any_of("state", filter.states.iter().map(|s| s.as_str()));
        query_all(
            &self.conn(),
            &format!("SELECT {COLUMNS} FROM workspaces{} ORDER BY created_at, id", w.sql()),
            w.params(),
            decode,
        )
    }

    /// Sets the state and the error message (`None` clears a previous error).
    pub fn set_workspace_state(&self, id: &str, state: WorkspaceState, error: Option<&str>) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE workspaces SET state = ?2, error = ?3 WHERE id = ?1")?
            .execute(params![id, state.as_str(), error])?;
        expect_row(changed, not_found(id))
    }

    /// Marks a `running` workspace whose container `container_id` exited as `stopped` with
    /// `error`; does nothing (returns false) when the row moved on meanwhile (another state,
    /// or another container after a restore).
    pub fn mark_container_exited(&self, id: &str, container_id: &str, error: &str) -> Result<bool> {
        let changed = self
            .conn()
            .prepare_cached(
                "UPDATE workspaces SET state = 'stopped', error = ?3 \
                 WHERE id = ?1 AND state = 'running' AND container_id = ?2",
            )?
            .execute(params![id, container_id, error])?;
        Ok(changed == 1)
    }

    /// Records the engine's container id and the network it joined, once created.
    pub fn set_workspace_container(&self, id: &str, container_id: &str, network: Option<&str>) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE workspaces SET container_id = ?2, network = ?3 WHERE id = ?1")?
            .execute(params![id, container_id, network])?;
        expect_row(changed, not_found(id))
    }

    /// Records the image the container now runs (a restore re-creates it from a snapshot).
    pub fn set_workspace_image(&self, id: &str, image: &str) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE workspaces SET image = ?2 WHERE id = ?1")?
            .execute(params![id, image])?;
        expect_row(changed, not_found(id))
    }

    /// Marks the workspace as used at `now_ms`.
    pub fn touch_workspace(&self, id: &str, now_ms: i64) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE workspaces SET last_used_at = ?2 WHERE id = ?1")?
            .execute(params![id, now_ms])?;
        expect_row(changed, not_found(id))
    }

    /// Records a use of the workspace at `now_ms` and returns its row, in one statement
    /// (what exec and the file API do before each operation); `None` when there is no such
    /// workspace.
    pub fn use_workspace(&self, id: &str, now_ms: i64) -> Result<Option<WorkspaceRecord>> {
        query_opt(
            &self.conn(),
            &format!("UPDATE workspaces SET last_used_at = ?2 WHERE id = ?1 RETURNING {COLUMNS}"),
            params![id, now_ms],
            decode,
        )
    }

    /// Hands a running workspace of `from_agent` to `to_agent` under a new container name
    /// (a warm-pool claim). Returns false, changing nothing, when the row is not a running
    /// workspace of `from_agent` any more: another process claimed it first.
    pub fn reassign_workspace(
        &self,
        id: &str,
        from_agent: &str,
        to_agent: &str,
        container_name: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let changed = self
            .conn()
            .prepare_cached(
                "UPDATE workspaces SET agent_id = ?3, container_name = ?4, last_used_at = ?5 \
                 WHERE id = ?1 AND agent_id = ?2 AND state = 'running'",
            )?
            .execute(params![id, from_agent, to_agent, container_name, now_ms])?;
        Ok(changed == 1)
    }

    /// Deletes the row. Snapshot rows of the workspace are not touched.
    pub fn delete_workspace(&self, id: &str) -> Result<()> {
        let changed = self
            .conn()
            .prepare_cached("DELETE FROM workspaces WHERE id = ?1")?
            .execute([id])?;
        expect_row(changed, not_found(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::file_store;
    use crate::StoreError;

    fn sample_limits() -> WorkspaceLimits {
        serde_json::from_str(r#"{"memory":"2Gi","cpu":"1","pids":512,"nofile":1024,"nproc":1024,"volume_size":"10Gi"}"#)
            .unwrap()
    }

    fn ws(id: &str, agent: &str, env: &str, created_at: i64) -> WorkspaceRecord {
        WorkspaceRecord {
            id: id.to_owned(),
            agent_id: agent.to_owned(),
            environment: env.to_owned(),
            image: "localhost/conductor/python-dev:latest".to_owned(),
            container_name: format!("claude-agent-{agent}-{id}"),
            container_id: None,
            network: None,
            network_policy: Default::default(),
            state: WorkspaceState::Creating,
            limits: sample_limits(),
            volume_dir: format!("/data/isolated/agent_{agent}/{id}"),
            created_at,
            last_used_at: created_at,
            error: None,
            secrets: Vec::new(),
        }
    }

    #[test]
    fn insert_get_and_update_round_trip() {
        let (_dir, store) = file_store();
        let original = ws("w1", "a1", "python", 100);
        store.insert_workspace(&original).unwrap();
        assert_eq!(store.get_workspace("w1").unwrap(), Some(original.clone()));
        assert_eq!(store.get_workspace("nope").unwrap(), None);

        store
            .set_workspace_container("w1", "c0ffee", Some("conductor-a1"))
            .unwrap();
        store.set_workspace_state("w1", WorkspaceState::Running, None).unwrap();
        store.touch_workspace("w1", 250).unwrap();
        assert_eq!(store.use_workspace("w1", 260).unwrap().unwrap().last_used_at, 260);
        assert_eq!(store.use_workspace("nope", 260).unwrap(), None);
        store.touch_workspace("w1", 250).unwrap();
        store
            .set_workspace_image("w1", "localhost/conductor-snapshots/w1:base-1")
            .unwrap();
        let got = store.get_workspace("w1").unwrap().unwrap();
        assert_eq!(got.image, "localhost/conductor-snapshots/w1:base-1");
        assert_eq!(got.container_id.as_deref(), Some("c0ffee"));
        assert_eq!(got.network.as_deref(), Some("conductor-a1"));
        assert_eq!(got.state, WorkspaceState::Running);
        assert_eq!(got.last_used_at, 250);
        assert_eq!(got.created_at, 100);

        store
            .set_workspace_state("w1", WorkspaceState::Lost, Some("container vanished"))
            .unwrap();
        let got = store.get_workspace("w1").unwrap().unwrap();
        assert_eq!(got.state, WorkspaceState::Lost);
        assert_eq!(got.error.as_deref(), Some("container vanished"));

        store.delete_workspace("w1").unwrap();
        assert_eq!(store.get_workspace("w1").unwrap(), None);
    }

    #[test]
    fn a_workspace_is_reassigned_once() {
        let store = Store::open_in_memory().unwrap();
        store.insert_workspace(&ws("w1", "pool", "python", 1)).unwrap();
        assert!(
            !store.reassign_workspace("w1", "pool", "a1", "c-a1", 5).unwrap(),
            "not running yet"
        );
        store.set_workspace_state("w1", WorkspaceState::Running, None).unwrap();
        assert!(store.reassign_workspace("w1", "pool", "a1", "c-a1", 5).unwrap());
        assert!(
            !store.reassign_workspace("w1", "pool", "a2", "c-a2", 6).unwrap(),
            "already claimed"
        );
        let got = store.get_workspace("w1").unwrap().unwrap();
        assert_eq!(
            (got.agent_id.as_str(), got.container_name.as_str(), got.last_used_at),
            ("a1", "c-a1", 5)
        );
    }

    #[test]
    fn an_exited_container_stops_only_its_own_running_row() {
        let store = Store::open_in_memory().unwrap();
        store.insert_workspace(&ws("w1", "a1", "python", 1)).unwrap();
        store.set_workspace_container("w1", "c1", None).unwrap();
        assert!(
            !store.mark_container_exited("w1", "c1", "died").unwrap(),
            "still creating"
        );
        store.set_workspace_state("w1", WorkspaceState::Running, None).unwrap();
        assert!(
            !store.mark_container_exited("w1", "c0", "died").unwrap(),
            "another container"
        );
        assert!(store.mark_container_exited("w1", "c1", "died").unwrap());
        let got = store.get_workspace("w1").unwrap().unwrap();
        assert_eq!(
            (got.state, got.error.as_deref()),
            (WorkspaceState::Stopped, Some("died"))
        );
        assert!(
            !store.mark_container_exited("w1", "c1", "again").unwrap(),
            "already stopped"
        );
    }

    #[test]
    fn rows_recorded_together_start_together_or_not_at_all() {
        let store = Store::open_in_memory().unwrap();
        store.insert_workspace(&ws("w0", "a1", "python", 1)).unwrap();
        // One duplicate id: none of the rows is recorded.
        let err = store
            .insert_workspaces(&[ws("w1", "a1", "python", 2), ws("w0", "a1", "python", 2)])
            .unwrap_err();
        assert!(err.is_conflict(), "{err:?}");
        assert_eq!(store.get_workspace("w1").unwrap(), None);

        let ids: Vec<String> = ["w1", "w2", "w3"].map(String::from).to_vec();
        let rows: Vec<WorkspaceRecord> = ids.iter().map(|id| ws(id, "a1", "python", 3)).collect();
        store.insert_workspaces(&rows).unwrap();
        // One of them moved on (removed meanwhile): none starts.
        store.set_workspace_state("w2", WorkspaceState::Removing, None).unwrap();
        assert!(!store.start_created_workspaces(&ids).unwrap());
        let state = |id: &str| store.get_workspace(id).unwrap().unwrap().state;
        assert_eq!(state("w1"), WorkspaceState::Creating);
        store
            .set_workspace_state("w2", WorkspaceState::Creating, Some("x"))
            .unwrap();
        assert!(store.start_created_workspaces(&ids).unwrap());
        for id in &ids {
            let got = store.get_workspace(id).unwrap().unwrap();
            assert_eq!((got.state, got.error), (WorkspaceState::Running, None));
        }
    }

    #[test]
    fn duplicate_id_is_a_conflict() {
        let store = Store::open_in_memory().unwrap();
        store.insert_workspace(&ws("w1", "a1", "python", 1)).unwrap();
        let err = store.insert_workspace(&ws("w1", "a2", "node", 2)).unwrap_err();
        assert!(err.is_conflict(), "{err:?}");
    }

    #[test]
    fn updates_of_missing_rows_are_not_found() {
        let store = Store::open_in_memory().unwrap();
        let expect_not_found = |r: Result<()>| match r {
            Err(StoreError::NotFound { what }) => assert_eq!(what, "workspace 'ghost'"),
            other => panic!("expected NotFound, got {other:?}"),
        };
        expect_not_found(store.set_workspace_state("ghost", WorkspaceState::Running, None));
        expect_not_found(store.set_workspace_container("ghost", "c1", None));
        expect_not_found(store.touch_workspace("ghost", 5));
        expect_not_found(store.set_workspace_image("ghost", "x"));
        expect_not_found(store.delete_workspace("ghost"));
    }

    #[test]
    fn list_filters_and_orders_by_creation() {
        let store = Store::open_in_memory().unwrap();
        store.insert_workspace(&ws("w3", "a1", "node", 30)).unwrap();
        store.insert_workspace(&ws("w1", "a1", "python", 10)).unwrap();
        store.insert_workspace(&ws("w2", "a2", "python", 20)).unwrap();
        store.set_workspace_state("w1", WorkspaceState::Running, None).unwrap();
        store.set_workspace_state("w2", WorkspaceState::Removed, None).unwrap();

        let ids = |f: WorkspaceFilter| -> Vec<String> {
            store.list_workspaces(&f).unwrap().into_iter().map(|w| w.id).collect()
        };
        assert_eq!(ids(WorkspaceFilter::default()), ["w1", "w2", "w3"]);
        assert_eq!(
            ids(WorkspaceFilter {
                agent_id: Some("a1".into()),
                ..Default::default()
            }),
            ["w1", "w3"]
        );
        assert_eq!(
            ids(WorkspaceFilter {
                environment: Some("python".into()),
                ..Default::default()
            }),
            ["w1", "w2"]
        );
        assert_eq!(
            ids(WorkspaceFilter {
                states: vec![WorkspaceState::Running, WorkspaceState::Creating],
                ..Default::default()
            }),
            ["w1", "w3"]
        );
        assert_eq!(
            ids(WorkspaceFilter {
                agent_id: Some("a1".into()),
                environment: Some("python".into()),
                states: vec![WorkspaceState::Removed],
            }),
            Vec::<String>::new()
        );
    }

    #[test]
    fn unknown_state_is_corrupt_naming_the_table_and_row() {
        let (_dir, store) = file_store();
        store.insert_workspace(&ws("w1", "a1", "python", 1)).unwrap();
        store
            .conn()
            .execute("UPDATE workspaces SET state = 'exploded' WHERE id = 'w1'", [])
            .unwrap();
        match store.get_workspace("w1").unwrap_err() {
            StoreError::Corrupt { what, detail } => {
                assert_eq!(what, "workspaces row 'w1', column state");
                assert!(detail.contains("exploded"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            store.list_workspaces(&WorkspaceFilter::default()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn secret_bindings_round_trip_and_old_rows_have_none() {
        let (_dir, store) = file_store();
        let mut w = ws("w1", "a1", "python", 100);
        w.secrets = vec![SecretBinding {
            name: "github".into(),
            placeholder: "conductor-secret-github-0123".into(),
        }];
        store.insert_workspace(&w).unwrap();
        assert_eq!(store.get_workspace("w1").unwrap().unwrap().secrets, w.secrets);
        store.insert_workspace(&ws("w2", "a1", "python", 101)).unwrap();
        let raw: Option<String> = store
            .conn()
            .query_row("SELECT secrets_json FROM workspaces WHERE id = 'w2'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(raw, None, "no secrets: NULL, as in rows made before the column");
        assert!(store.get_workspace("w2").unwrap().unwrap().secrets.is_empty());
    }

    #[test]
    fn the_network_policy_round_trips_and_old_rows_follow_their_network() {
        let (_dir, store) = file_store();
        let mut w = ws("w1", "a1", "python", 100);
        w.network_policy = ResolvedNetwork {
            mode: NetworkMode::Proxy,
            allow: vec!["pypi".into()],
            deny: vec!["evil.example".into()],
        };
        store.insert_workspace(&w).unwrap();
        assert_eq!(
            store.get_workspace("w1").unwrap().unwrap().network_policy,
            w.network_policy
        );
        // Rows made before the column: NULL, the mode follows from the bridge network.
        store.insert_workspace(&ws("w2", "a1", "python", 101)).unwrap();
        store.insert_workspace(&ws("w3", "a1", "python", 102)).unwrap();
        store
            .conn()
            .execute(
                "UPDATE workspaces SET network_policy_json = NULL, network = CASE id WHEN 'w3' THEN 'net' END \
                 WHERE id IN ('w2', 'w3')",
                [],
            )
            .unwrap();
        assert_eq!(
            store.get_workspace("w2").unwrap().unwrap().network_policy.mode,
            NetworkMode::Isolated
        );
        assert_eq!(
            store.get_workspace("w3").unwrap().unwrap().network_policy.mode,
            NetworkMode::Egress
        );
    }
}
