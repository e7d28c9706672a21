//! No write stored differently than it was sent (the write barrier), against the real PostgREST of
//! every family. After a migration that changes a column's type or default, PostgREST's stale cache
//! stores a *different* value with 201: shown first straight to PostgREST, then through the guard,
//! where each write must be stored exactly as PostgreSQL stores the same value.

use http::Method;

use crate::support::guard::{metric, start_guard, NotifyCounter};
use crate::support::postgrest::Family;
use crate::support::RealBed;

const SCHEMA: &str = "
    ALTER DATABASE postgres SET timezone TO 'UTC';
    CREATE TABLE readings (tag text PRIMARY KEY, d date, ts timestamp, price numeric(10,2), x real);
    CREATE TABLE tickets (ref text PRIMARY KEY, status text DEFAULT 'draft');
    CREATE TABLE untouched (id int PRIMARY KEY, note text);
    CREATE FUNCTION stamp(t timestamp) RETURNS text LANGUAGE sql AS 'SELECT t::text';
";

const MIGRATION: &str = "
    ALTER TABLE readings ALTER COLUMN d TYPE timestamptz, ALTER COLUMN ts TYPE timestamptz,
      ALTER COLUMN price TYPE numeric(10,4), ALTER COLUMN x TYPE double precision;
    ALTER TABLE tickets ALTER COLUMN status SET DEFAULT 'open';
    DROP FUNCTION stamp(timestamp);
    CREATE FUNCTION stamp(t timestamptz) RETURNS text LANGUAGE sql AS 'SELECT t::text';
";

/// Supabase's event trigger: PostgREST is told at every DDL's commit.
const EVENT_TRIGGER: &str = "
    CREATE FUNCTION notify_pgrst() RETURNS event_trigger LANGUAGE plpgsql AS
      $$ BEGIN NOTIFY pgrst, 'reload schema'; END $$;
    CREATE EVENT TRIGGER pgrst_watch ON ddl_command_end EXECUTE FUNCTION notify_pgrst();
";

const READING: &str = r#"{"tag":"TAG","d":"2026-01-01T10:00:00+02:00","ts":"2026-01-01T10:00:00+02:00","price":1.2345,"x":1.23456789012}"#;

async fn client(bed: &RealBed) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&bed.pg.uri("postgres"), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// What a row of readings holds, as text.
async fn stored(bed: &RealBed, tag: &str) -> Vec<String> {
    let row = client(bed)
        .await
        .query_one("SELECT d::text, ts::text, price::text, x::text FROM readings WHERE tag = $1", &[&tag])
        .await
        .expect("the row was stored");
    (0..4).map(|i| row.get::<_, Option<String>>(i).unwrap_or_default()).collect()
}

/// What PostgreSQL stores for the same values, by the current column types.
async fn expected(bed: &RealBed) -> Vec<String> {
    stored_by_postgres(bed, "INSERT INTO readings SELECT * FROM json_populate_record(NULL::readings, $1::text::json)")
        .await
}

async fn stored_by_postgres(bed: &RealBed, insert: &str) -> Vec<String> {
    let client = client(bed).await;
    let body = READING.replace("TAG", "by-postgres");
    client.execute(insert, &[&body]).await.expect("a direct insert");
    drop(client);
    stored(bed, "by-postgres").await
}

async fn post(bed: &RealBed, base: &str, path: &str, body: &str, prefer: &str) -> crate::support::client::TestResponse {
    bed.http
        .send(
            Method::POST,
            &format!("{base}{path}"),
            &[("content-type", "application/json"), ("prefer", prefer)],
            body.to_string(),
        )
        .await
}

async fn status_of(bed: &RealBed, reference: &str) -> String {
    client(bed)
        .await
        .query_one("SELECT status FROM tickets WHERE ref = $1", &[&reference])
        .await
        .expect("the ticket was stored")
        .get(0)
}

async fn writes_after_a_migration_are_stored_as_sent(family: Family, event_trigger: bool, with_admin: bool) {
    let setup = if event_trigger { format!("{SCHEMA}{EVENT_TRIGGER}") } else { SCHEMA.to_string() };
    let bed = RealBed::start(family, &setup).await;
    let admin = bed.postgrest.admin_url();
    let mut keys = vec![("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")];
    if with_admin {
        keys.push(("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()));
    }
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &keys).await;
    let direct = bed.postgrest.url();
    // Writes to a table no migration touches pay only the check: the cache is proved to hold it.
    let unchanged = post(&bed, &guard.url(), "/untouched", r#"{"id":1,"note":"before"}"#, "return=minimal").await;
    assert_eq!(unchanged.status, 201, "{}", unchanged.text());
    bed.pg.sql(MIGRATION).await;
    bed.pg.sql("TRUNCATE untouched; GRANT SELECT ON untouched TO PUBLIC").await;
    let should_be = expected(&bed).await;

    // The premise: straight to PostgREST, right after the commit, each value is stored altered.
    let premise = post(&bed, &direct, "/readings", &READING.replace("TAG", "direct"), "return=minimal").await;
    assert_eq!(premise.status, 201, "{}", premise.text());
    let altered = stored(&bed, "direct").await;
    if !event_trigger {
        for (column, (got, want)) in ["d", "ts", "price", "x"].iter().zip(altered.iter().zip(&should_be)) {
            assert_ne!(got, want, "premise: {column} is stored altered by the stale cache");
        }
    }
    // Through the guard, sent right after the commit.
    let held_before = metric(&guard.render_metrics(), "pgrst_guard_write_barrier_total{result=\"held\"}");
    let through = post(&bed, &guard.url(), "/readings", &READING.replace("TAG", "guard"), "return=minimal").await;
    assert_eq!(through.status, 201, "{}", through.text());
    let got = stored(&bed, "guard").await;
    {
        assert_eq!(got, should_be, "{family:?}: stored as PostgreSQL stores it");
        // A changed default, copied by `missing=default`.
        let ticket =
            post(&bed, &guard.url(), "/tickets?columns=ref,status", r#"[{"ref":"t1"}]"#, "missing=default").await;
        assert_eq!(ticket.status, 201, "{}", ticket.text());
        assert_eq!(status_of(&bed, "t1").await, "open");
        // A function whose argument type changed: its argument is cast as PostgreSQL casts it.
        let call = post(&bed, &guard.url(), "/rpc/stamp", r#"{"t":"2026-01-01T10:00:00+02:00"}"#, "").await;
        assert_eq!(call.status, 200, "{}", call.text());
        assert_eq!(call.json(), serde_json::json!("2026-01-01 08:00:00+00"));
        // PATCH and a bulk upsert after one more type change.
        bed.pg.sql("ALTER TABLE readings ALTER COLUMN price TYPE numeric(12,6)").await;
        let patch = bed
            .http
            .send(
                Method::PATCH,
                &format!("{}/readings?tag=eq.guard", guard.url()),
                &[("content-type", "application/json")],
                r#"{"price":1.234567}"#,
            )
            .await;
        assert_eq!(patch.status, 204, "{}", patch.text());
        assert_eq!(stored(&bed, "guard").await[2], "1.234567");
        let upsert = post(
            &bed,
            &guard.url(),
            "/readings",
            r#"[{"tag":"guard","price":2.345678},{"tag":"bulk","price":3.456789}]"#,
            "resolution=merge-duplicates",
        )
        .await;
        assert_eq!(upsert.status, 201, "{}", upsert.text());
        assert_eq!(stored(&bed, "bulk").await[2], "3.456789");
        let held = metric(&guard.render_metrics(), "pgrst_guard_write_barrier_total{result=\"held\"}");
        assert!(held > held_before, "the writes were held");
        // TRUNCATE and GRANT changed nothing PostgREST caches: a write to that table is not held.
        let held = metric(&guard.render_metrics(), "pgrst_guard_write_barrier_total{result=\"held\"}");
        let unchanged = post(&bed, &guard.url(), "/untouched", r#"{"id":2,"note":"after"}"#, "return=minimal").await;
        assert_eq!(unchanged.status, 201, "{}", unchanged.text());
        assert_eq!(metric(&guard.render_metrics(), "pgrst_guard_write_barrier_total{result=\"held\"}"), held);
    }
    assert_eq!(metric(&guard.render_metrics(), "pgrst_guard_write_barrier_total{result=\"unverified\"}"), 0);
}

// The default configuration: no admin URL, so the proof is the marker view.
family_matrix!(writes_after_a_migration_are_stored_as_sent_by_default, |family| async move {
    writes_after_a_migration_are_stored_as_sent(family, false, false).await;
});

family_matrix!(writes_after_a_migration_are_stored_as_sent_by_default_with_the_event_trigger, |family| async move {
    writes_after_a_migration_are_stored_as_sent(family, true, false).await;
});

// With the admin URL: the load counters (and the marker on 11.2, which has none).
family_matrix!(writes_after_a_migration_are_stored_as_sent_with_the_admin_url, |family| async move {
    writes_after_a_migration_are_stored_as_sent(family, false, true).await;
});

family_matrix!(
    writes_after_a_migration_are_stored_as_sent_with_the_admin_url_and_the_event_trigger,
    |family| async move {
        writes_after_a_migration_are_stored_as_sent(family, true, true).await;
    }
);

// Reads need nothing, and a write to an unchanged table sends no NOTIFY.
family_matrix!(reads_and_unchanged_writes_cost_no_reload, |family| async move {
    let bed = RealBed::start(family, SCHEMA).await;
    let admin = bed.postgrest.admin_url();
    let guard = start_guard(
        &bed.postgrest.url(),
        &bed.pg.uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str()), ("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let notifies = NotifyCounter::listen(&bed.pg.uri("postgres"), "pgrst").await;
    for n in 0..20 {
        let write =
            post(&bed, &guard.url(), "/untouched", &format!(r#"{{"id":{n},"note":"x"}}"#), "return=minimal").await;
        assert_eq!(write.status, 201, "{}", write.text());
        assert_eq!(bed.http.get(&format!("{}/untouched?id=eq.{n}", guard.url())).await.status, 200);
    }
    assert_eq!(notifies.settled().await, 0);
});
