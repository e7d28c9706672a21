//! No reload a client can force, against the real PostgREST of every family: objects that exist in
//! the catalog but that PostgREST never caches cost no NOTIFY; whatever the guard's model of
//! PostgREST's cache misses costs one NOTIFY per object and catalog change, never more; the request
//! checked is the one PostgREST received; and a flood of bogus names cannot delay a real heal.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use crate::support::client::HttpClient;
use crate::support::guard::metric;
use crate::support::guard::start_guard;
use crate::support::postgrest::Family;
use crate::support::RealBed;

/// Objects that exist in the catalog but that no PostgREST family caches, and what a client may
/// send that names them.
const NEVER_CACHED: &str = "
    CREATE TABLE target (id int PRIMARY KEY, name text);
    -- Supabase's starter template: a trigger function in the exposed schema.
    CREATE FUNCTION handle_new_user() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
    CREATE PROCEDURE do_thing(a int) LANGUAGE sql AS $$ SELECT 1 $$;
    CREATE FUNCTION two_unnamed(int, int) RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
    CREATE AGGREGATE my_sum(int) (sfunc = int4pl, stype = int);
    CREATE TABLE events (id int, at date NOT NULL) PARTITION BY RANGE (at);
    CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    -- A junction whose key columns are not in its primary key: no many-to-many.
    CREATE TABLE lefts (id int PRIMARY KEY);
    CREATE TABLE rights (id int PRIMARY KEY);
    CREATE TABLE lefts_rights (id serial PRIMARY KEY, left_id int REFERENCES lefts, right_id int REFERENCES rights);
    -- A self-referencing one-to-one key: never embeddable.
    CREATE TABLE nodes (id int PRIMARY KEY, twin_id int UNIQUE REFERENCES nodes (id));
    -- The same table name in two schemas, the other one having the column.
    CREATE TABLE users (id int PRIMARY KEY, name text);
    CREATE SCHEMA auth;
    CREATE TABLE auth.users (id int PRIMARY KEY, email text);";

struct Probe {
    method: Method,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

fn probes() -> Vec<Probe> {
    let probe = |method, path, headers, body| Probe { method, path, headers, body };
    vec![
        probe(Method::POST, "/rpc/handle_new_user", JSON, "{}"),
        probe(Method::POST, "/rpc/do_thing", JSON, r#"{"a":1}"#),
        probe(Method::POST, "/rpc/two_unnamed", JSON, "{}"),
        probe(Method::POST, "/rpc/my_sum", JSON, "{}"),
        probe(Method::GET, "/events_2026", &[], ""),
        probe(Method::POST, "/events_2026", JSON, r#"{"id":1,"at":"2026-05-01"}"#),
        probe(Method::GET, "/lefts?select=*,rights(*)", &[], ""),
        probe(Method::GET, "/nodes?select=*,twin_id(*)", &[], ""),
        probe(Method::HEAD, "/target?select=*,no_such_thing(*)", &[], ""),
        probe(Method::POST, "/target", JSON, r#"{"id":1,"ctid":"(0,1)"}"#),
        // PostgREST never receives a header the request's Connection names: it looks in public.
        probe(
            Method::POST,
            "/users",
            &[("content-type", "application/json"), ("content-profile", "auth"), ("connection", "content-profile")],
            r#"{"email":"x"}"#,
        ),
    ]
}

/// Sends `probe` from `clients` clients for `span`; returns how many answers differed from `expected`.
async fn flood(url: String, probe: &Probe, expected: StatusCode, clients: usize, span: Duration) -> (usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, wrong) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, stop, sent, wrong) =
            (HttpClient::new(), url.clone(), stop.clone(), sent.clone(), wrong.clone());
        let (method, headers, body) = (probe.method.clone(), probe.headers, probe.body);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let r = http.send(method.clone(), &url, headers, body).await;
                sent.fetch_add(1, Ordering::AcqRel);
                if r.status != expected {
                    wrong.fetch_add(1, Ordering::AcqRel);
                }
            }
        }));
    }
    tokio::time::sleep(span).await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.unwrap();
    }
    (sent.load(Ordering::Acquire), wrong.load(Ordering::Acquire))
}

family_matrix!(objects_postgrest_never_caches_cost_no_notify, |family: Family| async move {
    let bed = RealBed::start(family, NEVER_CACHED).await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[]).await;
    let notifies = bed.notify_counter().await;
    for probe in probes() {
        // PostgREST alone, sent what the guard forwards: no header the request's Connection names.
        let forwarded: Vec<(&str, &str)> = probe
            .headers
            .iter()
            .filter(|(name, _)| {
                *name != "connection" && !probe.headers.iter().any(|(n, v)| *n == "connection" && v.contains(name))
            })
            .copied()
            .collect();
        let direct = bed.http.send(probe.method.clone(), &bed.url(probe.path), &forwarded, probe.body).await;
        let through = bed
            .http
            .send(probe.method.clone(), &format!("{}{}", guard.url(), probe.path), probe.headers, probe.body)
            .await;
        assert_eq!((through.status, through.text()), (direct.status, direct.text()), "{} {}", probe.method, probe.path);
        let (sent, wrong) =
            flood(format!("{}{}", guard.url(), probe.path), &probe, direct.status, 8, Duration::from_millis(600)).await;
        assert_eq!(wrong, 0, "{} {}: {wrong} of {sent} answers differ from PostgREST's own", probe.method, probe.path);
        let sent_so_far = notifies.settled().await;
        println!("{family:?} {} {}: {sent} requests, {} {}", probe.method, probe.path, direct.status, sent_so_far);
        assert_eq!(sent_so_far, 0, "{} {} made the guard reload", probe.method, probe.path);
    }
    let metrics = guard.render_metrics();
    assert_eq!(metric(&metrics, "pgrst_guard_notifies_sent_total"), 0, "{metrics}");
    for outcome in ["gave_up", "healed", "uncurable"] {
        assert!(
            !metrics
                .lines()
                .any(|l| l.starts_with("pgrst_guard_heals_total") && l.contains(&format!("outcome=\"{outcome}\""))),
            "no request waited for a reload ({outcome}):\n{metrics}"
        );
    }
});

/// A view without its base table's key: PostgREST infers no relationship through it, while the
/// guard's model (every relation a view depends on) believes one. The guard learns from the first
/// reload that did not cure: one NOTIFY for a flood, none more until the view changes.
const VIEW_WITHOUT_KEY: &str = "
    CREATE TABLE projects (id int PRIMARY KEY, name text);
    CREATE TABLE chat_messages (id int PRIMARY KEY, content text, project_id int REFERENCES projects (id));
    CREATE VIEW project_names AS SELECT name FROM projects;
    INSERT INTO projects VALUES (1, 'p'); INSERT INTO chat_messages VALUES (1, 'm', 1);";

family_matrix!(a_reload_that_did_not_cure_is_not_repeated_until_the_object_changes, |family: Family| async move {
    let bed = RealBed::start(family, VIEW_WITHOUT_KEY).await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[]).await;
    let notifies = bed.notify_counter().await;
    let path = "/chat_messages?select=content,project_names(name)";
    let direct = bed.http.get(&bed.url(path)).await;
    assert_eq!(direct.code().as_deref(), Some("PGRST200"), "{}", direct.text());
    let probe = Probe { method: Method::GET, path, headers: &[], body: "" };
    let (sent, wrong) = flood(format!("{}{path}", guard.url()), &probe, direct.status, 8, Duration::from_secs(3)).await;
    assert_eq!(wrong, 0);
    let after_flood = notifies.settled().await;
    let metrics = guard.render_metrics();
    println!(
        "{family:?}: {sent} requests in 3 s, {after_flood} NOTIFY\n{}",
        metrics.lines().filter(|l| l.starts_with("pgrst_guard_heals_total")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(after_flood, 1, "one reload to learn that it does not cure");
    assert!(metric(&metrics, "pgrst_guard_heals_total{code=\"PGRST200\",outcome=\"healed\"}") == 0, "{metrics}");
    // Once learned, the error passes through at once, counted as uncurable.
    let r = bed.http.get(&format!("{}{path}", guard.url())).await;
    assert_eq!((r.status, r.text()), (direct.status, direct.text()));
    let metrics = guard.render_metrics();
    if family.has_load_metrics() {
        assert!(metric(&metrics, "pgrst_guard_heals_total{code=\"PGRST200\",outcome=\"uncurable\"}") > 0, "{metrics}");
    } else {
        // No load counter: the reload's end cannot be seen, so the object is doubted (no NOTIFY,
        // two back-off replays), never marked uncurable on a timeout.
        assert!(metric(&metrics, "pgrst_guard_catalog_checks_total{result=\"doubted\"}") > 0, "{metrics}");
    }

    // The view changes: now it carries the key, and the same embed heals with one more NOTIFY.
    bed.pg.sql("CREATE OR REPLACE VIEW project_names AS SELECT name, id FROM projects").await;
    let r = bed.http.get(&format!("{}{path}", guard.url())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!([{"content":"m","project_names":{"name":"p"}}]));
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(notifies.settled().await, 2);
});

family_matrix!(percent_encoded_names_heal, |family: Family| async move {
    let bed = RealBed::start(family, "").await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    // One migration each: every request meets a stale cache.
    for (migration, path, body, success) in [
        (
            "CREATE TABLE \"my table\" (id int PRIMARY KEY, label text)",
            "/my%20table",
            r#"{"id":1,"label":"x"}"#,
            StatusCode::CREATED,
        ),
        ("CREATE TABLE \"täble\" (id int PRIMARY KEY)", "/t%C3%A4ble", r#"{"id":1}"#, StatusCode::CREATED),
        (
            "CREATE FUNCTION \"say hi\"(\"to whom\" text) RETURNS text LANGUAGE sql AS $$ SELECT 'hi ' || $1 $$",
            "/rpc/say%20hi",
            r#"{"to whom":"ann"}"#,
            StatusCode::OK,
        ),
    ] {
        bed.pg.sql(migration).await;
        let r = bed.http.post_json(&format!("{}{path}", guard.url()), body).await;
        assert_eq!(r.status, success, "{path}: {}", r.text());
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"), "{path}");
    }
    assert_eq!(bed.scalar("SELECT count(*) FROM \"my table\"").await, 1);
    assert_eq!(bed.scalar("SELECT count(*) FROM \"täble\"").await, 1);
});

family_matrix!(a_csv_insert_naming_the_new_column_heals, |family: Family| async move {
    let bed = RealBed::start(family, "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);").await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let csv = [("content-type", "text/csv")];
    let body = "content,artifact_ids\nhi,\"{a1,a2}\"\n";
    let direct = bed.http.send(Method::POST, &bed.url("/chat_messages"), &csv, body).await;
    assert_eq!(direct.status, StatusCode::BAD_REQUEST, "the premise: {}", direct.text());
    let r = bed.http.send(Method::POST, &format!("{}/chat_messages", guard.url()), &csv, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(bed.scalar("SELECT count(*) FROM chat_messages WHERE artifact_ids = '{a1,a2}'").await, 1);
});

/// Distinct bogus column names from many clients while a real migration lands: the catalog answers
/// every queued name in one batch per interval, so the real heal does not queue behind them.
#[tokio::test]
async fn a_flood_of_bogus_names_does_not_delay_a_real_heal() {
    let bed = RealBed::start(Family::V14, "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text);").await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[]).await;
    let notifies = bed.notify_counter().await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for client in 0..64 {
        let (http, url, stop, sent) =
            (HttpClient::new(), format!("{}/chat_messages", guard.url()), stop.clone(), sent.clone());
        flooders.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let r = http.post_json(&url, &format!(r#"{{"content":"x","bogus_{client}_{n}":1}}"#)).await;
                assert_eq!(r.code().as_deref(), Some("PGRST204"));
                sent.fetch_add(1, Ordering::AcqRel);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids text[]").await;
    let started = Instant::now();
    let r = bed
        .http
        .post_json(&format!("{}/chat_messages", guard.url()), r#"{"content":"real","artifact_ids":["a"]}"#)
        .await;
    let took = started.elapsed();
    stop.store(true, Ordering::Release);
    for flooder in flooders {
        flooder.await.unwrap();
    }
    let metrics = guard.render_metrics();
    println!(
        "real heal after {took:?} during a flood of {} distinct bogus names; {} catalog answers of its own",
        sent.load(Ordering::Acquire),
        metric(&metrics, "pgrst_guard_catalog_checks_total{result=\"missing\"}")
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert!(took < Duration::from_secs(1), "the real heal waited {took:?} behind the flood");
    assert_eq!(notifies.settled().await, 1);
}
