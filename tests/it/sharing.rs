//! Work shared between requests belongs to none of them: the catalog query, the NOTIFY and the wait
//! for PostgREST's reload go on for the others when the client that started them leaves. And guards
//! failing at the same instant find each other on the channel. Against the real PostgREST.

use std::time::Duration;

use http::StatusCode;

use crate::support;
use crate::support::client::HttpClient;
use crate::support::postgrest::Family;
use crate::support::relay::Relay;
use crate::support::RealBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);";

/// The first client hangs up `after` its request went out, while the guard's database is 60 ms
/// away, so that it leaves during the catalog check, the NOTIFY or the wait for the reload; a
/// second client, sent just after it, is healed, with one NOTIFY in all and the first write never
/// stored.
async fn the_first_client_leaves(after: Duration) {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let relay = Relay::postgres(format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()).await;
    let guard = bed.guard(&relay.pg_uri("postgres"), &[]).await;
    let notifies = bed.notify_counter().await;
    relay.delay(Duration::from_millis(30));
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let url = format!("{}/chat_messages", guard.url());
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            tokio::time::timeout(after, HttpClient::new().post_json(&url, r#"{"content":"gone","artifact_ids":[]}"#))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(2)).await;
    let second = HttpClient::new().post_json(&url, r#"{"content":"stays","artifact_ids":[]}"#).await;
    let left = first.await.unwrap().is_err();
    println!("first client left after {after:?}: {left}; second got {}", second.status);
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.text());
    assert_eq!(second.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(notifies.settled().await, 1, "one NOTIFY in all");
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE content = 'stays'").await, 1);
    if left {
        assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE content = 'gone'").await, 0);
    }
}

#[tokio::test]
async fn the_first_client_leaves_during_the_catalog_check() {
    the_first_client_leaves(Duration::from_millis(5)).await
}

#[tokio::test]
async fn the_first_client_leaves_during_the_notify() {
    the_first_client_leaves(Duration::from_millis(90)).await
}

#[tokio::test]
async fn the_first_client_leaves_while_the_reload_is_awaited() {
    the_first_client_leaves(Duration::from_millis(200)).await
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
