//! The guard's own counters and histograms, rendered in Prometheus text on the admin listener.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds in seconds, shared by the latency histograms.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Counts per bucket (the last one is +Inf) and the sum; cumulative counts are made when rendered,
/// so an observation costs two atomic additions on the request path.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = cumulative + self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

pub struct Metrics {
    /// Answers by status code (100 to 599), indexed by `status - 100`.
    responses: [AtomicU64; 500],
    heals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    notifies_sent: AtomicU64,
    catalog_checks: Mutex<BTreeMap<&'static str, u64>>,
    heal_wait: Histogram,
    request_duration: Histogram,
    upstream_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            responses: std::array::from_fn(|_| AtomicU64::new(0)),
            heals: Mutex::default(),
            notifies_sent: AtomicU64::new(0),
            catalog_checks: Mutex::default(),
            heal_wait: Histogram::default(),
            request_duration: Histogram::default(),
            upstream_latency: Histogram::default(),
        }
    }
}

impl Metrics {
    pub fn response(&self, status: u16, took: Duration) {
        if let Some(count) = self.responses.get(usize::from(status).wrapping_sub(100)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.request_duration.observe(took);
    }

    pub fn heal(&self, code: &'static str, outcome: &'static str) {
        *self.heals.lock().expect("metrics lock").entry((code, outcome)).or_default() += 1;
    }

    pub fn catalog_check(&self, result: &'static str) {
        *self.catalog_checks.lock().expect("metrics lock").entry(result).or_default() += 1;
    }

    pub fn notify_sent(&self) {
        self.notifies_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_upstream(&self, took: Duration) {
        self.upstream_latency.observe(took);
    }

    pub fn observe_heal_wait(&self, took: Duration) {
        self.heal_wait.observe(took);
    }

    pub fn render(&self, database_connected: bool, notifies_seen: u64) -> String {
        let mut out = String::new();
        out.push_str("# HELP pgrst_guard_responses_total Answers sent to clients, by status.\n# TYPE pgrst_guard_responses_total counter\n");
        for (index, count) in self.responses.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            if count > 0 {
                let _ = writeln!(out, "pgrst_guard_responses_total{{status=\"{}\"}} {count}", index + 100);
            }
        }
        out.push_str("# HELP pgrst_guard_heals_total Schema-cache errors met, by code and outcome.\n# TYPE pgrst_guard_heals_total counter\n");
        for ((code, outcome), count) in self.heals.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "pgrst_guard_heals_total{{code=\"{code}\",outcome=\"{outcome}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP pgrst_guard_notifies_sent_total Reload NOTIFYs sent.\n# TYPE pgrst_guard_notifies_sent_total counter\npgrst_guard_notifies_sent_total {}",
            self.notifies_sent.load(Ordering::Relaxed)
        );
        out.push_str("# HELP pgrst_guard_catalog_checks_total Catalog checks before a reload, by result.\n# TYPE pgrst_guard_catalog_checks_total counter\n");
        for (result, count) in self.catalog_checks.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "pgrst_guard_catalog_checks_total{{result=\"{result}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP pgrst_guard_notifies_seen_total Reload NOTIFYs sent by others and seen on the channel.\n# TYPE pgrst_guard_notifies_seen_total counter\npgrst_guard_notifies_seen_total {notifies_seen}"
        );
        let _ = writeln!(
            out,
            "# HELP pgrst_guard_database_connected Whether the NOTIFY connection is up.\n# TYPE pgrst_guard_database_connected gauge\npgrst_guard_database_connected {}",
            u8::from(database_connected)
        );
        self.heal_wait.render(
            &mut out,
            "pgrst_guard_heal_wait_seconds",
            "Time from a schema-cache error to the answer sent.",
        );
        self.upstream_latency.render(
            &mut out,
            "pgrst_guard_upstream_latency_seconds",
            "Time from forwarding to the upstream's response head.",
        );
        self.request_duration.render(
            &mut out,
            "pgrst_guard_request_duration_seconds",
            "Time from request to response head.",
        );
        out
    }
}
