//! Supabase gateway mode with the real supabase-js (npm) in Node: REST through the heal layer to
//! the PostgREST double, everything else — auth, storage, functions, the realtime WebSocket —
//! through to a stand-in Supabase origin, untouched.

use std::path::Path;
use std::process::Command;

use crate::support;
use crate::support::guard::start_guard;
use crate::support::pg::free_port;
use crate::support::postgrest::Family;
use crate::support::RealBed;

/// An anon key as Supabase issues them: an HS256 JWT with `role: anon`, signed with [`JWT_SECRET`].
const ANON_KEY: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYW5vbiIsImlzcyI6InN1cGFiYXNlIn0.Rwe_zGR_sx0wvpYDb6OfBZeW7CxeVRa4NpL2F6v7DPo";
const JWT_SECRET: &str = "pgrst-guard-test-jwt-secret-0123456789abcdef";

fn node_modules_ready(js: &Path) {
    if js.join("node_modules/@supabase/supabase-js").exists() && js.join("node_modules/ws").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(js)
        .status()
        .expect("npm is needed for the supabase-js test (Debian: nodejs, npm)");
    assert!(status.success(), "npm ci in tests/js failed");
}

family_matrix!(supabase_js_through_the_gateway, supabase_js_case);

async fn supabase_js_case(family: Family) {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    tokio::task::spawn_blocking({
        let js = js.clone();
        move || node_modules_ready(&js)
    })
    .await
    .unwrap();

    let bed = RealBed::start_with(
        family,
        "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL);",
        |mut options| {
            options.jwt_secret = Some(JWT_SECRET.to_string());
            options
        },
    )
    .await;
    let origin_port = free_port();
    let origin = format!("http://127.0.0.1:{origin_port}");
    let admin = bed.postgrest.admin_url();
    let guard = start_guard(
        &bed.postgrest.url(),
        &bed.pg.uri("postgres"),
        &[
            ("PGRST_GUARD_REST_PREFIX", "/rest/v1"),
            ("PGRST_GUARD_PASSTHROUGH_UPSTREAM", &origin),
            ("PGRST_GUARD_UPSTREAM_ADMIN", &admin),
        ],
    )
    .await;
    bed.pg.sql("ALTER TABLE chat_messages ADD COLUMN artifact_ids TEXT[] DEFAULT '{}'").await;

    let guard_url = guard.url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("gateway.mjs")
            .current_dir(&js)
            .env("GUARD_URL", guard_url)
            .env("ORIGIN_PORT", origin_port.to_string())
            .env("ANON_KEY", ANON_KEY)
            .output()
            .expect("node is needed for the supabase-js test")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "supabase-js checks failed:\n{stdout}\n{stderr}");

    let client = bed.pg.connect("postgres").await;
    let row = client.query_one("SELECT content, artifact_ids FROM chat_messages", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "from supabase-js");
    assert_eq!(row.get::<_, Vec<String>>(1), vec!["a1", "a2"]);
    assert!(stdout.contains(r#""method":"UPGRADE""#), "the WebSocket reached the origin: {stdout}");
}

#[tokio::test]
async fn without_a_pass_through_origin_other_paths_get_404() {
    let bed = RealBed::start(Family::V14, "CREATE TABLE t (id int);").await;
    let guard =
        start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[("PGRST_GUARD_REST_PREFIX", "/rest/v1")]).await;
    let r = bed.http.get(&format!("{}/rest/v1/t", guard.url())).await;
    assert_eq!(r.status, http::StatusCode::OK);
    let r = bed.http.get(&format!("{}/auth/v1/user", guard.url())).await;
    assert_eq!(r.status, http::StatusCode::NOT_FOUND);
    assert_eq!(r.json()["code"], "PGRSTG08");
}

#[tokio::test]
async fn the_rest_prefix_is_matched_on_the_normalised_path() {
    let rest = support::echo::EchoServer::start().await;
    let origin = support::echo::EchoServer::start().await;
    let guard = support::guard::start_guard_without_waiting(
        &rest.url(),
        "postgres://postgres@127.0.0.1:1/postgres",
        &[("PGRST_GUARD_REST_PREFIX", "/rest/v1"), ("PGRST_GUARD_PASSTHROUGH_UPSTREAM", &origin.url())],
    )
    .await;
    let http = support::client::HttpClient::new();
    for sneaky in
        ["/rest/v1/../../auth/v1/user", "/rest/v1/%2e%2e/%2E%2E/auth/v1/user", "/rest/v1/./../.././auth/v1/user"]
    {
        let r = http.get(&format!("{}{sneaky}", guard.url())).await;
        assert_eq!(r.status, http::StatusCode::OK, "{sneaky}");
        // The echo answers with what it received: the origin, not PostgREST, got the auth path.
        assert_eq!(r.json()["uri"], "/auth/v1/user", "{sneaky}");
        assert_eq!(r.json()["headers"]["host"], origin.addr.to_string(), "{sneaky} went to the origin");
    }
    // Not under the prefix once resolved: the origin's, as the origin itself would read it.
    let r = http.get(&format!("{}/rest/v1/../auth/v1/user", guard.url())).await;
    assert_eq!(r.json()["uri"], "/rest/auth/v1/user");
    assert_eq!(r.json()["headers"]["host"], origin.addr.to_string());
    let r = http.get(&format!("{}/rest/v1/./todos?select=id", guard.url())).await;
    assert_eq!(r.json()["uri"], "/todos?select=id");
    assert_eq!(r.json()["headers"]["host"], rest.addr.to_string());
    let r = http.get(&format!("{}/../../etc/passwd", guard.url())).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (http::StatusCode::BAD_REQUEST, Some("PGRSTG03")));
}

#[tokio::test]
async fn connect_gets_a_postgrest_shaped_405() {
    let rest = support::echo::EchoServer::start().await;
    let guard =
        support::guard::start_guard_without_waiting(&rest.url(), "postgres://postgres@127.0.0.1:1/postgres", &[]).await;
    let mut stream = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.contains("\"code\":\"PGRSTG09\""), "{answer}");
}
