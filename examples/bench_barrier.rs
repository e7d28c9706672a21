//! The write barrier's cost, in front of the real PostgREST (v14): one-row POSTs through two guards
//! on the same PostgREST, one with the barrier on (the default) and one with it off, alternating in
//! rounds of equal length, at 1 and at 32 connections. Reports throughput (on/off ratio), p50 and
//! p99 latency, and the catalog queries per second the barrier sent; reads through the same guards
//! as a control. `cargo run --release --example bench_barrier -- [SECONDS] [ROUNDS]` (defaults 3
//! and 3); needs the test bed's PostgREST binaries (see README, Tests).

// Each example uses only a part of the test support.
#[allow(dead_code, unused_macros)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::client::HttpClient;
use support::guard::start_guard;
use support::postgrest::Family;
use support::RealBed;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Requests for `seconds` over `connections`; latencies in µs, sorted.
async fn run(http: &HttpClient, url: &str, write: bool, connections: usize, seconds: f64) -> Vec<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let (http, url, next) = (http.clone(), url.to_string(), next.clone());
        clients.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while Instant::now() < until {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let status = if write {
                    let body = format!(r#"{{"at":"2026-01-01T10:00:00+02:00","v":{n}}}"#);
                    http.send(
                        http::Method::POST,
                        &url,
                        &[("content-type", "application/json"), ("prefer", "return=minimal")],
                        body,
                    )
                    .await
                    .status
                } else {
                    http.get(&format!("{url}?id=eq.{}", n % 100 + 1)).await.status
                };
                assert!(status.is_success(), "{status}");
                took.push(started.elapsed().as_secs_f64() * 1e6);
            }
            took
        }));
    }
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.expect("a client"));
    }
    all.sort_by(f64::total_cmp);
    all
}

async fn barrier_queries(http: &HttpClient, guard: &pgrst_guard::RunningGuard) -> f64 {
    let metrics = http.get(&format!("http://{}/metrics", guard.admin_addr.expect("admin"))).await.text();
    metrics
        .lines()
        .find(|l| l.starts_with("pgrst_guard_write_barrier_queries_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let bed = RealBed::start(
        Family::V14,
        "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz, v numeric(12,2));
         INSERT INTO events (v) SELECT g FROM generate_series(1, 100) g;",
    )
    .await;
    let admin = bed.postgrest.admin_url();
    let keys = |barrier: &'static str| {
        vec![
            ("PGRST_GUARD_UPSTREAM_ADMIN", admin.clone()),
            ("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
            ("PGRST_GUARD_WRITE_BARRIER", barrier.to_string()),
        ]
    };
    let on_keys = keys("true");
    let off_keys = keys("false");
    let as_refs = |keys: &Vec<(&'static str, String)>| keys.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let on_owned = as_refs(&on_keys);
    let off_owned = as_refs(&off_keys);
    let on_refs: Vec<(&str, &str)> = on_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let off_refs: Vec<(&str, &str)> = off_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let on = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &on_refs).await;
    let off = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &off_refs).await;
    let http = HttpClient::new();
    println!("| what | connections | barrier on req/s | off req/s | ratio | p50 on/off µs | p99 on/off µs | barrier queries/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (what, write) in [("POST one row", true), ("GET one row", false)] {
        for connections in [1usize, 32] {
            let (mut with, mut without) = (Vec::new(), Vec::new());
            let (mut on_time, mut queries) = (0.0, 0.0);
            for _ in 0..rounds {
                let before = barrier_queries(&http, &on).await;
                let started = Instant::now();
                with.extend(run(&http, &format!("{}/events", on.url()), write, connections, seconds).await);
                on_time += started.elapsed().as_secs_f64();
                queries += barrier_queries(&http, &on).await - before;
                without.extend(run(&http, &format!("{}/events", off.url()), write, connections, seconds).await);
            }
            with.sort_by(f64::total_cmp);
            without.sort_by(f64::total_cmp);
            let total = seconds * rounds as f64;
            let (rate_on, rate_off) = (with.len() as f64 / total, without.len() as f64 / total);
            println!(
                "| {what} | {connections} | {rate_on:.0} | {rate_off:.0} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} |",
                rate_on / rate_off,
                percentile(&with, 0.5),
                percentile(&without, 0.5),
                percentile(&with, 0.99),
                percentile(&without, 0.99),
                queries / on_time,
            );
        }
    }
}
