//! What pgrst-guard forwards, and how it answers when PostgREST cannot.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support;
use crate::support::echo::EchoServer;
use crate::support::guard::{start_guard, start_guard_without_waiting};
use crate::support::pg::free_port;
use crate::support::RealBed;

async fn echo_guard(prefix: &str, extra: &[(&str, &str)]) -> (EchoServer, pgrst_guard::RunningGuard) {
    let echo = EchoServer::start().await;
    let guard = start_guard_without_waiting(
        &format!("{}{prefix}", echo.url()),
        "postgres://postgres@127.0.0.1:1/postgres",
        extra,
    )
    .await;
    (echo, guard)
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body_under_the_prefix() {
    let (echo, guard) = echo_guard("/rest/v1", &[]).await;
    let http = support::client::HttpClient::new();
    let r = http
        .send(
            Method::PATCH,
            &format!("{}/chat_messages?id=eq.1&select=id,content", guard.url()),
            &[
                ("apikey", "anon-key"),
                ("authorization", "Bearer user.jwt"),
                ("prefer", "return=representation"),
                ("connection", "keep-alive, x-drop-me"),
                ("x-drop-me", "hop"),
                ("keep-alive", "timeout=5"),
            ],
            r#"{"content":"edited"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = r.json();
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["uri"], "/rest/v1/chat_messages?id=eq.1&select=id,content");
    assert_eq!(seen["body"], r#"{"content":"edited"}"#);
    let headers = &seen["headers"];
    assert_eq!(headers["apikey"], "anon-key");
    assert_eq!(headers["authorization"], "Bearer user.jwt");
    assert_eq!(headers["prefer"], "return=representation");
    assert!(
        headers.get("x-drop-me").is_none() && headers.get("keep-alive").is_none(),
        "hop-by-hop headers dropped: {headers}"
    );
    assert_eq!(headers["host"], echo.addr.to_string());
    assert_eq!(headers["x-forwarded-host"], guard.addr.to_string());
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(r.header("x-secret-hop"), None, "headers the upstream named in Connection are dropped");
}

#[tokio::test]
async fn an_absolute_uri_still_goes_only_to_the_configured_upstream() {
    let (_echo, guard) = echo_guard("", &[]).await;
    let mut stream = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    stream
        .write_all(b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""uri":"/latest/meta-data""#), "went to the configured upstream: {answer}");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let (_echo, guard) = echo_guard("", &[]).await;
    let http = support::client::HttpClient::new();
    let upload = vec![b'a'; 8 << 20];
    let r = http.send(Method::POST, &format!("{}/upload", guard.url()), &[], upload).await;
    assert_eq!(r.json()["body_len"], 8 << 20);
    let r = http.get(&format!("{}/big?n={}", guard.url(), 16 << 20)).await;
    assert_eq!(r.body.len(), 16 << 20);
}

#[tokio::test]
async fn http2_clients_are_served() {
    let (_echo, guard) = echo_guard("", &[]).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::get(format!("{}/h2?x=1", guard.url())).body(Full::new(Bytes::new())).unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let seen: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["uri"], "/h2?x=1");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["x-forwarded-host"], guard.addr.to_string());
}

#[tokio::test]
async fn an_unreachable_upstream_gets_a_502_a_browser_can_read() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let guard = start_guard_without_waiting(&dead, "postgres://postgres@127.0.0.1:1/postgres", &[]).await;
    let http = support::client::HttpClient::new();
    let r = http
        .send(Method::GET, &format!("{}/chat_messages", guard.url()), &[("origin", "https://app.example")], "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.header("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    let body = r.json();
    assert_eq!(body["code"], "PGRSTG01");
    assert_eq!(body["message"], "Could not reach PostgREST. The request was not sent, so it is safe to send again.");
    assert!(body.get("details").is_some() && body.get("hint").is_some());
    // The upstream's address and the connector's error chain stay in the guard's log.
    assert!(!r.text().contains(&dead) && !r.text().contains("127.0.0.1"), "{}", r.text());
    assert!(r.header("proxy-status").unwrap().starts_with("pgrst-guard; error=destination_unavailable"));
}

#[tokio::test]
async fn a_silent_upstream_gets_a_504_in_time() {
    let (_echo, guard) = echo_guard("", &[("PGRST_GUARD_UPSTREAM_TIMEOUT_MS", "300")]).await;
    let http = support::client::HttpClient::new();
    let started = std::time::Instant::now();
    let r = http.send(Method::GET, &format!("{}/slow", guard.url()), &[("origin", "https://app.example")], "").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["code"], "PGRSTG02");
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert!(started.elapsed() < Duration::from_secs(5));
}

family_matrix!(cors_preflight_passes_through_to_postgrest, |family| async move {
    let bed = RealBed::start(family, "CREATE TABLE t (id int)").await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let headers = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "apikey,content-type"),
    ];
    let direct = bed.http.send(Method::OPTIONS, &bed.url("/t"), &headers, "").await;
    let r = bed.http.send(Method::OPTIONS, &format!("{}/t", guard.url()), &headers, "").await;
    assert_eq!(r.status, direct.status);
    assert!(r.header("server").is_some_and(|s| s.starts_with("postgrest/")), "answered by PostgREST, not the guard");
    for name in [
        "access-control-allow-origin",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-max-age",
    ] {
        assert_eq!(r.header(name), direct.header(name), "{name}");
    }
    assert!(r.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase().contains("apikey"));
});

/// A request: method, path, headers, body.
type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, &'a str);

/// Headers whose values must reach the client exactly as PostgREST sent them.
const SIGNIFICANT: [&str; 6] =
    ["content-range", "location", "preference-applied", "proxy-status", "content-type", "content-location"];

family_matrix!(answers_through_the_guard_are_postgrests_own, |family| async move {
    let bed = RealBed::start(
        family,
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric);
         INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 30) g;
         CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';",
    )
    .await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let json = ("content-type", "application/json");
    let cases: Vec<Case> = vec![
        (Method::GET, "/items?select=id,name&price=gt.10&order=id.desc&limit=3", vec![], ""),
        (Method::GET, "/items?select=id&order=id", vec![("range", "5-9"), ("prefer", "count=exact")], ""),
        (Method::HEAD, "/items?select=id", vec![("prefer", "count=exact")], ""),
        (Method::GET, "/items?id=eq.1", vec![("accept", "application/vnd.pgrst.object+json")], ""),
        (Method::GET, "/items?id=gt.1", vec![("accept", "application/vnd.pgrst.object+json")], ""),
        (Method::GET, "/items?select=nope", vec![], ""),
        (Method::GET, "/items?id=eq.x", vec![], ""),
        (Method::GET, "/items", vec![("accept-profile", "other")], ""),
        (
            Method::POST,
            "/items",
            vec![json, ("prefer", "return=representation,resolution=merge-duplicates")],
            r#"{"id":100,"name":"upserted","price":1}"#,
        ),
        (
            Method::POST,
            "/items",
            vec![json, ("prefer", "return=headers-only,resolution=merge-duplicates")],
            r#"{"id":101,"name":"h"}"#,
        ),
        (Method::POST, "/items", vec![json], r#"{"id":1,"name":"duplicate"}"#),
        (Method::POST, "/items", vec![json], r#"{"id":"#),
        (Method::PATCH, "/items?id=eq.2", vec![json, ("prefer", "return=representation")], r#"{"name":"two"}"#),
        (Method::DELETE, "/items?id=eq.999", vec![("prefer", "return=representation")], ""),
        (Method::POST, "/rpc/add", vec![json], r#"{"a":2,"b":3}"#),
        (Method::GET, "/rpc/add?a=4&b=5", vec![], ""),
        (Method::GET, "/", vec![("accept", "application/openapi+json")], ""),
    ];
    for (method, path, headers, body) in cases {
        // Writes change what the next one sees (an upsert inserts, then updates): the comparison
        // is between two sends that find the same state.
        // Direct requests on fresh connections: PostgREST 11 leaves a connection unusable after
        // a HEAD, which a pooled test client would trip over.
        let direct_once = support::client::HttpClient::new;
        direct_once().send(method.clone(), &bed.url(path), &headers, body.to_string()).await;
        let through =
            bed.http.send(method.clone(), &format!("{}{path}", guard.url()), &headers, body.to_string()).await;
        let direct = direct_once().send(method.clone(), &bed.url(path), &headers, body.to_string()).await;
        let what = format!("{family:?} {method} {path}");
        assert_eq!(through.status, direct.status, "{what}: {}", through.text());
        assert_eq!(through.body, direct.body, "{what}");
        for name in SIGNIFICANT {
            assert_eq!(through.header(name), direct.header(name), "{what}: {name}");
        }
        assert_eq!(through.header("x-pgrst-guard"), None, "{what}");
    }
});

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let (_echo, guard) = echo_guard("", &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")]).await;
    let admin = format!("http://{}", guard.admin_addr.unwrap());
    let http = support::client::HttpClient::new();
    assert_eq!(http.get(&format!("{admin}/healthz")).await.status, StatusCode::OK);
    let ready = http.get(&format!("{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["database"], "disconnected");
    http.get(&format!("{}/x", guard.url())).await;
    let metrics = http.get(&format!("{admin}/metrics")).await.text();
    assert!(metrics.contains("pgrst_guard_responses_total{status=\"200\"} 1"), "{metrics}");
}

/// What the real PostgREST saw of a request, from inside its transaction.
const SEEN_HEADERS: &str =
    "CREATE FUNCTION seen_headers() RETURNS json LANGUAGE sql STABLE AS $$ SELECT current_setting('request.headers', true)::json $$;";

const FORGERIES: [(&str, &str); 6] = [
    ("connection", "x-forwarded-for, x-forwarded-proto"),
    ("x-forwarded-for", "6.6.6.6"),
    ("forwarded", "for=6.6.6.6;proto=https"),
    ("x-real-ip", "6.6.6.6"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
];

async fn headers_postgrest_saw(family: support::postgrest::Family, trusted: Option<&str>) -> serde_json::Value {
    let bed = RealBed::start(family, SEEN_HEADERS).await;
    let extra: Vec<(&str, &str)> = trusted.map(|t| vec![("PGRST_GUARD_TRUSTED_PROXIES", t)]).unwrap_or_default();
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &extra).await;
    // A trusted proxy does not name its own forwarding headers in `Connection`.
    let skip = usize::from(trusted.is_some());
    let mut headers: Vec<(&str, &str)> = FORGERIES[skip..].to_vec();
    headers.extend([
        ("apikey", "sb_publishable_key"),
        ("prefer", "tx=commit"),
        ("accept-profile", "public"),
        ("x-retry-count", "2"),
    ]);
    let r = bed.http.send(Method::GET, &format!("{}/rpc/seen_headers", guard.url()), &headers, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

family_matrix!(forwarding_headers_cannot_be_erased_or_forged, |family| async move {
    let seen = headers_postgrest_saw(family, None).await;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
    assert_ne!(seen["x-forwarded-host"], "evil.example", "{seen}");
    assert!(seen.get("forwarded").is_none() && seen.get("x-real-ip").is_none(), "{seen}");
    assert_eq!(seen["apikey"], "sb_publishable_key");
    assert_eq!(seen["prefer"], "tx=commit");
    assert_eq!(seen["accept-profile"], "public");
    assert_eq!(seen["x-retry-count"], "2");
    // The guard gives every request an id, and PostgREST sees it.
    assert_eq!(seen["x-request-id"].as_str().map(str::len), Some(36), "{seen}");
});

/// A request id reaches PostgREST and comes back with the answer: the client's own when it sends
/// one, the guard's otherwise; through a heal too, so one id follows a request and its replays.
#[tokio::test]
async fn request_ids_reach_postgrest_and_come_back() {
    let bed = RealBed::start(
        support::postgrest::Family::V14,
        &format!("{SEEN_HEADERS} CREATE TABLE notes (id int PRIMARY KEY);"),
    )
    .await;
    let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let url = format!("{}/rpc/seen_headers", guard.url());
    let r = bed.http.send(Method::GET, &url, &[("x-request-id", "client-chosen-1")], "").await;
    assert_eq!(r.json()["x-request-id"], "client-chosen-1");
    assert_eq!(r.header("x-request-id"), Some("client-chosen-1"));
    let (a, b) = (bed.http.get(&url).await, bed.http.get(&url).await);
    let (a_id, b_id) = (a.header("x-request-id").unwrap().to_string(), b.header("x-request-id").unwrap().to_string());
    assert_ne!(a_id, b_id);
    assert_eq!(a.json()["x-request-id"], a_id.as_str());

    bed.pg.sql("ALTER TABLE notes ADD COLUMN body text").await;
    let r = bed
        .http
        .send(
            Method::POST,
            &format!("{}/notes", guard.url()),
            &[("content-type", "application/json"), ("x-request-id", "heal-me")],
            r#"{"id":1,"body":"b"}"#.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(r.header("x-request-id"), Some("heal-me"));
}

#[tokio::test]
async fn a_trusted_proxys_forwarding_headers_are_kept_and_appended_to() {
    let seen = headers_postgrest_saw(support::postgrest::Family::V14, Some("127.0.0.0/8")).await;
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1", "{seen}");
    assert_eq!(seen["forwarded"], "for=6.6.6.6;proto=https", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
}

family_matrix!(
    the_guards_own_answers_carry_the_cors_headers_postgrest_sends,
    |family: support::postgrest::Family| async move {
        let bed = RealBed::start(family, "CREATE TABLE t (id int)").await;
        let guard = start_guard(&bed.postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
        let origin = [("origin", "https://app.example")];
        let postgrest = bed.http.send(Method::GET, &bed.url("/no_such_table"), &origin, "").await;
        bed.postgrest.stop().await;
        let r = bed.http.send(Method::GET, &format!("{}/t", guard.url()), &origin, "").await;
        assert_eq!((r.status, r.json()["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("PGRSTG01")));
        assert_eq!(r.header("access-control-allow-credentials"), None, "never an echoed origin with credentials");
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        match postgrest.header("access-control-allow-origin") {
            // Any origin, no credentials (v12 on): the same, plus the guard's two headers exposed.
            Some("*") => {
                let exposed = postgrest.header("access-control-expose-headers").unwrap();
                assert!(r.header("access-control-expose-headers").unwrap().starts_with(exposed), "{exposed}");
            }
            // v11 echoes the Origin with credentials; the guard's answers never do.
            echoed => assert_eq!(echoed, Some("https://app.example"), "{family:?}"),
        }
    }
);

/// PostgREST closes idle keep-alive connections (after 30 s): a write sent after that must not
/// meet a connection the guard kept in its pool. A relay in front of PostgREST closes them at once.
#[tokio::test]
async fn a_pooled_connection_postgrest_closed_never_costs_a_request() {
    let bed = RealBed::start(support::postgrest::Family::V14, "CREATE TABLE t (id int PRIMARY KEY)").await;
    let postgrest = support::relay::Relay::start(vec![bed.postgrest.url()["http://".len()..].parse().unwrap()]).await;
    let guard = start_guard(&postgrest.url(), &bed.pg.uri("postgres"), &[]).await;
    let url = format!("{}/t", guard.url());
    for id in 0..4 {
        assert_eq!(bed.http.post_json(&url, &format!(r#"{{"id":{id}}}"#)).await.status, StatusCode::CREATED);
    }
    assert!(open_to(postgrest.addr) > 0, "the premise: the guard pools its connections to PostgREST");
    postgrest.close_open();
    let let_go = support::client::eventually(Duration::from_secs(5), || async { open_to(postgrest.addr) == 0 }).await;
    assert!(let_go, "the guard let go of the connections PostgREST closed");
    for id in 10..14 {
        let r = support::client::HttpClient::new().post_json(&url, &format!(r#"{{"id":{id}}}"#)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    assert_eq!(bed.scalar("SELECT count(*) FROM t").await, 8);
}

/// This process's TCP connections to `peer` that are open on its side (ESTABLISHED, or CLOSE_WAIT:
/// closed by the peer, not yet by us), from /proc/net/tcp.
fn open_to(peer: std::net::SocketAddr) -> usize {
    let remote = format!("0100007F:{:04X}", peer.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields[2] == remote && matches!(fields[3], "01" | "08"))
        .count()
}
