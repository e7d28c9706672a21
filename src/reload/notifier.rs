//! The guard's own PostgreSQL connection, used to send `NOTIFY <channel>, 'reload schema'`. It is
//! kept open and re-established with back-off; while it is down, forwarding goes on and only
//! healing stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;
use tokio_postgres::{Client, NoTls};

use crate::config::DbUri;

const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);
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
            NotifyError::Failed(reason) => write!(f, "NOTIFY failed: {reason}"),
        }
    }
}

/// Sends the reload NOTIFY. Cheap to share.
pub struct Notifier {
    channel: String,
    client: RwLock<Option<Client>>,
    connected: AtomicBool,
    sent: AtomicU64,
}

impl Notifier {
    /// Starts the connection task; the first connection is attempted in the background.
    pub fn spawn(db_uri: DbUri, channel: String) -> Arc<Notifier> {
        let notifier = Arc::new(Notifier {
            channel,
            client: RwLock::new(None),
            connected: AtomicBool::new(false),
            sent: AtomicU64::new(0),
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

    /// `pg_notify` takes the channel as a value: no identifier quoting to get wrong, and the name
    /// stays case-sensitive as PostgREST's quoted LISTEN expects.
    pub async fn notify_reload(&self) -> Result<(), NotifyError> {
        let guard = self.client.read().await;
        let client = guard.as_ref().ok_or(NotifyError::Disconnected)?;
        let sent = tokio::time::timeout(
            NOTIFY_TIMEOUT,
            client.execute("SELECT pg_notify($1, 'reload schema')", &[&self.channel]),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                self.sent.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Ok(Err(e)) => Err(NotifyError::Failed(e.to_string())),
            Err(_) => Err(NotifyError::Failed(format!(
                "NOTIFY took longer than {NOTIFY_TIMEOUT:?}"
            ))),
        }
    }
}

async fn keep_connected(notifier: std::sync::Weak<Notifier>, db_uri: DbUri) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_postgres::connect(db_uri.expose(), NoTls),
        )
        .await;
        let Some(this) = notifier.upgrade() else {
            return;
        };
        match attempt {
            Ok(Ok((client, connection))) => {
                *this.client.write().await = Some(client);
                this.connected.store(true, Ordering::Release);
                tracing::info!(db = %db_uri.redacted(), "database connection for reload NOTIFY is up");
                backoff = Duration::from_millis(250);
                drop(this);
                let ended = connection.await;
                let Some(this) = notifier.upgrade() else {
                    return;
                };
                this.connected.store(false, Ordering::Release);
                *this.client.write().await = None;
                match ended {
                    Ok(()) => tracing::warn!("database connection for reload NOTIFY closed; healing paused until it is back"),
                    Err(e) => tracing::warn!(error = %e, "database connection for reload NOTIFY lost; healing paused until it is back"),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(db = %db_uri.redacted(), error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to the database for reload NOTIFY")
            }
            Err(_) => {
                tracing::warn!(db = %db_uri.redacted(), "connecting to the database for reload NOTIFY timed out")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
