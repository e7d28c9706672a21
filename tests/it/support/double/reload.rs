//! The schema cache's life: a debounced loader (leading edge, 100 ms cool-down, triggers during a
//! load collapse into one more load — PostgREST ≥ v11.1; v11.0 drops them), load failures that empty
//! the cache (v11–v14) and retry with back-off, and the LISTEN connection that feeds the loader and
//! reloads after it reconnects.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use super::cache::SchemaCache;
use super::State;

const DEBOUNCE: Duration = Duration::from_millis(100);
const MAX_BACKOFF_SECS: u64 = 32;

#[derive(Default)]
pub struct ReloadState {
    requested: AtomicBool,
    loading: AtomicBool,
    wake: Notify,
    pub pending: AtomicBool,
    pub listener_up: AtomicBool,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    pub notifications_received: AtomicU64,
    /// Loads to fail on purpose, to imitate a statement timeout on a big schema.
    pub fail_next: AtomicUsize,
    pub load_delay_ms: AtomicU64,
    pub loaded: Notify,
    /// How long the last load took, from its start to the swap (microseconds).
    pub last_load_micros: AtomicU64,
}

/// Pokes the debounced loader, as a NOTIFY or SIGUSR1 does.
pub fn trigger(state: &State) {
    let reload = &state.reload;
    if state.profile.drops_notify_during_load() && reload.loading.load(Ordering::Acquire) {
        tracing::info!("schema cache reload request dropped: a load is running (v11.0 behaviour)");
        return;
    }
    reload.requested.store(true, Ordering::Release);
    reload.wake.notify_one();
}

pub async fn run_loader(state: Arc<State>) {
    loop {
        while !state.reload.requested.swap(false, Ordering::AcqRel) {
            state.reload.wake.notified().await;
        }
        state.reload.loading.store(true, Ordering::Release);
        let started = std::time::Instant::now();
        load_until_success(&state).await;
        state.reload.last_load_micros.store(started.elapsed().as_micros() as u64, Ordering::Release);
        state.reload.loading.store(false, Ordering::Release);
        tokio::time::sleep(DEBOUNCE).await;
    }
}

async fn load_until_success(state: &State) {
    let mut backoff = 1;
    loop {
        match load_once(state).await {
            Ok(cache) => {
                state.reload.pending.store(true, Ordering::Release);
                let summary = cache.summary();
                *state.cache.write().unwrap() = Some(Arc::new(cache));
                state.pool.flush();
                state.reload.successes.fetch_add(1, Ordering::AcqRel);
                state.reload.pending.store(false, Ordering::Release);
                state.reload.loaded.notify_waiters();
                tracing::info!("{summary}");
                return;
            }
            Err(reason) => {
                // v11–v14 void the cache when a load fails: every request gets PGRST002 until a retry works.
                *state.cache.write().unwrap() = None;
                state.reload.failures.fetch_add(1, Ordering::AcqRel);
                state.reload.loaded.notify_waiters();
                tracing::warn!("Failed to load the schema cache: {reason}. Attempting to reconnect to the database in {backoff} seconds...");
                tokio::time::sleep(Duration::from_secs(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF_SECS);
            }
        }
    }
}

async fn load_once(state: &State) -> Result<SchemaCache, String> {
    let mut client = state.pool.connect().await.map_err(|e| e.to_string())?;
    let loaded = SchemaCache::load(&mut client, &state.schemas).await.map_err(|e| e.to_string());
    let delay = state.reload.load_delay_ms.load(Ordering::Acquire);
    if delay > 0 {
        // Imitates the catalog queries of a big schema: the snapshot was taken when the load began,
        // and the old cache keeps serving until the swap.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let should_fail =
        state.reload.fail_next.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
    if should_fail {
        return Err("canceling statement due to statement timeout (injected)".to_string());
    }
    loaded
}

/// LISTENs on the channel (quoted, so case-sensitive) and reconnects with back-off; after a
/// reconnect it reloads, since notifications may have been lost meanwhile.
pub async fn run_listener(state: Arc<State>) {
    let mut backoff = 1;
    let mut had_failure = false;
    loop {
        match tokio_postgres::connect(&state.db_uri, NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        if tx.send(message).is_err() {
                            break;
                        }
                    }
                });
                let listen = format!("LISTEN {}", quote_ident(&state.channel));
                if client.batch_execute(&listen).await.is_ok() {
                    state.reload.listener_up.store(true, Ordering::Release);
                    tracing::info!("Listening for notifications on the {:?} channel", state.channel);
                    if had_failure {
                        trigger(&state);
                    }
                    backoff = 1;
                    while let Some(message) = notifications.recv().await {
                        if let Ok(AsyncMessage::Notification(n)) = message {
                            if n.channel() == state.channel {
                                handle_payload(&state, n.payload());
                            }
                        }
                    }
                }
                driver.abort();
                state.reload.listener_up.store(false, Ordering::Release);
                tracing::warn!(
                    "Failed listening for database notifications on the {:?} channel. Retrying listening for database notifications in {backoff} seconds...",
                    state.channel
                );
            }
            Err(e) => {
                state.reload.listener_up.store(false, Ordering::Release);
                tracing::warn!("listener cannot connect: {e}");
            }
        }
        had_failure = true;
        tokio::time::sleep(Duration::from_secs(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF_SECS);
    }
}

fn handle_payload(state: &State, payload: &str) {
    match payload {
        "" | "reload schema" => {
            state.reload.notifications_received.fetch_add(1, Ordering::AcqRel);
            tracing::info!("Received a schema cache reload message on the {:?} channel", state.channel);
            trigger(state);
        }
        "reload config" => tracing::info!("Received a config reload message on the {:?} channel", state.channel),
        _ => {}
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
