//! The heal under faults and odd answers, against the real PostgREST of every family: an
//! application's error-shaped answer is never replayed, a PostgREST restart ends the wait at once,
//! and one client request costs PostgREST a bounded number of requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support;
use crate::support::guard::{metric, start_guard};
use crate::support::postgrest::Family;
use crate::support::RealBed;

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
    assert_eq!(guard.database.notifications_sent(), 0);
}

family_matrix!(a_committed_rpc_that_looks_stale_runs_once_with_the_admin_url, |family| committed_rpcs_run_once(
    family, true
));
family_matrix!(a_committed_rpc_that_looks_stale_runs_once_without_the_admin_url, |family| committed_rpcs_run_once(
    family, false
));

/// PostgREST deaf to NOTIFY holds a stale cache; only its restart can refresh it. Heals that wait
/// must replay as soon as the new process has loaded its cache, not at the deadline: a restart
/// 600 ms or 1.5 s into the heal (on 11.2.2 the admin URL has no /metrics, and the guard must not
/// give up early on its account).
///
/// A kill that lands while a replay is inside PostgREST leaves that replay's outcome unknown: the
/// client then gets the honest 502 (PGRSTG11) and the row was written at most once. That chance is
/// real (one replay probes the reload every few tens of ms), so such a run is tried again, up to
/// three times, and one of them must heal.
async fn a_restart_ends_the_wait(family: Family, with_admin: bool) {
    for into_the_heal in [Duration::from_millis(600), Duration::from_millis(1500)] {
        let mut healed = false;
        for _ in 0..3 {
            if a_restart_into_the_heal_ends_the_wait(family, with_admin, into_the_heal).await {
                healed = true;
                break;
            }
        }
        assert!(healed, "{family:?}: three restarts {into_the_heal:?} into the heal each killed a replay in flight");
    }
}

/// True when the heal succeeded; false when the kill caught a replay inside PostgREST.
async fn a_restart_into_the_heal_ends_the_wait(family: Family, with_admin: bool, into_the_heal: Duration) -> bool {
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
    // The heal is under way once its NOTIFY is out; the restart comes `into_the_heal` after that.
    assert!(
        support::client::eventually(Duration::from_secs(5), || async { guard.database.notifications_sent() == 1 })
            .await
    );
    tokio::time::sleep(into_the_heal).await;
    bed.postgrest.restart().await;
    let back = Instant::now();
    let r = waiting.await.unwrap();
    let after_restart = back.elapsed();
    println!("{family:?} admin={with_admin}: restart {into_the_heal:?} into the heal, answered {after_restart:?} after PostgREST was back");
    if r.status == StatusCode::BAD_GATEWAY && r.text().contains("PGRSTG11") {
        let rows = bed.scalar("SELECT count(*) FROM chat_messages").await;
        assert!(rows <= 1, "a replay whose outcome was unknown ran {rows} times");
        println!("{family:?}: the kill caught a replay inside PostgREST ({rows} rows): trying again");
        return false;
    }
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert!(after_restart < Duration::from_secs(2), "answered {after_restart:?} after the restart");
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 1);
    true
}

family_matrix!(a_restart_ends_the_wait_with_the_admin_url, |family| a_restart_ends_the_wait(family, true));
family_matrix!(a_restart_ends_the_wait_without_the_admin_url, |family| a_restart_ends_the_wait(family, false));

/// How PostgREST fails to cure, for the budget tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Uncured {
    /// Deaf to NOTIFY, watched through its admin URL.
    WithAdminUrl,
    /// Deaf to NOTIFY, no admin URL: completion cannot be seen.
    WithoutAdminUrl,
    /// No schema cache at all (PGRST002): its reloads keep failing.
    EmptyCache,
    /// Gone after the first answer: every replay's connection is refused.
    Refused,
}

/// Every upstream request a client request causes, counted where it lands — PostgREST's own access
/// log, or the connections a relay refused in its place — stays within the one budget README states:
/// the client's own request and at most six more, whatever they are for, besides the probes of a
/// reload's end that one request per reload sends when the load counter cannot be watched.
async fn upstream_requests_per_client_request(family: Family, uncured: Uncured) {
    const CLIENTS: usize = 10;
    let setup = format!(
        "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text); {} ALTER ROLE authenticator SET lock_timeout = '200ms';",
        support::RELOAD_BLOCKER_SQL
    );
    let bed = RealBed::start_with(family, &setup, |o| support::postgrest::PostgrestOptions {
        log_level: "info",
        channel_enabled: uncured == Uncured::EmptyCache,
        ..o
    })
    .await;
    let admin = bed.postgrest.admin_url();
    let mut keys: Vec<(&str, &str)> = vec![];
    if uncured == Uncured::WithAdminUrl {
        keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()));
    }
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    // v16 keeps its old cache when a reload fails ("best effort", PostgREST #4873): the inserts
    // meet that cache, which lacks the column as the database does.
    let old_cache_serves = uncured == Uncured::EmptyCache && family == Family::V16;
    let _blocker = match uncured {
        Uncured::EmptyCache => {
            // Every reload from now on waits on the lock past its lock_timeout and fails.
            let blocker = support::ReloadBlocker::hold(&bed.pg).await;
            bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
            if old_cache_serves {
                let failed =
                    support::client::eventually(Duration::from_secs(10), || async { failed_loads(&bed).await > 0 })
                        .await;
                assert!(failed, "the premise: a reload failed");
                let r = bed.http.get(&bed.url("/chat_messages")).await;
                assert_eq!(r.status, StatusCode::OK, "v16 serves its old cache after a failed reload: {}", r.text());
            } else {
                let empty = support::client::eventually(Duration::from_secs(10), || async {
                    bed.http.get(&bed.url("/chat_messages")).await.code().as_deref() == Some("PGRST002")
                })
                .await;
                assert!(empty, "the premise: an empty cache");
            }
            Some(blocker)
        }
        _ => {
            bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
            None
        }
    };
    let before = bed.postgrest.access_log_lines("POST /chat_messages");
    let tasks = spawn_inserts(&bed, &guard, CLIENTS);
    if uncured == Uncured::Refused {
        let answered = support::client::eventually(Duration::from_secs(5), || async {
            bed.postgrest.access_log_lines("POST /chat_messages") - before >= CLIENTS
        })
        .await;
        assert!(answered, "every client request reached PostgREST once");
        bed.postgrest.stop().await;
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert!(!r.status.is_success(), "nothing cures it: {}", r.text());
        if old_cache_serves {
            // The old cache's answer; the catalog finds no such column either: the client's mistake.
            assert_eq!(r.code().as_deref(), Some("PGRST204"), "{}", r.text());
            assert_eq!(r.header("x-pgrst-guard"), None);
        }
    }
    let reached = bed.postgrest.access_log_lines("POST /chat_messages") - before;
    let metrics = guard.render_metrics();
    // A stopped PostgREST logs nothing: what its port refused, the guard counts.
    let refused = metric(&metrics, "pgrst_guard_upstream_requests_total{result=\"never_sent\"}") as usize;
    let per_request = (reached + refused) as f64 / CLIENTS as f64;
    println!("{family:?} {uncured:?}: {CLIENTS} client requests cost {reached} PostgREST requests and {refused} refused connections ({per_request:.1} each)");
    assert!(reached >= CLIENTS);
    if old_cache_serves {
        assert_eq!((reached, refused), (CLIENTS, 0), "one PostgREST request per client request");
        assert_eq!(guard.database.notifications_sent(), 0, "nothing to reload for");
    }
    // Without load counters one request per reload also probes its end, within a cap per reload.
    let probes = metric(&metrics, "pgrst_guard_reload_probes_total") as usize;
    let reloads = metric(&metrics, "pgrst_guard_notifies_sent_total") as usize;
    assert!(probes <= reloads * pgrst_guard::heal::budget::MAX_PROBES as usize, "{probes} probes, {reloads} reloads");
    // 11.2.2's admin server has no /metrics: its reloads are probed as without the admin URL.
    if uncured == Uncured::WithAdminUrl && family != Family::V11 {
        assert_eq!(probes, 0, "the load counter is watched: nothing to probe");
    }
    assert!(
        reached + refused <= CLIENTS * (1 + pgrst_guard::heal::budget::MAX_REPLAYS as usize) + probes,
        "{reached} + {refused}, {probes} of them probes"
    );
    if uncured == Uncured::Refused {
        assert!(refused > 0, "the replays met a refused port");
    }
    assert_eq!(metric(&metrics, "pgrst_guard_heals_total{code=\"PGRST204\",outcome=\"healed\"}"), 0);
}

family_matrix!(the_budget_holds_with_the_admin_url, |family| upstream_requests_per_client_request(
    family,
    Uncured::WithAdminUrl
));
family_matrix!(the_budget_holds_without_the_admin_url, |family| upstream_requests_per_client_request(
    family,
    Uncured::WithoutAdminUrl
));
family_matrix!(the_budget_holds_for_an_empty_cache, |family| upstream_requests_per_client_request(
    family,
    Uncured::EmptyCache
));
#[tokio::test]
async fn the_budget_holds_when_postgrest_is_gone() {
    upstream_requests_per_client_request(Family::V14, Uncured::Refused).await
}

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);";

// Without the admin URL the end of a slow reload shows only as a replay that succeeds: one request
// probes it while the others wait for its success. A reload held for most of a second costs
// PostgREST the probes and one successful replay per waiting request, not every waiting request's
// back-off replays (before probing: about four failing replays each).
family_matrix!(without_the_admin_url_one_request_probes_a_slow_reload_for_all, |family| async move {
    const CLIENTS: usize = 20;
    let bed = RealBed::start_with(family, &format!("{CHAT} {}", support::RELOAD_BLOCKER_SQL), |o| {
        support::postgrest::PostgrestOptions { log_level: "info", ..o }
    })
    .await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let blocker = support::ReloadBlocker::hold(&bed.pg).await;
    let before = bed.postgrest.access_log_lines("POST /chat_messages");
    let tasks = spawn_inserts(&bed, &guard, CLIENTS);
    let waiting = support::client::eventually(Duration::from_secs(10), || blocker.reload_waiting()).await;
    assert!(waiting, "the premise: the guard's reload waits on the lock");
    // A slow reload: long enough for every waiting request's own back-off to have replayed thrice.
    tokio::time::sleep(Duration::from_millis(700)).await;
    blocker.release().await;
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    }
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE artifact_ids = '{a}'").await, CLIENTS as i64);
    let metrics = guard.render_metrics();
    let probes = metric(&metrics, "pgrst_guard_reload_probes_total") as usize;
    let reached = bed.postgrest.access_log_lines("POST /chat_messages") - before;
    println!("{family:?}: {CLIENTS} requests waiting on a reload held 700 ms cost {reached} PostgREST requests, {probes} of them probes");
    assert!((1..=pgrst_guard::heal::budget::MAX_PROBES as usize).contains(&probes), "{probes} probes");
    // Each request's own and its successful replay, the probes, and on a busy machine about one
    // failing replay more for a request whose back-off came before the prober took its seat. Without
    // probing each request replayed about four times, failing, during such a reload.
    assert!(
        reached <= 3 * CLIENTS + probes,
        "each request's own and one successful replay, the probes, and at most one failing replay each: {reached}"
    );
});

/// `pgrst_schema_cache_loads_total{status="FAIL"}` from PostgREST's admin /metrics (v12.2 on).
async fn failed_loads(bed: &RealBed) -> u64 {
    let r = bed.http.get(&format!("{}/metrics", bed.postgrest.admin_url())).await;
    r.text()
        .lines()
        .find(|l| l.starts_with("pgrst_schema_cache_loads_total{") && l.contains("status=\"FAIL\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `clients` inserts with the new column at once, each on its own task.
fn spawn_inserts(
    bed: &RealBed,
    guard: &pgrst_guard::RunningGuard,
    clients: usize,
) -> Vec<tokio::task::JoinHandle<support::client::TestResponse>> {
    (0..clients)
        .map(|i| {
            let (http, url) = (bed.http.clone(), format!("{}/chat_messages", guard.url()));
            tokio::spawn(
                async move { http.post_json(&url, &format!(r#"{{"content":"c{i}","artifact_ids":["a"]}}"#)).await },
            )
        })
        .collect()
}

// The guard's database host stalls (bytes stop, the connection stays open): every stale request
// answers within the heal deadline with PostgREST's own answer, none queues behind another, and
// healing works again once the database answers.
family_matrix!(a_stalled_database_never_holds_a_request_past_the_deadline, |family| async move {
    let bed = Arc::new(RealBed::start(family, CHAT).await);
    let relay = support::relay::Relay::start(vec![format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()]).await;
    let admin = bed.postgrest.admin_url();
    let guard = start_guard(
        &bed.postgrest.url(),
        &relay.pg_uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &admin), ("PGRST_GUARD_HEAL_DEADLINE_MS", "3000")],
    )
    .await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    relay.stall(true);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (bed, url) = (bed.clone(), format!("{}/chat_messages", guard.url()));
        tasks.push(tokio::spawn(async move {
            let r = bed.http.post_json(&url, &format!(r#"{{"content":"c{i}","artifact_ids":[]}}"#)).await;
            (r, Instant::now())
        }));
    }
    for task in tasks {
        let (r, answered) = task.await.unwrap();
        let took = answered - started;
        assert_eq!(r.code().as_deref(), Some("PGRST204"), "PostgREST's own answer: {}", r.text());
        assert!(took < Duration::from_millis(3600), "answered after {took:?}, past the 3 s deadline");
    }
    println!("{family:?}: 10 stale requests with a stalled database answered in {:?}", started.elapsed());
    relay.stall(false);
    let r =
        bed.http.post_json(&format!("{}/chat_messages", guard.url()), r#"{"content":"after","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "healing is back: {}", r.text());
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 1);
});

/// A client that leaves while its heal waits on a stalled catalog check changes nothing for the
/// requests after it.
#[tokio::test]
async fn a_client_that_leaves_mid_heal_leaves_no_trace() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let relay = support::relay::Relay::start(vec![format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()]).await;
    let guard = start_guard(
        &bed.postgrest.url(),
        &relay.pg_uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &bed.postgrest.admin_url())],
    )
    .await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    relay.stall(true);
    let url = format!("{}/chat_messages", guard.url());
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        bed.http.post_json(&url, r#"{"content":"gone","artifact_ids":[]}"#),
    )
    .await;
    assert!(gone.is_err(), "the client left before an answer");
    relay.stall(false);
    let started = Instant::now();
    let r = bed.http.post_json(&url, r#"{"content":"next","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert!(started.elapsed() < Duration::from_secs(2), "no stuck catalog check to wait out: {:?}", started.elapsed());
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE content = 'gone'").await, 0);
}

/// Healing resumes by itself when the database connection comes back, whatever took it away: no
/// database at start-up, a terminated backend. LISTEN is renewed with it.
#[tokio::test]
async fn healing_resumes_when_the_database_connection_is_back() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let relay = support::relay::Relay::start(vec![format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()]).await;
    relay.refuse(true);
    let guard = support::guard::start_guard_without_waiting(
        &bed.postgrest.url(),
        &relay.pg_uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &bed.postgrest.admin_url())],
    )
    .await;
    let url = format!("{}/chat_messages", guard.url());
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN a text").await;
    let r = bed.http.post_json(&url, r#"{"content":"x","a":"1"}"#).await;
    assert_eq!(r.code().as_deref(), Some("PGRST204"), "no database: PostgREST's answer, at once");
    relay.refuse(false);
    assert!(support::client::eventually(Duration::from_secs(15), || async { guard.database.is_connected() }).await);
    let r = bed.http.post_json(&url, r#"{"content":"x","a":"1"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());

    // The backend is terminated (an operator, a failover): the guard reconnects and LISTENs again.
    bed.pg
        .sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'postgres' AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        .await;
    // The guard sees its backend gone and replaces it: counted, and a new backend LISTENs.
    let replaced = support::client::eventually(Duration::from_secs(15), || async {
        metric(&guard.render_metrics(), "pgrst_guard_database_reconnects_total{cause=\"closed\"}") >= 1
    })
    .await;
    assert!(replaced, "{}", guard.render_metrics());
    assert!(support::client::eventually(Duration::from_secs(15), || async { guard.database.hears_others() }).await);
    let seen = guard.database.notifications_seen();
    bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    assert!(
        support::client::eventually(Duration::from_secs(5), || async { guard.database.notifications_seen() > seen })
            .await,
        "LISTEN renewed"
    );
    bed.postgrest.reload_and_wait(&bed.pg).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN b text").await;
    let r = bed.http.post_json(&url, r#"{"content":"y","b":"2"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
}

/// "Healed" only when the final answer is a replay's success: PostgREST gone for good makes the
/// replays end in the guard's own 502, which is counted as what it is.
#[tokio::test]
async fn outcomes_are_true() {
    let bed = Arc::new(RealBed::start_with(Family::V14, CHAT, |o| o.deaf()).await);
    let guard =
        start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[("PGRST_GUARD_HEAL_DEADLINE_MS", "2000")]).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let url = format!("{}/chat_messages", guard.url());
    let waiting = {
        let bed = bed.clone();
        tokio::spawn(async move { bed.http.post_json(&url, r#"{"content":"c","artifact_ids":[]}"#).await })
    };
    // Once the heal waits for its reload, PostgREST goes away for good.
    assert!(
        support::client::eventually(Duration::from_secs(5), || async { guard.database.notifications_sent() == 1 })
            .await
    );
    bed.postgrest.stop().await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.code().as_deref(), Some("PGRSTG01"), "never sent: {}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), None, "not a heal");
    let metrics = guard.render_metrics();
    assert_eq!(metric(&metrics, "pgrst_guard_heals_total{code=\"PGRST204\",outcome=\"healed\"}"), 0, "{metrics}");
    assert_eq!(
        metric(&metrics, "pgrst_guard_heals_total{code=\"PGRST204\",outcome=\"replay_failed\"}"),
        1,
        "{metrics}"
    );
}

/// Two PostgREST instances behind one balancer: the guard waits until every instance has reloaded
/// (admin URL list), and with only one admin URL a replay that meets the other, still stale
/// instance waits for it — one NOTIFY either way.
async fn replicas_heal_with_one_notify(family: Family, both_admins: bool) {
    let bed = RealBed::start(family, CHAT).await;
    let second =
        support::postgrest::RealPostgrest::start(family, support::postgrest::PostgrestOptions::new(&bed.pg)).await;
    let backends = [bed.postgrest.url(), second.url()].map(|u| u.trim_start_matches("http://").parse().unwrap());
    let balancer = support::relay::Relay::start(backends.to_vec()).await;
    let admins = if both_admins {
        format!("{},{}", bed.postgrest.admin_url(), second.admin_url())
    } else {
        bed.postgrest.admin_url()
    };
    let guard = start_guard(&balancer.url(), &bed.pg.uri("postgres"), &[("PGRST_GUARD_UPSTREAM_ADMIN", &admins)]).await;
    let notifies = support::guard::NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        // A client of its own each: connections, and so instances, alternate.
        let url = format!("{}/chat_messages", guard.url());
        tasks.push(tokio::spawn(async move {
            support::client::HttpClient::new()
                .post_json(&url, &format!(r#"{{"content":"c{i}","artifact_ids":["a"]}}"#))
                .await
        }));
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    println!("{family:?} both_admins={both_admins}: 40 heals across two instances in {:?}", started.elapsed());
    assert_eq!(notifies.settled().await, 1, "one NOTIFY reaches both instances");
    assert_eq!(bed.scalar("SELECT count(DISTINCT content) FROM chat_messages").await, 40);
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 40);
}

family_matrix!(replicas_with_an_admin_url_each, |family| replicas_heal_with_one_notify(family, true));
family_matrix!(replicas_with_one_admin_url, |family| replicas_heal_with_one_notify(family, false));

/// Writes `count` rows naming `column`, each from a client of its own (so connections, and with
/// them processes sharing a port, alternate); every one must be stored.
async fn write_through(guard: &pgrst_guard::RunningGuard, column: &str, label: &str, count: usize) {
    let mut tasks = Vec::new();
    for i in 0..count {
        let url = format!("{}/chat_messages", guard.url());
        let body = format!(r#"{{"content":"{label}{i}","{column}":["a"]}}"#);
        tasks.push(tokio::spawn(async move { support::client::HttpClient::new().post_json(&url, &body).await }));
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
}

/// v16's `server-reuseport` hand-over: a new process starts on the old one's port (with an admin
/// port of its own, which cannot be shared), both serve for a while, then the old one stops, and
/// with it the admin URL the guard was given. Stale requests heal through all of it with one
/// NOTIFY per migration and within the deadline.
#[tokio::test]
async fn a_reuseport_hand_over_heals_with_one_notify_per_migration() {
    use support::postgrest::{PostgrestOptions, RealPostgrest};
    let port = support::pg::free_port();
    let bed = RealBed::start_with(Family::V16, CHAT, |o| PostgrestOptions { shared_port: Some(port), ..o }).await;
    let guard = start_guard(
        &bed.postgrest.url(),
        &bed.pg.uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &bed.postgrest.admin_url())],
    )
    .await;
    let notifies = support::guard::NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;

    // Migrate, then bring up the new process: the old one is stale, the new one fresh.
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let successor = RealPostgrest::start(
        Family::V16,
        PostgrestOptions { shared_port: Some(port), ..PostgrestOptions::new(&bed.pg) },
    )
    .await;
    let started = Instant::now();
    write_through(&guard, "artifact_ids", "both", 40).await;
    println!("40 writes while both processes serve: {:?}", started.elapsed());
    let sent = notifies.settled().await;
    assert!(sent <= 1, "{sent} NOTIFYs");

    // The old process leaves, and the admin URL with it; the next migration heals on the new one.
    bed.postgrest.stop().await;
    let before = notifies.settled().await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN tool_ids text[]").await;
    let started = Instant::now();
    write_through(&guard, "tool_ids", "after", 40).await;
    let elapsed = started.elapsed();
    println!("40 writes after the old process left: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(notifies.settled().await, before + 1);
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 80);
    drop(successor);
}
