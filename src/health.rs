//! What is known of the guard's database path, as health, readiness, metrics and `doctor` report
//! it: neutral types at the bottom, so that metrics and the admin endpoint need not depend on the
//! database client that fills them in.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio_postgres::error::SqlState;

/// Why PostgreSQL answers the guard but would refuse a heal's NOTIFY.
///
/// A read-only session is not among them: `NOTIFY` and `pg_notify` are allowed in read-only
/// transactions (`default_transaction_read_only = on`, a role set read-only), and such a session
/// heals; only recovery refuses them (PostgreSQL's `PreventCommandDuringRecovery("NOTIFY")`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CannotNotify {
    /// The server is in recovery: a replica, or an old primary after a failover (SQLSTATE 25006).
    Standby,
    /// "too many notifications in the NOTIFY queue" (SQLSTATE 54000): a listener stopped reading.
    QueueFull,
    /// Any other refusal, in PostgreSQL's words (EXECUTE on `pg_notify` revoked, ...).
    Refused(String),
}

impl CannotNotify {
    /// What the error PostgreSQL gave a NOTIFY says about the session.
    pub fn of(error: &tokio_postgres::Error) -> CannotNotify {
        match error.code() {
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION) => CannotNotify::Standby,
            Some(&SqlState::PROGRAM_LIMIT_EXCEEDED) => CannotNotify::QueueFull,
            _ => CannotNotify::Refused(describe(error)),
        }
    }

    /// The `reason` label of `pgrst_guard_database_cannot_notify`.
    pub fn label(&self) -> &'static str {
        match self {
            CannotNotify::Standby => "standby",
            CannotNotify::QueueFull => "queue_full",
            CannotNotify::Refused(_) => "refused",
        }
    }

    pub const LABELS: [&'static str; 3] = ["standby", "queue_full", "refused"];
}

impl std::fmt::Display for CannotNotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CannotNotify::Standby => f.write_str("server is a hot standby"),
            CannotNotify::QueueFull => f.write_str("notify queue is full"),
            CannotNotify::Refused(message) => f.write_str(message),
        }
    }
}

/// Why a connection was replaced, as `pgrst_guard_database_reconnects_total{cause}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReconnectCause {
    /// The server or the network closed it.
    Closed,
    /// An operation or the background check got no answer in time.
    Timeout,
    /// The round trip worked but its own NOTIFY never came back on LISTEN.
    ListenDeaf,
    /// The server refused the check's NOTIFY as a standby: another connection may reach a primary.
    CannotNotify,
}

impl ReconnectCause {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconnectCause::Closed => "closed",
            ReconnectCause::Timeout => "timeout",
            ReconnectCause::ListenDeaf => "listen_deaf",
            ReconnectCause::CannotNotify => "cannot_notify",
        }
    }
}

/// Whether the guard hears NOTIFYs on its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listening {
    /// Not yet proved either way.
    Unverified,
    /// Its own NOTIFY came back within the bound.
    Hearing,
    /// Its own NOTIFY did not come back even on a fresh connection: reloads others ask for cannot
    /// be joined. Healing goes on with the guard's own NOTIFYs.
    Off(&'static str),
}

/// What was last verified about the database path, and when.
#[derive(Clone, Debug)]
pub struct DatabaseHealth {
    /// A connection exists, a NOTIFY went through on it, and its last round trip, within the last
    /// check interval and timeout, succeeded.
    pub connected: bool,
    /// The server answers but would refuse a heal's NOTIFY, and why.
    pub cannot_notify: Option<CannotNotify>,
    /// When a round trip last succeeded.
    pub last_verified: Option<SystemTime>,
    pub listening: Listening,
    pub last_error: Option<String>,
    pub reconnects: BTreeMap<ReconnectCause, u64>,
}

/// PostgreSQL's own message and SQLSTATE where the server sent one, not just "db error".
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        // "error connecting to server" alone hides the cause (refused, timed out, TLS): add it.
        None => crate::error::causes(error).map(ToString::to_string).collect::<Vec<_>>().join(": "),
    }
}
