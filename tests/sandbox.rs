//! `pgrst-guard sandbox` end to end: the binary starts PostgreSQL, the real PostgREST and the guard,
//! plays the migration story, serves a developer's own migrations, and removes everything on exit;
//! and it says what to install when a part is missing.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

fn sandbox_command(args: &[&str], postgrest_dir: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgrst-guard"));
    command
        .arg("sandbox")
        .args(args)
        .env("PGRST_GUARD_TEST_POSTGREST", postgrest_dir)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    command
}

/// The `files` line: the directory the sandbox made.
fn files_dir(stdout: &str) -> std::path::PathBuf {
    let line = stdout.lines().find(|l| l.starts_with("files")).expect("the sandbox names its directory");
    std::path::PathBuf::from(line.trim_start_matches("files").trim())
}

#[test]
fn the_sandbox_plays_the_story_and_cleans_up() {
    let port = support::pg::free_port();
    let dir = support::postgrest::binaries_dir();
    let started = Instant::now();
    let out = sandbox_command(&["--show", "--once", "--listen", &format!("127.0.0.1:{port}")], dir.to_str().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\nthe whole sandbox run took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("pgrst-guard http://127.0.0.1:{port}")), "{stdout}");
    assert!(stdout.contains("POST straight to PostgREST: 400") && stdout.contains("PGRST204"), "{stdout}");
    assert!(stdout.contains("POST through pgrst-guard:   201 X-Pgrst-Guard: replayed"), "{stdout}");
    assert!(!files_dir(&stdout).exists(), "the sandbox directory is removed");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "the guard's port is free");
}

#[test]
fn a_missing_postgrest_says_what_to_install() {
    let out = sandbox_command(&["--once"], "/nonexistent").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("PostgREST was not found") && stderr.contains("releases"), "{stderr}");
}

#[tokio::test]
async fn a_developers_migrations_become_the_api_until_sigterm() {
    let migrations = std::env::temp_dir().join(format!("pgrst-guard-migrations-{}", std::process::id()));
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(migrations.join("001_todos.sql"), "CREATE TABLE todos (id serial PRIMARY KEY, title text)").unwrap();
    std::fs::write(migrations.join("002_seed.sql"), "INSERT INTO todos (title) VALUES ('write tests')").unwrap();
    let port = support::pg::free_port();
    let dir = support::postgrest::binaries_dir();
    let mut child = sandbox_command(
        &["--listen", &format!("127.0.0.1:{port}"), "--migrations", migrations.to_str().unwrap()],
        dir.to_str().unwrap(),
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("ready in") {
            break;
        }
    }
    let r = support::client::HttpClient::new().get(&format!("http://127.0.0.1:{port}/todos")).await;
    assert_eq!(r.json(), serde_json::json!([{"id": 1, "title": "write tests"}]), "{seen}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&migrations);
    assert!(!files_dir(&seen).exists(), "the sandbox directory is removed");
}
