//! The guard's database connection is never silently dead, and the guard always knows whether it
//! can heal: against the real PostgREST, in the default configuration, with a relay that drops
//! flows the way NAT gateways and load balancers do, PostgreSQL restarts, PgBouncer in transaction
//! mode, and a LISTEN that stops receiving.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support;
use crate::support::client::eventually;
use crate::support::guard::metric;
use crate::support::guard::start_guard;
use crate::support::postgrest::Family;
use crate::support::relay::Relay;
use crate::support::RealBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);";

/// One stale insert naming `column`, just added by a migration; returns the answer and its wait.
async fn heal_new_column(
    bed: &RealBed,
    guard: &pgrst_guard::RunningGuard,
    column: &str,
) -> (u16, Option<String>, Duration) {
    bed.pg.sql(&format!("ALTER TABLE chat_messages ADD COLUMN {column} text")).await;
    let started = Instant::now();
    let r = bed
        .http
        .post_json(&format!("{}/chat_messages", guard.url()), &format!(r#"{{"content":"c","{column}":"v"}}"#))
        .await;
    (r.status.as_u16(), r.header("x-pgrst-guard").map(str::to_string), started.elapsed())
}

// After a first heal, the relay stops passing bytes on the guard's open connections without closing
// them, while new connections work: the next stale request heals within the deadline, and so does
// every later migration; the replacement is counted and health tells the truth.
family_matrix!(a_silently_dropped_connection_is_replaced_and_heals_go_on, |family: Family| async move {
    let bed = RealBed::start(family, CHAT).await;
    let relay = Relay::postgres(format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()).await;
    let guard = bed.guard(&relay.pg_uri("postgres"), &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")]).await;
    assert_eq!(heal_new_column(&bed, &guard, "first").await.0, 201);

    relay.blackhole_open();
    let (status, header, took) = heal_new_column(&bed, &guard, "second").await;
    println!("{family:?}: healed {took:?} after the flow was dropped");
    assert_eq!((status, header.as_deref()), (201, Some("replayed")));
    assert!(took < Duration::from_secs(10), "within the heal deadline: {took:?}");
    for column in ["third", "fourth"] {
        let (status, header, _) = heal_new_column(&bed, &guard, column).await;
        assert_eq!((status, header.as_deref()), (201, Some("replayed")), "{column}");
    }
    let metrics = guard.render_metrics();
    assert!(metric(&metrics, "pgrst_guard_database_reconnects_total{cause=\"timeout\"}") >= 1, "{metrics}");
    assert_eq!(metric(&metrics, "pgrst_guard_database_connected"), 1, "{metrics}");
    let readyz = bed.http.get(&format!("http://{}/readyz", guard.admin_addr.unwrap())).await.json();
    assert_eq!(readyz["database"], "connected", "{readyz}");
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages").await, 4);
});

/// A quiet connection dropped by the network is found by the guard's own check, not by the next
/// heal: health says so within the check interval and the timeout, and a new connection replaces it.
#[tokio::test]
async fn an_idle_dead_connection_is_found_before_a_heal_needs_it() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let relay = Relay::postgres(format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()).await;
    let guard = bed.guard(&relay.pg_uri("postgres"), &[]).await;
    let replaced =
        || async { metric(&guard.render_metrics(), "pgrst_guard_database_reconnects_total{cause=\"timeout\"}") >= 1 };
    assert!(!replaced().await);
    let dropped = Instant::now();
    relay.blackhole_open();
    // The default check: every 5 s, 2 s to answer.
    assert!(eventually(Duration::from_secs(12), replaced).await, "the dead connection was not found");
    println!("an idle dead connection was found and replaced {:?} after the drop", dropped.elapsed());
    assert!(eventually(Duration::from_secs(5), || async { guard.database.is_connected() }).await);
    let (status, header, took) = heal_new_column(&bed, &guard, "after_idle").await;
    println!("the heal after it took {took:?}");
    assert_eq!((status, header.as_deref()), (201, Some("replayed")));
}

// A migration committed right after a PostgreSQL restart heals: the heal connects now instead of
// waiting for the guard's reconnect back-off.
family_matrix!(a_migration_right_after_a_postgresql_restart_heals, |family: Family| async move {
    let bed = RealBed::start(family, CHAT).await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[]).await;
    bed.pg.stop().await;
    // Down long enough for the guard's background reconnects to back off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bed.pg.start_again().await;
    assert!(bed.postgrest.wait_ready(Duration::from_secs(60)).await, "PostgREST is back");
    let (status, header, took) = heal_new_column(&bed, &guard, "right_after").await;
    println!("{family:?}: healed {took:?} after the restart");
    assert_eq!((status, header.as_deref()), (201, Some("replayed")));
});

/// Through PgBouncer in transaction mode: the catalog check and the NOTIFY work, LISTEN cannot; the
/// guard heals, and says once — in /readyz, /metrics and doctor — that joining others' reloads is off.
#[tokio::test]
async fn through_a_transaction_pooler_heals_and_says_listen_is_off() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let bouncer = support::pgbouncer::PgBouncer::start(&bed.pg, "transaction").await;
    // Other clients of the pooler, as on a shared port 6543: server connections change hands.
    let mut others = Vec::new();
    for _ in 0..3 {
        let (client, connection) = tokio_postgres::connect(&bouncer.uri(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        others.push(tokio::spawn(async move {
            loop {
                if client.simple_query("SELECT pg_sleep(0.02)").await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let guard = bed.guard(&bouncer.uri(), &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")]).await;
    let notifies = bed.notify_counter().await;
    let (status, header, _) = heal_new_column(&bed, &guard, "pooled").await;
    assert_eq!((status, header.as_deref()), (201, Some("replayed")), "{}", bouncer.log());
    assert_eq!(notifies.settled().await, 1);
    let admin = format!("http://{}", guard.admin_addr.unwrap());
    let off = eventually(Duration::from_secs(20), || async {
        bed.http.get(&format!("{admin}/readyz")).await.json()["listen"] == "off"
    })
    .await;
    let readyz = bed.http.get(&format!("{admin}/readyz")).await.json();
    assert!(off, "{readyz}");
    assert_eq!(readyz["joining_others_reloads"], "off");
    assert!(readyz["listen_problem"].as_str().unwrap().contains("transaction-mode pooler"), "{readyz}");
    assert_eq!(readyz["database"], "connected", "{readyz}");
    let metrics = bed.http.get(&format!("{admin}/metrics")).await.text();
    assert_eq!(metric(&metrics, "pgrst_guard_database_listening"), 0, "{metrics}");

    // doctor says it too.
    let mut raw = pgrst_guard::config::RawConfig::new();
    raw.insert("PGRST_GUARD_UPSTREAM".into(), bed.postgrest.url());
    raw.insert("PGRST_GUARD_UPSTREAM_ADMIN".into(), bed.postgrest.admin_url());
    raw.insert("PGRST_GUARD_DB_URI".into(), bouncer.uri());
    let config = pgrst_guard::config::Config::from_raw(&raw).unwrap();
    let findings = pgrst_guard::doctor::run(&config, |_| {}).await;
    let listen = findings.iter().find(|f| f.check == "listen").expect("a listen finding");
    assert_eq!(listen.status, pgrst_guard::doctor::Status::Warn, "{}", listen.message);
    assert!(listen.message.contains("joining reloads others ask for is off"), "{}", listen.message);

    // And heals go on.
    let (status, header, _) = heal_new_column(&bed, &guard, "pooled_again").await;
    assert_eq!((status, header.as_deref()), (201, Some("replayed")));
    for other in others {
        other.abort();
    }
}

/// The guard's LISTEN stops receiving (as PostgreSQL's notification-queue bug leaves it): its own
/// check finds out, a fresh connection renews it, and NOTIFYs from others are seen again.
#[tokio::test]
async fn a_listen_that_stops_receiving_is_renewed() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let relay = Relay::postgres(format!("127.0.0.1:{}", bed.pg.port()).parse().unwrap()).await;
    let guard = start_guard(&bed.postgrest.url(), &relay.pg_uri("postgres"), &[]).await;
    assert!(eventually(Duration::from_secs(10), || async { guard.database.hears_others() }).await);
    let deafened = Instant::now();
    relay.deafen_open();
    let renewed = eventually(Duration::from_secs(15), || async {
        metric(&guard.render_metrics(), "pgrst_guard_database_reconnects_total{cause=\"listen_deaf\"}") >= 1
    })
    .await;
    assert!(renewed, "the deaf LISTEN was not noticed:\n{}", guard.render_metrics());
    println!("a deaf LISTEN was renewed {:?} after it stopped receiving", deafened.elapsed());
    assert!(eventually(Duration::from_secs(10), || async { guard.database.hears_others() }).await);
    let seen = guard.database.notifications_seen();
    bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    assert!(
        eventually(Duration::from_secs(5), || async { guard.database.notifications_seen() > seen }).await,
        "the renewed LISTEN hears others"
    );
}

#[tokio::test]
async fn a_stopped_database_is_reported_as_it_is() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let guard =
        start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")])
            .await;
    let admin = format!("http://{}", guard.admin_addr.unwrap());
    bed.pg.stop().await;
    let reported = eventually(Duration::from_secs(15), || async {
        bed.http.get(&format!("{admin}/readyz")).await.json()["database"] == "disconnected"
    })
    .await;
    let readyz = bed.http.get(&format!("{admin}/readyz")).await.json();
    assert!(reported, "{readyz}");
    assert!(readyz["database_error"].is_string(), "{readyz}");
    assert_eq!(metric(&bed.http.get(&format!("{admin}/metrics")).await.text(), "pgrst_guard_database_connected"), 0);
    bed.pg.start_again().await;
    assert!(eventually(Duration::from_secs(15), || async { guard.database.is_connected() }).await);
    assert!(StatusCode::OK.is_success());
}
