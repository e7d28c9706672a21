//! The PostgREST double against a real PostgreSQL, reduced to what the guard's own tests rely on it
//! for: a stale cache healed by NOTIFY, PostgreSQL errors from dropped objects, a load that takes a
//! set time, a load that fails on command, and the load counter. Everything else is tested against
//! the real PostgREST.

use std::time::Duration;

use http::StatusCode;

use crate::support::client::eventually;
use crate::support::TestBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL, created_at timestamptz DEFAULT now());";

#[tokio::test]
async fn new_column_gives_pgrst204_until_notify_then_201() {
    let bed = TestBed::start(CHAT).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[] DEFAULT '{}'").await;
    let body = r#"{"content":"hello","artifact_ids":["a1","a2"]}"#;

    let stale = bed.http.post_json(&bed.url("/chat_messages"), body).await;
    assert_eq!(stale.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        stale.text(),
        r#"{"code":"PGRST204","details":null,"hint":null,"message":"Could not find the 'artifact_ids' column of 'chat_messages' in the schema cache"}"#
    );
    assert_eq!(stale.header("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(stale.header("proxy-status"), Some("PostgREST; error=PGRST204"));
    assert_eq!(stale.header("server"), Some("postgrest/14.17"));

    bed.notify_and_wait_reload().await;
    let healed = bed.http.post_json(&bed.url("/chat_messages"), body).await;
    assert_eq!(healed.status, StatusCode::CREATED, "{}", healed.text());
    assert!(healed.body.is_empty());

    let client = bed.pg.connect("postgres").await;
    let row = client.query_one("SELECT artifact_ids FROM chat_messages", &[]).await.unwrap();
    assert_eq!(row.get::<_, Vec<String>>(0), vec!["a1", "a2"]);
}

#[tokio::test]
async fn stale_cache_of_dropped_objects_gives_postgresql_errors() {
    let bed = TestBed::start(&format!(
        "{CHAT} ALTER TABLE chat_messages ADD COLUMN legacy text; CREATE TABLE old_things (id int);"
    ))
    .await;
    bed.pg.sql("ALTER TABLE chat_messages DROP COLUMN legacy; DROP TABLE old_things;").await;

    let r = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"x","legacy":"y"}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code().as_deref(), Some("42703"));
    assert_eq!(r.json()["message"], "column \"legacy\" of relation \"chat_messages\" does not exist");
    assert_eq!(r.header("proxy-status"), Some("PostgREST; error=42703"));

    let r = bed.http.get(&bed.url("/old_things")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code().as_deref(), Some("42P01"));
    assert_eq!(r.json()["message"], "relation \"public.old_things\" does not exist");

    bed.notify_and_wait_reload().await;
    let r = bed.http.get(&bed.url("/old_things")).await;
    assert_eq!(r.code().as_deref(), Some("PGRST205"));
}

#[tokio::test]
async fn a_notify_during_a_load_is_not_lost_and_old_cache_serves_meanwhile() {
    let bed = TestBed::start_with(CHAT, |o| o.load_delay(Duration::from_millis(600))).await;
    bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]; NOTIFY pgrst, 'reload schema';").await;
    // Requests during the load are served from the old cache, not blocked or refused.
    let during = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"a","artifact_ids":[]}"#).await;
    assert_eq!(during.code().as_deref(), Some("PGRST204"));
    let healed = eventually(Duration::from_secs(5), || async {
        bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"a","artifact_ids":["x"]}"#).await.status
            == StatusCode::CREATED
    })
    .await;
    assert!(healed, "the second NOTIFY must cause one more load");
}

#[tokio::test]
async fn a_failing_load_empties_the_cache_until_a_retry_succeeds() {
    let bed = TestBed::start(CHAT).await;
    bed.double.fail_next_loads(1);
    bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    assert!(eventually(Duration::from_secs(5), || async { bed.double.failed_loads() == 1 }).await);
    let r = bed.http.get(&bed.url("/chat_messages")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.text(),
        r#"{"code":"PGRST002","details":null,"hint":null,"message":"Could not query the database for the schema cache. Retrying."}"#
    );
    assert_eq!(r.header("retry-after"), Some("0"));
    let ready = bed.http.get(&format!("{}/ready", bed.double.admin_url())).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let metrics = bed.http.get(&format!("{}/metrics", bed.double.admin_url())).await.text();
    assert!(metrics.contains("pgrst_schema_cache_loads_total{status=\"FAIL\"} 1.0"), "{metrics}");

    assert!(
        eventually(Duration::from_secs(5), || async {
            bed.http.get(&bed.url("/chat_messages")).await.status == StatusCode::OK
        })
        .await
    );
    assert_eq!(bed.http.get(&format!("{}/ready", bed.double.admin_url())).await.status, StatusCode::OK);
}

#[tokio::test]
async fn admin_server_reports_loads_after_the_swap() {
    let bed = TestBed::start(CHAT).await;
    let admin = bed.double.admin_url();
    assert_eq!(bed.http.get(&format!("{admin}/live")).await.status, StatusCode::OK);
    assert_eq!(bed.http.get(&format!("{admin}/ready")).await.status, StatusCode::OK);
    let metrics = bed.http.get(&format!("{admin}/metrics")).await;
    assert_eq!(metrics.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(metrics.text().contains("pgrst_schema_cache_loads_total{status=\"SUCCESS\"} 1.0"), "{}", metrics.text());
    assert!(!metrics.text().contains("FAIL"));

    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    bed.notify_and_wait_reload().await;
    // Once the counter moved, the new cache is in place.
    let r = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"a","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let metrics = bed.http.get(&format!("{admin}/metrics")).await.text();
    assert!(metrics.contains("pgrst_schema_cache_loads_total{status=\"SUCCESS\"} 2.0"), "{metrics}");
    let dump = bed.http.get(&format!("{admin}/schema_cache")).await.json();
    assert!(dump["dbTables"]["public.chat_messages"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "artifact_ids"));
    assert_eq!(bed.http.get(&format!("{admin}/nope")).await.status, StatusCode::NOT_FOUND);
}
