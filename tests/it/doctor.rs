//! `pgrst-guard doctor` against the real PostgREST of every family and a real PostgreSQL.

use std::process::{Command, Output};

use crate::support;
use crate::support::postgrest::Family;
use crate::support::RealBed;

async fn doctor(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgrst-guard")).arg("doctor").args(args).env_clear().output().unwrap()
    })
    .await
    .unwrap()
}

fn args(bed: &RealBed, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--upstream".to_string(),
        bed.postgrest.url(),
        "--upstream-admin".to_string(),
        bed.postgrest.admin_url(),
        "--db-uri".to_string(),
        bed.pg.uri("postgres").replace("postgres@", "postgres:doctor-secret@"),
        "--heal-deadline-ms".to_string(),
        "2000".to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

family_matrix!(all_is_well_when_a_notify_makes_postgrest_reload, |family: Family| async move {
    let bed = RealBed::start(family, "CREATE TABLE t (id int);").await;
    let loads = bed.postgrest.successful_loads().await;
    let out = doctor(args(&bed, &[])).await;
    let report = String::from_utf8_lossy(&out.stdout);
    let major_minor: String = bed.postgrest.version.split('.').take(2).collect::<Vec<_>>().join(".");
    assert!(report.contains(&format!("PostgREST {major_minor}")), "{report}");
    assert!(!report.contains("doctor-secret"), "password in the report: {report}");
    if family.has_load_metrics() {
        assert_eq!(out.status.code(), Some(0), "{report}");
        assert!(report.contains("made PostgREST reload in"), "{report}");
        assert!(report.contains("doctor: all is well"));
        assert!(bed.postgrest.successful_loads().await > loads);
    } else {
        // v11 has no load counter: the reload cannot be observed, which doctor must say.
        assert!(!report.contains("made PostgREST reload in"), "{report}");
    }
});

#[tokio::test]
async fn a_listener_that_does_not_receive_is_diagnosed() {
    let bed = RealBed::start(Family::V14, "CREATE TABLE t (id int);").await;
    // The NOTIFY goes to a channel PostgREST does not listen on: the load counter never moves.
    let out = doctor(args(&bed, &["--db-channel", "elsewhere"])).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL reload"), "{report}");
    assert!(report.contains("select pg_notification_queue_usage();"), "{report}");
}

#[tokio::test]
async fn an_unreachable_upstream_fails() {
    let bed = RealBed::start(Family::V14, "CREATE TABLE t (id int);").await;
    let dead = format!("http://127.0.0.1:{}", support::pg::free_port());
    let mut a = args(&bed, &[]);
    a[1] = dead;
    let out = doctor(a).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL upstream"), "{report}");
}

#[tokio::test]
async fn an_upstream_that_is_not_postgrest_fails() {
    let bed = RealBed::start(Family::V14, "CREATE TABLE t (id int);").await;
    let echo = support::echo::EchoServer::start().await;
    let mut a = args(&bed, &[]);
    a[1] = echo.url();
    let out = doctor(a).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL upstream") && report.contains("not PostgREST"), "{report}");
}

#[tokio::test]
async fn database_errors_show_postgresqls_own_message_and_whether_tls_is_on() {
    let bed = RealBed::start(Family::V14, "CREATE TABLE t (id int);").await;
    let out = doctor(args(&bed, &[])).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("connection NOT encrypted"), "{report}");

    let mut a = args(&bed, &[]);
    a[5] = format!("{}/no_such_db", a[5].rsplit_once('/').unwrap().0);
    let out = doctor(a).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("database \"no_such_db\" does not exist") && report.contains("3D000"), "{report}");
}
