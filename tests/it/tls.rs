//! TLS both ways: an https upstream trusted through an extra CA file, and PostgreSQL over TLS with
//! libpq's sslmode semantics.

use std::time::Duration;

use http::StatusCode;

use crate::support::client::{eventually, HttpClient};
use crate::support::echo::EchoServer;
use crate::support::guard::start_guard_without_waiting;
use crate::support::pg::TestCluster;
use crate::support::pki::TestPki;

const NO_DB: &str = "postgres://postgres@127.0.0.1:1/postgres";

#[tokio::test]
async fn an_https_upstream_is_trusted_through_the_extra_ca_file() {
    let pki = TestPki::new();
    let echo = EchoServer::start_tls(pki.server_config()).await;
    let upstream = format!("https://localhost:{}/rest/v1", echo.addr.port());
    let ca = pki.ca_file.to_str().unwrap();
    let guard = start_guard_without_waiting(&upstream, NO_DB, &[("PGRST_GUARD_UPSTREAM_CA_FILE", ca)]).await;
    let http = HttpClient::new();
    let r = http.get(&format!("{}/chat_messages?select=id", guard.url())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["uri"], "/rest/v1/chat_messages?select=id");

    // Without the CA the certificate is not trusted: a clear 502 saying the request was never sent
    // (the certificate error itself goes to the log), and no plaintext fallback.
    let untrusting = start_guard_without_waiting(&upstream, NO_DB, &[]).await;
    let r = http.get(&format!("{}/chat_messages", untrusting.url())).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["code"], "PGRSTG01", "{}", r.text());
    assert_eq!(r.json()["uri"], serde_json::Value::Null, "the echo never saw it: {}", r.text());
}

async fn ssl_connections(pg: &TestCluster) -> i64 {
    let client = pg.connect("postgres").await;
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND application_name = 'pgrst-guard'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn postgres_over_tls_with_require_and_verify_full() {
    let pki = TestPki::new();
    let pg = TestCluster::start().await;
    pg.enable_tls(&pki.cert_pem, &pki.key_pem).await;
    let echo = EchoServer::start().await;
    let base = format!("postgres://postgres@localhost:{}/postgres", pg.port());

    let require = start_guard_without_waiting(&echo.url(), &format!("{base}?sslmode=require"), &[]).await;
    assert!(eventually(Duration::from_secs(10), || async { require.database.is_connected() }).await);
    assert_eq!(ssl_connections(&pg).await, 1, "the NOTIFY connection is encrypted");

    let ca = pki.ca_file.to_str().unwrap();
    let verified =
        start_guard_without_waiting(&echo.url(), &format!("{base}?sslmode=verify-full&sslrootcert={ca}"), &[]).await;
    assert!(eventually(Duration::from_secs(10), || async { verified.database.is_connected() }).await);
    assert_eq!(ssl_connections(&pg).await, 2);
    verified
        .database
        .notify_reload(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
        .await
        .expect("NOTIFY over TLS");

    // verify-full against an unknown CA must not connect.
    let unverified = start_guard_without_waiting(&echo.url(), &format!("{base}?sslmode=verify-full"), &[]).await;
    // Its connection attempt has been made and refused once its error is on record.
    let refused =
        eventually(Duration::from_secs(10), || async { unverified.database.health().last_error.is_some() }).await;
    assert!(refused && !unverified.database.is_connected(), "{:?}", unverified.database.health());
    assert_eq!(ssl_connections(&pg).await, 2);
}

#[test]
fn a_missing_ca_file_is_a_configuration_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrst-guard"))
        .args(["--db-uri", "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PGRST_GUARD_DB_URI") && stderr.contains("sslrootcert"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrst-guard"))
        .args(["--db-uri", "postgres://u@h/db", "--upstream-ca-file", "/nonexistent/ca.pem"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PGRST_GUARD_UPSTREAM_CA_FILE"));
}
