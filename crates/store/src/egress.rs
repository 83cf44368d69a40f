//! The `egress_events` table: the audit of outbound connections, one row per connection
//! attempt a workspace made through conductor's egress proxy, allowed or denied.
//!
//! `id` only grows, so it is the cursor for following the audit
//! ([`EgressFilter::after_id`]). Rows are not tied to their workspace or task: they stay
//! after either is removed, until [`Store::prune_egress_events`] drops them by age and count.

use std::fmt;
use std::str::FromStr;

use rusqlite::{params, Row, TransactionBehavior};

use crate::{query_all, Decoder, Result, Store, Where};

const COLUMNS: &str = "id, at_ms, workspace_id, task_id, method, host, port, resolved, decision, \
     rule, reason, bytes_up, bytes_down, duration_ms, error, injected";

/// At most this many hosts are listed in an [`EgressSummary`].
const SUMMARY_HOSTS: i64 = 50;

/// Whether the proxy let a connection through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressDecision {
    Allowed,
    Denied,
}

impl EgressDecision {
    /// Both decisions, in the order [`Store::egress_counts`] reports them.
    pub const ALL: [EgressDecision; 2] = [Self::Allowed, Self::Denied];

    /// The spelling stored in the `decision` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
        }
    }
}

impl fmt::Display for EgressDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EgressDecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a valid EgressDecision"))
    }
}

/// One outbound connection attempt, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EgressEventRecord {
    /// Position in the audit, assigned by the store; only ever grows. Ignored on insert.
    pub id: i64,
    /// When the attempt started, unix milliseconds.
    pub at_ms: i64,
    /// The workspace that made it.
    pub workspace_id: String,
    /// The task running in the workspace at the time, if any.
    pub task_id: Option<String>,
    /// The proxy request method: `CONNECT`, `GET`, ...
    pub method: String,
    /// The host asked for (name or IP literal).
    pub host: String,
    /// The port asked for.
    pub port: u16,
    /// The address actually connected to, if the proxy got that far.
    pub resolved: Option<String>,
    /// Allowed or denied.
    pub decision: EgressDecision,
    /// The policy rule that decided, if one did.
    pub rule: Option<String>,
    /// Short code of why it was denied (`not_allowed`, `ip_literal`, `special_address`,
    /// `sni_mismatch`, `connection_limit`, ...).
    pub reason: Option<String>,
    /// Bytes sent by the workspace.
    pub bytes_up: u64,
    /// Bytes received by the workspace.
    pub bytes_down: u64,
    /// How long the connection lasted, milliseconds.
    pub duration_ms: u64,
    /// What went wrong after the decision (upstream unreachable, reset, ...), if anything.
    pub error: Option<String>,
    /// The names (never the values) of the secrets the proxy injected into this
    /// connection's requests; empty for a connection it did not intercept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub injected: Vec<String>,
}

/// Which events [`Store::list_egress_events`] returns. The default matches all, without a
/// limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressFilter {
    /// Only this workspace's events.
    pub workspace_id: Option<String>,
    /// Only events of this task.
    pub task_id: Option<String>,
    /// Only allowed, or only denied, events.
    pub decision: Option<EgressDecision>,
    /// Only events with a larger id (a follow cursor): then the *first* `limit` of them.
    /// Without a cursor, the *last* `limit` events (a tail).
    pub after_id: Option<i64>,
    /// Page size; 0 means no limit.
    pub limit: usize,
}

/// A task's egress at a glance, for its result.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EgressSummary {
    /// Allowed attempts.
    pub allowed: u64,
    /// Denied attempts.
    pub denied: u64,
    /// Bytes sent, over all attempts.
    pub bytes_up: u64,
    /// Bytes received, over all attempts.
    pub bytes_down: u64,
    /// Per destination, most attempts first (then by host); at most 50.
    pub hosts: Vec<EgressHostSummary>,
}

/// Attempts to one destination within an [`EgressSummary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EgressHostSummary {
    /// The host asked for.
    pub host: String,
    /// The port asked for.
    pub port: u16,
    /// Allowed attempts.
    pub allowed: u64,
    /// Denied attempts.
    pub denied: u64,
}

fn decode(row: &Row<'_>) -> Result<EgressEventRecord> {
    let id: i64 = row.get("id")?;
    let d = Decoder::new(row, format!("egress_events row {id}"));
    Ok(EgressEventRecord {
        at_ms: d.get("at_ms")?,
        workspace_id: d.get("workspace_id")?,
        task_id: d.get("task_id")?,
        method: d.get("method")?,
        host: d.get("host")?,
        port: d.get("port")?,
        resolved: d.get("resolved")?,
        decision: d.parse("decision")?,
        rule: d.get("rule")?,
        reason: d.get("reason")?,
        bytes_up: d.get("bytes_up")?,
        bytes_down: d.get("bytes_down")?,
        duration_ms: d.get("duration_ms")?,
        error: d.get("error")?,
        injected: d
            .get::<Option<String>>("injected")?
            .map(|names| names.split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default(),
        id,
    })
}

fn decode_host(row: &Row<'_>) -> Result<EgressHostSummary> {
    let host: String = row.get("host")?;
    let d = Decoder::new(row, format!("egress_events of host '{host}'"));
    Ok(EgressHostSummary {
        port: d.get("port")?,
        allowed: d.get("allowed")?,
        denied: d.get("denied")?,
        host,
    })
}

/// SQLite's "no limit" for a `limit` of 0.
fn sql_limit(limit: usize) -> i64 {
    if limit == 0 {
        -1
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

impl Store {
    /// Records one connection attempt (`e.id` is ignored) and returns its id.
    pub fn insert_egress_event(&self, e: &EgressEventRecord) -> Result<i64> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO egress_events (at_ms, workspace_id, task_id, method, host, port, \
             resolved, decision, rule, reason, bytes_up, bytes_down, duration_ms, error, injected) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?
        .execute(params![
            e.at_ms,
            e.workspace_id,
            e.task_id,
            e.method,
            e.host,
            e.port,
            e.resolved,
            e.decision.as_str(),
            e.rule,
            e.reason,
            e.bytes_up,
            e.bytes_down,
            e.duration_ms,
            e.error,
            (!e.injected.is_empty()).then(|| e.injected.join(",")),
        ])?;
        Ok(conn.last_insert_rowid())
    }

    /// Events matching `filter`, in id order. With `after_id`, the first `limit` events after
    /// it (continue from the last one's id); without, the last `limit` events (a tail).
    pub fn list_egress_events(&self, filter: &EgressFilter) -> Result<Vec<EgressEventRecord>> {
        let mut w = Where::default();
        w.eq("workspace_id", filter.workspace_id.as_deref());
        w.eq("task_id", filter.task_id.as_deref());
        w.eq("decision", filter.decision.map(EgressDecision::as_str));
        let sql = match filter.after_id {
            Some(after_id) => {
                let after = w.param(after_id);
                w.clauses.push(format!("id > {after}"));
                let clause = w.sql();
                let limit = w.param(sql_limit(filter.limit));
                format!("SELECT {COLUMNS} FROM egress_events{clause} ORDER BY id LIMIT {limit}")
            }
            None => {
                let clause = w.sql();
                let limit = w.param(sql_limit(filter.limit));
                format!(
                    "SELECT * FROM (SELECT {COLUMNS} FROM egress_events{clause} \
                     ORDER BY id DESC LIMIT {limit}) ORDER BY id"
                )
            }
        };
        query_all(&self.conn(), &sql, w.params(), decode)
    }

    /// Totals of the task's egress, and its busiest destinations.
    pub fn egress_summary(&self, task_id: &str) -> Result<EgressSummary> {
        let conn = self.conn();
        let totals = query_all(
            &conn,
            "SELECT decision, COUNT(*) AS n, SUM(bytes_up) AS up, SUM(bytes_down) AS down \
             FROM egress_events WHERE task_id = ?1 GROUP BY decision",
            [task_id],
            |row| {
                let d = Decoder::new(row, format!("egress_events of task '{task_id}'"));
                Ok((
                    d.parse::<EgressDecision>("decision")?,
                    d.get::<u64>("n")?,
                    d.get::<u64>("up")?,
                    d.get::<u64>("down")?,
                ))
            },
        )?;
        let mut summary = EgressSummary::default();
        for (decision, n, up, down) in totals {
            match decision {
                EgressDecision::Allowed => summary.allowed = n,
                EgressDecision::Denied => summary.denied = n,
            }
            summary.bytes_up += up;
            summary.bytes_down += down;
        }
        summary.hosts = query_all(
            &conn,
            "SELECT host, port, SUM(decision = ?2) AS allowed, SUM(decision = ?3) AS denied \
             FROM egress_events WHERE task_id = ?1 GROUP BY host, port \
             ORDER BY COUNT(*) DESC, host, port LIMIT ?4",
            params![
                task_id,
                EgressDecision::Allowed.as_str(),
                EgressDecision::Denied.as_str(),
                SUMMARY_HOSTS
            ],
            decode_host,
        )?;
        Ok(summary)
    }

    /// The number of events by decision and reason (`""` for none), for metrics; only
    /// combinations that occur, ordered by decision then reason.
    pub fn egress_counts(&self) -> Result<Vec<(EgressDecision, String, u64)>> {
        query_all(
            &self.conn(),
            "SELECT decision, COALESCE(reason, '') AS reason, COUNT(*) AS n FROM egress_events \
             GROUP BY decision, COALESCE(reason, '') ORDER BY decision, reason",
            [],
            |row| {
                let d = Decoder::new(row, "egress_events".to_owned());
                Ok((d.parse("decision")?, d.get("reason")?, d.get("n")?))
            },
        )
    }

    /// Deletes the events that started before `older_than_ms`, then the oldest (by id) of
    /// the rest beyond the newest `keep_max_rows`, in one transaction. Returns how many rows
    /// went.
    pub fn prune_egress_events(&self, older_than_ms: i64, keep_max_rows: u64) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let by_age = tx
            .prepare_cached("DELETE FROM egress_events WHERE at_ms < ?1")?
            .execute([older_than_ms])?;
        // The subquery walks the primary key from the newest row, `keep_max_rows` steps at
        // most; NULL (nothing deleted) when no more than that many rows remain.
        let by_count = tx
            .prepare_cached(
                "DELETE FROM egress_events WHERE id <= \
                 (SELECT id FROM egress_events ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            )?
            .execute([i64::try_from(keep_max_rows).unwrap_or(i64::MAX)])?;
        tx.commit()?;
        Ok((by_age + by_count) as u64)
    }
}

#[cfg(test)]
mod tests {
    use conductor_core::lifecycle::WorkspaceState;

    use super::*;
    use crate::migrations::MIGRATIONS;
    use crate::test_util::file_store;
    use crate::{StoreError, WorkspaceRecord};

    fn event(
        workspace: &str,
        task: Option<&str>,
        host: &str,
        decision: EgressDecision,
        at_ms: i64,
    ) -> EgressEventRecord {
        EgressEventRecord {
            id: 0,
            at_ms,
            workspace_id: workspace.to_owned(),
            task_id: task.map(str::to_owned),
            method: "CONNECT".to_owned(),
            host: host.to_owned(),
            port: 443,
            resolved: None,
            decision,
            rule: None,
            reason: (decision == EgressDecision::Denied).then(|| "not_allowed".to_owned()),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            error: None,
            injected: Vec::new(),
        }
    }

    fn allowed(workspace: &str, task: Option<&str>, host: &str, at_ms: i64) -> EgressEventRecord {
        event(workspace, task, host, EgressDecision::Allowed, at_ms)
    }

    fn denied(workspace: &str, task: Option<&str>, host: &str, at_ms: i64) -> EgressEventRecord {
        event(workspace, task, host, EgressDecision::Denied, at_ms)
    }

    fn ids(store: &Store, filter: &EgressFilter) -> Vec<i64> {
        store
            .list_egress_events(filter)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    fn all_ids(store: &Store) -> Vec<i64> {
        ids(store, &EgressFilter::default())
    }

    fn table_exists(conn: &rusqlite::Connection, name: &str) -> bool {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type IN ('table', 'index') AND name = ?1",
            [name],
            |row| row.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }

    #[test]
    fn decision_spellings_round_trip() {
        for d in EgressDecision::ALL {
            assert_eq!(d.as_str().parse::<EgressDecision>(), Ok(d));
            assert_eq!(d.to_string(), d.as_str());
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
        }
        assert!("maybe".parse::<EgressDecision>().unwrap_err().contains("\"maybe\""));
    }

    #[test]
    fn insert_and_list_round_trip_every_field() {
        let (_dir, store) = file_store();
        let full = EgressEventRecord {
            id: 999,
            at_ms: 1_700_000_000_123,
            workspace_id: "w1".into(),
            task_id: Some("t1".into()),
            method: "CONNECT".into(),
            host: "pypi.org".into(),
            port: u16::MAX,
            resolved: Some("151.101.0.223".into()),
            decision: EgressDecision::Allowed,
            rule: Some("pypi (pypi.org)".into()),
            reason: None,
            bytes_up: 1_234,
            bytes_down: i64::MAX as u64,
            duration_ms: 5_678,
            error: Some("upstream reset".into()),
            injected: vec!["github".into(), "npm-corp".into()],
        };
        let sparse = EgressEventRecord {
            id: 0,
            at_ms: 1_700_000_000_200,
            workspace_id: "w1".into(),
            task_id: None,
            method: "GET".into(),
            host: "10.0.0.1".into(),
            port: 80,
            resolved: None,
            decision: EgressDecision::Denied,
            rule: None,
            reason: Some("special_address".into()),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            error: None,
            injected: Vec::new(),
        };
        let id1 = store.insert_egress_event(&full).unwrap();
        let id2 = store.insert_egress_event(&sparse).unwrap();
        assert!(id1 < id2);
        assert_ne!(id1, 999, "the given id is ignored");

        let got = store.list_egress_events(&EgressFilter::default()).unwrap();
        assert_eq!(
            got,
            vec![
                EgressEventRecord { id: id1, ..full },
                EgressEventRecord { id: id2, ..sparse },
            ]
        );
        let json = serde_json::to_value(&got[1]).unwrap();
        assert_eq!(json["decision"], "denied");
        assert_eq!(json["port"], 80);
    }

    #[test]
    fn tail_without_cursor_and_pages_after_it() {
        let store = Store::open_in_memory().unwrap();
        let inserted: Vec<i64> = (0..5)
            .map(|i| store.insert_egress_event(&allowed("w1", None, "a.example", i)).unwrap())
            .collect();

        let tail = |limit| EgressFilter {
            limit,
            ..Default::default()
        };
        assert_eq!(ids(&store, &tail(3)), inserted[2..], "the last 3, ascending");
        assert_eq!(ids(&store, &tail(0)), inserted, "0 = no limit");
        assert_eq!(ids(&store, &tail(10)), inserted, "fewer rows than the limit");

        let page = |after_id, limit| EgressFilter {
            after_id: Some(after_id),
            limit,
            ..Default::default()
        };
        assert_eq!(ids(&store, &page(0, 2)), inserted[..2], "the first 2 after the cursor");
        assert_eq!(ids(&store, &page(inserted[1], 2)), inserted[2..4]);
        assert_eq!(ids(&store, &page(inserted[3], 2)), inserted[4..]);
        assert_eq!(ids(&store, &page(inserted[4], 2)), Vec::<i64>::new());
        assert_eq!(ids(&store, &page(inserted[0], 0)), inserted[1..]);
    }

    #[test]
    fn list_filters_by_workspace_task_and_decision() {
        let store = Store::open_in_memory().unwrap();
        let a = store.insert_egress_event(&allowed("w1", Some("t1"), "a", 1)).unwrap();
        let b = store.insert_egress_event(&denied("w1", Some("t1"), "b", 2)).unwrap();
        let c = store.insert_egress_event(&allowed("w2", Some("t2"), "c", 3)).unwrap();
        let d = store.insert_egress_event(&denied("w1", None, "d", 4)).unwrap();
        let e = store.insert_egress_event(&denied("w2", Some("t1"), "e", 5)).unwrap();

        let workspace = |id: &str| EgressFilter {
            workspace_id: Some(id.into()),
            ..Default::default()
        };
        assert_eq!(ids(&store, &workspace("w1")), [a, b, d]);
        assert_eq!(ids(&store, &workspace("w2")), [c, e]);
        assert_eq!(ids(&store, &workspace("w3")), Vec::<i64>::new());
        let task = EgressFilter {
            task_id: Some("t1".into()),
            ..Default::default()
        };
        assert_eq!(ids(&store, &task), [a, b, e]);
        let only_denied = EgressFilter {
            decision: Some(EgressDecision::Denied),
            ..Default::default()
        };
        assert_eq!(ids(&store, &only_denied), [b, d, e]);
        let combined = EgressFilter {
            workspace_id: Some("w1".into()),
            task_id: Some("t1".into()),
            decision: Some(EgressDecision::Denied),
            ..Default::default()
        };
        assert_eq!(ids(&store, &combined), [b]);
        let denied_in_w1_tail = EgressFilter {
            workspace_id: Some("w1".into()),
            decision: Some(EgressDecision::Denied),
            limit: 1,
            ..Default::default()
        };
        assert_eq!(ids(&store, &denied_in_w1_tail), [d]);
        let denied_after_b = EgressFilter {
            decision: Some(EgressDecision::Denied),
            after_id: Some(b),
            limit: 1,
            ..Default::default()
        };
        assert_eq!(ids(&store, &denied_after_b), [d]);
    }

    #[test]
    fn summary_groups_by_destination_and_totals_the_task() {
        let store = Store::open_in_memory().unwrap();
        let with_bytes = |mut e: EgressEventRecord, up, down| {
            e.bytes_up = up;
            e.bytes_down = down;
            e
        };
        let mut other_port = allowed("w1", Some("t1"), "b.example", 1);
        other_port.port = 80;
        for e in [
            with_bytes(allowed("w1", Some("t1"), "b.example", 1), 10, 100),
            with_bytes(allowed("w1", Some("t1"), "b.example", 2), 20, 200),
            denied("w1", Some("t1"), "b.example", 3),
            other_port,
            with_bytes(allowed("w1", Some("t1"), "a.example", 4), 1, 2),
            denied("w1", Some("t1"), "c.example", 5),
            // Other tasks do not count.
            with_bytes(allowed("w1", Some("t2"), "b.example", 6), 1000, 1000),
            allowed("w1", None, "b.example", 7),
        ] {
            store.insert_egress_event(&e).unwrap();
        }

        let host = |host: &str, port, allowed, denied| EgressHostSummary {
            host: host.into(),
            port,
            allowed,
            denied,
        };
        assert_eq!(
            store.egress_summary("t1").unwrap(),
            EgressSummary {
                allowed: 4,
                denied: 2,
                bytes_up: 31,
                bytes_down: 302,
                hosts: vec![
                    host("b.example", 443, 2, 1),
                    // Ties on the total go by host, then port.
                    host("a.example", 443, 1, 0),
                    host("b.example", 80, 1, 0),
                    host("c.example", 443, 0, 1),
                ],
            }
        );
        assert_eq!(store.egress_summary("ghost").unwrap(), EgressSummary::default());
    }

    #[test]
    fn summary_lists_at_most_50_hosts() {
        let store = Store::open_in_memory().unwrap();
        for i in 0..60 {
            store
                .insert_egress_event(&denied("w1", Some("t1"), &format!("h{i:02}.example"), i))
                .unwrap();
        }
        store
            .insert_egress_event(&allowed("w1", Some("t1"), "h59.example", 99))
            .unwrap();
        let summary = store.egress_summary("t1").unwrap();
        assert_eq!((summary.allowed, summary.denied), (1, 60));
        assert_eq!(summary.hosts.len(), 50);
        assert_eq!(
            summary.hosts[0],
            EgressHostSummary {
                host: "h59.example".into(),
                port: 443,
                allowed: 1,
                denied: 1,
            }
        );
        assert_eq!(summary.hosts[1].host, "h00.example");
        assert_eq!(summary.hosts[49].host, "h48.example");
    }

    #[test]
    fn counts_by_decision_and_reason() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.egress_counts().unwrap(), vec![]);
        let with_reason = |mut e: EgressEventRecord, reason: Option<&str>| {
            e.reason = reason.map(str::to_owned);
            e
        };
        for e in [
            allowed("w1", None, "a", 1),
            allowed("w1", None, "a", 2),
            with_reason(allowed("w1", None, "a", 3), Some("")),
            denied("w1", None, "b", 4),
            with_reason(denied("w2", None, "c", 5), Some("ip_literal")),
            with_reason(denied("w2", None, "c", 6), Some("ip_literal")),
            with_reason(denied("w2", None, "c", 7), None),
        ] {
            store.insert_egress_event(&e).unwrap();
        }
        assert_eq!(
            store.egress_counts().unwrap(),
            vec![
                (EgressDecision::Allowed, String::new(), 3),
                (EgressDecision::Denied, String::new(), 1),
                (EgressDecision::Denied, "ip_literal".to_owned(), 2),
                (EgressDecision::Denied, "not_allowed".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn prune_by_age_then_by_count() {
        let (_dir, store) = file_store();
        // at_ms is the start time, so it need not follow id order: id 4 started early.
        let at = [10, 20, 30, 5, 40, 50, 60, 70];
        let inserted: Vec<i64> = at
            .iter()
            .map(|&t| store.insert_egress_event(&allowed("w1", None, "a", t)).unwrap())
            .collect();

        assert_eq!(store.prune_egress_events(0, 100).unwrap(), 0, "nothing old, room left");
        assert_eq!(all_ids(&store), inserted);

        // Age only: at_ms 5, 10 and 20 go.
        assert_eq!(store.prune_egress_events(25, 100).unwrap(), 3);
        let survivors = [inserted[2], inserted[4], inserted[5], inserted[6], inserted[7]];
        assert_eq!(all_ids(&store), survivors);

        // Count only: exactly 5 rows is within the bound.
        assert_eq!(store.prune_egress_events(0, 5).unwrap(), 0);
        assert_eq!(store.prune_egress_events(0, 3).unwrap(), 2);
        assert_eq!(all_ids(&store), survivors[2..]);

        // Both: at_ms 50 goes by age, then of 60 and 70 only the newest is kept.
        assert_eq!(store.prune_egress_events(55, 1).unwrap(), 2);
        assert_eq!(all_ids(&store), [inserted[7]]);

        assert_eq!(store.prune_egress_events(0, 0).unwrap(), 1, "keep none");
        assert_eq!(all_ids(&store), Vec::<i64>::new());
        // The cursor keeps growing after the table was emptied, so followers miss nothing.
        let next = store.insert_egress_event(&allowed("w1", None, "a", 80)).unwrap();
        assert!(next > inserted[7]);
        let follow = EgressFilter {
            after_id: Some(inserted[7]),
            ..Default::default()
        };
        assert_eq!(ids(&store, &follow), [next]);
        assert_eq!(store.prune_egress_events(0, u64::MAX).unwrap(), 0);
    }

    #[test]
    fn events_outlive_their_workspace() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_workspace(&WorkspaceRecord {
                id: "w1".into(),
                agent_id: "a1".into(),
                environment: "python".into(),
                image: "img".into(),
                container_name: "c".into(),
                container_id: None,
                network: None,
                network_policy: Default::default(),
                state: WorkspaceState::Running,
                limits: serde_json::from_str(
                    r#"{"memory":"2Gi","cpu":"1","pids":512,"nofile":1024,"nproc":1024,"volume_size":"10Gi"}"#,
                )
                .unwrap(),
                volume_dir: "/v".into(),
                created_at: 1,
                last_used_at: 1,
                error: None,
                secrets: Vec::new(),
            })
            .unwrap();
        let id = store.insert_egress_event(&allowed("w1", Some("t1"), "a", 2)).unwrap();
        store.delete_workspace("w1").unwrap();
        assert_eq!(all_ids(&store), [id]);
    }

    #[test]
    fn insert_and_list_are_one_statement_each() {
        let store = Store::open_in_memory().unwrap();
        let before = store.statements();
        store.insert_egress_event(&allowed("w1", None, "a", 1)).unwrap();
        assert_eq!(store.statements() - before, 1);
        let before = store.statements();
        store
            .list_egress_events(&EgressFilter {
                workspace_id: Some("w1".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(store.statements() - before, 1);
    }

    #[test]
    fn unknown_decision_and_out_of_range_port_are_corrupt() {
        let (_dir, store) = file_store();
        let id = store.insert_egress_event(&allowed("w1", Some("t1"), "a", 1)).unwrap();
        store
            .conn()
            .execute("UPDATE egress_events SET decision = 'shrug' WHERE id = ?1", [id])
            .unwrap();
        match store.list_egress_events(&EgressFilter::default()).unwrap_err() {
            StoreError::Corrupt { what, detail } => {
                assert_eq!(what, format!("egress_events row {id}, column decision"));
                assert!(detail.contains("\"shrug\""), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(store.egress_counts(), Err(StoreError::Corrupt { .. })));
        assert!(matches!(store.egress_summary("t1"), Err(StoreError::Corrupt { .. })));

        store
            .conn()
            .execute(
                "UPDATE egress_events SET decision = 'allowed', port = 70000 WHERE id = ?1",
                [id],
            )
            .unwrap();
        match store.list_egress_events(&EgressFilter::default()).unwrap_err() {
            StoreError::Corrupt { what, .. } => assert_eq!(what, format!("egress_events row {id}, column port")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn migration_creates_the_table_on_a_fresh_database() {
        let (_dir, store) = file_store();
        let conn = store.conn();
        for name in [
            "egress_events",
            "egress_events_by_workspace",
            "egress_events_by_task",
            "egress_events_by_time",
        ] {
            assert!(table_exists(&conn, name), "{name}");
        }
    }

    #[test]
    fn rows_from_before_the_injected_column_decode_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conductor.db");
        let previous = MIGRATIONS.len() - 1;
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..previous] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", previous).unwrap();
            conn.execute(
                "INSERT INTO egress_events (at_ms, workspace_id, method, host, port, decision) \
                 VALUES (1, 'w1', 'CONNECT', 'a.test', 443, 'allowed')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let rows = store.list_egress_events(&EgressFilter::default()).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].injected.is_empty());
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert!(json.get("injected").is_none(), "omitted when empty: {json}");
    }

    #[test]
    fn migration_upgrades_a_database_at_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conductor.db");
        {
            // The schema as it was before the egress audit: version 1, with some data.
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('instance_id', 'abcdef012345')",
                [],
            )
            .unwrap();
            assert!(!table_exists(&conn, "egress_events"));
        }

        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(store.instance_id().unwrap(), "abcdef012345", "old data kept");
        let id = store.insert_egress_event(&denied("w1", None, "a", 1)).unwrap();
        assert_eq!(all_ids(&store), [id]);
        drop(store);
        // And the upgraded file opens again without re-running anything.
        let store = Store::open(&path).unwrap();
        assert_eq!(all_ids(&store), [id]);
    }
}
