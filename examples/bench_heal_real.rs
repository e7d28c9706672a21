//! Heal cost on a real PostgREST (v14, the family Supabase runs) with a big schema: thousands of
//! tables chained by foreign keys, so that a reload takes a noticeable time. It measures PostgREST's
//! own reload (NOTIFY until its load counter rises, polled every 2 ms), then the heal of an insert
//! with a new column through the guard, with and without the admin URL, and reports the heal time
//! minus the reload two ways: against the p50 of separate reloads, and paired, against the reload
//! each heal itself caused (from the moment its NOTIFY reached a listener to the counter's rise),
//! which takes PostgREST's spread of reload times out of the difference.
//! `cargo run --release --example bench_heal_real -- [TABLES] [HEALS]`
//! (defaults 2000 and 30); needs the test bed's PostgREST binaries (see README, Tests).

// Each example uses only a part of the test support.
#[allow(dead_code, unused_macros)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::client::HttpClient;
use support::guard::start_guard;
use support::postgrest::Family;
use support::RealBed;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn big_schema(tables: usize) -> String {
    format!(
        "CREATE TABLE items (id bigserial PRIMARY KEY, name text);
         CREATE TABLE t_0 (id int PRIMARY KEY);
         DO $$ BEGIN FOR i IN 1..{} LOOP
           EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, parent int REFERENCES t_%s (id), label text)', i, i - 1);
         END LOOP; END $$;",
        tables - 1
    )
}

/// Heal totals, and each heal minus the reload it caused (paired), both sorted.
async fn heals(bed: &RealBed, with_admin: bool, heals: usize, first_column: usize) -> (Vec<f64>, Vec<f64>) {
    let admin = bed.postgrest.admin_url();
    let mut keys = vec![("PGRST_GUARD_RELOAD_MIN_INTERVAL_MS", "1")];
    if with_admin {
        keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()));
    }
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    let http = HttpClient::new();
    let url = format!("{}/items", guard.url());
    let mut clock = bed.reload_clock().await;
    let mut totals = Vec::with_capacity(heals);
    let mut paired = Vec::with_capacity(heals);
    for i in first_column..first_column + heals {
        bed.pg.sql(&format!("ALTER TABLE items ADD COLUMN c{i} text")).await;
        let body = format!(r#"{{"name":"n","c{i}":"v"}}"#);
        let started = Instant::now();
        let (r, own_reload) = clock.time(bed, http.post_json(&url, &body)).await;
        let total = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(r.status, http::StatusCode::CREATED, "{}", r.text());
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
        totals.push(total);
        paired.push(total - own_reload);
        // Let PostgREST's debounce cool-down pass, as between two real migrations.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    guard.shutdown().await;
    totals.sort_by(f64::total_cmp);
    paired.sort_by(f64::total_cmp);
    (totals, paired)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let mut args = std::env::args().skip(1);
    let tables: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let bed = RealBed::start(Family::V14, &big_schema(tables)).await;
    let mut reloads = Vec::new();
    for _ in 0..10 {
        reloads.push(bed.reload_time_ms().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    reloads.sort_by(f64::total_cmp);
    let reload = percentile(&reloads, 0.5);
    println!(
        "PostgREST {} with {tables} tables: reload p50 {reload:.1} ms (min {:.1}, max {:.1}, 10 reloads)\n",
        bed.postgrest.version,
        reloads[0],
        reloads[reloads.len() - 1]
    );
    println!("| admin URL | heals | heal p50 | heal p90 | heal p50 − reload p50 | heal − its own reload, p50 (p90) |");
    println!("|---|---|---|---|---|---|");
    for (n, with_admin) in [true, false].into_iter().enumerate() {
        let (totals, paired) = heals(&bed, with_admin, count, n * count).await;
        let p50 = percentile(&totals, 0.5);
        println!(
            "| {} | {count} | {p50:.1} ms | {:.1} ms | {:+.1} ms | {:+.1} ms ({:+.1} ms) |",
            if with_admin { "set" } else { "unset" },
            percentile(&totals, 0.9),
            p50 - reload,
            percentile(&paired, 0.5),
            percentile(&paired, 0.9),
        );
    }
}
