//! `pgrst-guard doctor` against the PostgREST double and a real PostgreSQL.

mod support;

use std::process::{Command, Output};

use support::TestBed;

async fn doctor(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgrst-guard")).arg("doctor").args(args).env_clear().output().unwrap()
    })
    .await
    .unwrap()
}

fn args(bed: &TestBed, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--upstream".to_string(),
        bed.double.url(),
        "--upstream-admin".to_string(),
        bed.double.admin_url(),
        "--db-uri".to_string(),
        bed.pg.uri("postgres").replace("postgres@", "postgres:doctor-secret@"),
        "--heal-deadline-ms".to_string(),
        "2000".to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

#[tokio::test]
async fn all_is_well_when_a_notify_makes_postgrest_reload() {
    let bed = TestBed::start("CREATE TABLE t (id int);").await;
    let loads = bed.double.successful_loads();
    let out = doctor(args(&bed, &[])).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("PostgREST 14.17"), "{report}");
    assert!(report.contains("made PostgREST reload in"), "{report}");
    assert!(report.contains("doctor: all is well"));
    assert!(!report.contains("doctor-secret"), "password in the report: {report}");
    assert!(bed.double.successful_loads() > loads);
}

#[tokio::test]
async fn a_listener_that_does_not_receive_is_diagnosed() {
    let bed = TestBed::start("CREATE TABLE t (id int);").await;
    // The NOTIFY goes to a channel PostgREST does not listen on: the load counter never moves.
    let out = doctor(args(&bed, &["--db-channel", "elsewhere"])).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL reload"), "{report}");
    assert!(report.contains("select pg_notification_queue_usage();"), "{report}");
}

#[tokio::test]
async fn an_unreachable_upstream_fails() {
    let bed = TestBed::start("CREATE TABLE t (id int);").await;
    let dead = format!("http://127.0.0.1:{}", support::pg::free_port());
    let mut a = args(&bed, &[]);
    a[1] = dead;
    let out = doctor(a).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL upstream"), "{report}");
}
