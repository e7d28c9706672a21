//! `pgrst-guard doctor`: checks, with the guard's own configuration, everything healing depends on,
//! ending with the situation that made people need the guard: "I sent NOTIFY and PostgREST still
//! does not see my column". It sends one NOTIFY and watches PostgREST's load counter move.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::{Config, UpstreamUrl};
use crate::health::CannotNotify;
use crate::reload::LoadCounter;
use crate::tls;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

pub struct Finding {
    pub status: Status,
    pub check: &'static str,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        write!(f, "{status} {:<10} {}", self.check, self.message)
    }
}

fn finding(status: Status, check: &'static str, message: impl Into<String>) -> Finding {
    Finding { status, check, message: message.into() }
}

/// Runs every check, printing each finding as it comes; returns them all.
pub async fn run(config: &Config, mut report: impl FnMut(&Finding)) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut note = |f: Finding| {
        report(&f);
        findings.push(f);
    };
    let https = match tls::https_config(config.upstream_ca_file.as_deref()) {
        Ok(https) => https,
        Err(e) => {
            note(finding(Status::Fail, "tls", e));
            return findings;
        }
    };
    note(check_upstream(&config.upstream, https.clone(), config).await);

    let counter = match config.upstream_admin.first() {
        None => {
            note(finding(
                Status::Warn,
                "admin",
                "PGRST_GUARD_UPSTREAM_ADMIN is not set: heals wait with back-off, and this check cannot confirm reloads \
                 (hosted Supabase does not expose PostgREST's admin server)",
            ));
            None
        }
        Some(admin) => {
            let counter = LoadCounter::new(admin, https.clone());
            match counter.successful_loads().await {
                Ok(count) => {
                    note(finding(
                        Status::Ok,
                        "admin",
                        format!("{admin}/metrics: {count} successful schema cache loads so far"),
                    ));
                    Some(counter)
                }
                Err(e) => {
                    note(finding(
                        Status::Fail,
                        "admin",
                        format!("{admin}/metrics: {e} (PostgREST 12.2 or newer has it)"),
                    ));
                    None
                }
            }
        }
    };

    let (client, mut notifications) = match connect_database(config).await {
        Ok(connected) => connected,
        Err(e) => {
            note(finding(Status::Fail, "database", format!("{}: {e}", config.db_uri.redacted())));
            return findings;
        }
    };
    // Unnamed statements in one round trip each, as the guard itself queries: they work through
    // transaction-mode poolers too.
    // A standby answers every query below but refuses the NOTIFY every heal ends with.
    if let Ok(row) = client.query_typed_one("SELECT pg_is_in_recovery()", &[]).await {
        if row.get::<_, bool>(0) {
            note(finding(
                Status::Fail,
                "database",
                format!(
                    "{}: cannot NOTIFY: {}: heals cannot ask PostgREST to reload. Point PGRST_GUARD_DB_URI at the \
                     primary; a multi-host URI with target_session_attrs=read-write follows a failover.",
                    config.db_uri.redacted(),
                    CannotNotify::Standby
                ),
            ));
            return findings;
        }
    }
    let version: String = client
        .query_typed_one("SELECT current_setting('server_version')", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or_else(|_| "unknown".to_string());
    let listeners: i64 = client
        .query_typed_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN ' || quote_ident($1) OR query = 'LISTEN \"' || $1 || '\"'",
            &[(&config.db_channel, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(0);
    // What the server says about this very connection, not what sslmode asked for.
    let encryption =
        match client.query_typed_opt("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl", &[]).await
        {
            Ok(Some(row)) => format!("encrypted ({})", row.get::<_, Option<String>>(0).unwrap_or_default()),
            Ok(None) => "NOT encrypted".to_string(),
            Err(e) => format!("encryption unknown: {}", crate::reload::database::describe(&e)),
        };
    note(finding(
        Status::Ok,
        "database",
        format!(
            "{} (PostgreSQL {version}, sslmode {:?}, connection {encryption}); {listeners} session(s) visibly LISTENing on {:?}",
            config.db_uri.redacted(),
            config.db_uri.ssl_mode(),
            config.db_channel
        ),
    ));

    note(check_listen(&client, &mut notifications).await);
    note(check_reload(&client, counter.as_ref(), config).await);
    findings
}

/// Does LISTEN receive on this connection? A NOTIFY to itself on a private channel must come back.
/// Through a transaction-mode pooler it does not: heals still work, joining others' reloads does not.
async fn check_listen(
    client: &tokio_postgres::Client,
    notifications: &mut tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
) -> Finding {
    // LISTEN belongs to one backend: statements that land on changing backends mean a
    // transaction-mode pooler, where a NOTIFY may come back by luck but cannot be relied on.
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..20 {
        if let Ok(row) = client.query_typed_one("SELECT pg_backend_pid()", &[]).await {
            backends.insert(row.get::<_, i32>(0));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if backends.len() > 1 {
        return finding(
            Status::Warn,
            "listen",
            format!(
                "twenty statements over half a second ran on {} different database backends: a transaction-mode pooler (PgBouncer \
                 pool_mode=transaction, Supabase's port 6543) is in between, so joining reloads others ask for is off \
                 (heals still work with the guard's own NOTIFYs). Use the session pooler (port 5432) or a direct connection.",
                backends.len()
            ),
        );
    }
    let channel = format!("pgrst_guard_doctor_{}", std::process::id());
    let sent = Instant::now();
    let asked = async {
        client.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
        client
            .query_typed("SELECT pg_notify($1, 'doctor')", &[(&channel.as_str(), tokio_postgres::types::Type::TEXT)])
            .await
    };
    if let Err(e) = asked.await {
        return finding(
            Status::Warn,
            "listen",
            format!("LISTEN or NOTIFY failed: {}", crate::reload::database::describe(&e)),
        );
    }
    let heard = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(notification) = notifications.recv().await {
            if notification.channel() == channel {
                return true;
            }
        }
        false
    })
    .await;
    if heard == Ok(true) {
        finding(
            Status::Ok,
            "listen",
            format!(
                "a NOTIFY to itself came back in {} ms: reloads others ask for are joined",
                sent.elapsed().as_millis()
            ),
        )
    } else {
        finding(
            Status::Warn,
            "listen",
            "a NOTIFY to itself did not come back within 2 s: joining reloads others ask for is off (heals still work \
             with the guard's own NOTIFYs). Through a transaction-mode pooler (PgBouncer pool_mode=transaction, \
             Supabase's port 6543) LISTEN cannot work: use the session pooler (port 5432) or a direct connection.",
        )
    }
}

async fn check_upstream(upstream: &UpstreamUrl, https: rustls::ClientConfig, config: &Config) -> Finding {
    let client: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(tls::upstream_connector(https, config.upstream_connect_timeout));
    let uri = format!("{upstream}/");
    let request = match Request::get(&uri).body(Empty::new()) {
        Ok(request) => request,
        Err(e) => return finding(Status::Fail, "upstream", format!("{uri}: {e}")),
    };
    match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
        Ok(Ok(response)) => {
            let server = response.headers().get(header::SERVER).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let openapi = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/openapi+json"));
            let status = response.status();
            let _ = response.into_body().collect().await;
            match (server.strip_prefix("postgrest/"), openapi, status) {
                (Some(version), _, _) => {
                    finding(Status::Ok, "upstream", format!("{upstream} answered {status}; PostgREST {version}"))
                }
                (None, true, _) => finding(
                    Status::Ok,
                    "upstream",
                    format!("{upstream} answered {status} with PostgREST's OpenAPI description (behind a proxy)"),
                ),
                // A gateway (Supabase's) that wants an apikey before it says anything.
                (None, false, StatusCode::UNAUTHORIZED) => finding(
                    Status::Warn,
                    "upstream",
                    format!("{upstream} answered 401 without naming PostgREST: a gateway asking for an apikey?"),
                ),
                (None, false, _) => finding(
                    Status::Fail,
                    "upstream",
                    format!(
                        "{upstream} answered {status}, but it is not PostgREST (Server {server:?}, no OpenAPI description)"
                    ),
                ),
            }
        }
        Ok(Err(e)) => finding(Status::Fail, "upstream", format!("{upstream} is not reachable: {e}")),
        Err(_) => finding(Status::Fail, "upstream", format!("{upstream} did not answer within 5 s")),
    }
}

type Notifications = tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>;

async fn connect_database(config: &Config) -> Result<(tokio_postgres::Client, Notifications), String> {
    let tls = config.db_uri.tls()?;
    let connect = config.db_uri.pg_config().connect(tls);
    let (client, mut connection) = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| "no connection within 10 s".to_string())?
        .map_err(|e| crate::reload::database::describe(&e))?;
    let (forward, notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                let _ = forward.send(notification);
            }
        }
    });
    Ok((client, notifications))
}

/// Sends one NOTIFY and, with the admin server, waits for the load counter to move.
async fn check_reload(client: &tokio_postgres::Client, counter: Option<&LoadCounter>, config: &Config) -> Finding {
    let before = match counter {
        Some(counter) => counter.successful_loads().await.ok(),
        None => None,
    };
    let channel =
        [(&config.db_channel as &(dyn tokio_postgres::types::ToSql + Sync), tokio_postgres::types::Type::TEXT)];
    if let Err(e) = client.query_typed("SELECT pg_notify($1, 'reload schema')", &channel).await {
        let message = match CannotNotify::of(&e) {
            why @ CannotNotify::Refused(_) => format!("cannot NOTIFY: {why}"),
            why => format!("cannot NOTIFY: {why} ({})", crate::reload::database::describe(&e)),
        };
        return finding(Status::Fail, "reload", format!("NOTIFY on {:?} failed: {message}", config.db_channel));
    }
    let (Some(counter), Some(before)) = (counter, before) else {
        return finding(
            Status::Warn,
            "reload",
            format!(
                "sent NOTIFY on {:?}; set PGRST_GUARD_UPSTREAM_ADMIN to confirm PostgREST reloaded",
                config.db_channel
            ),
        );
    };
    let sent = Instant::now();
    while sent.elapsed() < config.heal_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(now) = counter.successful_loads().await {
            if now != before {
                return finding(
                    Status::Ok,
                    "reload",
                    format!(
                        "NOTIFY on {:?} made PostgREST reload in {} ms",
                        config.db_channel,
                        sent.elapsed().as_millis()
                    ),
                );
            }
        }
    }
    finding(
        Status::Fail,
        "reload",
        format!(
            "sent NOTIFY on {:?} but PostgREST did not reload within {} ms: its listener is not receiving. \
             Check that PostgREST's db-channel is {:?} and that it listens on this database; if its log says \
             \"could not access status of transaction\", run `select pg_notification_queue_usage();` \
             (a PostgreSQL notification-queue bug, PostgREST #3147), or restart PostgREST.",
            config.db_channel,
            config.heal_deadline.as_millis(),
            config.db_channel
        ),
    )
}
