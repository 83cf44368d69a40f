//! The schema, as an ordered list of SQL scripts. Script `i` moves the database from version
//! `i` to `i + 1` (`PRAGMA user_version`); all pending scripts run in one transaction at open.
//! Never edit a script that has shipped: append a new one.
//!
//! Tables are `STRICT`, so a value of the wrong type is rejected on write rather than
//! discovered on read. State columns hold the lifecycle enums' `as_str` spellings; they are
//! deliberately not `CHECK`ed here so that the enums stay the single source of truth (a row
//! with an unknown state decodes to `StoreError::Corrupt`).

/// Migration scripts, applied in order.
pub(crate) const MIGRATIONS: &[&str] = &[
    V1_INITIAL,
    V2_EGRESS_EVENTS,
    V3_WORKSPACE_NETWORK_POLICY,
    V4_SECRETS,
    V5_SECRET_USE,
    V6_SANDBOX_LEASES,
    V7_WORKSPACE_FORKS,
];

const V1_INITIAL: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE workspaces (
    id             TEXT PRIMARY KEY NOT NULL,
    agent_id       TEXT NOT NULL,
    environment    TEXT NOT NULL,
    image          TEXT NOT NULL,
    container_name TEXT NOT NULL,
    container_id   TEXT,
    network        TEXT,
    state          TEXT NOT NULL,
    limits_json    TEXT NOT NULL,
    volume_dir     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    last_used_at   INTEGER NOT NULL,
    error          TEXT
) STRICT;
CREATE INDEX workspaces_by_agent ON workspaces (agent_id, created_at);

-- `seq` is the rowid: AUTOINCREMENT guarantees it only grows (never reused), which makes it
-- the FIFO order within a priority. `id` is the public id.
CREATE TABLE tasks (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    batch_id         TEXT,
    agent_id         TEXT,
    environment      TEXT NOT NULL,
    spec_json        TEXT NOT NULL,
    priority         INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 10),
    state            TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    workspace_id     TEXT,
    exit_code        INTEGER,
    error            TEXT,
    result_json      TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    not_before       INTEGER NOT NULL,
    commands_started INTEGER NOT NULL
) STRICT;
-- The queue: "state = 'queued' ORDER BY priority DESC, seq" walks this index in order.
CREATE INDEX tasks_queue ON tasks (state, priority DESC, seq);
CREATE INDEX tasks_by_agent ON tasks (agent_id, seq);
CREATE INDEX tasks_by_batch ON tasks (batch_id, seq);

CREATE TABLE task_commands (
    task_id     TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    phase       TEXT NOT NULL CHECK (phase IN ('pre', 'main', 'post')),
    idx         INTEGER NOT NULL,
    command     TEXT NOT NULL,
    exit_code   INTEGER,
    stdout      TEXT NOT NULL,
    stderr      TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    PRIMARY KEY (task_id, phase, idx)
) STRICT, WITHOUT ROWID;

CREATE TABLE task_logs (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    stream  TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    data    TEXT NOT NULL,
    at      INTEGER NOT NULL
) STRICT;
CREATE INDEX task_logs_by_task ON task_logs (task_id, seq);

-- No foreign key to workspaces: the service decides when a workspace's snapshots (and the
-- images they name) go away; a cascade here would silently orphan those images.
CREATE TABLE snapshots (
    id           TEXT PRIMARY KEY NOT NULL,
    workspace_id TEXT NOT NULL,
    name         TEXT NOT NULL,
    state        TEXT NOT NULL,
    rootfs_image TEXT,
    data_ref     TEXT,
    bytes        INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (workspace_id, name)
) STRICT;
CREATE INDEX snapshots_by_state ON snapshots (state, created_at);
"#;

const V2_EGRESS_EVENTS: &str = r#"
-- One row per outbound connection attempt through the egress proxy. `id` is the follow
-- cursor: AUTOINCREMENT keeps it growing even after pruning empties the table. No foreign
-- keys: the audit outlives its workspace and task, and goes only when pruned.
CREATE TABLE egress_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms        INTEGER NOT NULL,
    workspace_id TEXT NOT NULL,
    task_id      TEXT,
    method       TEXT NOT NULL,
    host         TEXT NOT NULL,
    port         INTEGER NOT NULL,
    resolved     TEXT,
    decision     TEXT NOT NULL,
    rule         TEXT,
    reason       TEXT,
    bytes_up     INTEGER NOT NULL DEFAULT 0,
    bytes_down   INTEGER NOT NULL DEFAULT 0,
    duration_ms  INTEGER NOT NULL DEFAULT 0,
    error        TEXT
) STRICT;
CREATE INDEX egress_events_by_workspace ON egress_events (workspace_id, id);
CREATE INDEX egress_events_by_task ON egress_events (task_id);
CREATE INDEX egress_events_by_time ON egress_events (at_ms);
"#;

/// The network policy a workspace was made with (mode, allow, deny after layering), as
/// JSON; `NULL` for rows made before proxy mode (their mode follows from `network`).
const V3_WORKSPACE_NETWORK_POLICY: &str = r#"
ALTER TABLE workspaces ADD COLUMN network_policy_json TEXT;
"#;

/// Secrets the egress proxy injects: the value sealed with XChaCha20-Poly1305 (`nonce` is
/// its random 24-byte nonce, the name the associated data), the injection rules as JSON,
/// and a version that grows with each rotation.
const V4_SECRETS: &str = r#"
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY NOT NULL,
    ciphertext BLOB NOT NULL,
    nonce      BLOB NOT NULL,
    rules_json TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version    INTEGER NOT NULL
) STRICT;
"#;

/// Where secrets are used: the secrets a workspace may use with their placeholders (JSON,
/// `NULL` for none), and on an audit row the names of the secrets the proxy injected into
/// that connection's requests (comma-separated, `NULL` for none; never values).
const V5_SECRET_USE: &str = r#"
ALTER TABLE workspaces ADD COLUMN secrets_json TEXT;
ALTER TABLE egress_events ADD COLUMN injected TEXT;
"#;

/// Workspaces made through the E2B-compatible API: the template name the client asked for,
/// its metadata (JSON object of strings), when it started and when it expires (unix ms;
/// the lease reaper acts then), and what happens at expiry (`kill` or `pause`).
const V6_SANDBOX_LEASES: &str = r#"
CREATE TABLE sandbox_leases (
    workspace_id  TEXT PRIMARY KEY NOT NULL,
    template      TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    started_at    INTEGER NOT NULL,
    end_at        INTEGER NOT NULL,
    on_timeout    TEXT NOT NULL,
    auto_resume   INTEGER NOT NULL
) STRICT;
CREATE INDEX sandbox_leases_by_end ON sandbox_leases (end_at);
"#;

/// Which workspace a fork was made from (one row per copy), for showing a workspace's forks.
const V7_WORKSPACE_FORKS: &str = r#"
CREATE TABLE workspace_forks (
    workspace_id TEXT PRIMARY KEY NOT NULL,
    source_id    TEXT NOT NULL
) STRICT;
CREATE INDEX workspace_forks_by_source ON workspace_forks (source_id);
"#;
