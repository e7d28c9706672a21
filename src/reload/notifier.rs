//! The guard's own PostgreSQL connection. It sends `NOTIFY <channel>, 'reload schema'`, LISTENs on
//! the same channel so that reloads asked for by anyone else (an event trigger, a migration,
//! another guard) are seen and joined, and answers the catalog check. It is kept open and
//! re-established with back-off; while it is down, forwarding goes on and only healing stops.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, RwLock};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client};

use crate::config::DbUri;

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum NotifyError {
    Disconnected,
    Failed(String),
}

impl std::fmt::Display for NotifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyError::Disconnected => write!(f, "no database connection"),
            NotifyError::Failed(reason) => write!(f, "database request failed: {reason}"),
        }
    }
}

/// A reload request someone else sent on our channel.
#[derive(Clone, Copy, Debug)]
pub struct ObservedReload {
    pub sender_pid: i32,
}

pub struct Notifier {
    channel: String,
    client: RwLock<Option<Client>>,
    connected: AtomicBool,
    own_pid: AtomicI32,
    sent: AtomicU64,
    seen: AtomicU64,
    observed: broadcast::Sender<ObservedReload>,
}

impl Notifier {
    /// Starts the connection task; the first connection is attempted in the background.
    pub fn spawn(db_uri: DbUri, channel: String) -> Arc<Notifier> {
        let (observed, _) = broadcast::channel(64);
        let notifier = Arc::new(Notifier {
            channel,
            client: RwLock::new(None),
            connected: AtomicBool::new(false),
            own_pid: AtomicI32::new(0),
            sent: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            observed,
        });
        tokio::spawn(keep_connected(Arc::downgrade(&notifier), db_uri));
        notifier
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn notifications_sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Reload requests from others seen on the channel.
    pub fn notifications_seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ObservedReload> {
        self.observed.subscribe()
    }

    /// `pg_notify` takes the channel as a value: no identifier quoting to get wrong, and the name
    /// stays case-sensitive as PostgREST's quoted LISTEN expects.
    pub async fn notify_reload(&self, deadline: tokio::time::Instant) -> Result<(), NotifyError> {
        self.query_bool_until(deadline, "SELECT pg_notify($1, 'reload schema') IS NULL", &[&self.channel]).await?;
        self.sent.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Runs a one-row, one-boolean query on the guard's connection, giving up after 5 s.
    pub async fn query_bool(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<bool, NotifyError> {
        self.query_bool_until(tokio::time::Instant::now() + QUERY_TIMEOUT, sql, params).await
    }

    /// As [`Notifier::query_bool`], giving up at `deadline` (the caller's, passed down): a stalled
    /// database must not hold a request past its heal deadline.
    pub async fn query_bool_until(
        &self,
        deadline: tokio::time::Instant,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<bool, NotifyError> {
        let run = async {
            let guard = self.client.read().await;
            let client = guard.as_ref().ok_or(NotifyError::Disconnected)?;
            let row = client.query_one(sql, params).await.map_err(|e| NotifyError::Failed(describe(&e)))?;
            row.try_get(0).map_err(|e| NotifyError::Failed(e.to_string()))
        };
        match tokio::time::timeout_at(deadline, run).await {
            Ok(answer) => answer,
            Err(_) => Err(NotifyError::Failed("no answer before the deadline".to_string())),
        }
    }

    fn on_notification(&self, pid: i32, channel: &str, payload: &str) {
        let is_reload = payload.is_empty() || payload == "reload schema";
        if channel != self.channel || !is_reload || pid == self.own_pid.load(Ordering::Acquire) {
            return;
        }
        self.seen.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(sender_pid = pid, "saw a schema reload request on the channel");
        let _ = self.observed.send(ObservedReload { sender_pid: pid });
    }
}

async fn keep_connected(notifier: Weak<Notifier>, db_uri: DbUri) {
    let tls = match db_uri.tls() {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up TLS for the database connection; healing is off");
            return;
        }
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, db_uri.pg_config().connect(tls.clone())).await;
        let Some(this) = notifier.upgrade() else {
            return;
        };
        match attempt {
            Ok(Ok((client, mut connection))) => {
                let weak = notifier.clone();
                let driver = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => match weak.upgrade() {
                                Some(this) => this.on_notification(n.process_id(), n.channel(), n.payload()),
                                None => return Ok(()),
                            },
                            Ok(_) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                });
                match setup(&client, &this.channel).await {
                    Ok(pid) => {
                        this.own_pid.store(pid, Ordering::Release);
                        *this.client.write().await = Some(client);
                        this.connected.store(true, Ordering::Release);
                        tracing::info!(db = %db_uri.redacted(), channel = %this.channel, "database connection for reload NOTIFY is up");
                        backoff = Duration::from_millis(250);
                    }
                    Err(e) => {
                        tracing::warn!(db = %db_uri.redacted(), error = %describe(&e), "database connection set-up failed")
                    }
                }
                drop(this);
                let ended = driver.await;
                let Some(this) = notifier.upgrade() else {
                    return;
                };
                this.connected.store(false, Ordering::Release);
                *this.client.write().await = None;
                match ended {
                    Ok(Err(e)) => {
                        tracing::warn!(error = %describe(&e), "database connection for reload NOTIFY lost; healing paused until it is back")
                    }
                    _ => {
                        tracing::warn!("database connection for reload NOTIFY closed; healing paused until it is back")
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(db = %db_uri.redacted(), error = %describe(&e), retry_in_ms = backoff.as_millis() as u64, "cannot connect to the database for reload NOTIFY")
            }
            Err(_) => {
                tracing::warn!(db = %db_uri.redacted(), "connecting to the database for reload NOTIFY timed out")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Our backend pid (to tell our own NOTIFYs from others') and the LISTEN. A LISTEN that fails (a
/// transaction-mode pooler) costs only the joining of others' reloads, not the connection.
async fn setup(client: &Client, channel: &str) -> Result<i32, tokio_postgres::Error> {
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let listen = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    if let Err(e) = client.batch_execute(&listen).await {
        tracing::warn!(error = %describe(&e), channel, "LISTEN failed: reloads sent by others will not be joined");
    }
    Ok(pid)
}

/// PostgreSQL's own message and SQLSTATE where the server sent one, not just "db error".
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        // "error connecting to server" alone hides the cause (refused, timed out, TLS): add it.
        None => crate::error::causes(error).map(ToString::to_string).collect::<Vec<_>>().join(": "),
    }
}
