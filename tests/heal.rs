//! Healing through pgrst-guard, against the PostgREST double and a real PostgreSQL: what the client
//! sees, and what the database holds.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use support::double::Profile;
use support::guard::{start_guard, start_guard_without_waiting, NotifyCounter};
use support::TestBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL);";

struct Setup {
    bed: TestBed,
    guard: pgrst_guard::RunningGuard,
    notifies: NotifyCounter,
}

impl Setup {
    async fn new(sql: &str, profile: Profile, with_admin: bool, extra: &[(&str, &str)]) -> Setup {
        Self::with_delay(sql, profile, with_admin, Duration::ZERO, extra).await
    }

    async fn with_delay(
        sql: &str,
        profile: Profile,
        with_admin: bool,
        delay: Duration,
        extra: &[(&str, &str)],
    ) -> Setup {
        let bed = TestBed::start_with(sql, |o| o.profile(profile).load_delay(delay)).await;
        let admin = bed.double.admin_url();
        let mut keys: Vec<(&str, &str)> = extra.to_vec();
        if with_admin {
            keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", &admin));
        }
        let guard = start_guard(&bed.double.url(), &bed.pg.uri("postgres"), &keys).await;
        let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
        Setup { bed, guard, notifies }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.guard.url(), path)
    }

    async fn scalar(&self, sql: &str) -> i64 {
        self.bed.pg.connect("postgres").await.query_one(sql, &[]).await.unwrap().get(0)
    }
}

async fn artifact_ids_case(profile: Profile, with_admin: bool) {
    let s = Setup::new(CHAT, profile, with_admin, &[]).await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[] DEFAULT '{}'").await;

    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"hi","artifact_ids":["a1","a2"]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    let client = s.bed.pg.connect("postgres").await;
    let rows = client.query("SELECT artifact_ids FROM chat_messages", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "stored exactly once");
    assert_eq!(rows[0].get::<_, Vec<String>>(0), vec!["a1", "a2"]);
    assert_eq!(s.notifies.count(), 1);

    // Healthy requests are not touched.
    let r = s.bed.http.get(&s.url("/chat_messages?select=content")).await;
    assert_eq!((r.status, r.json()), (StatusCode::OK, json!([{"content":"hi"}])));
    assert_eq!(r.header("x-pgrst-guard"), None);
}

#[tokio::test]
async fn new_column_heals_with_admin_metrics() {
    artifact_ids_case(Profile::V14, true).await;
}

#[tokio::test]
async fn a_heal_shows_in_the_guards_metrics() {
    let s = Setup::new(CHAT, Profile::V14, true, &[]).await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"hi","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let metrics = s.guard.metrics.render(true, 0);
    for expected in [
        "pgrst_guard_heals_total{code=\"PGRST204\",outcome=\"healed\"} 1",
        "pgrst_guard_notifies_sent_total 1",
        "pgrst_guard_catalog_checks_total{result=\"exists\"} 1",
        "pgrst_guard_responses_total{status=\"201\"} 1",
        "pgrst_guard_heal_wait_seconds_count 1",
        "pgrst_guard_upstream_latency_seconds_count 2",
    ] {
        assert!(metrics.contains(expected), "missing {expected}:\n{metrics}");
    }
}

#[tokio::test]
async fn new_column_heals_without_admin() {
    artifact_ids_case(Profile::V14, false).await;
}

#[tokio::test]
async fn v12_2_without_proxy_status_heals_from_the_body() {
    artifact_ids_case(Profile::V12_2, true).await;
}

#[tokio::test]
async fn v12_0_without_metrics_falls_back_to_backoff() {
    artifact_ids_case(Profile::V12_0, true).await;
}

#[tokio::test]
async fn v11_0_heals_with_its_older_message() {
    artifact_ids_case(Profile::V11_0, false).await;
}

#[tokio::test]
async fn new_table_heals_reads_and_writes() {
    let s = Setup::new(CHAT, Profile::V14, true, &[]).await;
    s.bed.pg.sql("CREATE TABLE artifacts (id int PRIMARY KEY, label text)").await;
    let r = s.bed.http.post_json(&s.url("/artifacts"), r#"{"id":1,"label":"x"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(s.scalar("SELECT count(*) FROM artifacts").await, 1);

    s.bed.pg.sql("CREATE TABLE artifact_tags (tag text)").await;
    let r = s.bed.http.get(&s.url("/artifact_tags")).await;
    assert_eq!((r.status, r.json()), (StatusCode::OK, json!([])));
    assert_eq!(s.notifies.count(), 2);
}

#[tokio::test]
async fn v12_2_new_table_write_heals_the_bare_404() {
    let s = Setup::new(CHAT, Profile::V12_2, true, &[]).await;
    s.bed.pg.sql("CREATE TABLE artifacts (id int PRIMARY KEY)").await;
    let r = s.bed.http.post_json(&s.url("/artifacts"), r#"{"id":1}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(s.scalar("SELECT count(*) FROM artifacts").await, 1);
}

#[tokio::test]
async fn new_function_heals() {
    let s = Setup::new(CHAT, Profile::V14, true, &[]).await;
    s.bed.pg.sql("CREATE FUNCTION word_count(t text) RETURNS int LANGUAGE sql IMMUTABLE AS $$SELECT array_length(regexp_split_to_array(t, '\\s+'), 1)$$").await;
    let r = s.bed.http.post_json(&s.url("/rpc/word_count"), r#"{"t":"one two three"}"#).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "3".to_string()));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
}

#[tokio::test]
async fn new_foreign_key_embed_heals() {
    let s = Setup::new(
        &format!("{CHAT} CREATE TABLE projects (id int PRIMARY KEY, name text); INSERT INTO projects VALUES (1, 'p');"),
        Profile::V14,
        true,
        &[],
    )
    .await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN project_id int REFERENCES projects(id); INSERT INTO chat_messages (content, project_id) VALUES ('m', 1);").await;
    let r = s.bed.http.get(&s.url("/chat_messages?select=content,projects(name)")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!([{"content":"m","projects":{"name":"p"}}]));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
}

#[tokio::test]
async fn five_hundred_concurrent_failures_share_one_notify_and_store_each_row_once() {
    let s = Arc::new(Setup::with_delay(CHAT, Profile::V14, true, Duration::from_millis(200), &[]).await);
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let mut tasks = Vec::new();
    for i in 0..500 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"content":"m{i}","artifact_ids":["a{i}"]}}"#);
            let r = s.bed.http.post_json(&s.url("/chat_messages"), &body).await;
            (r.status, r.header("x-pgrst-guard").map(str::to_string), r.text())
        }));
    }
    let mut replayed = 0;
    for task in tasks {
        let (status, header, text) = task.await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{text}");
        replayed += usize::from(header.as_deref() == Some("replayed"));
    }
    assert!(replayed > 0);
    assert_eq!(s.notifies.count(), 1, "one reload for all");
    assert_eq!(s.scalar("SELECT count(*) FROM chat_messages").await, 500);
    assert_eq!(s.scalar("SELECT count(DISTINCT content) FROM chat_messages").await, 500);
    assert_eq!(
        s.scalar("SELECT count(*) FROM chat_messages WHERE artifact_ids = ARRAY['a' || substr(content, 2)]").await,
        500
    );
}

#[tokio::test]
async fn a_body_over_the_replay_cap_passes_its_error_through() {
    let s = Setup::new(CHAT, Profile::V14, true, &[("PGRST_GUARD_REPLAY_BODY_LIMIT", "64")]).await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let long = "x".repeat(200);
    let r =
        s.bed.http.post_json(&s.url("/chat_messages"), &format!(r#"{{"content":"{long}","artifact_ids":[]}}"#)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code().as_deref(), Some("PGRST204"));
    assert_eq!(r.header("x-pgrst-guard"), None);
    assert_eq!(s.notifies.count(), 0);
    // A small body still heals.
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"s","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_column_that_does_not_exist_returns_the_original_error_within_the_deadline() {
    let s = Setup::new(CHAT, Profile::V14, true, &[]).await;
    let started = Instant::now();
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"x","nope":1}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text(),
        r#"{"code":"PGRST204","details":null,"hint":null,"message":"Could not find the 'nope' column of 'chat_messages' in the schema cache"}"#
    );
    assert_eq!(r.header("proxy-status"), Some("PostgREST; error=PGRST204"));
    assert_eq!(r.header("x-pgrst-guard"), None);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(s.scalar("SELECT count(*) FROM chat_messages").await, 0);
}

#[tokio::test]
async fn ambiguity_and_database_errors_pass_through_untouched() {
    let s = Setup::new(
        "CREATE TABLE people (id int PRIMARY KEY);
         CREATE TABLE letters (id int PRIMARY KEY, sender int REFERENCES people(id), receiver int REFERENCES people(id));
         CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql AS 'SELECT a'; CREATE FUNCTION f(a text) RETURNS int LANGUAGE sql AS 'SELECT 1';
         INSERT INTO people VALUES (1);",
        Profile::V14,
        true,
        &[],
    )
    .await;
    let r = s.bed.http.get(&s.url("/letters?select=*,people(*)")).await;
    assert_eq!((r.status.as_u16(), r.code().as_deref()), (300, Some("PGRST201")));
    let r = s.bed.http.post_json(&s.url("/rpc/f"), r#"{"a":1}"#).await;
    assert_eq!((r.status.as_u16(), r.code().as_deref()), (300, Some("PGRST203")));
    let r = s.bed.http.post_json(&s.url("/people"), r#"{"id":1}"#).await;
    assert_eq!((r.status, r.code().as_deref()), (StatusCode::CONFLICT, Some("23505")));
    assert_eq!(s.notifies.count(), 0);
}

#[tokio::test]
async fn an_empty_cache_is_waited_out() {
    let s = Setup::new(CHAT, Profile::V14, true, &[]).await;
    s.bed.double.fail_next_loads(1);
    s.bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    assert!(support::client::eventually(Duration::from_secs(5), || async { s.bed.double.failed_loads() == 1 }).await);
    let r = s.bed.http.get(&s.url("/chat_messages")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(s.notifies.count(), 1, "only the test's own NOTIFY");
}

#[tokio::test]
async fn a_database_that_is_down_stops_healing_but_not_forwarding() {
    let s = Setup::new(CHAT, Profile::V14, true, &[]).await;
    s.bed.pg.stop().await;
    let r = s.bed.http.get(&s.url("/chat_messages")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(matches!(r.code().as_deref(), Some("PGRST000") | Some("PGRST001") | Some("57P01")), "{}", r.text());
    s.bed.pg.start_again().await;
    assert!(
        support::client::eventually(Duration::from_secs(15), || async { s.guard.notifier.is_connected() }).await,
        "NOTIFY connection comes back"
    );
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"back","artifact_ids":["z"]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
}

#[tokio::test]
async fn a_guard_without_its_database_still_forwards() {
    let bed = TestBed::start(CHAT).await;
    let guard = start_guard_without_waiting(&bed.double.url(), "postgres://postgres@127.0.0.1:1/postgres", &[]).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = bed.http.get(&format!("{}/chat_messages", guard.url())).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = bed
        .http
        .send(Method::POST, &format!("{}/chat_messages", guard.url()), &[], r#"{"content":"a","artifact_ids":[]}"#)
        .await;
    assert_eq!(r.code().as_deref(), Some("PGRST204"), "cannot heal without the database, but answers at once");
}
