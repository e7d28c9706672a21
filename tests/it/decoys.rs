//! What a client controls cannot buy reloads, and no replay repeats a write's side effects: the
//! attacks of issue 28 against the real PostgREST of every family, in the default configuration
//! (no admin URL) and with it. Each request carries a new string; straight to PostgREST each is an
//! error, and through the guard it must be the same error with at most one NOTIFY per kind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::Method;

use crate::support::client::HttpClient;
use crate::support::guard::{metric, start_guard, GuardProcess, NotifyCounter};
use crate::support::postgrest::Family;
use crate::support::RealBed;

const SCHEMA: &str = "
    CREATE TABLE nums (id int PRIMARY KEY, n int);
    INSERT INTO nums VALUES (1, 1);
    CREATE FUNCTION takes_doc(doc jsonb) RETURNS int LANGUAGE sql AS 'SELECT 1';
    CREATE TABLE authors (id int PRIMARY KEY, name text);
    CREATE TABLE books (id int PRIMARY KEY, author_id int REFERENCES authors(id));
    CREATE VIEW authors_v AS SELECT * FROM authors;
    CREATE SEQUENCE side_effects;
    CREATE TABLE memos (id serial PRIMARY KEY, body text);
    CREATE FUNCTION count_insert() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN PERFORM nextval('side_effects'); RETURN NEW; END $$;
    CREATE TRIGGER memos_count BEFORE INSERT ON memos FOR EACH ROW EXECUTE FUNCTION count_insert();
";

/// One kind of attack: the request for the `n`th new string.
struct Attack {
    name: &'static str,
    method: Method,
    path: fn(usize) -> String,
    content_type: &'static str,
    body: fn(usize) -> String,
}

fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "quoted value in a POST body",
            method: Method::POST,
            path: |_| "/nums".into(),
            content_type: "application/json",
            body: |n| format!(r#"{{"id":"k{n}: \"x","n":1}}"#),
        },
        Attack {
            name: "the same value in a PATCH filter",
            method: Method::PATCH,
            path: |n| format!("/nums?id=eq.k{n}%3A%20%22x"),
            content_type: "application/json",
            body: |_| r#"{"n":2}"#.into(),
        },
        Attack {
            name: "a form-encoded POST",
            method: Method::POST,
            path: |_| "/nums".into(),
            content_type: "application/x-www-form-urlencoded",
            body: |n| format!("id=k{n}%3A%20%22x&n=1"),
        },
        Attack {
            name: "a single named jsonb parameter called with new keys",
            method: Method::POST,
            path: |_| "/rpc/takes_doc".into(),
            content_type: "application/json",
            body: |n| format!(r#"{{"k{n}":1}}"#),
        },
        Attack {
            name: "an embed through a view with new hints",
            method: Method::GET,
            path: |n| format!("/authors_v?select=id,books!h{n}(id)"),
            content_type: "application/json",
            body: |_| String::new(),
        },
    ]
}

/// Sends `total` requests of `attack`, 8 at a time; each status is checked against PostgREST's own
/// answer to the same request.
async fn flood(http: &HttpClient, guard: &str, direct: &str, attack: &Attack, total: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (http, next, guard, direct) = (http.clone(), next.clone(), guard.to_string(), direct.to_string());
        let (method, path, body, content_type) = (attack.method.clone(), attack.path, attack.body, attack.content_type);
        clients.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::AcqRel);
                if n >= total {
                    return;
                }
                let headers = [("content-type", content_type)];
                let through = http.send(method.clone(), &format!("{guard}{}", path(n)), &headers, body(n)).await;
                assert!(through.header("x-pgrst-guard").is_none(), "nothing is healed: {}", through.text());
                if n % 50 == 0 {
                    let straight = http.send(method.clone(), &format!("{direct}{}", path(n)), &headers, body(n)).await;
                    assert_eq!(through.status, straight.status, "{}", through.text());
                    assert!(!straight.status.is_success(), "the premise: an error straight from PostgREST");
                }
            }
        }));
    }
    for client in clients {
        client.await.expect("a client of the flood");
    }
}

async fn attacks_cost_at_most_one_notify_each(family: Family, with_admin: bool) {
    let bed = RealBed::start(family, SCHEMA).await;
    let admin = bed.postgrest.admin_url();
    let keys: Vec<(&str, &str)> =
        if with_admin { vec![("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str())] } else { Vec::new() };
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
    let answered = || metric(&guard.render_metrics(), "pgrst_guard_upstream_requests_total{result=\"answered\"}");
    let mut counts = Vec::new();
    for attack in attacks() {
        let (before, sent_before) = (notifies.settled().await, answered());
        flood(&bed.http, &guard.url(), &bed.postgrest.url(), &attack, 200).await;
        counts.push((attack.name, notifies.settled().await - before, answered() - sent_before));
    }
    println!("{family:?} (admin URL: {with_admin}): (NOTIFYs, upstream requests) per kind over 200 requests each: {counts:?}");
    for (name, count, upstream) in counts {
        assert!(count <= 1, "{name}: {count} NOTIFYs");
        // One upstream request per client request: nothing was replayed or probed.
        assert_eq!(upstream, 200, "{name}: {upstream} upstream requests for 200 client requests");
    }
}

family_matrix!(varied_text_buys_no_reloads_by_default, |family| async move {
    attacks_cost_at_most_one_notify_each(family, false).await;
});

family_matrix!(varied_text_buys_no_reloads_with_the_admin_url, |family| async move {
    attacks_cost_at_most_one_notify_each(family, true).await;
});

/// How often the memos trigger ran since the sequence was reset.
async fn side_effects(bed: &RealBed) -> i64 {
    let (client, connection) =
        tokio_postgres::connect(&bed.pg.uri("postgres"), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM side_effects", &[])
        .await
        .expect("read the sequence");
    row.get(0)
}

async fn reset_side_effects(bed: &RealBed) {
    bed.pg.sql("ALTER SEQUENCE side_effects RESTART").await;
}

family_matrix!(a_cast_after_the_row_was_written_runs_the_trigger_once, |family| async move {
    let bed = RealBed::start(family, SCHEMA).await;
    let admin = bed.postgrest.admin_url();
    let prefer = [("content-type", "application/json"), ("prefer", "return=representation")];
    let select_cast = "/memos?select=id,body::int";
    // The premise: straight to PostgREST the trigger runs once and the answer is a cast failure.
    let straight = bed.http.send(Method::POST, &bed.url(select_cast), &prefer, r#"{"body":"x"}"#).await;
    assert_eq!(straight.status, 400, "{}", straight.text());
    assert_eq!(side_effects(&bed).await, 1);
    for keys in [vec![], vec![("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str())]] {
        let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
        let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
        reset_side_effects(&bed).await;
        let through =
            bed.http.send(Method::POST, &format!("{}{select_cast}", guard.url()), &prefer, r#"{"body":"x"}"#).await;
        assert_eq!(through.status, 400, "{}", through.text());
        assert_eq!(side_effects(&bed).await, 1, "the trigger ran once (admin URL: {})", !keys.is_empty());
        // A body cast the table's trigger may have raised after other rows were written: not
        // replayed either. (`id` takes a number; the trigger would run for the first row.)
        reset_side_effects(&bed).await;
        let body = r#"[{"id":1,"body":"a"},{"id":"k: \"x","body":"b"}]"#;
        let through = bed.http.send(Method::POST, &format!("{}/memos", guard.url()), &prefer, body).await;
        assert_eq!(through.status, 400, "{}", through.text());
        assert!(side_effects(&bed).await <= 1, "no replay ran the trigger again");
        assert_eq!(notifies.settled().await, 0);
    }
});

/// 100,000 distinct long keys straight into the catalog check, 10,000 at a time: what it remembers
/// stays within its limits, and a flood cannot push out a mark a reload left.
#[tokio::test]
async fn a_hundred_thousand_distinct_keys_stay_bounded_and_leave_marks_alone() {
    use pgrst_guard::heal::classify::{CallShape, MissingObject};
    use pgrst_guard::reload::catalog::{CatalogAnswer, CatalogCheck, Definition, REMEMBERED_LIMITS};
    let bed = RealBed::start(Family::V14, "CREATE TABLE kept (id int PRIMARY KEY);").await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let check = CatalogCheck::new(guard.database.clone(), std::time::Duration::from_millis(25));
    let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let kept = MissingObject::Column { table: "kept".into(), column: "id".into() };
    let reply = check.check(&kept, "public", tokio::time::Instant::now(), far()).await;
    assert_eq!(reply.answer, CatalogAnswer::Exists);
    let definition: Definition = reply.definition.expect("an existing column has a definition");
    check.doubt(&definition);
    let started = std::time::Instant::now();
    for chunk in 0..10 {
        let asked = tokio::time::Instant::now();
        let checks = (0..10_000).map(|i| {
            let n = chunk * 10_000 + i;
            let object = MissingObject::Function {
                schema: "public".into(),
                name: format!("f{n:0>62}"),
                args: (0..20).map(|a| format!("{n:0>58}_{a:0>4}")).collect(),
                call: CallShape::Json,
                single_argument_unnamed: true,
            };
            let check = &check;
            async move { check.check(&object, "public", asked, far()).await.answer }
        });
        for answer in futures_util::future::join_all(checks).await {
            assert!(answer.is_missing(), "{answer:?}");
        }
    }
    let remembered = check.remembered();
    println!("100,000 keys in {:?}: {remembered:?}", started.elapsed());
    assert!(remembered.answers <= REMEMBERED_LIMITS.0, "{remembered:?}");
    assert!(remembered.answer_bytes <= REMEMBERED_LIMITS.1, "{remembered:?}");
    assert!(check.marked(&definition), "the mark a reload left is still there");
}

/// Calls of functions that do not exist through the guard's own process, each with a distinct name
/// and fifty distinct 63-byte argument names: its resident memory stays flat.
#[tokio::test]
async fn a_flood_of_distinct_long_names_stays_within_a_memory_bound() {
    let bed = RealBed::start(Family::V14, "").await;
    let guard = GuardProcess::start(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let total: usize = std::env::var("DECOY_FLOOD").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let resident = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the guard's status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS").to_string();
        line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("a size") / 1024
    };
    // Warm up: connections and buffers of the flood's size.
    let send = |n: usize| {
        let http = bed.http.clone();
        let url = format!("{}/rpc/f{n:0>62}", guard.url());
        async move {
            let args: Vec<String> = (0..50).map(|a| format!("\"{:0>58}_{a:0>4}\":1", n)).collect();
            let body = format!("{{{}}}", args.join(","));
            http.send(Method::POST, &url, &[("content-type", "application/json")], body).await
        }
    };
    let next = Arc::new(AtomicUsize::new(0));
    let run = |total: usize| {
        let next = next.clone();
        let send = &send;
        async move {
            let clients = (0..64).map(|_| {
                let next = next.clone();
                async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::AcqRel);
                        if n >= total {
                            return;
                        }
                        let answer = send(n).await;
                        assert_eq!(answer.status, 404, "{}", answer.text());
                    }
                }
            });
            futures_util::future::join_all(clients).await;
        }
    };
    run(2_000).await;
    let before = resident(guard.pid());
    let started = std::time::Instant::now();
    run(total).await;
    println!("{total} calls in {:?}", started.elapsed());
    let after = resident(guard.pid());
    println!("resident: {before} MiB after 2,000 calls, {after} MiB after {total}");
    assert!(after <= before + 32, "{before} MiB grew to {after} MiB");
}

/// A mark holds while what PostgREST caches is unchanged: TRUNCATE, GRANT, VACUUM FULL, CLUSTER
/// and an identical CREATE OR REPLACE keep it; a changed column type or argument ends it.
#[tokio::test]
async fn marks_follow_definitions_not_row_versions() {
    use pgrst_guard::heal::classify::{CallShape, MissingObject};
    use pgrst_guard::reload::catalog::{CatalogAnswer, CatalogCheck};
    let bed = RealBed::start(
        Family::V14,
        "CREATE TABLE kept (id int PRIMARY KEY, n int); INSERT INTO kept VALUES (1, 1);
         CREATE FUNCTION ping(a int) RETURNS int LANGUAGE sql AS 'SELECT a';",
    )
    .await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let check = CatalogCheck::new(guard.database.clone(), std::time::Duration::from_millis(1));
    let column = MissingObject::Column { table: "kept".into(), column: "n".into() };
    let function = MissingObject::Function {
        schema: "public".into(),
        name: "ping".into(),
        args: vec!["a".into()],
        call: CallShape::Json,
        single_argument_unnamed: true,
    };
    let ask = |object: &MissingObject| {
        let (check, object) = (&check, object.clone());
        async move {
            let now = tokio::time::Instant::now();
            check.check(&object, "public", now, now + std::time::Duration::from_secs(10)).await
        }
    };
    for object in [&column, &function] {
        let reply = ask(object).await;
        assert_eq!(reply.answer, CatalogAnswer::Exists, "{object:?}");
        check.doubt(&reply.definition.expect("a definition"));
        assert_eq!(ask(object).await.answer, CatalogAnswer::Doubted);
    }
    for statement in [
        "TRUNCATE kept",
        "GRANT SELECT ON kept TO PUBLIC",
        "VACUUM FULL kept",
        "CLUSTER kept USING kept_pkey",
        "CREATE OR REPLACE FUNCTION ping(a int) RETURNS int LANGUAGE sql AS 'SELECT a'",
        "GRANT EXECUTE ON FUNCTION ping(int) TO PUBLIC",
    ] {
        bed.pg.sql(statement).await;
    }
    for object in [&column, &function] {
        assert_eq!(ask(object).await.answer, CatalogAnswer::Doubted, "{object:?} after row-version changes");
    }
    bed.pg
        .sql(
            "ALTER TABLE kept ALTER COLUMN n TYPE bigint;
             CREATE OR REPLACE FUNCTION ping(a int, b int DEFAULT 0) RETURNS int LANGUAGE sql AS 'SELECT a';
             DROP FUNCTION ping(int);",
        )
        .await;
    for object in [&column, &function] {
        assert_eq!(ask(object).await.answer, CatalogAnswer::Exists, "{object:?} after its definition changed");
    }
}
