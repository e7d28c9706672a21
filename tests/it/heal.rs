//! Healing through pgrst-guard, against the real PostgREST of every family and a real PostgreSQL:
//! what the client sees, and what the database holds. A test says where families differ.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use crate::support;
use crate::support::guard::{start_guard, start_guard_without_waiting, NotifyCounter};
use crate::support::postgrest::Family;
use crate::support::RealBed;

const CHAT: &str = "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL);";

struct Setup {
    bed: RealBed,
    guard: pgrst_guard::RunningGuard,
    notifies: NotifyCounter,
}

impl Setup {
    /// A real PostgREST of `family` with a guard in front; `with_admin` gives the guard its admin URL
    /// (v11 has an admin server without /metrics: the guard must fall back to back-off).
    async fn new(family: Family, sql: &str, with_admin: bool, extra: &[(&str, &str)]) -> Setup {
        let bed = RealBed::start(family, sql).await;
        let admin = bed.postgrest.admin_url();
        let mut keys: Vec<(&str, &str)> = extra.to_vec();
        if with_admin {
            keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", &admin));
        }
        let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
        let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
        Setup { bed, guard, notifies }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.guard.url(), path)
    }

    async fn scalar(&self, sql: &str) -> i64 {
        self.bed.scalar(sql).await
    }
}

async fn artifact_ids_case(family: Family, with_admin: bool) {
    let s = Setup::new(family, CHAT, with_admin, &[]).await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[] DEFAULT '{}'").await;

    // What PostgREST alone says: its cache is stale.
    let direct = s.bed.http.post_json(&s.bed.url("/chat_messages"), r#"{"content":"direct","artifact_ids":[]}"#).await;
    assert_eq!((direct.status, direct.code().as_deref()), (StatusCode::BAD_REQUEST, Some("PGRST204")));
    assert_eq!(direct.header("proxy-status").is_some(), family.has_proxy_status());

    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"hi","artifact_ids":["a1","a2"]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    let client = s.bed.pg.connect("postgres").await;
    let rows = client.query("SELECT artifact_ids FROM chat_messages", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "stored exactly once");
    assert_eq!(rows[0].get::<_, Vec<String>>(0), vec!["a1", "a2"]);
    assert_eq!(s.notifies.settled().await, 1);

    // Healthy requests are not touched.
    let r = s.bed.http.get(&s.url("/chat_messages?select=content")).await;
    assert_eq!((r.status, r.json()), (StatusCode::OK, json!([{"content":"hi"}])));
    assert_eq!(r.header("x-pgrst-guard"), None);
}

family_matrix!(new_column_heals_with_the_admin_url, |family| artifact_ids_case(family, true));
family_matrix!(new_column_heals_without_the_admin_url, |family| artifact_ids_case(family, false));

#[tokio::test]
async fn a_heal_shows_in_the_guards_metrics() {
    let s = Setup::new(Family::V14, CHAT, true, &[]).await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"hi","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let metrics = s.guard.render_metrics();
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

family_matrix!(new_table_heals_reads_and_writes, |family: Family| async move {
    let s = Setup::new(family, CHAT, true, &[]).await;
    s.bed.pg.sql("CREATE TABLE artifacts (id int PRIMARY KEY, label text)").await;
    // Before v13 a write to an uncached table is a bare `404 {}`; from v13 on it is PGRST205.
    let direct = s.bed.http.post_json(&s.bed.url("/artifacts"), r#"{"id":0,"label":"direct"}"#).await;
    assert_eq!(direct.status, StatusCode::NOT_FOUND);
    if family.has_proxy_status() {
        assert_eq!(direct.code().as_deref(), Some("PGRST205"));
    } else {
        assert_eq!(direct.text(), "{}");
    }
    let r = s.bed.http.post_json(&s.url("/artifacts"), r#"{"id":1,"label":"x"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(s.scalar("SELECT count(*) FROM artifacts").await, 1);

    // A read of a new table: from v13 on PGRST205 and a heal; before, PostgREST asks the database
    // and the read simply works.
    s.bed.pg.sql("CREATE TABLE artifact_tags (tag text)").await;
    let r = s.bed.http.get(&s.url("/artifact_tags")).await;
    assert_eq!((r.status, r.json()), (StatusCode::OK, json!([])));
    let expected_notifies = if family.has_proxy_status() { 2 } else { 1 };
    assert_eq!(s.notifies.settled().await, expected_notifies);
});

family_matrix!(new_function_heals, |family| async move {
    let s = Setup::new(family, CHAT, true, &[]).await;
    s.bed.pg.sql("CREATE FUNCTION word_count(t text) RETURNS int LANGUAGE sql IMMUTABLE AS $$SELECT array_length(regexp_split_to_array(t, '\\s+'), 1)$$").await;
    let r = s.bed.http.post_json(&s.url("/rpc/word_count"), r#"{"t":"one two three"}"#).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "3".to_string()));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
});

family_matrix!(new_foreign_key_embed_heals, |family| async move {
    let s = Setup::new(
        family,
        &format!("{CHAT} CREATE TABLE projects (id int PRIMARY KEY, name text); INSERT INTO projects VALUES (1, 'p');"),
        true,
        &[],
    )
    .await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN project_id int REFERENCES projects(id); INSERT INTO chat_messages (content, project_id) VALUES ('m', 1);").await;
    let r = s.bed.http.get(&s.url("/chat_messages?select=content,projects(name)")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!([{"content":"m","projects":{"name":"p"}}]));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));

    // Two keys to one table: only a `!hint` (here a key's column) tells them apart, and the
    // catalog check resolves it as PostgREST does.
    s.bed.pg.sql("CREATE TABLE users (id int PRIMARY KEY, name text); INSERT INTO users VALUES (7, 'ada'), (8, 'bob');
                  ALTER TABLE chat_messages ADD COLUMN author_id int REFERENCES users(id), ADD COLUMN editor_id int REFERENCES users(id);
                  UPDATE chat_messages SET author_id = 7, editor_id = 8;").await;
    let notifies_before = s.notifies.settled().await;
    let r = s.bed.http.get(&s.url("/chat_messages?select=content,author:users!author_id(name)")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!([{"content":"m","author":{"name":"ada"}}]));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    let r =
        s.bed.http.get(&s.url("/chat_messages?select=content,editor:users!chat_messages_editor_id_fkey(name)")).await;
    assert_eq!(r.json(), json!([{"content":"m","editor":{"name":"bob"}}]));
    assert_eq!(s.notifies.settled().await, notifies_before + 1);
});

family_matrix!(concurrent_failures_share_one_notify_and_store_each_row_once, |family| async move {
    let s = Arc::new(Setup::new(family, CHAT, true, &[]).await);
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let mut tasks = Vec::new();
    for i in 0..300 {
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
    assert_eq!(s.notifies.settled().await, 1, "one reload for all");
    assert_eq!(s.scalar("SELECT count(*) FROM chat_messages").await, 300);
    assert_eq!(s.scalar("SELECT count(DISTINCT content) FROM chat_messages").await, 300);
    assert_eq!(
        s.scalar("SELECT count(*) FROM chat_messages WHERE artifact_ids = ARRAY['a' || substr(content, 2)]").await,
        300
    );
});

family_matrix!(a_body_over_the_replay_cap_passes_its_error_through, |family| async move {
    let s = Setup::new(family, CHAT, true, &[("PGRST_GUARD_REPLAY_BODY_LIMIT", "64")]).await;
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let long = "x".repeat(200);
    let r =
        s.bed.http.post_json(&s.url("/chat_messages"), &format!(r#"{{"content":"{long}","artifact_ids":[]}}"#)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code().as_deref(), Some("PGRST204"));
    assert_eq!(r.header("x-pgrst-guard"), None);
    assert_eq!(s.notifies.settled().await, 0);
    // A small body still heals.
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"s","artifact_ids":[]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);
});

family_matrix!(a_column_that_does_not_exist_gets_postgrests_own_answer_at_once, |family| async move {
    let s = Setup::new(family, CHAT, true, &[]).await;
    let body = r#"{"content":"x","nope":1}"#;
    let direct = s.bed.http.post_json(&s.bed.url("/chat_messages"), body).await;
    let started = Instant::now();
    let r = s.bed.http.post_json(&s.url("/chat_messages"), body).await;
    assert!(started.elapsed() < Duration::from_secs(1), "no wait for a client's own mistake");
    assert_eq!((r.status, r.text()), (direct.status, direct.text()));
    assert_eq!(r.header("proxy-status"), direct.header("proxy-status"));
    assert_eq!(r.header("x-pgrst-guard"), None);
    assert_eq!(s.scalar("SELECT count(*) FROM chat_messages").await, 0);
    assert_eq!(s.notifies.settled().await, 0);
});

family_matrix!(ambiguity_and_database_errors_pass_through_untouched, |family| async move {
    let s = Setup::new(
        family,
        "CREATE TABLE people (id int PRIMARY KEY);
         CREATE TABLE letters (id int PRIMARY KEY, sender int REFERENCES people(id), receiver int REFERENCES people(id));
         CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql AS 'SELECT a'; CREATE FUNCTION f(a text) RETURNS int LANGUAGE sql AS 'SELECT 1';
         INSERT INTO people VALUES (1);",
        true,
        &[],
    )
    .await;
    for (method, path, body) in [
        (Method::GET, "/letters?select=*,people(*)", ""),
        (Method::POST, "/rpc/f", r#"{"a":1}"#),
        (Method::POST, "/people", r#"{"id":1}"#),
    ] {
        let headers = [("content-type", "application/json")];
        let direct = s.bed.http.send(method.clone(), &s.bed.url(path), &headers, body.to_string()).await;
        let r = s.bed.http.send(method, &s.url(path), &headers, body.to_string()).await;
        assert_eq!((r.status, r.text()), (direct.status, direct.text()), "{path}");
        assert_eq!(r.header("x-pgrst-guard"), None);
    }
    let r = s.bed.http.post_json(&s.url("/people"), r#"{"id":1}"#).await;
    assert_eq!((r.status, r.code().as_deref()), (StatusCode::CONFLICT, Some("23505")));
    assert_eq!(s.notifies.settled().await, 0);
});

family_matrix!(a_database_that_is_down_stops_healing_but_not_forwarding, |family| async move {
    let s = Setup::new(family, CHAT, true, &[]).await;
    s.bed.pg.stop().await;
    let r = s.bed.http.get(&s.url("/chat_messages")).await;
    let direct = s.bed.http.get(&s.bed.url("/chat_messages")).await;
    assert_eq!(r.status, direct.status, "{}", r.text());
    assert!(r.status.is_server_error(), "{}", r.text());
    s.bed.pg.start_again().await;
    assert!(
        support::client::eventually(Duration::from_secs(15), || async { s.guard.database.is_connected() }).await,
        "NOTIFY connection comes back"
    );
    assert!(s.bed.postgrest.wait_ready(Duration::from_secs(40)).await, "PostgREST reconnects");
    s.bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = s.bed.http.post_json(&s.url("/chat_messages"), r#"{"content":"back","artifact_ids":["z"]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
});

family_matrix!(a_guard_without_its_database_still_forwards, |family| async move {
    let bed = RealBed::start(family, CHAT).await;
    let guard =
        start_guard_without_waiting(&bed.postgrest.url(), "postgres://postgres@127.0.0.1:1/postgres", &[]).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[]").await;
    let r = bed.http.get(&format!("{}/chat_messages", guard.url())).await;
    assert_eq!(r.status, StatusCode::OK);
    let started = Instant::now();
    let r = bed
        .http
        .send(
            Method::POST,
            &format!("{}/chat_messages", guard.url()),
            &[("content-type", "application/json")],
            r#"{"content":"a","artifact_ids":[]}"#,
        )
        .await;
    assert_eq!(r.code().as_deref(), Some("PGRST204"), "cannot heal without the database");
    assert!(started.elapsed() < Duration::from_secs(1), "but answers at once");
});

// A reload that fails (here: it waits on a lock longer than the role's lock_timeout, as Supabase's
// 8 s on `authenticator`) leaves PostgREST v11–v14 with no cache: 503 PGRST002 for everyone until its
// retry, a second later, succeeds. The guard waits it out and replays. v16 keeps its old cache.
family_matrix!(an_empty_cache_is_waited_out, |family: Family| async move {
    let s = Setup::new(
        family,
        &format!("{CHAT} {} ALTER ROLE authenticator SET lock_timeout = '300ms';", support::RELOAD_BLOCKER_SQL),
        true,
        &[],
    )
    .await;
    let blocker = support::ReloadBlocker::hold(&s.bed.pg).await;
    s.bed.pg.sql("NOTIFY pgrst, 'reload schema'").await;
    if family < Family::V16 {
        let empty = support::client::eventually(Duration::from_secs(10), || async {
            s.bed.http.get(&s.bed.url("/chat_messages")).await.code().as_deref() == Some("PGRST002")
        })
        .await;
        assert!(empty, "the premise: PostgREST's cache is empty after a failed reload");
    }
    let answered_before = upstream_answers(&s.guard);
    let waiting = {
        let (http, url) = (s.bed.http.clone(), s.url("/chat_messages"));
        tokio::spawn(async move { http.get(&url).await })
    };
    assert!(
        support::client::eventually(Duration::from_secs(5), || async { upstream_answers(&s.guard) > answered_before })
            .await
    );
    blocker.release().await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    if family < Family::V16 {
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    }
    assert_eq!(s.notifies.settled().await, 1, "only the test's own NOTIFY");
});

fn upstream_answers(guard: &pgrst_guard::RunningGuard) -> u64 {
    let metrics = guard.render_metrics();
    metrics
        .lines()
        .find(|l| l.starts_with("pgrst_guard_upstream_latency_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

family_matrix!(functions_resolve_as_postgrest_resolves_them, |family| async move {
    let s = Setup::new(family, CHAT, true, &[]).await;
    s.bed.pg.sql(
        "CREATE FUNCTION greet(name text, greeting text DEFAULT 'hello') RETURNS text LANGUAGE sql AS $$SELECT greeting || ' ' || name$$;
         CREATE FUNCTION echo_body(jsonb) RETURNS jsonb LANGUAGE sql AS $$SELECT $1$$;",
    )
    .await;
    // A defaulted argument may be left out; a single unnamed jsonb argument takes the whole body.
    let r = s.bed.http.post_json(&s.url("/rpc/greet"), r#"{"name":"ann"}"#).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, r#""hello ann""#.to_string()));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    let r = s.bed.http.post_json(&s.url("/rpc/echo_body"), r#"{"any":"keys"}"#).await;
    assert_eq!((r.status, r.json()), (StatusCode::OK, json!({"any":"keys"})));
    let notifies = s.notifies.settled().await;
    // Arguments no overload has, or a required one left out: the client's mistake, no reload.
    for body in [r#"{"name":"ann","shout":true}"#, r#"{"greeting":"hi"}"#] {
        let r = s.bed.http.post_json(&s.url("/rpc/greet"), body).await;
        assert_eq!((r.status, r.code().as_deref()), (StatusCode::NOT_FOUND, Some("PGRST202")), "{body}");
        assert_eq!(r.header("x-pgrst-guard"), None);
    }
    assert_eq!(s.notifies.settled().await, notifies, "no reload for a call no function takes");
});
