//! Limits and shutdown: each limit answers with a clear PostgREST-shaped error, and a SIGTERM lets
//! open requests finish.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support;
use crate::support::client::HttpClient;
use crate::support::echo::EchoServer;
use crate::support::guard::start_guard_without_waiting;

const NO_DB: &str = "postgres://postgres@127.0.0.1:1/postgres";

async fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_slow_request_head_gets_408_and_the_connection_closes() {
    let echo = EchoServer::start().await;
    let guard = start_guard_without_waiting(&echo.url(), NO_DB, &[("PGRST_GUARD_HEADER_READ_TIMEOUT_MS", "300")]).await;
    let mut stream = TcpStream::connect(guard.addr).await.unwrap();
    stream.write_all(b"GET /chat_messages HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let answer = read_all(&mut stream).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"PGRSTG04""#), "{answer}");
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let echo = EchoServer::start().await;
    let guard = start_guard_without_waiting(&echo.url(), NO_DB, &[("PGRST_GUARD_MAX_CONNECTIONS", "2")]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(guard.addr).await.unwrap();
        stream.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    let mut third = TcpStream::connect(guard.addr).await.unwrap();
    third.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n").await.unwrap();
    let answer = read_all(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"PGRSTG05""#), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("access-control-allow-origin: *"), "{answer}");
    drop(held);
    // Once a held connection closes, new ones are served again.
    let http = HttpClient::new();
    let served = support::client::eventually(Duration::from_secs(5), || async {
        http.try_send(Method::GET, &format!("{}/x", guard.url()), &[], "")
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    assert!(served);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let echo = EchoServer::start().await;
    let guard = start_guard_without_waiting(&echo.url(), NO_DB, &[("PGRST_GUARD_MAX_HEADER_BYTES", "2048")]).await;
    let http = HttpClient::new();
    let big = "x".repeat(4096);
    let r = http.send(Method::GET, &format!("{}/x", guard.url()), &[("x-big", &big)], "").await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.json()["code"], "PGRSTG06");
    let r = http.send(Method::GET, &format!("{}/x", guard.url()), &[("x-small", "y")], "").await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let echo = EchoServer::start().await;
    let guard = start_guard_without_waiting(&echo.url(), NO_DB, &[("PGRST_GUARD_MAX_BODY_BYTES", "1000")]).await;
    let http = HttpClient::new();
    let r = http.send(Method::POST, &format!("{}/x", guard.url()), &[], vec![b'a'; 2000]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["code"], "PGRSTG07");

    // Chunked, so the length is only known while streaming.
    let mut stream = TcpStream::connect(guard.addr).await.unwrap();
    let chunk = "a".repeat(600);
    let request = format!(
        "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("PGRSTG07"), "{answer}");

    let r = http.send(Method::POST, &format!("{}/x", guard.url()), &[], vec![b'a'; 900]).await;
    assert_eq!(r.json()["body_len"], 900);
}

#[tokio::test]
async fn sigterm_lets_open_requests_finish_then_exits_zero() {
    let echo = EchoServer::start().await;
    let port = support::pg::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgrst-guard"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", &echo.url(), "--db-uri", NO_DB])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("pgrst-guard listening") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let http = HttpClient::new();
    let url = format!("http://127.0.0.1:{port}/delay");
    let open = tokio::spawn({
        let http = http.clone();
        async move { http.send(Method::GET, &url, &[], "").await }
    });
    // The request is open once the echo has begun to answer it (it takes 700 ms).
    let started = support::client::eventually(Duration::from_secs(5), || async {
        support::echo::DELAYED_STARTED.load(std::sync::atomic::Ordering::Acquire) == 1
    })
    .await;
    assert!(started);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let refused = support::client::eventually(Duration::from_secs(5), || async move {
        TcpStream::connect(("127.0.0.1", port)).await.is_err()
    })
    .await;
    assert!(refused, "no new connections after SIGTERM");
    let answer = open.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "the open request finished");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// An origin that accepts any upgrade and then echoes bytes back (a WebSocket server, reduced to
/// what the guard sees of one).
async fn upgrade_echo_origin() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await;
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

async fn open_tunnel(guard: &pgrst_guard::RunningGuard) -> TcpStream {
    let mut stream = TcpStream::connect(guard.addr).await.unwrap();
    stream
        .write_all(
            b"GET /realtime/v1/websocket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "the upgrade is answered");
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    stream.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping", "the tunnel carries bytes both ways");
    stream
}

#[tokio::test]
async fn websocket_tunnels_count_against_the_cap_and_close_when_idle() {
    let origin = upgrade_echo_origin().await;
    let rest = EchoServer::start().await;
    let guard = start_guard_without_waiting(
        &rest.url(),
        NO_DB,
        &[
            ("PGRST_GUARD_REST_PREFIX", "/rest/v1"),
            ("PGRST_GUARD_PASSTHROUGH_UPSTREAM", &format!("http://{origin}")),
            ("PGRST_GUARD_MAX_CONNECTIONS", "1"),
            ("PGRST_GUARD_IDLE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let mut tunnel = open_tunnel(&guard).await;
    // The tunnel holds the only connection slot.
    let mut other = TcpStream::connect(guard.addr).await.unwrap();
    other.write_all(b"GET /rest/v1/x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answer = read_all(&mut other).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // Nothing passes for longer than the idle timeout: the guard closes the tunnel, freeing the slot.
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "closed: {closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(800), "not before the idle timeout");
    let served = support::client::eventually(Duration::from_secs(3), || async {
        HttpClient::new()
            .try_send(Method::GET, &format!("{}/rest/v1/x", guard.url()), &[], "")
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    assert!(served, "the slot is free again");
}

#[tokio::test]
async fn idle_keep_alive_and_http2_connections_are_closed() {
    let echo = EchoServer::start().await;
    let guard = start_guard_without_waiting(&echo.url(), NO_DB, &[("PGRST_GUARD_IDLE_TIMEOUT_MS", "500")]).await;
    // HTTP/1.1 keep-alive.
    let mut stream = TcpStream::connect(guard.addr).await.unwrap();
    stream.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(stream.read(&mut buf).await.unwrap() > 0);
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "an idle HTTP/1.1 connection is closed: {closed:?}");

    // HTTP/2 (h2c).
    let stream = TcpStream::connect(guard.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request =
        http::Request::get(format!("{}/x", guard.url())).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), StatusCode::OK);
    let ended = tokio::time::timeout(Duration::from_secs(3), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection is closed by the guard");
}
