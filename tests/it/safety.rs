//! Reload safety against the real PostgREST of every family: clients cannot cause reload storms,
//! reloads are shared across guards and with event triggers, and writes stay exactly-once under
//! chaos. Every test counts NOTIFYs with a LISTENer of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support;
use crate::support::client::{eventually, HttpClient};
use crate::support::guard::metric;
use crate::support::guard::{start_guard, NotifyCounter};
use crate::support::postgrest::{Family, PostgrestOptions, RealPostgrest};
use crate::support::RealBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL);";

async fn bed_with_guard(
    family: Family,
    sql: &str,
    extra: &[(&str, &str)],
) -> (RealBed, pgrst_guard::RunningGuard, NotifyCounter) {
    let bed = RealBed::start(family, sql).await;
    let admin = bed.postgrest.admin_url();
    let mut keys = vec![("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()), ("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")];
    keys.extend_from_slice(extra);
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
    (bed, guard, notifies)
}

/// Sends `total` POSTs with `concurrency` in flight; returns the statuses seen.
async fn hammer(
    http: &HttpClient,
    url: String,
    body: &'static str,
    total: usize,
    concurrency: usize,
) -> HashMap<u16, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, next) = (http.clone(), url.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut seen: HashMap<u16, usize> = HashMap::new();
            while next.fetch_add(1, Ordering::AcqRel) < total {
                let r = http.post_json(&url, body).await;
                *seen.entry(r.status.as_u16()).or_default() += 1;
            }
            seen
        }));
    }
    let mut all = HashMap::new();
    for worker in workers {
        for (status, count) in worker.await.unwrap() {
            *all.entry(status).or_default() += count;
        }
    }
    all
}

async fn guard_metrics(http: &HttpClient, guard: &pgrst_guard::RunningGuard) -> String {
    http.get(&format!("http://{}/metrics", guard.admin_addr.unwrap())).await.text()
}

/// Catalog queries the flood may cost: one per key per recheck interval (25 ms by default), and
/// one more for the interval under way.
fn query_bound(keys: u64, elapsed: Duration) -> u64 {
    keys * (elapsed.as_millis() as u64 / 25 + 1)
}

family_matrix!(ten_thousand_requests_for_a_missing_column_cause_no_notify, |family| async move {
    let (bed, guard, notifies) = bed_with_guard(family, CHAT, &[]).await;
    let url = format!("{}/chat_messages", guard.url());
    let started = Instant::now();
    let statuses = hammer(&bed.http, url, r#"{"content":"x","no_such_column":1}"#, 10_000, 32).await;
    let elapsed = started.elapsed();
    assert_eq!(statuses.get(&400), Some(&10_000), "{statuses:?}");
    assert_eq!(notifies.settled().await, 0);
    let metrics = guard_metrics(&bed.http, &guard).await;
    let queried = metric(&metrics, "pgrst_guard_catalog_checks_total{result=\"missing\"}");
    let shared = metric(&metrics, "pgrst_guard_catalog_checks_total{result=\"shared_missing\"}");
    println!(
        "{family:?}: 10,000 requests in {elapsed:?}: {queried} catalog queries ({:.0}/s), {shared} answers shared",
        queried as f64 / elapsed.as_secs_f64()
    );
    assert!(queried >= 1 && queried <= query_bound(1, elapsed), "{queried} catalog queries in {elapsed:?}\n{metrics}");
    assert_eq!(queried + shared, 10_000);
});

family_matrix!(decoys_cause_no_notify_either, |family| async move {
    let (bed, guard, notifies) = bed_with_guard(
        family,
        &format!(
            "{CHAT} CREATE TABLE projects (id int PRIMARY KEY, name text);
                  ALTER TABLE chat_messages ADD COLUMN project_id int REFERENCES projects(id);
                  CREATE SCHEMA private; CREATE TABLE private.secrets (id int PRIMARY KEY, value text);
                  CREATE FUNCTION private.rotate(id int) RETURNS int LANGUAGE sql AS 'SELECT 1';"
        ),
        &[],
    )
    .await;
    let started = Instant::now();
    // A column of another table, a table and a function of a schema PostgREST does not expose.
    let decoys = [
        ("/chat_messages", r#"{"content":"x","name":"a column of projects"}"#),
        ("/secrets", r#"{"id":1,"value":"a table of an unexposed schema"}"#),
        ("/rpc/rotate", r#"{"id":1}"#),
    ];
    for (path, body) in decoys {
        let statuses = hammer(&bed.http, format!("{}{path}", guard.url()), body, 1_000, 16).await;
        let direct = bed.http.post_json(&bed.url(path), body).await;
        assert_eq!(statuses.get(&direct.status.as_u16()), Some(&1_000), "{path}: {statuses:?}");
    }
    // An embed whose relationship exists under a `!hint` naming no key, column or junction.
    let wrong_hint = "/chat_messages?select=content,projects!no_such_key(name)";
    let direct = bed.http.get(&bed.url(wrong_hint)).await;
    assert_eq!(direct.code().as_deref(), Some("PGRST200"), "{}", direct.text());
    for _ in 0..200 {
        let r = bed.http.get(&format!("{}{wrong_hint}", guard.url())).await;
        assert_eq!((r.status, r.text()), (direct.status, direct.text()));
    }
    let elapsed = started.elapsed();
    assert_eq!(notifies.settled().await, 0);
    let metrics = guard_metrics(&bed.http, &guard).await;
    let queried = metric(&metrics, "pgrst_guard_catalog_checks_total{result=\"missing\"}");
    assert!(queried <= query_bound(4, elapsed), "{queried} catalog queries in {elapsed:?}");
});

family_matrix!(without_the_catalog_check_the_budget_allows_one_notify_per_interval, |family| async move {
    let (bed, guard, notifies) = bed_with_guard(
        family,
        CHAT,
        &[
            ("PGRST_GUARD_CATALOG_CHECK", "false"),
            ("PGRST_GUARD_RELOAD_MIN_INTERVAL_MS", "500"),
            ("PGRST_GUARD_HEAL_DEADLINE_MS", "1500"),
        ],
    )
    .await;
    let url = format!("{}/chat_messages", guard.url());
    let started = Instant::now();
    let statuses = hammer(&bed.http, url, r#"{"content":"x","no_such_column":1}"#, 160, 16).await;
    let elapsed = started.elapsed();
    assert_eq!(statuses.get(&400), Some(&160), "the original error comes back: {statuses:?}");
    let allowed = (elapsed.as_millis() / 500) as u64 + 1;
    let sent = notifies.settled().await;
    assert!(sent >= 1, "without the catalog check the guard does try a reload");
    assert!(sent <= allowed, "{sent} NOTIFYs in {elapsed:?}, budget allows {allowed}");
});

family_matrix!(two_guards_share_one_reload, |family| async move {
    let (bed, guard_a, notifies) = bed_with_guard(family, CHAT, &[]).await;
    let guard_b = start_guard(
        &bed.postgrest.url(),
        &bed.pg.uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &bed.postgrest.admin_url())],
    )
    .await;
    // Each guard proves PostgREST's cache once as it starts (the write barrier): not the heal's.
    let at_start = notifies.settled().await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let mut tasks = Vec::new();
    for i in 0..400 {
        let url = format!("{}/chat_messages", if i % 2 == 0 { guard_a.url() } else { guard_b.url() });
        let http = bed.http.clone();
        tasks.push(tokio::spawn(async move {
            http.post_json(&url, &format!(r#"{{"content":"m{i}","artifact_ids":["a"]}}"#)).await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    let sent = notifies.settled().await - at_start;
    assert!((1..=2).contains(&sent), "{sent} NOTIFYs for 400 failures across two guards");
    let client = bed.pg.connect("postgres").await;
    let row = client.query_one("SELECT count(*), count(DISTINCT content) FROM chat_messages", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (400, 400));
});

family_matrix!(an_event_trigger_notify_is_joined_not_doubled, |family| async move {
    let (bed, guard, notifies) = bed_with_guard(
        family,
        &format!(
            "{CHAT}
             CREATE FUNCTION pgrst_watch() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN NOTIFY pgrst, 'reload schema'; END $$;
             CREATE EVENT TRIGGER pgrst_watch ON ddl_command_end EXECUTE PROCEDURE pgrst_watch();"
        ),
        &[],
    )
    .await;
    // PostgREST sends nothing on the channel; the LISTENer counts what the trigger sends.
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r =
        bed.http.post_json(&format!("{}/chat_messages", guard.url()), r#"{"content":"x","artifact_ids":["a"]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert!(eventually(Duration::from_secs(5), || async { guard.database.notifications_seen() == 1 }).await);
    assert_eq!(notifies.settled().await, 1, "only the event trigger's NOTIFY");
    assert_eq!(guard.database.notifications_sent(), 0);
});

// PostgreSQL's 42703 from a cache that still has a dropped column: passed through while no reload is
// under way (it is also what a plain wrong request gets), replayed once while one is. A real
// PostgREST held mid-reload serves from its old cache meanwhile.
family_matrix!(database_errors_are_healed_only_while_a_reload_is_under_way, |family: Family| async move {
    let (bed, guard, _notifies) = bed_with_guard(
        family,
        &format!("{CHAT} ALTER TABLE chat_messages ADD COLUMN legacy text; {}", support::RELOAD_BLOCKER_SQL),
        &[],
    )
    .await;
    bed.pg.sql("ALTER TABLE chat_messages DROP COLUMN legacy").await;
    let url = format!("{}/chat_messages", guard.url());

    // No reload in progress: PostgreSQL's 42703 passes through at once, as PostgREST gives it.
    let direct = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"x","legacy":"y"}"#).await;
    assert_eq!(direct.code().as_deref(), Some("42703"), "the premise: {}", direct.text());
    let r = bed.http.post_json(&url, r#"{"content":"x","legacy":"y"}"#).await;
    assert_eq!((r.status, r.text()), (direct.status, direct.text()));
    assert_eq!(r.header("x-pgrst-guard"), None);

    // A reload under way: the 42703 is waited out and replayed once; the fresh cache then says
    // PGRST204, which the catalog check knows is the client's own error.
    let blocker = support::ReloadBlocker::hold(&bed.pg).await;
    bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    assert!(eventually(Duration::from_secs(10), || blocker.reload_waiting()).await, "PostgREST is mid-reload");
    assert!(eventually(Duration::from_secs(5), || async { guard.database.notifications_seen() == 1 }).await);
    let answered_before = upstream_answers(&guard);
    let waiting = {
        let (http, url) = (bed.http.clone(), url.clone());
        tokio::spawn(async move { http.post_json(&url, r#"{"content":"x","legacy":"y"}"#).await })
    };
    // The guard has PostgREST's 42703 from the old cache in hand, and waits.
    assert!(eventually(Duration::from_secs(5), || async { upstream_answers(&guard) > answered_before }).await);
    blocker.release().await;
    let r = waiting.await.unwrap();
    let metrics = guard.render_metrics();
    if family.has_load_metrics() {
        // The load counter says when the reload is done: the one replay comes after it.
        assert_eq!(r.code().as_deref(), Some("PGRST204"), "{}", r.text());
        assert_eq!(
            metric(&metrics, "pgrst_guard_heals_total{code=\"42703\",outcome=\"client_error\"}"),
            1,
            "{metrics}"
        );
    } else {
        // v11 has no load counter: the one replay comes after the first back-off step, before
        // this held reload ends, and PostgREST's answer goes through.
        assert_eq!(r.code().as_deref(), Some("42703"), "{}", r.text());
        assert_eq!(
            metric(&metrics, "pgrst_guard_heals_total{code=\"42703\",outcome=\"replay_failed\"}"),
            1,
            "{metrics}"
        );
    }
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 0);
    assert_eq!(guard.database.notifications_sent(), 0, "no reload of its own for a database error");
});

/// Answers the guard has had from PostgREST so far.
fn upstream_answers(guard: &pgrst_guard::RunningGuard) -> u64 {
    metric(&guard.render_metrics(), "pgrst_guard_upstream_latency_seconds_count")
}

/// 50 writers insert while migrations add columns and tables, PostgREST restarts and the database
/// restarts. Every write the client saw acknowledged is stored exactly once; none appears twice.
async fn writes_stay_exactly_once_under_chaos(family: Family) {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("pgrst_guard=info").try_init();
    let pg = support::pg::TestCluster::start().await;
    pg.sql(support::postgrest::ROLES_SQL).await;
    pg.sql("CREATE TABLE events (id bigserial PRIMARY KEY, write_id text NOT NULL, payload text)").await;
    let mut options = PostgrestOptions::new(&pg);
    options.pool_size = 20;
    let postgrest = RealPostgrest::start(family, options).await;
    let guard = start_guard(
        &postgrest.url(),
        &pg.uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &postgrest.admin_url()), ("PGRST_GUARD_HEAL_DEADLINE_MS", "5000")],
    )
    .await;
    let url = guard.url();

    // Migrations publish what exists once committed; writers use the newest column and table.
    let columns = Arc::new(AtomicUsize::new(0));
    let tables = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let http = HttpClient::new();
    let mut writers = Vec::new();
    for writer in 0..50 {
        let (http, url, columns, tables, stop) =
            (http.clone(), url.clone(), columns.clone(), tables.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let write_id = format!("w{writer}-{n}");
                let (table, body) = match (n % 3, columns.load(Ordering::Acquire), tables.load(Ordering::Acquire)) {
                    (0, _, t) if t > 0 => (format!("side_{t}"), format!(r#"{{"write_id":"{write_id}"}}"#)),
                    (_, 0, _) => ("events".to_string(), format!(r#"{{"write_id":"{write_id}","payload":"p"}}"#)),
                    (_, c, _) => {
                        ("events".to_string(), format!(r#"{{"write_id":"{write_id}","payload":"p","extra_{c}":"e"}}"#))
                    }
                };
                let headers = [("content-type", "application/json")];
                let sent = http.try_send(http::Method::POST, &format!("{url}/{table}"), &headers, body).await;
                // A transport failure (no answer at all) is recorded as 599: never acknowledged.
                let (status, code) = match sent {
                    Ok(r) => (r.status, r.code().unwrap_or_default()),
                    Err(e) => (StatusCode::from_u16(599).unwrap(), e),
                };
                results.push((table, write_id, status, code));
            }
            results
        }));
    }

    let chaos_started = Instant::now();
    for step in 1..=6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let client = pg.connect("postgres").await;
        let _ = client.batch_execute(&format!("ALTER TABLE events ADD COLUMN extra_{step} text")).await;
        columns.store(step, Ordering::Release);
        if step % 2 == 0 {
            let t = step / 2;
            let _ = client
                .batch_execute(&format!("CREATE TABLE side_{t} (id bigserial PRIMARY KEY, write_id text NOT NULL)"))
                .await;
            tables.store(t, Ordering::Release);
        }
        if step == 3 {
            // PostgREST restarts: in-flight requests are cut off, new ones get 502 until it is back.
            postgrest.stop().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            postgrest.restart().await;
        }
        if step == 5 {
            drop(client);
            pg.restart().await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let mut results = Vec::new();
    for writer in writers {
        results.extend(writer.await.unwrap());
    }
    assert!(chaos_started.elapsed() < Duration::from_secs(120));

    let client = pg.connect("postgres").await;
    let mut stored: HashMap<(String, String), i64> = HashMap::new();
    for table in std::iter::once("events".to_string()).chain((1..=3).map(|t| format!("side_{t}"))) {
        for row in
            client.query(&format!("SELECT write_id, count(*) FROM {table} GROUP BY write_id"), &[]).await.unwrap()
        {
            stored.insert((table.clone(), row.get(0)), row.get(1));
        }
    }
    let duplicates: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "writes stored twice: {duplicates:?}");
    let acknowledged: Vec<_> = results.iter().filter(|(_, _, s, _)| *s == StatusCode::CREATED).collect();
    for (table, write_id, _, _) in &acknowledged {
        assert_eq!(
            stored.get(&(table.clone(), write_id.clone())),
            Some(&1),
            "acknowledged write {table}/{write_id} missing"
        );
    }
    let healed_columns = acknowledged.iter().filter(|(t, _, _, _)| t == "events").count();
    let healed_tables = acknowledged.iter().filter(|(t, _, _, _)| t.starts_with("side_")).count();
    assert!(
        acknowledged.len() > 100 && healed_columns > 0 && healed_tables > 0,
        "the run did real work: {} acknowledged",
        acknowledged.len()
    );
    let mut by_status: HashMap<(u16, &str), usize> = HashMap::new();
    for (_, _, s, code) in &results {
        *by_status.entry((s.as_u16(), code.as_str())).or_default() += 1;
    }
    eprintln!("chaos {family:?}: {} writes, by status {by_status:?}", results.len());
}

family_matrix!(chaos, writes_stay_exactly_once_under_chaos);
