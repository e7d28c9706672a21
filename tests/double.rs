//! The PostgREST double against a real PostgreSQL: stale caches, reload triggers, debounce,
//! failing loads, restarts, error shapes and the version profiles.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use support::client::eventually;
use support::double::Profile;
use support::TestBed;

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
async fn reads_writes_filters_embeds_and_rpc_behave_like_postgrest() {
    let bed = TestBed::start(
        "CREATE TABLE authors (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE books (id serial PRIMARY KEY, title text NOT NULL, author_id int REFERENCES authors(id), pages int DEFAULT 100);
         INSERT INTO authors VALUES (1, 'Ann'), (2, 'Bob');
         INSERT INTO books (title, author_id, pages) VALUES ('A', 1, 10), ('B', 1, 20), ('C', 2, 30);
         CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';
         CREATE FUNCTION books_of(author int) RETURNS SETOF books LANGUAGE sql STABLE AS 'SELECT * FROM books WHERE author_id = author ORDER BY id';",
    )
    .await;
    let http = &bed.http;

    let r = http.get(&bed.url("/books?select=title,pages&pages=gte.20&order=pages.desc")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([{"title":"C","pages":30},{"title":"B","pages":20}]));
    assert_eq!(r.header("content-range"), Some("0-1/*"));

    let r = http.get(&bed.url("/books?select=title,author:authors(name)&id=in.(1,3)&order=id")).await;
    assert_eq!(r.json(), json!([{"title":"A","author":{"name":"Ann"}},{"title":"C","author":{"name":"Bob"}}]));

    let r = http.get(&bed.url("/authors?select=name,books(title)&id=eq.2")).await;
    assert_eq!(r.json(), json!([{"name":"Bob","books":[{"title":"C"}]}]));

    let r = http.get(&bed.url("/books?select=id&limit=1&offset=1&order=id")).await;
    assert_eq!(r.json(), json!([{"id":2}]));
    assert_eq!(r.header("content-range"), Some("1-1/*"));

    let r = http.get(&bed.url("/books?author_id=is.null")).await;
    assert_eq!(r.json(), json!([]));
    assert_eq!(r.header("content-range"), Some("*/*"));

    let r = http
        .send(
            Method::POST,
            &bed.url("/books?select=title,pages"),
            &[("prefer", "return=representation,missing=default"), ("content-type", "application/json")],
            r#"[{"title":"D","author_id":2}]"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json(), json!([{"title":"D","pages":100}]));

    let r = http
        .send(
            Method::POST,
            &bed.url("/authors"),
            &[("prefer", "resolution=merge-duplicates,return=representation")],
            r#"{"id":1,"name":"Anna"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json(), json!([{"id":1,"name":"Anna"}]));

    let r = http.send(Method::POST, &bed.url("/authors"), &[], r#"{"id":1,"name":"Dup"}"#).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code().as_deref(), Some("23505"));

    let r = http.send(Method::PATCH, &bed.url("/books?title=eq.A"), &[], r#"{"pages":11}"#).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = http.send(Method::DELETE, &bed.url("/books?title=eq.B"), &[("prefer", "return=representation")], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()[0]["title"], "B");
    let r = http.get(&bed.url("/books?select=title,pages&order=id")).await;
    assert_eq!(r.json(), json!([{"title":"A","pages":11},{"title":"C","pages":30},{"title":"D","pages":100}]));

    let r = http.post_json(&bed.url("/rpc/add"), r#"{"a":2,"b":3}"#).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "5".to_string()));
    let r = http.get(&bed.url("/rpc/add?a=4&b=5")).await;
    assert_eq!(r.text(), "9");
    let r = http.get(&bed.url("/rpc/books_of?author=2")).await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);

    let r = http.send(Method::HEAD, &bed.url("/books"), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());

    let r = http
        .send(Method::GET, &bed.url("/books?id=eq.1"), &[("accept", "application/vnd.pgrst.object+json")], "")
        .await;
    assert_eq!(r.json()["title"], "A");
    let r = http.send(Method::GET, &bed.url("/books"), &[("accept", "application/vnd.pgrst.object+json")], "").await;
    assert_eq!(r.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(r.code().as_deref(), Some("PGRST116"));
}

#[tokio::test]
async fn schema_cache_errors_have_postgrest_shapes() {
    let bed = TestBed::start(&format!("{CHAT} CREATE TABLE projects (id int PRIMARY KEY); CREATE FUNCTION ping() RETURNS text LANGUAGE sql AS $$SELECT 'pong'$$;")).await;
    bed.pg
        .sql(
            "CREATE TABLE artifacts (id int PRIMARY KEY, message_id bigint REFERENCES chat_messages(id));
              CREATE FUNCTION summarize(message_id bigint) RETURNS text LANGUAGE sql AS $$SELECT 'x'$$;",
        )
        .await;

    let r = bed.http.get(&bed.url("/artifacts")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text(),
        r#"{"code":"PGRST205","details":null,"hint":null,"message":"Could not find the table 'public.artifacts' in the schema cache"}"#
    );

    let r = bed.http.get(&bed.url("/chat_messagez")).await;
    assert_eq!(r.json()["hint"], "Perhaps you meant the table 'public.chat_messages'");

    let r = bed.http.post_json(&bed.url("/rpc/summarize"), r#"{"message_id":1}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text(),
        r#"{"code":"PGRST202","details":"Searched for the function public.summarize with parameter message_id or with a single unnamed json/jsonb parameter, but no matches were found in the schema cache.","hint":null,"message":"Could not find the function public.summarize(message_id) in the schema cache"}"#
    );

    let r = bed.http.get(&bed.url("/chat_messages?select=*,projects(*)")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code().as_deref(), Some("PGRST200"));
    assert_eq!(
        r.json()["message"],
        "Could not find a relationship between 'chat_messages' and 'projects' in the schema cache"
    );
    assert_eq!(
        r.json()["details"],
        "Searched for a foreign key relationship between 'chat_messages' and 'projects' in the schema 'public', but no matches were found."
    );

    let r = bed.http.send(Method::GET, &bed.url("/chat_messages"), &[("accept-profile", "private")], "").await;
    assert_eq!(r.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(r.json()["hint"], "Only the following schemas are exposed: public");

    bed.notify_and_wait_reload().await;
    assert_eq!(bed.http.get(&bed.url("/artifacts")).await.status, StatusCode::OK);
    let r = bed.http.post_json(&bed.url("/rpc/summarize"), r#"{"message_id":1}"#).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, r#""x""#.to_string()));
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
async fn notify_payloads_and_channel_case_are_respected() {
    let bed = TestBed::start(CHAT).await;
    let loads = bed.double.successful_loads();
    for ignored in [
        "NOTIFY pgrst, 'reload config'",
        "NOTIFY pgrst, 'Reload Schema'",
        "NOTIFY \"PGRST\", 'reload schema'",
        "NOTIFY other, ''",
    ] {
        bed.pg.sql(ignored).await;
    }
    bed.pg.sql("NOTIFY pgrst").await;
    assert!(eventually(Duration::from_secs(5), || async { bed.double.successful_loads() == loads + 1 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bed.double.successful_loads(), loads + 1, "only the empty payload reloads");
}

#[tokio::test]
async fn a_burst_of_notifies_collapses_into_two_loads() {
    let bed = TestBed::start_with(CHAT, |o| o.load_delay(Duration::from_millis(300))).await;
    let client = bed.pg.connect("postgres").await;
    // Let the start-up load's 100 ms cool-down pass, so the burst meets an idle loader.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loads = bed.double.successful_loads();
    for _ in 0..10 {
        client.batch_execute("NOTIFY pgrst, 'reload schema'").await.unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || async { bed.double.successful_loads() >= loads + 2 }).await);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(bed.double.successful_loads(), loads + 2, "leading-edge load plus exactly one collapsed load");
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
async fn v11_0_drops_a_notify_that_arrives_during_a_load() {
    let bed = TestBed::start_with(CHAT, |o| o.load_delay(Duration::from_millis(600)).profile(Profile::V11_0)).await;
    let loads = bed.double.successful_loads();
    bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]; NOTIFY pgrst, 'reload schema';").await;
    assert!(eventually(Duration::from_secs(5), || async { bed.double.successful_loads() == loads + 1 }).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(bed.double.successful_loads(), loads + 1);
    let r = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"a","artifact_ids":[]}"#).await;
    assert_eq!(r.code().as_deref(), Some("PGRST204"));
    assert_eq!(r.json()["message"], "Column 'artifact_ids' of relation 'chat_messages' does not exist");
    assert_eq!(r.header("proxy-status"), None);
    assert_eq!(r.header("server"), Some("postgrest/11.0.1"));
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

#[tokio::test]
async fn after_a_database_restart_it_listens_again_and_reloads() {
    let bed = TestBed::start(CHAT).await;
    let loads = bed.double.successful_loads();
    bed.pg.restart().await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            bed.double.is_listening() && bed.double.successful_loads() > loads
        })
        .await,
        "re-LISTEN and reload after the restart"
    );
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    bed.notify_and_wait_reload().await;
    let r = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"a","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
}

#[tokio::test]
async fn v13_profile_differs_only_where_postgrest_13_does() {
    let bed = TestBed::start_with(CHAT, |o| o.profile(Profile::V13)).await;
    let r = bed.http.get(&bed.url("/nothing_here")).await;
    assert_eq!(r.code().as_deref(), Some("PGRST205"));
    assert_eq!(r.header("server"), Some("postgrest/13.0.8"));
    assert_eq!(r.header("proxy-status"), Some("PostgREST; error=PGRST205"));
}

#[tokio::test]
async fn v12_2_profile_has_no_pgrst205_and_no_proxy_status() {
    let bed = TestBed::start_with(CHAT, |o| o.profile(Profile::V12_2)).await;
    bed.pg.sql("CREATE TABLE fresh (id int); INSERT INTO fresh VALUES (7);").await;
    let read = bed.http.get(&bed.url("/fresh")).await;
    assert_eq!((read.status, read.json()), (StatusCode::OK, json!([{"id":7}])), "reads go to the database");
    let write = bed.http.post_json(&bed.url("/fresh"), r#"{"id":8}"#).await;
    assert_eq!((write.status, write.text()), (StatusCode::NOT_FOUND, "{}".to_string()));
    let missing = bed.http.get(&bed.url("/nothing_here")).await;
    assert_eq!(missing.code().as_deref(), Some("42P01"));
    assert_eq!(missing.header("proxy-status"), None);
    assert_eq!(missing.header("server"), Some("postgrest/12.2.12"));
    assert_eq!(bed.http.get(&format!("{}/metrics", bed.double.admin_url())).await.status, StatusCode::OK);
}

#[tokio::test]
async fn v12_0_profile_has_no_metrics() {
    let bed = TestBed::start_with(CHAT, |o| o.profile(Profile::V12_0)).await;
    assert_eq!(bed.http.get(&format!("{}/metrics", bed.double.admin_url())).await.status, StatusCode::NOT_FOUND);
    assert_eq!(bed.http.get(&format!("{}/ready", bed.double.admin_url())).await.status, StatusCode::OK);
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = bed.http.post_json(&bed.url("/chat_messages"), r#"{"content":"a","artifact_ids":[]}"#).await;
    assert_eq!(r.json()["message"], "Column 'artifact_ids' of relation 'chat_messages' does not exist");
}

#[tokio::test]
async fn cors_preflight_is_answered() {
    let bed = TestBed::start(CHAT).await;
    let r = bed
        .http
        .send(
            Method::OPTIONS,
            &bed.url("/chat_messages"),
            &[
                ("origin", "http://app.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "apikey, content-type"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r.header("access-control-allow-headers").unwrap().contains("apikey"));
}
