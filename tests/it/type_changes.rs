//! Column type changes, against the real PostgREST of every family: until PostgREST reloads it
//! casts a write's body to the cached column types, so a value only the new type holds fails. The
//! guard heals such writes (each stored once) and lets a value the new type refuses too pass through
//! with no reload.

use http::StatusCode;

use crate::support::postgrest::Family;
use crate::support::RealBed;

const ORDERS: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, label text UNIQUE, code varchar(8), qty int, price int, data text);";

struct TypeChange {
    migration: &'static str,
    /// A write only the new type accepts (its `label` is added).
    body: &'static str,
    /// What PostgREST alone answers it with its stale cache.
    stale_code: &'static str,
    /// A write the new type refuses too, and PostgREST's code for it.
    genuine: Option<(&'static str, &'static str)>,
}

const CHANGES: [TypeChange; 4] = [
    TypeChange {
        migration: "ALTER TABLE orders ALTER COLUMN code TYPE varchar(64)",
        body: r#""code":"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","qty":1"#,
        stale_code: "22001",
        genuine: Some((
            r#""code":"YYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY""#,
            "22001",
        )),
    },
    TypeChange {
        migration: "ALTER TABLE orders ALTER COLUMN qty TYPE bigint",
        body: r#""code":"ok","qty":5000000000"#,
        stale_code: "22003",
        genuine: Some((r#""qty":99999999999999999999"#, "22003")),
    },
    TypeChange {
        migration: "ALTER TABLE orders ALTER COLUMN price TYPE numeric",
        body: r#""code":"ok","price":1.5"#,
        stale_code: "22P02",
        genuine: Some((r#""price":"abc""#, "22P02")),
    },
    TypeChange {
        migration: "ALTER TABLE orders ALTER COLUMN data TYPE jsonb USING data::jsonb",
        body: r#""code":"ok","data":{"a":1}"#,
        stale_code: "42804",
        genuine: None,
    },
];

family_matrix!(a_widened_column_accepts_its_new_values_at_once, |family: Family| async move {
    let bed = RealBed::start(family, ORDERS).await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[]).await;
    let notifies = bed.notify_counter().await;
    for (n, change) in CHANGES.iter().enumerate() {
        bed.pg.sql(change.migration).await;
        let label = format!("change-{n}");
        let body = format!(r#"{{"label":"{label}",{}}}"#, change.body);
        let direct = bed.http.post_json(&bed.url("/orders"), &body.replace(&label, "direct")).await;
        assert_eq!(
            (direct.status, direct.code().as_deref()),
            (StatusCode::BAD_REQUEST, Some(change.stale_code)),
            "the premise, {}: {}",
            change.migration,
            direct.text()
        );
        let r = bed.http.post_json(&format!("{}/orders", guard.url()), &body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}: {}", change.migration, r.text());
        assert_eq!(r.header("x-pgrst-guard"), Some("replayed"), "{}", change.migration);
        assert_eq!(bed.scalar(&format!("SELECT count(*) FROM orders WHERE label = '{label}'")).await, 1);
        assert_eq!(notifies.settled().await, n as u64 + 1, "one reload for {}", change.migration);

        // A value the new type refuses too is the client's own error: PostgREST's answer, no reload.
        if let Some((genuine, code)) = change.genuine {
            let body = format!(r#"{{"label":"genuine-{n}",{genuine}}}"#);
            let direct = bed.http.post_json(&bed.url("/orders"), &body).await;
            let r = bed.http.post_json(&format!("{}/orders", guard.url()), &body).await;
            assert_eq!(direct.code().as_deref(), Some(code), "{}", direct.text());
            assert_eq!((r.status, r.text()), (direct.status, direct.text()), "{}", change.migration);
            assert_eq!(r.header("x-pgrst-guard"), None);
            assert_eq!(notifies.settled().await, n as u64 + 1, "no reload for a genuine {code}");
        }
    }
    // An RPC casting its argument fails the same way: never a type heal.
    bed.pg.sql("CREATE FUNCTION twice(n int) RETURNS int LANGUAGE sql AS $$ SELECT n * 2 $$").await;
    bed.postgrest.reload_and_wait(&bed.pg).await;
    let before = notifies.settled().await;
    let r = bed.http.post_json(&format!("{}/rpc/twice", guard.url()), r#"{"n":5000000000}"#).await;
    assert_eq!((r.status, r.code().as_deref()), (StatusCode::BAD_REQUEST, Some("22003")), "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), None);
    assert_eq!(notifies.settled().await, before);
});
