//! The guard's own PostgreSQL connection: the NOTIFY that asks PostgREST to reload, the LISTEN that
//! sees reloads others ask for, and the catalog check's queries.
//!
//! A connection can die without a sound: a NAT gateway or load balancer that drops an idle flow
//! leaves both ends waiting forever. So nothing here trusts a socket for being open:
//! - every operation is bounded (`PGRST_GUARD_DB_TIMEOUT_MS`, and the caller's deadline); one that
//!   does not answer in time discards the connection, and the operation is tried once more on a
//!   fresh one while the deadline allows;
//! - a caller that needs the database and finds no connection connects now, bounded by its own
//!   deadline, instead of waiting for the background reconnect back-off (the first migration after
//!   a PostgreSQL restart must heal);
//! - a background check every `PGRST_GUARD_DB_CHECK_INTERVAL_MS` sends a NOTIFY on a private channel
//!   of this process and must hear it back: that proves the round trip and the LISTEN together, so
//!   an idle connection is found dead by the check, not by the first heal after a quiet night, and a
//!   LISTEN that receives nothing (a transaction-mode pooler, PostgreSQL's notification-queue bug) is
//!   renewed, and reported when renewing does not help;
//! - an answer is not health: a connection counts as up only once a NOTIFY went through on it, the
//!   one thing every heal needs. A server that refuses it (a hot standby, a full notification
//!   queue) is reported as [`CannotNotify`], never as connected; a standby is not kept at all, and
//!   reconnecting with back-off goes on until the URI reaches a primary again (after a failover, or
//!   through a multi-host URI with `target_session_attrs=read-write`);
//! - TCP keepalive with a short idle time lets the kernel end a dead flow too.
//!
//! Queries use the unnamed statement in one round trip (`query_typed`), which works through
//! transaction-mode poolers such as PgBouncer or Supabase's port 6543.

pub use crate::health::{describe, CannotNotify, DatabaseHealth, Listening, ReconnectCause};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Row};

use crate::config::DbUri;

/// Connecting in the background gives up after this; a caller's own deadline may be shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Background reconnects back off from the first to the last of these.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// While LISTEN is known not to work, a fresh connection is tried this often to see if it does again.
const DEAF_RETRY: Duration = Duration::from_secs(60);

/// How the guard keeps its database connection honest.
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    pub channel: String,
    /// The longest one query or NOTIFY may take before the connection is taken for dead.
    pub op_timeout: Duration,
    /// How often the connection and its LISTEN are proved to work.
    pub check_interval: Duration,
    /// TCP keepalive: idle time before the first probe.
    pub keepalive_idle: Duration,
}

#[derive(Debug)]
pub enum DbError {
    /// No connection could be had, or it failed, before the deadline.
    Unavailable(String),
    /// The server answers but refuses the NOTIFY every heal ends with.
    CannotNotify(CannotNotify),
    /// PostgreSQL answered with an error (the connection is fine).
    Query(String),
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Unavailable(reason) => write!(f, "no database connection: {reason}"),
            DbError::CannotNotify(why) => write!(f, "cannot NOTIFY: {why}"),
            DbError::Query(reason) => write!(f, "database request failed: {reason}"),
        }
    }
}

/// Whether a NOTIFY, what every heal ends with, goes through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Notifying {
    /// Not proved on the current connection (or there is none).
    #[default]
    Unproved,
    /// A NOTIFY went through on the current connection.
    Proved,
    /// The server answers but refuses it. Kept across reconnects until a NOTIFY goes through or no
    /// server answers at all, so a standby reached again and again is one state, not a flapping one.
    Refused(CannotNotify),
}

/// Who may send the next reload NOTIFY among guards on one database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This guard: send it.
    Ours,
    /// Another guard is sending one right now: expect it.
    Taken,
    /// No coordination possible (LISTEN not proved, or the database did not answer): send it.
    NotCoordinated,
}

/// A reload request someone else sent on PostgREST's channel.
#[derive(Clone, Copy, Debug)]
pub struct ObservedReload {
    pub sender_pid: i32,
}

/// How one statement failed.
enum Failure {
    /// PostgreSQL refused it on this session (the connection is fine).
    Refused(Arc<Session>, tokio_postgres::Error),
    /// No session to run it on, or none that answered in time.
    NoSession(DbError),
}

/// One connection and what runs it.
struct Session {
    client: Client,
    /// The backend it started on: another one later means a transaction-mode pooler in between.
    pid: i32,
    closed: Arc<AtomicBool>,
    /// The newest heartbeat token heard back on the private channel.
    heard: watch::Receiver<u64>,
    driver: tokio::task::AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        // A dead flow never ends by itself: the task polling it must be stopped.
        self.driver.abort();
    }
}

impl Session {
    fn is_live(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct HealthState {
    last_verified: Option<(Instant, SystemTime)>,
    notifying: Notifying,
    listening: Option<Listening>,
    last_error: Option<String>,
    reconnects: BTreeMap<ReconnectCause, u64>,
}

pub struct Database {
    me: Weak<Database>,
    uri: DbUri,
    pg_config: tokio_postgres::Config,
    tls: Result<tokio_postgres_rustls::MakeRustlsConnect, String>,
    settings: DatabaseSettings,
    /// Where this process hears its own heartbeats: private to it, so guards never hear each other's.
    heartbeat_channel: String,
    session: Mutex<Option<Arc<Session>>>,
    /// One connection attempt at a time; whoever waits on it uses its result.
    connecting: tokio::sync::Mutex<()>,
    /// Wakes the background keeper when a connection is discarded.
    discarded: Arc<Notify>,
    health: Mutex<HealthState>,
    next_token: AtomicU64,
    own_pid: AtomicI32,
    sent: AtomicU64,
    seen: AtomicU64,
    /// When a reload NOTIFY from somebody else was last seen.
    last_seen: Mutex<Option<Instant>>,
    observed: broadcast::Sender<ObservedReload>,
    runtime: Handle,
}

impl Database {
    /// Starts the background keeper on the current runtime; the first connection is made there.
    pub fn spawn(uri: DbUri, settings: DatabaseSettings) -> Arc<Database> {
        let (observed, _) = broadcast::channel(64);
        let mut pg_config = uri.pg_config().clone();
        pg_config
            .keepalives(true)
            .keepalives_idle(settings.keepalive_idle)
            .keepalives_interval(Duration::from_secs(2).min(settings.keepalive_idle))
            .keepalives_retries(3)
            .tcp_user_timeout(settings.keepalive_idle + Duration::from_secs(6));
        let database = Arc::new_cyclic(|me| Database {
            me: me.clone(),
            tls: uri.tls(),
            uri,
            pg_config,
            heartbeat_channel: format!("pgrst_guard_heartbeat_{}_{:x}", std::process::id(), random_u64()),
            settings,
            session: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            discarded: Arc::new(Notify::new()),
            health: Mutex::new(HealthState::default()),
            next_token: AtomicU64::new(1),
            own_pid: AtomicI32::new(0),
            sent: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            last_seen: Mutex::new(None),
            observed,
            runtime: Handle::current(),
        });
        if let Err(e) = &database.tls {
            tracing::error!(error = %e, "cannot set up TLS for the database connection; healing is off");
        }
        let discarded = database.discarded.clone();
        database.runtime.spawn(keep_verified(Arc::downgrade(&database), discarded));
        database
    }

    pub fn channel(&self) -> &str {
        &self.settings.channel
    }

    /// Is there a connection whose last round trip (within one check interval and timeout) worked?
    /// What [`Database::health`] calls `connected`, without copying the rest: cheap enough for
    /// every write the barrier checks.
    pub fn is_connected(&self) -> bool {
        let live = self.current().is_some();
        let health = self.health.lock().expect("health lock");
        let fresh = self.settings.check_interval + self.settings.op_timeout * 2;
        live && health.notifying == Notifying::Proved
            && health.last_verified.is_some_and(|(at, _)| at.elapsed() <= fresh)
    }

    pub fn health(&self) -> DatabaseHealth {
        let connected = self.is_connected();
        let health = self.health.lock().expect("health lock");
        DatabaseHealth {
            connected,
            cannot_notify: match &health.notifying {
                Notifying::Refused(why) => Some(why.clone()),
                _ => None,
            },
            last_verified: health.last_verified.map(|(_, wall)| wall),
            listening: health.listening.clone().unwrap_or(Listening::Unverified),
            last_error: health.last_error.clone(),
            reconnects: health.reconnects.clone(),
        }
    }

    pub fn notifications_sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Reload requests from others seen on the channel.
    pub fn notifications_seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    /// When a reload NOTIFY from somebody else was last seen.
    pub fn last_seen(&self) -> Option<Instant> {
        *self.last_seen.lock().expect("last seen lock")
    }

    pub fn notify_counts(&self) -> crate::metrics::NotifyCounts {
        crate::metrics::NotifyCounts { sent: self.notifications_sent(), seen: self.notifications_seen() }
    }

    /// Claims the right to send the next reload NOTIFY among the guards on this database, for as
    /// long as this connection holds it: a session advisory lock, tried without waiting. Only where
    /// LISTEN is proved (a direct or session-pooled connection): through a transaction pooler a
    /// session lock could stay behind on a backend the guard no longer reaches.
    pub async fn claim_reload(&self, deadline: Instant) -> Claim {
        if !self.hears_others() {
            return Claim::NotCoordinated;
        }
        let key = self.claim_key();
        match self.query(deadline, "SELECT pg_try_advisory_lock($1)", &[(&key, Type::INT8)]).await {
            Ok(rows) if rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()) == Some(true) => Claim::Ours,
            Ok(_) => Claim::Taken,
            Err(_) => Claim::NotCoordinated,
        }
    }

    /// Lets the claim go (on whichever connection is current: a replaced one took it along).
    pub async fn release_claim(&self, deadline: Instant) {
        let key = self.claim_key();
        let _ = self.query(deadline, "SELECT pg_advisory_unlock($1)", &[(&key, Type::INT8)]).await;
    }

    /// The advisory lock key of PostgREST's channel, the same in every guard.
    fn claim_key(&self) -> i64 {
        // FNV-1a: stable across processes and versions, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in "pgrst-guard reload ".bytes().chain(self.settings.channel.bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        hash as i64
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ObservedReload> {
        self.observed.subscribe()
    }

    /// Does the guard hear reloads others ask for? Only a proved LISTEN counts.
    pub fn hears_others(&self) -> bool {
        self.health().listening == Listening::Hearing
    }

    /// `NOTIFY <channel>, 'reload schema'`. `pg_notify` takes the channel as a value: no identifier
    /// quoting to get wrong, and the name stays case-sensitive as PostgREST's quoted LISTEN expects.
    /// A standby's refusal discards its connection, and the NOTIFY is sent once more on the next one
    /// while the deadline allows: after a failover that one may reach the new primary.
    pub async fn notify_reload(&self, deadline: Instant) -> Result<(), DbError> {
        self.send_reload(deadline, true).await
    }

    /// A reload NOTIFY the write barrier's proof sends: not counted among the heals' NOTIFYs
    /// (`pgrst_guard_notifies_sent_total`); the barrier counts its proofs itself.
    pub async fn notify_reload_for_proof(&self, deadline: Instant) -> Result<(), DbError> {
        self.send_reload(deadline, false).await
    }

    async fn send_reload(&self, deadline: Instant, counted: bool) -> Result<(), DbError> {
        let channel = self.settings.channel.as_str();
        let mut may_retry = true;
        loop {
            // The same NOTIFY either way; the statements differ only so that a proxy or a log can tell
            // a heal's reload from a write barrier's proof.
            let statement = if counted {
                "SELECT pg_notify($1, 'reload schema')"
            } else {
                "SELECT pg_notify($1, 'reload schema') AS write_barrier_proof"
            };
            match self.run(deadline, statement, &[(&channel, Type::TEXT)]).await {
                Ok(_) => {
                    self.set_notifying(Notifying::Proved);
                    if counted {
                        self.sent.fetch_add(1, Ordering::AcqRel);
                    }
                    return Ok(());
                }
                Err(Failure::Refused(session, e)) => {
                    let why = CannotNotify::of(&e);
                    self.set_notifying(Notifying::Refused(why.clone()));
                    if why == CannotNotify::Standby && std::mem::take(&mut may_retry) {
                        self.discard(&session, ReconnectCause::CannotNotify, format!("cannot NOTIFY: {why}"));
                        continue;
                    }
                    return Err(DbError::CannotNotify(why));
                }
                Err(Failure::NoSession(e)) => return Err(e),
            }
        }
    }

    /// Runs one statement (unnamed, one round trip) and returns its rows. Ends by `deadline`; an
    /// answer slower than the operation timeout discards the connection and the statement runs once
    /// more on a fresh one, if the deadline still allows. Only for statements safe to repeat.
    pub async fn query(
        &self,
        deadline: Instant,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, DbError> {
        self.run(deadline, sql, params).await.map_err(|failure| match failure {
            Failure::Refused(_, e) => DbError::Query(describe(&e)),
            Failure::NoSession(e) => e,
        })
    }

    /// [`Database::query`], with PostgreSQL's refusal as it came and the session that got it.
    async fn run(
        &self,
        deadline: Instant,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Failure> {
        let mut last_error = None;
        for _ in 0..2 {
            if Instant::now() >= deadline {
                break;
            }
            let session = self.session(deadline).await.map_err(Failure::NoSession)?;
            let until = deadline.min(Instant::now() + self.settings.op_timeout);
            match tokio::time::timeout_at(until, session.client.query_typed(sql, params)).await {
                Ok(Ok(rows)) => {
                    self.verified();
                    return Ok(rows);
                }
                Ok(Err(e)) if e.as_db_error().is_some() => {
                    self.verified();
                    return Err(Failure::Refused(session, e));
                }
                Ok(Err(e)) => {
                    last_error = Some(describe(&e));
                    self.discard(&session, ReconnectCause::Closed, describe(&e));
                }
                Err(_) if until < deadline => {
                    let reason = format!("no answer within {} ms", self.settings.op_timeout.as_millis());
                    self.discard(&session, ReconnectCause::Timeout, reason.clone());
                    last_error = Some(reason);
                }
                Err(_) => {
                    last_error = Some("no answer before the deadline".to_string());
                    break;
                }
            }
        }
        let reason = last_error.unwrap_or_else(|| "the deadline passed".to_string());
        Err(Failure::NoSession(DbError::Unavailable(reason)))
    }

    /// A live connection: the current one, or a new one made now (bounded by `deadline`), never
    /// after a back-off.
    async fn session(&self, deadline: Instant) -> Result<Arc<Session>, DbError> {
        if let Some(session) = self.current() {
            return Ok(session);
        }
        let _one_attempt = tokio::time::timeout_at(deadline, self.connecting.lock())
            .await
            .map_err(|_| DbError::Unavailable("connecting did not finish before the deadline".to_string()))?;
        if let Some(session) = self.current() {
            return Ok(session);
        }
        let session = self.connect(deadline.min(Instant::now() + CONNECT_TIMEOUT)).await?;
        *self.session.lock().expect("session lock") = Some(session.clone());
        Ok(session)
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.session.lock().expect("session lock").as_ref().filter(|s| s.is_live()).cloned()
    }

    /// Replaces `session` (if it is still the current one) and says why.
    fn discard(&self, session: &Arc<Session>, cause: ReconnectCause, reason: String) {
        let mut current = self.session.lock().expect("session lock");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
            drop(current);
            tracing::warn!(cause = cause.as_str(), reason = %reason, "database connection replaced");
            let mut health = self.health.lock().expect("health lock");
            *health.reconnects.entry(cause).or_default() += 1;
            health.last_error = Some(reason);
            // A LISTEN or NOTIFY proved on the old connection says nothing of the next one.
            if health.listening == Some(Listening::Hearing) {
                health.listening = Some(Listening::Unverified);
            }
            if health.notifying == Notifying::Proved {
                health.notifying = Notifying::Unproved;
            }
            self.discarded.notify_one();
        }
    }

    /// The current connection ended by itself (the server or the network closed it).
    fn replace_ended(&self, reason: String) {
        let ended = self.session.lock().expect("session lock").as_ref().filter(|s| !s.is_live()).cloned();
        match ended {
            Some(session) => self.discard(&session, ReconnectCause::Closed, reason),
            None => self.health.lock().expect("health lock").last_error = Some(reason),
        }
    }

    fn verified(&self) {
        self.health.lock().expect("health lock").last_verified = Some((Instant::now(), SystemTime::now()));
    }

    async fn connect(&self, until: Instant) -> Result<Arc<Session>, DbError> {
        let tls = self.tls.clone().map_err(DbError::Unavailable)?;
        let connected = tokio::time::timeout_at(until, self.pg_config.connect(tls)).await;
        let (client, mut connection) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(self.connect_failed(describe(&e))),
            Err(_) => return Err(self.connect_failed("connecting timed out".to_string())),
        };
        let closed = Arc::new(AtomicBool::new(false));
        let (hear, heard) = watch::channel(0u64);
        let (me, ended, heartbeat_channel) = (self.me.clone(), closed.clone(), self.heartbeat_channel.clone());
        let driver = self.runtime.spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let error = loop {
                match messages.next().await {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == heartbeat_channel => {
                        if let Ok(token) = n.payload().parse::<u64>() {
                            hear.send_if_modified(|newest| std::mem::replace(newest, token.max(*newest)) != *newest);
                        }
                    }
                    Some(Ok(AsyncMessage::Notification(n))) => match me.upgrade() {
                        Some(database) => database.on_notification(n.process_id(), n.channel(), n.payload()),
                        None => break None,
                    },
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Some(describe(&e)),
                    None => break None,
                }
            };
            ended.store(true, Ordering::Release);
            if let Some(database) = me.upgrade() {
                let reason = error.unwrap_or_else(|| "the server closed the connection".to_string());
                database.replace_ended(reason);
            }
        });
        let setup = async {
            // PostgREST's own remedy for PostgreSQL's notification-queue bug (#3147), run on every
            // new connection: cheap, and it unblocks a queue that would keep LISTEN deaf.
            let row = client
                .query_typed_one(
                    "SELECT pg_backend_pid(), pg_is_in_recovery() FROM (SELECT pg_notification_queue_usage()) AS q",
                    &[],
                )
                .await?;
            let (pid, in_recovery): (i32, bool) = (row.get(0), row.get(1));
            if in_recovery {
                // A standby refuses LISTEN and NOTIFY alike: not worth keeping.
                return Ok(Err(CannotNotify::Standby));
            }
            for channel in [self.settings.channel.as_str(), self.heartbeat_channel.as_str()] {
                let listen = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
                if let Err(e) = client.batch_execute(&listen).await {
                    if e.as_db_error().is_none() {
                        return Err(e);
                    }
                    tracing::warn!(error = %describe(&e), channel, "LISTEN failed");
                }
            }
            Ok::<_, tokio_postgres::Error>(Ok(pid))
        };
        let pid = match tokio::time::timeout_at(until, setup).await {
            Ok(Ok(Ok(pid))) => pid,
            Ok(Ok(Err(why))) => {
                driver.abort();
                self.health.lock().expect("health lock").last_error = Some(format!("cannot NOTIFY: {why}"));
                self.set_notifying(Notifying::Refused(why.clone()));
                return Err(DbError::CannotNotify(why));
            }
            failed => {
                driver.abort();
                let reason = match failed {
                    Ok(Err(e)) => describe(&e),
                    _ => "connection set-up timed out".to_string(),
                };
                return Err(self.connect_failed(reason));
            }
        };
        self.own_pid.store(pid, Ordering::Release);
        let session = Arc::new(Session { client, pid, closed, heard, driver: driver.abort_handle() });
        self.verified();
        tracing::info!(db = %self.uri.redacted(), channel = %self.settings.channel, pid, "database connection for reload NOTIFY is up");
        Ok(session)
    }

    /// No server answered: whatever one refused before says nothing of the next one to answer.
    fn connect_failed(&self, reason: String) -> DbError {
        let mut health = self.health.lock().expect("health lock");
        health.last_error = Some(reason.clone());
        if matches!(health.notifying, Notifying::Refused(_)) {
            health.notifying = Notifying::Unproved;
        }
        DbError::Unavailable(reason)
    }

    /// Records whether a NOTIFY goes through; says so in the log when that changes.
    fn set_notifying(&self, notifying: Notifying) {
        let mut health = self.health.lock().expect("health lock");
        if health.notifying == notifying {
            return;
        }
        match (&health.notifying, &notifying) {
            (_, Notifying::Refused(why)) => {
                tracing::warn!(db = %self.uri.redacted(), "cannot NOTIFY: {why}; heals cannot ask PostgREST to reload until the database takes a NOTIFY again")
            }
            (Notifying::Refused(_), Notifying::Proved) => {
                tracing::info!(db = %self.uri.redacted(), "the database can NOTIFY again: heals resume")
            }
            _ => {}
        }
        health.notifying = notifying;
    }

    /// Proves the round trip and the LISTEN at once: a NOTIFY on the private channel must come back.
    async fn heartbeat(&self, session: &Arc<Session>) -> Heartbeat {
        let token = self.next_token.fetch_add(1, Ordering::AcqRel);
        let mut heard = session.heard.clone();
        let (channel, payload) = (self.heartbeat_channel.as_str(), token.to_string());
        let sent = tokio::time::timeout(
            self.settings.op_timeout,
            session.client.query_typed(
                "SELECT pg_backend_pid() FROM (SELECT pg_notify($1, $2)) AS n",
                &[(&channel, Type::TEXT), (&payload.as_str(), Type::TEXT)],
            ),
        )
        .await;
        match sent {
            Ok(Ok(rows)) => {
                self.verified();
                self.set_notifying(Notifying::Proved);
                let pid = rows.first().and_then(|row| row.try_get::<_, i32>(0).ok());
                if pid.is_some_and(|pid| pid != session.pid) {
                    // LISTEN belongs to a session; this one hops between backends.
                    return Heartbeat::Pooled;
                }
            }
            Ok(Err(e)) if e.as_db_error().is_some() => {
                self.verified();
                return Heartbeat::CannotNotify(CannotNotify::of(&e));
            }
            Ok(Err(e)) => return Heartbeat::Dead(ReconnectCause::Closed, describe(&e)),
            Err(_) => {
                let reason =
                    format!("the connection check got no answer within {} ms", self.settings.op_timeout.as_millis());
                return Heartbeat::Dead(ReconnectCause::Timeout, reason);
            }
        }
        let came_back = tokio::time::timeout(self.settings.op_timeout, heard.wait_for(|newest| *newest >= token))
            .await
            .is_ok_and(|heard| heard.is_ok());
        if came_back {
            Heartbeat::Hearing
        } else {
            Heartbeat::Deaf
        }
    }

    fn set_listening(&self, listening: Listening) {
        let mut health = self.health.lock().expect("health lock");
        if health.listening.as_ref() != Some(&listening) {
            match &listening {
                Listening::Hearing => {
                    tracing::info!(channel = %self.settings.channel, "LISTEN proved to work: reloads others ask for are joined")
                }
                Listening::Off(why) => {
                    tracing::warn!(channel = %self.settings.channel, why, "LISTEN receives nothing: joining reloads others ask for is off; the guard heals on with its own NOTIFYs")
                }
                Listening::Unverified => {}
            }
            health.listening = Some(listening);
        }
    }

    fn on_notification(&self, pid: i32, channel: &str, payload: &str) {
        let is_reload = payload.is_empty() || payload == "reload schema";
        if channel != self.settings.channel || !is_reload || pid == self.own_pid.load(Ordering::Acquire) {
            return;
        }
        if matches!(self.health.lock().expect("health lock").listening, Some(Listening::Off(_))) {
            // Through a transaction pooler the sender's pid says nothing (it may be our own NOTIFY
            // on another backend), and joining others' reloads is off anyway.
            return;
        }
        self.seen.fetch_add(1, Ordering::AcqRel);
        *self.last_seen.lock().expect("last seen lock") = Some(Instant::now());
        tracing::debug!(sender_pid = pid, "saw a schema reload request on the channel");
        let _ = self.observed.send(ObservedReload { sender_pid: pid });
    }
}

enum Heartbeat {
    Hearing,
    Deaf,
    /// Statements run on another backend than the one the connection began on: a transaction-mode
    /// pooler, where LISTEN cannot be relied on even when a NOTIFY happens to come back.
    Pooled,
    /// PostgreSQL refused the check's NOTIFY (the connection answers).
    CannotNotify(CannotNotify),
    Dead(ReconnectCause, String),
}

const DEAF: &str = "NOTIFYs sent on the guard's connection do not come back on its LISTEN, even on a fresh \
     connection: through a transaction-mode pooler (PgBouncer pool_mode=transaction, Supabase's port 6543) LISTEN \
     cannot work; use the session pooler or a direct connection";
const POOLED: &str = "the guard's statements run on changing database backends: a transaction-mode pooler \
     (PgBouncer pool_mode=transaction, Supabase's port 6543) is in between, and LISTEN cannot work through it; use the \
     session pooler or a direct connection";

/// The background keeper: connects (with back-off while nobody needs the database), then proves
/// the connection and its LISTEN every check interval, replacing it when it fails.
async fn keep_verified(database: Weak<Database>, discarded: Arc<Notify>) {
    let mut backoff = FIRST_BACKOFF;
    // LISTEN that stayed deaf on a fresh connection: since when, to try again now and then.
    let mut deaf_since: Option<Instant> = None;
    loop {
        let Some(db) = database.upgrade() else { return };
        if db.tls.is_err() {
            return;
        }
        let Some(session) = db.current() else {
            let attempt = db.session(Instant::now() + CONNECT_TIMEOUT).await;
            let wait = match attempt {
                // The back-off is reset by a NOTIFY that goes through, not by a connection.
                Ok(_) => continue,
                // Said once, when it became so.
                Err(DbError::CannotNotify(_)) => backoff,
                Err(e) => {
                    tracing::warn!(db = %db.uri.redacted(), error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to the database for reload NOTIFY; healing waits for it");
                    backoff
                }
            };
            backoff = (backoff * 2).min(MAX_BACKOFF);
            drop(db);
            tokio::time::sleep(wait).await;
            continue;
        };
        let heartbeat = db.heartbeat(&session).await;
        if matches!(heartbeat, Heartbeat::Hearing | Heartbeat::Deaf | Heartbeat::Pooled) {
            backoff = FIRST_BACKOFF;
        }
        match heartbeat {
            Heartbeat::Hearing => {
                deaf_since = None;
                db.set_listening(Listening::Hearing);
            }
            Heartbeat::Deaf => {
                let fresh_try_due = deaf_since.is_none_or(|since| since.elapsed() >= DEAF_RETRY);
                let already_off = matches!(db.health().listening, Listening::Off(_));
                if !already_off && deaf_since.is_none() {
                    // First time: a fresh connection (and its LISTEN) may well hear again.
                    deaf_since = Some(Instant::now());
                    db.discard(
                        &session,
                        ReconnectCause::ListenDeaf,
                        "its own NOTIFY did not come back on LISTEN".to_string(),
                    );
                    continue;
                }
                db.set_listening(Listening::Off(DEAF));
                if already_off && fresh_try_due && deaf_since.is_some() {
                    deaf_since = Some(Instant::now());
                    db.discard(&session, ReconnectCause::ListenDeaf, "trying LISTEN on a fresh connection".to_string());
                    continue;
                }
            }
            Heartbeat::Pooled => db.set_listening(Listening::Off(POOLED)),
            Heartbeat::CannotNotify(why) => {
                let standby = why == CannotNotify::Standby;
                db.set_notifying(Notifying::Refused(why));
                if standby {
                    // Another connection may reach a primary: after a failover, or another host of
                    // the URI. Not at once: the same standby is likely to answer again.
                    db.discard(&session, ReconnectCause::CannotNotify, "cannot NOTIFY: server is a hot standby".into());
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    drop((db, session));
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            Heartbeat::Dead(cause, reason) => {
                db.discard(&session, cause, reason);
                continue;
            }
        }
        let interval = db.settings.check_interval;
        drop((db, session));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = discarded.notified() => {}
        }
    }
}

/// A random number from the standard library's per-process hash keys.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}
