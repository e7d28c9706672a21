//! The heal under faults and odd answers, against the real PostgREST of every family: an
//! application's error-shaped answer is never replayed, a PostgREST restart ends the wait at once,
//! and one client request costs PostgREST a bounded number of requests.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::guard::start_guard;
use support::postgrest::Family;
use support::RealBed;

/// RPCs that commit a write and then answer like a stale schema cache: a PGRST204-shaped 400
/// (naming a key of the request body), and a bare `404 {}` from a function named like a table.
const LOOKALIKES: &str = "
    CREATE TABLE calls (id bigserial PRIMARY KEY, label text NOT NULL);
    CREATE TABLE orders (id int PRIMARY KEY);
    CREATE FUNCTION record_call(label text) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO calls (label) VALUES (record_call.label);
      PERFORM set_config('response.status', '400', true);
      RETURN json_build_object('code', 'PGRST204', 'details', null, 'hint', null,
        'message', 'Could not find the ''label'' column of ''calls'' in the schema cache');
    END $$;
    CREATE FUNCTION orders(label text) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO calls (label) VALUES (orders.label);
      PERFORM set_config('response.status', '404', true);
      RETURN '{}'::json;
    END $$;";

async fn committed_rpcs_run_once(family: Family, with_admin: bool) {
    let bed = RealBed::start(family, LOOKALIKES).await;
    let admin = bed.postgrest.admin_url();
    let keys: Vec<(&str, &str)> =
        if with_admin { vec![("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str())] } else { vec![] };
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    for (n, (function, status)) in [("record_call", 400), ("orders", 404)].into_iter().enumerate() {
        let label = format!("call-{n}");
        let started = Instant::now();
        let r =
            bed.http.post_json(&format!("{}/rpc/{function}", guard.url()), &format!(r#"{{"label":"{label}"}}"#)).await;
        assert_eq!(r.status.as_u16(), status, "{function}: {}", r.text());
        assert_eq!(r.header("x-pgrst-guard"), None);
        assert!(started.elapsed() < Duration::from_secs(1), "{function}: answered at once");
        let runs = bed.scalar(&format!("SELECT count(*) FROM calls WHERE label = '{label}'")).await;
        assert_eq!(runs, 1, "{family:?} {function}: the committed RPC ran {runs} times");
    }
    assert_eq!(guard.notifier.notifications_sent(), 0);
}

family_matrix!(a_committed_rpc_that_looks_stale_runs_once_with_the_admin_url, |family| committed_rpcs_run_once(
    family, true
));
family_matrix!(a_committed_rpc_that_looks_stale_runs_once_without_the_admin_url, |family| committed_rpcs_run_once(
    family, false
));

/// PostgREST deaf to NOTIFY holds a stale cache; only its restart can refresh it. Heals that wait
/// must replay as soon as the new process has loaded its cache, not at the deadline.
async fn a_restart_ends_the_wait(family: Family, with_admin: bool) {
    let bed = Arc::new(
        RealBed::start_with(family, "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);", |o| {
            o.deaf()
        })
        .await,
    );
    let admin = bed.postgrest.admin_url();
    let keys: Vec<(&str, &str)> =
        if with_admin { vec![("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str())] } else { vec![] };
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let url = format!("{}/chat_messages", guard.url());
    let waiting = {
        let bed = bed.clone();
        tokio::spawn(async move { bed.http.post_json(&url, r#"{"content":"c","artifact_ids":["a"]}"#).await })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    bed.postgrest.restart().await;
    let back = Instant::now();
    let r = waiting.await.unwrap();
    let after_restart = back.elapsed();
    println!("{family:?} admin={with_admin}: healed {after_restart:?} after PostgREST was back");
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert!(after_restart < Duration::from_secs(2), "answered {after_restart:?} after the restart");
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 1);
}

family_matrix!(a_restart_ends_the_wait_with_the_admin_url, |family| a_restart_ends_the_wait(family, true));
family_matrix!(a_restart_ends_the_wait_without_the_admin_url, |family| a_restart_ends_the_wait(family, false));

/// A PostgREST that never reloads: each stale client request costs at most the replay budget
/// README states (1 + 4 with the load counter, 1 + 6 without), never a request per back-off step.
async fn upstream_requests_per_client_request(family: Family, with_admin: bool) {
    let bed =
        RealBed::start_with(family, "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);", |o| {
            o.deaf()
        })
        .await;
    let admin = bed.postgrest.admin_url();
    let mut keys: Vec<(&str, &str)> = vec![("PGRST_GUARD_HEAL_DEADLINE_MS", "4000")];
    if with_admin {
        keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()));
    }
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (http, url) = (bed.http.clone(), format!("{}/chat_messages", guard.url()));
        tasks.push(tokio::spawn(async move {
            http.post_json(&url, &format!(r#"{{"content":"c{i}","artifact_ids":["a"]}}"#)).await
        }));
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.code().as_deref(), Some("PGRST204"), "the stale error comes back: {}", r.text());
    }
    let metrics = guard.metrics.render(true, 0);
    let upstream: u64 = metrics
        .lines()
        .find(|l| l.starts_with("pgrst_guard_upstream_latency_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    let per_request = if with_admin && family.has_load_metrics() { 1 + 4 } else { 1 + 6 };
    println!("{family:?} admin={with_admin}: 20 client requests cost PostgREST {upstream} requests");
    assert!(upstream <= 20 * per_request, "{upstream} upstream requests for 20 client requests");
    assert!(upstream >= 20);
    assert!(guard.notifier.notifications_sent() >= 1, "the guard did try to heal");
}

family_matrix!(replays_per_request_are_bounded_with_the_admin_url, |family| upstream_requests_per_client_request(
    family, true
));
family_matrix!(replays_per_request_are_bounded_without_the_admin_url, |family| {
    upstream_requests_per_client_request(family, false)
});
