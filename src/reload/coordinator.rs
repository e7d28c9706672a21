//! Single-flight reloads. The first request that meets a stale cache sends the NOTIFY; every request
//! that fails while that reload is pending joins it and waits on the same completion signal; a
//! request whose answer predates a reload that has since finished just replays.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::load_counter::LoadCounter;
use super::notifier::{Notifier, NotifyError};

const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// PostgREST's debounce cool-down between two loads.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct WaitSettings {
    /// The longest a heal may wait in all.
    pub deadline: Duration,
    /// First back-off when completion cannot be observed; doubles up to 1 s.
    pub backoff: Duration,
    /// How often the load counter is read while a reload is awaited.
    pub poll: Duration,
}

pub struct ReloadCoordinator {
    notifier: Arc<Notifier>,
    load_counter: Option<LoadCounter>,
    settings: WaitSettings,
    flights: tokio::sync::Mutex<FlightLog>,
}

#[derive(Default)]
struct FlightLog {
    pending: Option<Arc<Flight>>,
    last_completed: Option<Instant>,
}

/// One NOTIFY and everything that waits on it.
pub struct Flight {
    notified_at: Instant,
    completion: Completion,
    completed_at: Mutex<Option<Instant>>,
}

enum Completion {
    /// PostgREST's load counter, read before the NOTIFY and polled after it.
    LoadCounter {
        baseline: u64,
        loads: watch::Receiver<u64>,
    },
    /// No way to observe the reload: replay after a growing back-off.
    Backoff { backoff: Duration },
}

/// A request's place in a reload.
pub enum Ticket {
    /// The answer came from a cache that has been replaced since: replay now.
    AlreadyReloaded,
    Flight(Arc<Flight>),
}

#[derive(Debug)]
pub enum ReloadError {
    Notify(NotifyError),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Notify(e) => write!(f, "{e}"),
        }
    }
}

impl ReloadCoordinator {
    pub fn new(
        notifier: Arc<Notifier>,
        load_counter: Option<LoadCounter>,
        settings: WaitSettings,
    ) -> ReloadCoordinator {
        ReloadCoordinator {
            notifier,
            load_counter,
            settings,
            flights: tokio::sync::Mutex::new(FlightLog::default()),
        }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    pub fn settings(&self) -> &WaitSettings {
        &self.settings
    }

    /// Joins the pending reload, or starts one, for an answer that was requested at `sent_at`.
    pub async fn join_or_start(&self, sent_at: Instant) -> Result<(Ticket, bool), ReloadError> {
        let mut log = self.flights.lock().await;
        if let Some(flight) = &log.pending {
            if let Some(done) = flight.completed_at() {
                log.last_completed = log.last_completed.max(Some(done));
                log.pending = None;
            } else if flight.notified_at.elapsed() > self.settings.deadline {
                log.pending = None;
            }
        }
        if let Some(flight) = &log.pending {
            return Ok((Ticket::Flight(flight.clone()), false));
        }
        if log.last_completed.is_some_and(|done| done > sent_at) {
            return Ok((Ticket::AlreadyReloaded, false));
        }
        let baseline = match &self.load_counter {
            Some(counter) => match counter.successful_loads().await {
                Ok(count) => Some(count),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read PostgREST's load counter; waiting with back-off instead");
                    None
                }
            },
            None => None,
        };
        self.notifier
            .notify_reload()
            .await
            .map_err(ReloadError::Notify)?;
        let notified_at = Instant::now();
        let (completion, poller) = match (baseline, &self.load_counter) {
            (Some(baseline), Some(counter)) => {
                let (publish, loads) = watch::channel(baseline);
                (
                    Completion::LoadCounter { baseline, loads },
                    Some((counter.clone(), publish, baseline)),
                )
            }
            _ => (
                Completion::Backoff {
                    backoff: self.settings.backoff,
                },
                None,
            ),
        };
        let flight = Arc::new(Flight {
            notified_at,
            completion,
            completed_at: Mutex::new(None),
        });
        if let Some((counter, publish, baseline)) = poller {
            spawn_load_poller(
                Arc::downgrade(&flight),
                counter,
                publish,
                baseline,
                self.settings.clone(),
            );
        }
        log.pending = Some(flight.clone());
        Ok((Ticket::Flight(flight), true))
    }
}

/// Publishes the load counter until it has risen twice or time is up, and marks the flight
/// complete at the first rise, so later failures stop joining it.
fn spawn_load_poller(
    flight: Weak<Flight>,
    counter: LoadCounter,
    publish: watch::Sender<u64>,
    baseline: u64,
    settings: WaitSettings,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < settings.deadline {
            tokio::time::sleep(settings.poll).await;
            let Ok(count) = counter.successful_loads().await else {
                continue;
            };
            if count > baseline {
                match flight.upgrade() {
                    Some(flight) => flight.mark_completed(Instant::now()),
                    None => break,
                }
            }
            publish.send_replace(count);
            if count >= baseline + 2 {
                break;
            }
        }
    });
}

impl Flight {
    pub fn completed_at(&self) -> Option<Instant> {
        *self.completed_at.lock().expect("flight lock")
    }

    pub fn mark_completed(&self, at: Instant) {
        self.completed_at
            .lock()
            .expect("flight lock")
            .get_or_insert(at);
    }

    pub fn notified_at(&self) -> Instant {
        self.notified_at
    }
}

impl Ticket {
    /// Waits until replay number `attempt` (from 1) is worth sending; false means give up.
    pub async fn wait_before_replay(&self, attempt: u32, deadline: Instant) -> bool {
        let flight = match self {
            Ticket::AlreadyReloaded => return attempt == 1,
            Ticket::Flight(flight) => flight,
        };
        match &flight.completion {
            Completion::LoadCounter { baseline, loads } => {
                // PostgREST's debounce: the load that started after our NOTIFY ends at the first or,
                // if one was already running, the second rise of the counter.
                let (target, limit) = match attempt {
                    1 => (baseline + 1, deadline),
                    2 => {
                        let risen = flight.completed_at().unwrap_or_else(Instant::now);
                        let first_load = risen.saturating_duration_since(flight.notified_at);
                        (
                            baseline + 2,
                            deadline.min(
                                risen + first_load * 2 + DEBOUNCE + Duration::from_millis(150),
                            ),
                        )
                    }
                    _ => return false,
                };
                let mut loads = loads.clone();
                let reached =
                    tokio::time::timeout_at(limit, loads.wait_for(|count| *count >= target)).await;
                matches!(reached, Ok(Ok(_)))
            }
            Completion::Backoff { backoff } => {
                let delay = backoff
                    .saturating_mul(1 << (attempt.saturating_sub(1)).min(16))
                    .min(MAX_BACKOFF);
                if Instant::now() + delay > deadline {
                    return false;
                }
                tokio::time::sleep(delay).await;
                true
            }
        }
    }

    /// A replay succeeded: in back-off mode that is the only sign the reload has finished.
    pub fn succeeded(&self) {
        if let Ticket::Flight(flight) = self {
            flight.mark_completed(Instant::now());
        }
    }
}

/// Back-off for PGRST002 (no cache at all): PostgREST retries its own load, nothing to send.
pub async fn wait_out_empty_cache(attempt: u32, backoff: Duration, deadline: Instant) -> bool {
    let delay = backoff
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    if Instant::now() + delay > deadline {
        return false;
    }
    tokio::time::sleep(delay).await;
    true
}
