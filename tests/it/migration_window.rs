//! The case pgrst-guard exists for, against the real PostgREST of every family, in the guard's
//! default configuration: clients already use a new column, table, function or relationship when
//! the migration that adds it commits. Every request sent after the commit must succeed, and every
//! write must be stored exactly once, whether the migration's DDL sends the reload NOTIFY itself
//! (Supabase's event trigger) or nothing does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use crate::support::client::HttpClient;
use crate::support::guard::start_guard;
use crate::support::postgrest::Family;
use crate::support::RealBed;

const WRITERS: usize = 8;
const BEFORE_COMMIT: Duration = Duration::from_millis(400);
const AFTER_COMMIT: Duration = Duration::from_millis(1500);

/// Supabase's `pgrst_ddl_watch`, reduced to its effect: every DDL command NOTIFYs at commit.
const EVENT_TRIGGER: &str = "
    CREATE FUNCTION pgrst_ddl_watch() RETURNS event_trigger LANGUAGE plpgsql AS $$
    BEGIN NOTIFY pgrst, 'reload schema'; END $$;
    CREATE EVENT TRIGGER pgrst_ddl_watch ON ddl_command_end EXECUTE PROCEDURE pgrst_ddl_watch();";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Notifying {
    EventTrigger,
    Nothing,
}

/// One migration and the request clients already send for what it adds.
struct Scenario {
    setup: &'static str,
    migration: &'static str,
    method: Method,
    path: &'static str,
    /// The JSON body for writer `writer`'s request number `n` (None for reads).
    body: fn(usize, u64) -> Option<String>,
    success: StatusCode,
    /// SQL counting (all rows, distinct labels) of what the acknowledged writes stored.
    stored: Option<&'static str>,
}

const NEW_COLUMN: Scenario = Scenario {
    setup: "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL UNIQUE);",
    migration: "ALTER TABLE chat_messages ADD COLUMN artifact_ids text[] DEFAULT '{}'",
    method: Method::POST,
    path: "/chat_messages",
    body: |w, n| Some(format!(r#"{{"content":"w{w}-{n}","artifact_ids":["a{n}"]}}"#)),
    success: StatusCode::CREATED,
    stored: Some("SELECT count(*), count(DISTINCT content) FROM chat_messages"),
};

const NEW_TABLE: Scenario = Scenario {
    setup: "",
    migration: "CREATE TABLE artifacts (id bigserial PRIMARY KEY, label text NOT NULL UNIQUE)",
    method: Method::POST,
    path: "/artifacts",
    body: |w, n| Some(format!(r#"{{"label":"w{w}-{n}"}}"#)),
    success: StatusCode::CREATED,
    stored: Some("SELECT count(*), count(DISTINCT label) FROM artifacts"),
};

const NEW_FUNCTION: Scenario = Scenario {
    setup: "CREATE TABLE events (id bigserial PRIMARY KEY, label text NOT NULL UNIQUE);",
    migration: "CREATE FUNCTION log_event(label text) RETURNS bigint LANGUAGE sql AS
                $$ INSERT INTO events (label) VALUES (log_event.label) RETURNING id $$",
    method: Method::POST,
    path: "/rpc/log_event",
    body: |w, n| Some(format!(r#"{{"label":"w{w}-{n}"}}"#)),
    success: StatusCode::OK,
    stored: Some("SELECT count(*), count(DISTINCT label) FROM events"),
};

const WIDER_COLUMN: Scenario = Scenario {
    setup: "CREATE TABLE orders (id bigserial PRIMARY KEY, label text NOT NULL UNIQUE, code varchar(8));",
    migration: "ALTER TABLE orders ALTER COLUMN code TYPE varchar(64)",
    method: Method::POST,
    path: "/orders",
    body: |w, n| Some(format!(r#"{{"label":"w{w}-{n}","code":"a code that outgrew eight characters"}}"#)),
    success: StatusCode::CREATED,
    stored: Some("SELECT count(*), count(DISTINCT label) FROM orders"),
};

const NEW_RELATIONSHIP: Scenario = Scenario {
    setup: "CREATE TABLE projects (id bigserial PRIMARY KEY, name text NOT NULL);
            CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL, project_id bigint);
            INSERT INTO projects (name) VALUES ('p');
            INSERT INTO chat_messages (content, project_id) VALUES ('m', 1);",
    migration: "ALTER TABLE chat_messages ADD CONSTRAINT chat_messages_project_fk FOREIGN KEY (project_id) REFERENCES projects (id)",
    method: Method::GET,
    path: "/chat_messages?select=content,projects(name)",
    body: |_, _| None,
    success: StatusCode::OK,
    stored: None,
};

#[derive(Default)]
struct Tally {
    before_commit: (u64, u64),
    /// (successes, failures) of requests sent after the commit.
    after_commit: (u64, u64),
    failures_after: Vec<String>,
    acknowledged: u64,
}

/// `writers` clients send the scenario's request in a loop through `base` across the migration.
async fn run_window(bed: &RealBed, base: &str, scenario: &Scenario) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let committed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let sequence = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (http, url) = (HttpClient::new(), format!("{base}{}", scenario.path));
        let (tally, committed_at, stop, sequence) =
            (tally.clone(), committed_at.clone(), stop.clone(), sequence.clone());
        let (method, body, success) = (scenario.method.clone(), scenario.body, scenario.success);
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let n = sequence.fetch_add(1, Ordering::AcqRel);
                let sent = Instant::now();
                let payload = body(writer, n);
                let headers: &[(&str, &str)] =
                    if payload.is_some() { &[("content-type", "application/json")] } else { &[] };
                let r = http.send(method.clone(), &url, headers, payload.unwrap_or_default()).await;
                let after = committed_at.lock().unwrap().is_some_and(|at| sent >= at);
                let ok = r.status == success;
                let mut t = tally.lock().unwrap();
                let slot = if after { &mut t.after_commit } else { &mut t.before_commit };
                if ok {
                    slot.0 += 1;
                } else {
                    slot.1 += 1;
                }
                if ok && method != Method::GET {
                    t.acknowledged += 1;
                }
                if after && !ok && t.failures_after.len() < 5 {
                    t.failures_after.push(format!("{} {}", r.status, r.text()));
                }
            }
        }));
    }
    tokio::time::sleep(BEFORE_COMMIT).await;
    bed.pg.sql(scenario.migration).await;
    // Requests sent from here on were sent after the commit.
    *committed_at.lock().unwrap() = Some(Instant::now());
    tokio::time::sleep(AFTER_COMMIT).await;
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await.unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    tally
}

async fn migration_window(family: Family, scenario: Scenario, notifying: Notifying) {
    let setup = match notifying {
        Notifying::EventTrigger => format!("{}{EVENT_TRIGGER}", scenario.setup),
        Notifying::Nothing => scenario.setup.to_string(),
    };
    let bed = RealBed::start(family, &setup).await;
    // The default configuration: only the required keys.
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;

    let tally = run_window(&bed, &guard.url(), &scenario).await;
    let (ok_after, failed_after) = tally.after_commit;
    if let Some(stored) = scenario.stored {
        let row = bed.pg.connect("postgres").await.query_one(stored, &[]).await.unwrap();
        let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(rows, distinct, "a write was stored twice");
        assert_eq!(rows as u64, tally.acknowledged, "every acknowledged write stored, nothing else");
    }
    println!(
        "{family:?} {} {notifying:?}: before the commit {} ok / {} failed; after it {ok_after} ok / {failed_after} failed",
        scenario.path, tally.before_commit.0, tally.before_commit.1,
    );
    assert_eq!(failed_after, 0, "requests sent after the commit failed: {:?}", tally.failures_after);
    assert!(ok_after > 0, "no request was sent after the commit");
}

macro_rules! window_tests {
    ($name:ident, $scenario:expr) => {
        mod $name {
            use super::*;
            family_matrix!(event_trigger, |family| migration_window(family, $scenario, Notifying::EventTrigger));
            family_matrix!(no_notify, |family| migration_window(family, $scenario, Notifying::Nothing));
        }
    };
}

window_tests!(new_column, NEW_COLUMN);
window_tests!(new_table, NEW_TABLE);
window_tests!(new_function, NEW_FUNCTION);
window_tests!(new_relationship, NEW_RELATIONSHIP);
window_tests!(wider_column, WIDER_COLUMN);
