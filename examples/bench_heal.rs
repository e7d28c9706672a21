//! Heal cost: the time from a stale-cache error to the replayed answer, minus the double's own
//! load time, over many heals, with the double's load time at 0 and at 200 ms, with and without
//! the admin URL. Part of `bench/run.sh`; runs alone with `cargo run --release --example bench_heal`.

// Each example uses only a part of the test support.
#[allow(dead_code, unused_macros)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::client::HttpClient;
use support::guard::start_guard;
use support::TestBed;

const HEALS: usize = 40;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn measure(load_delay: Duration, with_admin: bool) -> (f64, f64, f64, f64) {
    let bed =
        TestBed::start_with("CREATE TABLE items (id bigserial PRIMARY KEY, name text);", |o| o.load_delay(load_delay))
            .await;
    let admin = bed.double.admin_url();
    let mut keys = vec![("PGRST_GUARD_RELOAD_MIN_INTERVAL_MS", "1")];
    if with_admin {
        keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()));
    }
    let guard = start_guard(&bed.double.url(), &bed.pg.uri("postgres"), &keys).await;
    let http = HttpClient::new();
    let url = format!("{}/items", guard.url());
    let (mut totals, mut overheads) = (Vec::new(), Vec::new());
    for i in 0..HEALS {
        bed.pg.sql(&format!("ALTER TABLE items ADD COLUMN c{i} text")).await;
        // Let the double's debounce cool-down pass, as between two real migrations.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let r = http.post_json(&url, &format!(r#"{{"name":"n","c{i}":"v"}}"#)).await;
        let total = started.elapsed();
        assert_eq!(r.status, http::StatusCode::CREATED, "{}", r.text());
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
        let load = bed.double.last_load_duration();
        totals.push(total.as_secs_f64() * 1000.0);
        overheads.push(total.saturating_sub(load).as_secs_f64() * 1000.0);
    }
    totals.sort_by(f64::total_cmp);
    overheads.sort_by(f64::total_cmp);
    (percentile(&totals, 0.5), percentile(&overheads, 0.5), percentile(&overheads, 0.99), percentile(&totals, 0.99))
}

#[tokio::main]
async fn main() {
    // Logs of the test bed go to stderr; stdout is the table.
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    println!("| double's load time | admin URL | heals | heal total p50 | total p99 | overhead p50 | overhead p99 |");
    println!("|---|---|---|---|---|---|---|");
    for delay in [0u64, 200] {
        for with_admin in [true, false] {
            let (total_p50, over_p50, over_p99, total_p99) = measure(Duration::from_millis(delay), with_admin).await;
            println!(
                "| {delay} ms | {} | {HEALS} | {total_p50:.1} ms | {total_p99:.1} ms | {over_p50:.1} ms | {over_p99:.1} ms |",
                if with_admin { "set" } else { "unset" }
            );
        }
    }
}
