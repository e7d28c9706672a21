//! A database path that cannot NOTIFY is never reported healthy, and the guard finds the primary:
//! against a real streaming replica of PostgreSQL 15 (`pg_basebackup -R`). A guard pointed at a
//! hot standby says "cannot NOTIFY" in /readyz, /metrics, doctor and once in its log, and heals as
//! soon as the standby is promoted; a multi-host URI with `target_session_attrs=read-write` heals
//! through the primary and follows a failover within the heal deadline; a read-only session, which
//! PostgreSQL lets NOTIFY, heals and is reported healthy.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::client::{eventually, HttpClient};
use crate::support::guard::{start_guard, GuardProcess, NotifyCounter};
use crate::support::pg::TestCluster;
use crate::support::postgrest::Family;
use crate::support::RealBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);";
/// PGRST_GUARD_HEAL_DEADLINE_MS's default.
const HEAL_DEADLINE: Duration = Duration::from_secs(10);

fn metric(metrics: &str, series: &str) -> Option<i64> {
    metrics.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `postgres://` URI of database `postgres` over several hosts, asking for the primary among them.
fn read_write_uri(clusters: &[&TestCluster]) -> String {
    let hosts: Vec<String> = clusters.iter().map(|c| format!("127.0.0.1:{}", c.port())).collect();
    format!("postgres://postgres@{}/postgres?target_session_attrs=read-write", hosts.join(","))
}

/// One stale insert naming `column`, just added by a migration on `primary`: status and
/// `X-PgRST-Guard`.
async fn heal_new_column(
    primary: &TestCluster,
    http: &HttpClient,
    guard_url: &str,
    column: &str,
) -> (u16, Option<String>) {
    primary.sql(&format!("ALTER TABLE chat_messages ADD COLUMN {column} text")).await;
    let r =
        http.post_json(&format!("{guard_url}/chat_messages"), &format!(r#"{{"content":"c","{column}":"v"}}"#)).await;
    (r.status.as_u16(), r.header("x-pgrst-guard").map(str::to_string))
}

/// Sessions that have ended on `cluster`'s database `postgres`, as its statistics count them.
async fn ended_sessions(client: &tokio_postgres::Client) -> i64 {
    let row = client
        .query_one("SELECT sessions FROM pg_stat_database WHERE datname = 'postgres'", &[])
        .await
        .expect("pg_stat_database");
    row.get(0)
}

// A replica pasted as PGRST_GUARD_DB_URI: it answers every query, but refuses NOTIFY. The guard
// says so everywhere and keeps trying, with one line in its log, not one per attempt; once the
// standby is promoted, the guard can NOTIFY within the heal deadline.
#[tokio::test]
async fn a_guard_pointed_at_a_standby_says_it_cannot_notify_until_it_is_promoted() {
    let primary = TestCluster::start().await;
    let standby = TestCluster::start_standby_of(&primary).await;
    assert!(standby.in_recovery().await, "the premise: a hot standby");
    // PostgREST's port, reachable (accepting, so that no backlog fills): readiness is about
    // forwarding, the database is reported.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let accepting = tokio::spawn(async move {
        while let Ok((connection, _)) = upstream.accept().await {
            drop(connection);
        }
    });
    let guard = GuardProcess::start(&upstream_url, &standby.uri("postgres"), &[]).await;
    let http = HttpClient::new();
    let (readyz, metrics) = (format!("http://{}/readyz", guard.admin), format!("http://{}/metrics", guard.admin));

    let reported = eventually(HEAL_DEADLINE, || async {
        http.get(&readyz).await.json()["database"] == "cannot NOTIFY: server is a hot standby"
    })
    .await;
    let ready = http.get(&readyz).await;
    assert!(reported, "{} {}\n{}", ready.status, ready.text(), guard.log());
    assert_eq!(ready.status, StatusCode::OK, "PostgREST is reachable: {}", ready.text());
    assert_eq!(ready.json()["database_error"], "cannot NOTIFY: server is a hot standby", "{}", ready.text());
    let text = http.get(&metrics).await.text();
    assert_eq!(metric(&text, "pgrst_guard_database_connected "), Some(0), "{text}");
    assert_eq!(metric(&text, "pgrst_guard_database_cannot_notify{reason=\"standby\"}"), Some(1), "{text}");
    assert_eq!(metric(&text, "pgrst_guard_database_cannot_notify{reason=\"queue_full\"}"), Some(0), "{text}");

    // doctor, with the same URI.
    let mut raw = pgrst_guard::config::RawConfig::new();
    raw.insert("PGRST_GUARD_UPSTREAM".into(), upstream_url.clone());
    raw.insert("PGRST_GUARD_DB_URI".into(), standby.uri("postgres"));
    let config = pgrst_guard::config::Config::from_raw(&raw).unwrap();
    let findings = pgrst_guard::doctor::run(&config, |_| {}).await;
    let database = findings.iter().find(|f| f.check == "database").expect("a database finding");
    assert_eq!(database.status, pgrst_guard::doctor::Status::Fail, "{}", database.message);
    assert!(database.message.contains("cannot NOTIFY: server is a hot standby"), "{}", database.message);

    // The guard keeps trying (three more connections have come and gone), and said it once.
    let stats = standby.connect("postgres").await;
    let before = ended_sessions(&stats).await;
    let retried = eventually(Duration::from_secs(20), || async { ended_sessions(&stats).await >= before + 3 }).await;
    assert!(retried, "the guard stopped trying: {} sessions ended", ended_sessions(&stats).await - before);
    let log = guard.log();
    let said = log.lines().filter(|l| l.contains("cannot NOTIFY")).count();
    assert_eq!(said, 1, "one warning, not one per attempt:\n{log}");

    // The failover: the standby becomes the primary the URI names.
    primary.stop().await;
    standby.promote().await;
    let promoted = Instant::now();
    let connected =
        eventually(HEAL_DEADLINE, || async { http.get(&readyz).await.json()["database"] == "connected" }).await;
    let ready = http.get(&readyz).await.text();
    assert!(connected, "not connected {HEAL_DEADLINE:?} after the promotion: {ready}\n{}", guard.log());
    println!("the guard could NOTIFY {:?} after the promotion", promoted.elapsed());
    let text = http.get(&metrics).await.text();
    assert_eq!(metric(&text, "pgrst_guard_database_connected "), Some(1), "{text}");
    assert_eq!(metric(&text, "pgrst_guard_database_cannot_notify{reason=\"standby\"}"), Some(0), "{text}");
    assert!(guard.log().contains("can NOTIFY again"), "{}", guard.log());
    accepting.abort();
}

// `host=standby,primary` with target_session_attrs=read-write: the guard skips the standby listed
// first, is healthy, and a migration heals through the primary.
#[tokio::test]
async fn a_multi_host_uri_asking_for_read_write_heals_through_the_primary() {
    let bed = RealBed::start(Family::V14, CHAT).await;
    let standby = TestCluster::start_standby_of(&bed.pg).await;
    let guard = bed.guard(&read_write_uri(&[&standby, &bed.pg]), &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")]).await;
    let readyz = bed.http.get(&format!("http://{}/readyz", guard.admin_addr.unwrap())).await.json();
    assert_eq!(readyz["database"], "connected", "{readyz}");
    let notifies = bed.notify_counter().await;
    let (status, header) = heal_new_column(&bed.pg, &bed.http, &guard.url(), "mood").await;
    assert_eq!((status, header.as_deref()), (201, Some("replayed")));
    assert_eq!(notifies.settled().await, 1);
}

// The same URI through a failover: the primary stops, the standby is promoted, and the guard can
// NOTIFY on the promoted server within the heal deadline of the promotion.
#[tokio::test]
async fn after_a_failover_a_multi_host_uri_reaches_the_promoted_standby_within_the_heal_deadline() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
    let primary = TestCluster::start().await;
    let standby = TestCluster::start_standby_of(&primary).await;
    let guard = start_guard(
        "http://127.0.0.1:9",
        &read_write_uri(&[&standby, &primary]),
        &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let http = HttpClient::new();
    let readyz = format!("http://{}/readyz", guard.admin_addr.unwrap());
    let database = || async { http.get(&readyz).await.json()["database"].as_str().unwrap_or_default().to_string() };
    assert_eq!(database().await, "connected");

    primary.stop().await;
    let lost = eventually(Duration::from_secs(15), || async { database().await != "connected" }).await;
    assert!(lost, "the guard did not notice its primary stopped");
    standby.promote().await;
    let promoted = Instant::now();
    let connected = eventually(HEAL_DEADLINE, || async { database().await == "connected" }).await;
    assert!(connected, "not connected {HEAL_DEADLINE:?} after the promotion: {}", http.get(&readyz).await.text());
    println!("the guard could NOTIFY {:?} after the promotion", promoted.elapsed());

    // Its reload NOTIFY now reaches the promoted server, where PostgREST would listen.
    let notifies = NotifyCounter::listen(&standby.uri("postgres"), "pgrst").await;
    guard.database.notify_reload(tokio::time::Instant::now() + HEAL_DEADLINE).await.expect("NOTIFY after the failover");
    assert_eq!(notifies.settled().await, 1);
}

// A role set read-only (as a reporting role pasted by mistake would be) still NOTIFYs: PostgreSQL
// allows NOTIFY in read-only transactions. The guard reports it healthy, and it heals.
#[tokio::test]
async fn a_read_only_session_can_notify_so_it_is_healthy_and_heals() {
    let setup = format!(
        "{CHAT} CREATE ROLE guard_ro LOGIN; ALTER ROLE guard_ro SET default_transaction_read_only = on; \
         GRANT SELECT ON chat_messages TO guard_ro;"
    );
    let bed = RealBed::start(Family::V14, &setup).await;
    let uri = format!("postgres://guard_ro@127.0.0.1:{}/postgres", bed.pg.port());
    let (client, connection) = tokio_postgres::connect(&uri, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let read_only: String = client.query_one("SHOW transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(read_only, "on", "the premise: a read-only session");

    let guard = bed.guard(&uri, &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")]).await;
    let readyz = format!("http://{}/readyz", guard.admin_addr.unwrap());
    let hearing =
        eventually(HEAL_DEADLINE, || async { bed.http.get(&readyz).await.json()["listen"] == "hearing" }).await;
    let ready = bed.http.get(&readyz).await.json();
    assert!(hearing, "{ready}");
    assert_eq!(ready["database"], "connected", "{ready}");
    let notifies = bed.notify_counter().await;
    let (status, header) = heal_new_column(&bed.pg, &bed.http, &guard.url(), "mood").await;
    assert_eq!((status, header.as_deref()), (201, Some("replayed")));
    assert_eq!(notifies.settled().await, 1);
}
