//! Work shared between requests belongs to none of them: the catalog query, the NOTIFY and the wait
//! for PostgREST's reload go on for the others when the client that started them leaves. And guards
//! failing at the same instant find each other on the channel. Against the real PostgREST.

use std::time::Duration;

use http::StatusCode;

use crate::support;
use crate::support::client::{eventually, HttpClient};
use crate::support::guard::metric;
use crate::support::postgrest::{Family, PostgrestOptions};
use crate::support::relay::Relay;
use crate::support::RealBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);";

/// Where the first client's heal is when it leaves, held there until the second client's heal has
/// met it: the guard's catalog query or its NOTIFY held at a relay in front of the guard's database,
/// or PostgREST's reload waiting on a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    CatalogCheck,
    Notify,
    ReloadAwaited,
}

/// The first client hangs up, before any answer, while its heal is held in `phase` (proved by the
/// hold itself and the guard's own counters); a second client, sent while the first heal is held,
/// is healed once the hold ends, with one NOTIFY in all and the first write never stored.
async fn the_first_client_leaves(phase: Phase) {
    let bed = RealBed::start_with(Family::V14, &format!("{CHAT} {}", support::RELOAD_BLOCKER_SQL), |o| {
        PostgrestOptions { log_level: "info", ..o }
    })
    .await;
    let relay = Relay::postgres(format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()).await;
    // Holding the heal's NOTIFY holds the guard's one database connection: a write's barrier query
    // would wait behind it until the connection is taken for dead. The NOTIFY phase is about the
    // heal's flight, so it runs without the barrier (tests/it/silent_writes.rs covers the barrier,
    // faults.rs a stalled database with it).
    let keys: &[(&str, &str)] = if phase == Phase::Notify { &[("PGRST_GUARD_WRITE_BARRIER", "false")] } else { &[] };
    let guard = bed.guard(&relay.pg_uri("postgres"), keys).await;
    let notifies = bed.notify_counter().await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let blocker = match phase {
        // The catalog query for a column (src/reload/catalog/columns.sql opens with this comment;
        // the write barrier's query reads pg_attribute too, so that is no mark of it).
        Phase::CatalogCheck => {
            relay.hold_query_containing("Would PostgREST cache this column");
            None
        }
        // The guard's reload NOTIFY for a heal (src/reload/database.rs `notify_reload`; the write
        // barrier's proof names itself).
        Phase::Notify => {
            relay.hold_query_containing("pg_notify($1, 'reload schema')\0");
            None
        }
        Phase::ReloadAwaited => Some(support::ReloadBlocker::hold(&bed.pg).await),
    };
    let url = format!("{}/chat_messages", guard.url());
    let (leave, left) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            let http = HttpClient::new();
            tokio::select! {
                answer = http.post_json(&url, r#"{"content":"gone","artifact_ids":[]}"#) => Some(answer),
                _ = left => None,
            }
        })
    };
    let counters = || {
        let metrics = guard.render_metrics();
        (metric(&metrics, "pgrst_guard_catalog_checks_total{"), guard.database.notifications_sent())
    };
    let held = eventually(Duration::from_secs(10), || async {
        match &blocker {
            Some(blocker) => blocker.reload_waiting().await,
            None => relay.holding(),
        }
    })
    .await;
    assert!(held, "the premise: the first heal is held in {phase:?}");
    // (catalog checks finished, NOTIFYs sent) by the guard while the first heal is held.
    let expected = match phase {
        Phase::CatalogCheck => (0, 0),
        Phase::Notify => (1, 0),
        Phase::ReloadAwaited => (1, 1),
    };
    assert_eq!(counters(), expected, "the guard's counters place the first heal in {phase:?}");
    let _ = leave.send(());
    assert!(first.await.unwrap().is_none(), "the first client left before any answer, in {phase:?}");
    let second =
        tokio::spawn(
            async move { HttpClient::new().post_json(&url, r#"{"content":"stays","artifact_ids":[]}"#).await },
        );
    // PostgREST has answered both stale inserts: the second heal has begun while the first's is held.
    let begun =
        eventually(Duration::from_secs(5), || async { bed.postgrest.access_log_lines("POST /chat_messages") >= 2 })
            .await;
    assert!(begun, "the second insert reached PostgREST");
    let still_held = match &blocker {
        Some(blocker) => blocker.reload_waiting().await,
        None => relay.holding(),
    };
    assert!(still_held, "the first heal was still held when the second began");
    assert_eq!(guard.database.notifications_sent(), expected.1, "no NOTIFY went out in between");
    match blocker {
        Some(blocker) => blocker.release().await,
        None => relay.release(),
    }
    let second = second.await.unwrap();
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.text());
    assert_eq!(second.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(notifies.settled().await, 1, "one NOTIFY in all");
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE content = 'stays'").await, 1);
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE content = 'gone'").await, 0);
}

#[tokio::test]
async fn the_first_client_leaves_during_the_catalog_check() {
    the_first_client_leaves(Phase::CatalogCheck).await
}

#[tokio::test]
async fn the_first_client_leaves_during_the_notify() {
    the_first_client_leaves(Phase::Notify).await
}

#[tokio::test]
async fn the_first_client_leaves_while_the_reload_is_awaited() {
    the_first_client_leaves(Phase::ReloadAwaited).await
}

/// Six guards (processes of their own, as a fleet runs) in front of one PostgREST, ten stale inserts
/// each at the same instant, four migrations in a row: each migration costs at most two NOTIFYs in all.
#[tokio::test]
async fn guards_failing_at_the_same_instant_send_at_most_two_notifies() {
    let bed = RealBed::start(Family::V16, CHAT).await;
    let mut guards = Vec::new();
    for _ in 0..6 {
        let admin = bed.postgrest.admin_url();
        guards.push(
            support::guard::GuardProcess::start(
                &bed.postgrest.url(),
                &bed.pg.uri("postgres"),
                &[("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()), ("PGRST_GUARD_WORKERS", "1")],
            )
            .await,
        );
    }
    for guard in &guards {
        assert!(
            support::client::eventually(Duration::from_secs(15), || async {
                guard.readyz().await["listen"] == "hearing"
            })
            .await
        );
    }
    let notifies = bed.notify_counter().await;
    // A first NOTIFY from someone else, so that the guards have heard others on the channel.
    bed.postgrest.reload_and_wait(&bed.pg).await;
    let mut before = notifies.settled().await;
    for round in 0..4 {
        bed.pg.sql(&format!("ALTER TABLE chat_messages ADD COLUMN c{round} text")).await;
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(60));
        let mut tasks = Vec::new();
        for guard in &guards {
            for i in 0..10 {
                let (url, start) = (format!("{}/chat_messages", guard.url()), start.clone());
                tasks.push(tokio::spawn(async move {
                    let http = HttpClient::new();
                    start.wait().await;
                    http.post_json(&url, &format!(r#"{{"content":"r{round}-{i}","c{round}":"x"}}"#)).await
                }));
            }
        }
        for task in tasks {
            let r = task.await.unwrap();
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        }
        let now = notifies.settled().await;
        println!("round {round}: 60 stale inserts through six guards, {} NOTIFYs", now - before);
        if now - before > 2 {
            for guard in &guards {
                eprintln!("--- guard {}\n{}", guard.addr, guard.log());
            }
        }
        assert!(now - before <= 2, "round {round}: {} NOTIFYs", now - before);
        before = now;
    }
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 240);
}
