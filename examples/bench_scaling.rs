//! How the guard's costs grow with the work, on the real PostgREST 14 and the guard as its own
//! process (the release binary, default configuration):
//! 1. heal time against schema size (100, 2,000, 10,000 tables chained by foreign keys), with and
//!    without the admin URL, next to PostgREST's own reload time;
//! 2. heal time, NOTIFYs and upstream requests with 1, 100 and 1,000 requests failing on one
//!    migration and waiting on one reload;
//! 3. resident memory with 1,000 and 10,000 idle keep-alive connections, and with 1,000 requests
//!    holding 64 KiB bodies while they wait on a reload.
//!
//! `bash bench/scaling.sh` builds it and the guard and writes `bench/scaling-latest.md`; alone:
//! `PGRST_GUARD_BIN=target/release/pgrst-guard cargo run --release --example bench_scaling`.

// Each example uses only a part of the test support.
#[allow(dead_code, unused_macros)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::client::HttpClient;
use support::guard::{GuardProcess, NotifyCounter};
use support::postgrest::Family;
use support::RealBed;

const SCHEMA_SIZES: [usize; 3] = [100, 2_000, 10_000];
const WAITING: [usize; 3] = [1, 100, 1_000];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// The tables the heals write to, and the start of the chain.
fn base_schema() -> String {
    format!(
        "CREATE TABLE items (id bigserial PRIMARY KEY, name text);
         {}
         CREATE TABLE t_0 (id int PRIMARY KEY);",
        support::RELOAD_BLOCKER_SQL
    )
}

/// Up to `tables` tables, each referencing the one before: PostgREST's reload grows with both. In
/// transactions of 1,000 tables, within PostgreSQL's default lock table.
async fn grow_schema(bed: &RealBed, tables: usize) {
    let last = tables - 2;
    for first in (1..=last).step_by(1_000) {
        bed.pg
            .sql(&format!(
                "DO $$ BEGIN FOR i IN {first}..{} LOOP
                   EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, parent int REFERENCES t_%s (id), label text)', i, i - 1);
                 END LOOP; END $$;",
                (first + 999).min(last)
            ))
            .await;
    }
    // PostgREST started on the base schema: the first reload takes in the rest.
    bed.reload_time_ms().await;
}

async fn reload_p50(bed: &RealBed, count: usize) -> (f64, Vec<f64>) {
    let mut reloads = Vec::new();
    for _ in 0..count {
        reloads.push(bed.reload_time_ms().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let reloads = sorted(reloads);
    (percentile(&reloads, 0.5), reloads)
}

async fn guard(bed: &RealBed, with_admin: bool) -> GuardProcess {
    let admin = bed.postgrest.admin_url();
    let mut keys = vec![("PGRST_GUARD_LOG_LEVEL", "warn")];
    if with_admin {
        keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()));
    }
    GuardProcess::start(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await
}

fn admin_label(with_admin: bool) -> &'static str {
    if with_admin {
        "set"
    } else {
        "unset"
    }
}

/// A metric of the guard's `/metrics`, 0 when absent.
async fn metric(guard: &GuardProcess, series: &str) -> f64 {
    let text = HttpClient::new().get(&format!("http://{}/metrics", guard.admin)).await.text();
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// One round of `waiting` inserts with a column added just before: each one's time, and what it
/// cost (NOTIFYs on the channel, upstream requests per client request, probes).
struct Round {
    times: Vec<f64>,
    notifies: u64,
    upstream_per_request: f64,
    probes: f64,
}

async fn stale_round(bed: &RealBed, guard: &GuardProcess, column: &str, waiting: usize, body_pad: usize) -> Round {
    bed.pg.sql(&format!("ALTER TABLE items ADD COLUMN {column} text")).await;
    inserts(bed, guard, column, waiting, body_pad).await
}

/// `waiting` concurrent inserts naming `column`, each padded by `body_pad` bytes.
async fn inserts(bed: &RealBed, guard: &GuardProcess, column: &str, waiting: usize, body_pad: usize) -> Round {
    let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
    let upstream_before = metric(guard, "pgrst_guard_upstream_requests_total{result=\"answered\"}").await;
    let probes_before = metric(guard, "pgrst_guard_reload_probes_total").await;
    let http = HttpClient::new();
    let url = format!("{}/items", guard.url());
    let pad = "x".repeat(body_pad);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(waiting);
    for _ in 0..waiting {
        let (http, url, body) = (http.clone(), url.clone(), format!(r#"{{"name":"n{pad}","{column}":"v"}}"#));
        tasks.push(tokio::spawn(async move {
            let r = http.post_json(&url, &body).await;
            (r, started.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut times = Vec::with_capacity(waiting);
    for task in tasks {
        let (r, took) = task.await.expect("request task");
        assert_eq!(r.status, http::StatusCode::CREATED, "{}", r.text());
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
        times.push(took);
    }
    let upstream = metric(guard, "pgrst_guard_upstream_requests_total{result=\"answered\"}").await - upstream_before;
    let probes = metric(guard, "pgrst_guard_reload_probes_total").await - probes_before;
    Round { times, notifies: notifies.settled().await, upstream_per_request: upstream / waiting as f64, probes }
}

async fn schema_size_rows(family: Family, tables: usize, heals: usize) -> (String, RealBed) {
    let built = Instant::now();
    let bed = RealBed::start(family, &base_schema()).await;
    grow_schema(&bed, tables).await;
    eprintln!("{tables} tables ready in {:.1} s", built.elapsed().as_secs_f64());
    let (reload, reloads) = reload_p50(&bed, 10).await;
    let mut rows = String::new();
    let mut clock = bed.reload_clock().await;
    for with_admin in [true, false] {
        let guard = guard(&bed, with_admin).await;
        let (mut times, mut paired) = (Vec::new(), Vec::new());
        for i in 0..heals {
            let column = format!("s{}_{i}", admin_label(with_admin));
            let (round, own_reload) = clock.time(&bed, stale_round(&bed, &guard, &column, 1, 0)).await;
            paired.push(round.times[0] - own_reload);
            times.extend(round.times);
            // Migrations a second apart: the guard sends at most one NOTIFY per
            // PGRST_GUARD_RELOAD_MIN_INTERVAL_MS (1 s), and a heal sooner would time that budget.
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let (times, paired) = (sorted(times), sorted(paired));
        let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
        rows.push_str(&format!(
            "| {tables} | {reload:.1} ({:.1}–{:.1}) | {} | {heals} | {p50:.1} | {p99:.1} | {:+.1} | {:+.1} ({:+.1}) |\n",
            reloads[0],
            reloads[reloads.len() - 1],
            admin_label(with_admin),
            p50 - reload,
            percentile(&paired, 0.5),
            percentile(&paired, 0.99),
        ));
    }
    (rows, bed)
}

async fn waiting_rows(bed: &RealBed) -> String {
    let mut rows = String::new();
    for with_admin in [true, false] {
        let guard = guard(bed, with_admin).await;
        for waiting in WAITING {
            let rounds = if waiting == 1 { 10 } else { 3 };
            let mut times = Vec::new();
            let (mut notifies, mut upstream, mut probes) = (Vec::new(), 0.0, 0.0);
            for round in 0..rounds {
                let column = format!("w{}_{waiting}_{round}", admin_label(with_admin));
                let r = stale_round(bed, &guard, &column, waiting, 0).await;
                times.extend(r.times);
                notifies.push(r.notifies.to_string());
                upstream += r.upstream_per_request / rounds as f64;
                probes += r.probes / rounds as f64;
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            let times = sorted(times);
            rows.push_str(&format!(
                "| {waiting} | {} | {rounds} | {:.1} | {:.1} | {} | {upstream:.2} | {probes:.1} |\n",
                admin_label(with_admin),
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                notifies.join(", "),
            ));
        }
    }
    rows
}

/// Opens `count` keep-alive connections to the guard, each with one answered GET, and holds them.
async fn hold_connections(guard: &GuardProcess, count: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /items?limit=1 HTTP/1.1\r\nHost: {}\r\n\r\n", guard.addr);
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = tokio::net::TcpStream::connect(guard.addr).await.expect("connect to the guard");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        // The answer is small: its head and body arrive together.
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the guard closed a connection");
            answer.extend_from_slice(&chunk[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        held.push(stream);
    }
    held
}

async fn memory_rows(bed: &RealBed) -> String {
    let mut rows = String::new();
    let guard = guard(bed, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_mib(guard.pid());
    rows.push_str(&format!("| idle | {idle:.1} |\n"));
    for count in [1_000, 10_000] {
        let held = hold_connections(&guard, count).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_mib(guard.pid());
        rows.push_str(&format!(
            "| {count} idle keep-alive connections | {rss:.1} ({:.1} KiB each over idle) |\n",
            (rss - idle) * 1024.0 / count as f64
        ));
        drop(held);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(guard);

    // 1,000 inserts of 64 KiB each, held by the guard for their replay while the reload waits on a lock.
    let guard = self::guard(bed, true).await;
    let idle = rss_mib(guard.pid());
    bed.pg.sql("ALTER TABLE items ADD COLUMN m64 text").await;
    let blocker = support::ReloadBlocker::hold(&bed.pg).await;
    let watch_pid = guard.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let rss = (rss_mib(watch_pid) * 1024.0) as u64;
                peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let round = {
        let bed_ref = bed;
        let guard_ref = &guard;
        let releaser = async {
            let waiting = support::client::eventually(Duration::from_secs(30), || blocker.reload_waiting()).await;
            assert!(waiting, "the reload waits on the lock");
            // Every request has its body in the guard and its first answer: the stale error.
            let all_failed_once = support::client::eventually(Duration::from_secs(30), || async {
                metric(guard_ref, "pgrst_guard_upstream_requests_total{result=\"answered\"}").await >= 1_000.0
            })
            .await;
            assert!(all_failed_once, "all 1,000 requests reached PostgREST once");
            let held = rss_mib(watch_pid);
            blocker.release().await;
            held
        };
        let inserts = inserts(bed_ref, guard_ref, "m64", 1_000, 64 * 1024);
        let (held, round) = tokio::join!(releaser, inserts);
        (held, round)
    };
    sampler.abort();
    let (held, round) = round;
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    rows.push_str(&format!(
        "| 1,000 requests with 64 KiB bodies waiting on a reload (all {} healed, NOTIFYs {}) | {held:.1} while held, {peak:.1} peak (idle {idle:.1}) |\n",
        round.times.len(),
        round.notifies
    ));
    rows
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    pgrst_guard::server::raise_open_files_limit(12_000);
    let family = Family::V14;
    let mut out = String::new();

    out.push_str("### Heal time against schema size\n\n");
    out.push_str(
        "One insert with a column added just before, through the guard; PostgREST's own reload timed as NOTIFY \
         until its load counter rises (10 reloads). Paired: each heal minus the reload it caused itself (its \
         NOTIFY heard by a listener until the counter rose), which takes PostgREST's spread of reload times \
         out. Times in ms.\n\n",
    );
    out.push_str(
        "| tables | reload p50 (min–max) | admin URL | heals | heal p50 | heal p99 | heal p50 − reload p50 | \
         heal − its own reload, p50 (p99) |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    let mut two_thousand = None;
    for tables in SCHEMA_SIZES {
        let heals = if tables >= 10_000 { 15 } else { 30 };
        let (rows, bed) = schema_size_rows(family, tables, heals).await;
        eprint!("{rows}");
        out.push_str(&rows);
        if tables == 2_000 {
            two_thousand = Some(bed);
        }
    }
    let bed = two_thousand.expect("the 2,000-table schema");

    out.push_str("\n### Requests waiting on one reload (2,000 tables)\n\n");
    out.push_str(
        "N concurrent inserts with a column added just before, each on its own connection; times from the first \
         send to each answer, in ms; NOTIFYs per round; upstream requests per client request (its own included); \
         probes per round.\n\n",
    );
    out.push_str("| waiting | admin URL | rounds | p50 | p99 | NOTIFYs per round | upstream per request | probes |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    let rows = waiting_rows(&bed).await;
    eprint!("{rows}");
    out.push_str(&rows);

    out.push_str("\n### Resident memory (guard process, in front of PostgREST, 2,000 tables)\n\n");
    out.push_str("| state | RSS (MiB) |\n|---|---|\n");
    let rows = memory_rows(&bed).await;
    eprint!("{rows}");
    out.push_str(&rows);
    print!("{out}");
}
