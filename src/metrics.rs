//! The guard's own counters and histograms, kept and rendered (Prometheus text format 0.0.4) by
//! the `prometheus` crate on the admin listener. Names are those the guard has always exposed.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::health::{CannotNotify, DatabaseHealth, Listening};

/// Reload NOTIFYs the guard's database connection sent, and saw from others.
#[derive(Clone, Copy, Debug, Default)]
pub struct NotifyCounts {
    pub sent: u64,
    pub seen: u64,
}

/// Upper bounds in seconds, shared by the latency histograms.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Statuses 100 to 599.
const STATUSES: usize = 500;

pub struct Metrics {
    registry: Registry,
    responses: IntCounterVec,
    /// Each status's counter, looked up once: on the request path an answer costs an index and an
    /// atomic addition, not a hash lookup under the vector's lock.
    response_counters: Box<[OnceLock<IntCounter>; STATUSES]>,
    heals: IntCounterVec,
    notifies_sent: IntCounter,
    reload_probes: IntCounter,
    upstream_requests: IntCounterVec,
    catalog_checks: IntCounterVec,
    notifies_seen: IntCounter,
    database_connected: IntGauge,
    database_verified: prometheus::Gauge,
    database_listening: IntGauge,
    database_cannot_notify: IntGaugeVec,
    database_reconnects: IntCounterVec,
    heal_wait: Histogram,
    write_barrier: IntCounterVec,
    write_barrier_reloads: IntCounter,
    write_barrier_queries: IntCounter,
    write_hold: Histogram,
    request_duration: Histogram,
    upstream_latency: Histogram,
    /// One scrape at a time: the counters fed from elsewhere are brought up to date while rendering.
    rendering: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(vec.clone())).expect("unique metric");
            vec
        };
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(counter.clone())).expect("unique metric");
            counter
        };
        let histogram = |name: &str, help: &str| {
            let histogram =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec())).expect("valid metric");
            registry.register(Box::new(histogram.clone())).expect("unique metric");
            histogram
        };
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(gauge.clone())).expect("unique metric");
            gauge
        };
        let database_connected = gauge(
            "pgrst_guard_database_connected",
            "1 when the guard's database connection took a NOTIFY and its last round trip succeeded within the last \
             check interval; 0 otherwise, including a server that answers but refuses NOTIFY (see \
             pgrst_guard_database_cannot_notify).",
        );
        let database_listening = gauge(
            "pgrst_guard_database_listening",
            "1 when the guard's LISTEN was proved to receive (reloads others ask for are joined), 0 when it is \
             known not to (a transaction-mode pooler), -1 before the first proof.",
        );
        let database_verified = prometheus::Gauge::new(
            "pgrst_guard_database_last_verified_timestamp_seconds",
            "When a round trip on the guard's database connection last succeeded (Unix time; 0: never).",
        )
        .expect("valid metric");
        registry.register(Box::new(database_verified.clone())).expect("unique metric");
        let database_cannot_notify = IntGaugeVec::new(
            Opts::new(
                "pgrst_guard_database_cannot_notify",
                "1 for the reason the database answers but refuses the guard's NOTIFY, so heals cannot work: standby \
                 (a hot standby), queue_full (the notification queue is full), refused (any other); 0 otherwise.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry.register(Box::new(database_cannot_notify.clone())).expect("unique metric");
        for reason in CannotNotify::LABELS {
            database_cannot_notify.with_label_values(&[reason]).set(0);
        }
        Metrics {
            responses: counter_vec("pgrst_guard_responses_total", "Answers sent to clients, by status.", &["status"]),
            response_counters: Box::new(std::array::from_fn(|_| OnceLock::new())),
            heals: counter_vec(
                "pgrst_guard_heals_total",
                "Schema-cache errors met, by code and outcome.",
                &["code", "outcome"],
            ),
            notifies_sent: counter("pgrst_guard_notifies_sent_total", "Reload NOTIFYs sent."),
            reload_probes: counter(
                "pgrst_guard_reload_probes_total",
                "Replays sent to find a reload's end when PostgREST's load counter cannot be watched (no admin \
                 URL): one request per reload probes, the others wait for its success.",
            ),
            upstream_requests: counter_vec(
                "pgrst_guard_upstream_requests_total",
                "Requests sent to PostgREST (replays included), by result: answered, never_sent (the connection was \
                 refused or could not be made), no_answer (sent, then the connection broke), timeout.",
                &["result"],
            ),
            catalog_checks: counter_vec(
                "pgrst_guard_catalog_checks_total",
                "Catalog checks before a reload, by result.",
                &["result"],
            ),
            notifies_seen: counter(
                "pgrst_guard_notifies_seen_total",
                "Reload NOTIFYs sent by others and seen on the channel.",
            ),
            database_connected,
            database_verified,
            database_listening,
            database_cannot_notify,
            database_reconnects: counter_vec(
                "pgrst_guard_database_reconnects_total",
                "Database connections replaced, by cause (closed, timeout, listen_deaf, cannot_notify).",
                &["cause"],
            ),
            heal_wait: histogram("pgrst_guard_heal_wait_seconds", "Time from a schema-cache error to the answer sent."),
            write_barrier: counter_vec(
                "pgrst_guard_write_barrier_total",
                "Writes checked by the write barrier, by result: current (the cache is shown to hold what the \
                 write depends on), held (it waited for a reload), unverified (no admin URL or no database: \
                 forwarded unproved), timed_out (answered 503, not sent).",
                &["result"],
            ),
            write_barrier_reloads: counter(
                "pgrst_guard_write_barrier_reloads_total",
                "Proofs the write barrier ran: a schema snapshot, then reloads until two loads follow it.",
            ),
            write_barrier_queries: counter(
                "pgrst_guard_write_barrier_queries_total",
                "Catalog queries the write barrier sent: one per batch of writes that arrived while the previous ran.",
            ),
            write_hold: histogram(
                "pgrst_guard_write_hold_seconds",
                "Time a write waited for the write barrier's proof.",
            ),
            request_duration: histogram("pgrst_guard_request_duration_seconds", "Time from request to response head."),
            upstream_latency: histogram(
                "pgrst_guard_upstream_latency_seconds",
                "Time from forwarding to the upstream's response head.",
            ),
            registry,
            rendering: Mutex::new(()),
        }
    }
}

impl Metrics {
    pub fn reload_probe(&self) {
        self.reload_probes.inc();
    }

    pub fn response(&self, status: u16, took: Duration) {
        if let Some(slot) = self.response_counters.get(usize::from(status).wrapping_sub(100)) {
            slot.get_or_init(|| self.responses.with_label_values(&[status.to_string().as_str()])).inc();
        }
        self.request_duration.observe(took.as_secs_f64());
    }

    pub fn heal(&self, code: &'static str, outcome: &'static str) {
        self.heals.with_label_values(&[code, outcome]).inc();
    }

    pub fn catalog_check(&self, result: &'static str) {
        self.catalog_checks.with_label_values(&[result]).inc();
    }

    pub fn observe_upstream(&self, took: Duration) {
        self.upstream_latency.observe(took.as_secs_f64());
    }

    /// An upstream request that got no answer: `never_sent`, `no_answer` or `timeout`.
    pub fn upstream_failed(&self, result: &'static str) {
        self.upstream_requests.with_label_values(&[result]).inc();
    }

    pub fn write_barrier(&self, result: &'static str) {
        self.write_barrier.with_label_values(&[result]).inc();
    }

    pub fn write_barrier_reload(&self) {
        self.write_barrier_reloads.inc();
    }

    pub fn write_barrier_query(&self) {
        self.write_barrier_queries.inc();
    }

    pub fn observe_write_hold(&self, took: Duration) {
        self.write_hold.observe(took.as_secs_f64());
    }

    pub fn observe_heal_wait(&self, took: Duration) {
        self.heal_wait.observe(took.as_secs_f64());
    }

    /// The text exposition, with what was last verified of the database path and the NOTIFYs sent
    /// and seen on it.
    pub fn render(&self, database: &DatabaseHealth, notifies: NotifyCounts) -> String {
        let _one_scrape = self.rendering.lock().expect("metrics lock");
        self.database_connected.set(i64::from(database.connected));
        let verified = database.last_verified.and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok());
        self.database_verified.set(verified.map_or(0.0, |at| at.as_secs_f64()));
        self.database_listening.set(match database.listening {
            Listening::Hearing => 1,
            Listening::Off(_) => 0,
            Listening::Unverified => -1,
        });
        let refused = database.cannot_notify.as_ref().map(CannotNotify::label);
        for reason in CannotNotify::LABELS {
            self.database_cannot_notify.with_label_values(&[reason]).set(i64::from(refused == Some(reason)));
        }
        for (cause, count) in &database.reconnects {
            let counter = self.database_reconnects.with_label_values(&[cause.as_str()]);
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        self.notifies_seen.inc_by(notifies.seen.saturating_sub(self.notifies_seen.get()));
        self.notifies_sent.inc_by(notifies.sent.saturating_sub(self.notifies_sent.get()));
        // Answered requests are the latency histogram's count: one atomic on the request path, not two.
        let answered = self.upstream_requests.with_label_values(&["answered"]);
        answered.inc_by(self.upstream_latency.get_sample_count().saturating_sub(answered.get()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::ReconnectCause;

    #[test]
    fn renders_the_names_the_guard_has_always_exposed() {
        let metrics = Metrics::default();
        metrics.response(201, Duration::from_millis(3));
        metrics.response(201, Duration::from_millis(3));
        metrics.heal("PGRST204", "healed");
        metrics.catalog_check("missing");
        let mut database = DatabaseHealth {
            connected: true,
            cannot_notify: None,
            last_verified: Some(std::time::SystemTime::now()),
            listening: Listening::Hearing,
            last_error: None,
            reconnects: [(ReconnectCause::Timeout, 2)].into_iter().collect(),
        };
        let text = metrics.render(&database, NotifyCounts { sent: 1, seen: 4 });
        for line in [
            "pgrst_guard_responses_total{status=\"201\"} 2",
            "pgrst_guard_heals_total{code=\"PGRST204\",outcome=\"healed\"} 1",
            "pgrst_guard_catalog_checks_total{result=\"missing\"} 1",
            "pgrst_guard_notifies_sent_total 1",
            "pgrst_guard_notifies_seen_total 4",
            "pgrst_guard_database_connected 1",
            "pgrst_guard_database_listening 1",
            "pgrst_guard_database_cannot_notify{reason=\"standby\"} 0",
            "pgrst_guard_database_reconnects_total{cause=\"timeout\"} 2",
            "pgrst_guard_request_duration_seconds_bucket{le=\"0.005\"} 2",
            "pgrst_guard_request_duration_seconds_count 2",
            "# TYPE pgrst_guard_heal_wait_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        database.connected = false;
        database.listening = Listening::Off("pooler");
        database.cannot_notify = Some(CannotNotify::Standby);
        let text = metrics.render(&database, NotifyCounts { sent: 1, seen: 6 });
        for line in [
            "pgrst_guard_notifies_seen_total 6",
            "pgrst_guard_database_connected 0",
            "pgrst_guard_database_listening 0",
            "pgrst_guard_database_cannot_notify{reason=\"standby\"} 1",
            "pgrst_guard_database_cannot_notify{reason=\"queue_full\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
