//! `pgrst-guard sandbox` end to end: the binary starts PostgreSQL, the real PostgREST and the guard,
//! plays the migration story, serves a developer's own migrations, and removes everything on exit;
//! and it says what to install when a part is missing.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use crate::support;

fn sandbox_command(args: &[&str], postgrest_dir: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgrst-guard"));
    command
        .arg("sandbox")
        .args(args)
        .env("PGRST_GUARD_TEST_POSTGREST", postgrest_dir)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    command
}

/// The sandbox on `port` with `args`, once it has printed its `ready in` line: the child, the rest
/// of its output, and what it printed until then.
fn start_sandbox(port: u16, args: &[&str]) -> (Child, std::io::Lines<BufReader<ChildStdout>>, String) {
    let listen = format!("127.0.0.1:{port}");
    let all_args: Vec<&str> = ["--listen", listen.as_str()].into_iter().chain(args.iter().copied()).collect();
    let dir = support::postgrest::binaries_dir();
    let mut child = sandbox_command(&all_args, dir.to_str().unwrap()).stdout(Stdio::piped()).spawn().unwrap();
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
    (child, lines, seen)
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
    let (mut child, _, seen) = start_sandbox(port, &["--migrations", migrations.to_str().unwrap()]);
    let r = support::client::HttpClient::new().get(&format!("http://127.0.0.1:{port}/todos")).await;
    assert_eq!(r.json(), serde_json::json!([{"id": 1, "title": "write tests"}]), "{seen}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&migrations);
    assert!(!files_dir(&seen).exists(), "the sandbox directory is removed");
}

/// A Supabase project's `supabase/migrations`, as written: grants to anon and authenticated, row
/// level security with `auth.uid()`, a foreign key to `auth.users`, a function. The sandbox applies
/// them after PostgREST's and Supabase's roles, serves them through the guard for the anon key and a
/// user's JWT, applies a new file with `--watch`, and the guard heals the running API across it.
#[tokio::test]
async fn a_supabase_projects_migrations_run_as_written_and_watch_heals_the_next_one() {
    let migrations = std::env::temp_dir().join(format!("pgrst-guard-supabase-migrations-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&migrations);
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(
        migrations.join("20260101000000_profiles.sql"),
        "create table public.profiles (
           id uuid primary key references auth.users on delete cascade,
           username text unique,
           created_at timestamptz default now()
         );
         alter table public.profiles enable row level security;
         create policy \"Profiles are public\" on public.profiles for select using (true);
         create policy \"Own profile\" on public.profiles for update using (auth.uid() = id);
         grant select on public.profiles to anon;
         grant all on public.profiles to authenticated;",
    )
    .unwrap();
    std::fs::write(
        migrations.join("20260101000100_todos.sql"),
        "create table public.todos (
           id bigint generated by default as identity primary key,
           user_id uuid not null default auth.uid() references auth.users,
           task text check (char_length(task) > 3),
           is_complete boolean default false
         );
         alter table public.todos enable row level security;
         create policy \"Own todos\" on public.todos for all to authenticated
           using ((select auth.uid()) = user_id) with check ((select auth.uid()) = user_id);
         revoke all on public.todos from anon;",
    )
    .unwrap();
    std::fs::write(
        migrations.join("20260101000200_count.sql"),
        "create function public.my_todo_count() returns bigint language sql stable security invoker
           as $$ select count(*) from public.todos $$;",
    )
    .unwrap();
    let port = support::pg::free_port();
    let (mut child, lines, seen) = start_sandbox(port, &["--migrations", migrations.to_str().unwrap(), "--watch"]);
    let field = |name: &str| {
        seen.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name}: {seen}"))
    };
    let (db, secret, anon) = (field("PostgreSQL"), field("jwt secret"), field("anon key"));
    let applied = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let applied = applied.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                applied.lock().unwrap().push_str(&line);
            }
        });
    }
    // A user signed up (auth.users), with a session JWT as Supabase's auth issues it.
    let user = "6f1e1d5c-2c1a-4a7e-9a55-3f0e4b2c7d10";
    let (client, connection) = tokio_postgres::connect(&db, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("insert into auth.users (id, email) values ('{user}', 'ann@example.com')"))
        .await
        .unwrap();
    let jwt = pgrst_guard::sandbox::sign_hs256(
        &secret,
        &serde_json::json!({"sub": user, "role": "authenticated", "email": "ann@example.com", "exp": 4_102_444_800u64}),
    );
    let http = support::client::HttpClient::new();
    let api = format!("http://127.0.0.1:{port}");
    let (user_bearer, anon_bearer) = (format!("Bearer {jwt}"), format!("Bearer {anon}"));
    let user_headers =
        [("apikey", anon.as_str()), ("authorization", user_bearer.as_str()), ("content-type", "application/json")];
    let anon_headers =
        [("apikey", anon.as_str()), ("authorization", anon_bearer.as_str()), ("content-type", "application/json")];

    let r =
        http.send(http::Method::POST, &format!("{api}/todos"), &user_headers, r#"{"task":"write the guard"}"#).await;
    assert_eq!(r.status, http::StatusCode::CREATED, "{}", r.text());
    let r = http.send(http::Method::GET, &format!("{api}/todos?select=task,user_id"), &user_headers, "").await;
    assert_eq!(r.json(), serde_json::json!([{"task": "write the guard", "user_id": user}]), "RLS with auth.uid()");
    let r = http.send(http::Method::GET, &format!("{api}/todos"), &anon_headers, "").await;
    assert_eq!(r.status, http::StatusCode::UNAUTHORIZED, "anon has no grant on todos: {}", r.text());
    let r = http.send(http::Method::POST, &format!("{api}/rpc/my_todo_count"), &user_headers, "{}").await;
    assert_eq!((r.status, r.text()), (http::StatusCode::OK, "1".to_string()));
    let r = http.send(http::Method::GET, &format!("{api}/profiles"), &anon_headers, "").await;
    assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());

    // A new migration, applied by --watch while the API runs: the next write naming it heals.
    std::fs::write(
        migrations.join("20260102000000_priority.sql"),
        "alter table public.todos add column priority int default 0;",
    )
    .unwrap();
    let picked_up = support::client::eventually(std::time::Duration::from_secs(10), || async {
        applied.lock().unwrap().contains("20260102000000_priority.sql")
    })
    .await;
    assert!(picked_up, "--watch applied the new file");
    let r = http
        .send(http::Method::POST, &format!("{api}/todos"), &user_headers, r#"{"task":"ship it","priority":2}"#)
        .await;
    assert_eq!(r.status, http::StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&migrations);
}

#[test]
fn a_failing_migration_is_named_with_postgresqls_message_and_line() {
    let migrations = std::env::temp_dir().join(format!("pgrst-guard-broken-migrations-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&migrations);
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(migrations.join("001_ok.sql"), "create table public.things (id int primary key);").unwrap();
    std::fs::write(
        migrations.join("002_broken.sql"),
        "create table public.notes (id int primary key);\n\nalter table public.notes add column body txet;\n",
    )
    .unwrap();
    let dir = support::postgrest::binaries_dir();
    let out = sandbox_command(&["--once", "--migrations", migrations.to_str().unwrap()], dir.to_str().unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("002_broken.sql") && stderr.contains("at line 3"), "{stderr}");
    assert!(stderr.contains("type \"txet\" does not exist"), "{stderr}");
    let _ = std::fs::remove_dir_all(&migrations);
}
