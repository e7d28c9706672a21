//! What can be checked of the deployment files as files (tests/it/docker.rs starts them for real): the
//! compose file and the Supabase override parse,
//! its services, ports and environment agree with each other and with the guard's configuration
//! keys, the Dockerfile is multi-stage, non-root and health-checked, and the demo's SQL heals as the
//! README says.

use std::collections::BTreeMap;

use http::StatusCode;
use pgrst_guard::config::{Config, RawConfig, KEYS};
use yaml_rust2::{Yaml, YamlLoader};

use crate::support;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn environment(service: &Yaml) -> BTreeMap<String, String> {
    service["environment"]
        .as_hash()
        .expect("environment as a map")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                other => panic!("unexpected value {other:?}"),
            };
            (k.as_str().unwrap().to_string(), value)
        })
        .collect()
}

#[test]
fn the_compose_file_wires_the_guard_to_postgrest_and_postgres() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("docker-compose.yml parses");
    let services = &docs[0]["services"];
    let (db, rest, guard) = (&services["db"], &services["rest"], &services["guard"]);
    assert!(db["image"].as_str().unwrap().starts_with("postgres:"));
    assert!(rest["image"].as_str().unwrap().starts_with("postgrest/postgrest:"));
    assert_eq!(guard["build"].as_str(), Some("."));

    let rest_env = environment(rest);
    let guard_env = environment(guard);
    for key in guard_env.keys() {
        assert!(KEYS.iter().any(|k| k.env == key), "{key} is not a pgrst-guard key");
    }
    let config = Config::from_raw(&guard_env.clone().into_iter().collect::<RawConfig>())
        .expect("the guard's environment is valid");
    assert_eq!(config.upstream.to_string(), format!("http://rest:{}", rest_env["PGRST_SERVER_PORT"]));
    assert_eq!(config.upstream_admin[0].to_string(), format!("http://rest:{}", rest_env["PGRST_ADMIN_SERVER_PORT"]));
    assert_eq!(config.db_channel, rest_env["PGRST_DB_CHANNEL"]);
    assert_eq!(config.db_schemas.join(","), rest_env["PGRST_DB_SCHEMAS"]);
    assert!(guard_env["PGRST_GUARD_DB_URI"].contains("@db:5432/postgres"));
    assert!(rest_env["PGRST_DB_URI"].contains("@db:5432/postgres"), "NOTIFY goes to the database PostgREST listens on");

    // Published on 127.0.0.1 unless the user says otherwise, mapped to the ports the guard listens on.
    let ports: Vec<&str> = guard["ports"].as_vec().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    for port in [config.listen.port(), config.admin_listen.unwrap().port()] {
        assert!(
            ports.iter().any(|p| p.ends_with(&format!(":{port}}}:{port}")) && p.contains("127.0.0.1")),
            "{ports:?}"
        );
    }
    // Start-up order by health: PostgREST only once the database is healthy, the guard only once
    // PostgREST's cache is loaded.
    assert_eq!(rest["depends_on"]["db"]["condition"].as_str(), Some("service_healthy"));
    assert_eq!(guard["depends_on"]["rest"]["condition"].as_str(), Some("service_healthy"));
    let check: Vec<&str> = rest["healthcheck"]["test"].as_vec().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(check, ["CMD", "postgrest", "--ready"]);
    let mounts: Vec<&str> = db["volumes"].as_vec().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for mount in mounts {
        let file = mount.split(':').next().unwrap().trim_start_matches("./");
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file).exists(), "{file} is missing");
    }
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_and_health_checked() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    let user = dockerfile.lines().rev().find(|l| l.starts_with("USER ")).expect("a USER line");
    assert!(!user.contains("root") && user.trim() != "USER 0", "{user}");
    let healthcheck = dockerfile.lines().skip_while(|l| !l.starts_with("HEALTHCHECK")).take(2).collect::<String>();
    assert!(healthcheck.contains("/healthz"), "{healthcheck}");
    assert!(dockerfile.contains("EXPOSE 8080 8081"));
    assert!(dockerfile.contains("PGRST_GUARD_ADMIN_LISTEN=0.0.0.0:8081"));
}

#[tokio::test]
async fn the_demo_migration_heals_as_the_readme_says() {
    let pg = support::pg::TestCluster::start().await;
    pg.sql(&read("docker/init.sql")).await;
    let postgrest = support::postgrest::RealPostgrest::start(
        support::postgrest::Family::V14,
        support::postgrest::PostgrestOptions::new(&pg),
    )
    .await;
    let guard = support::guard::start_guard(
        &postgrest.url(),
        &pg.uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &postgrest.admin_url())],
    )
    .await;
    pg.sql(&read("docker/migration.sql")).await;
    let r = support::client::HttpClient::new()
        .post_json(&format!("{}/chat_messages", guard.url()), r#"{"content":"hi","artifact_ids":["a1"]}"#)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
}

/// Compose's merge of a service from two files: maps merge key by key (the later file wins),
/// everything else (scalars, lists such as `command` or a health check's `test`) is replaced.
fn compose_merge(base: &Yaml, over: &Yaml) -> Yaml {
    match (base, over) {
        (Yaml::Hash(base), Yaml::Hash(over)) => {
            let mut merged = base.clone();
            for (key, value) in over {
                let combined = match base.get(key) {
                    Some(existing) => compose_merge(existing, value),
                    None => value.clone(),
                };
                merged.insert(key.clone(), combined);
            }
            Yaml::Hash(merged)
        }
        (_, over) => over.clone(),
    }
}

/// Supabase's .env, as compose would substitute it (nested defaults included).
fn substitute(value: &str) -> String {
    let env = [
        ("POSTGRES_PASSWORD", "secret"),
        ("POSTGRES_HOST", "db"),
        ("POSTGRES_PORT", "5432"),
        ("POSTGRES_DB", "postgres"),
        ("PGRST_DB_SCHEMAS", "public,storage,graphql_public"),
        ("JWT_SECRET", "a-jwt-secret"),
        ("JWT_EXPIRY", "3600"),
    ];
    let mut text = value.to_string();
    // Innermost first: `${JWT_JWKS:-${JWT_SECRET}}` with JWT_JWKS unset is JWT_SECRET.
    while let Some(start) = text.rfind("${") {
        let end = start + text[start..].find('}').expect("closed");
        let inner = &text[start + 2..end];
        let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
        let value = env.iter().find(|(k, _)| *k == name).map_or(default, |(_, v)| *v).to_string();
        text.replace_range(start..=end, &value);
    }
    text
}

/// The Supabase override composed onto a copy of Supabase's own compose file (tests/supabase/, at
/// the commit its header names): every service that reaches PostgREST reaches the guard, everything
/// Supabase gives PostgREST still reaches PostgREST but for what the guard must change (each named
/// with its reason), the guard holds none of PostgREST's secrets, the log router still finds
/// PostgREST by its container name, and a heal ends inside Envoy's route timeout.
#[test]
fn the_supabase_override_fits_supabase_self_hosted_as_it_is() {
    let supabase =
        YamlLoader::load_from_str(&read("tests/supabase/docker-compose.yml")).expect("Supabase's file parses");
    let ours = YamlLoader::load_from_str(&read("docker-compose.supabase.yml")).expect("the override parses");
    let (theirs, overrides) = (&supabase[0]["services"], &ours[0]["services"]);
    let base_rest = &theirs["rest"];
    assert!(base_rest["image"].as_str().unwrap().starts_with("postgrest/postgrest:"), "Supabase's `rest` is PostgREST");
    let guard = compose_merge(base_rest, &overrides["rest"]);
    let postgrest = &overrides["postgrest"];
    assert!(theirs["postgrest"].is_badvalue(), "no service of Supabase's is named postgrest");

    // Who calls PostgREST calls `rest:3000`, which is now the guard.
    let calls_rest: Vec<String> = theirs
        .as_hash()
        .unwrap()
        .iter()
        .filter(|(name, service)| {
            name.as_str() != Some("rest")
                && service["environment"]
                    .as_hash()
                    .is_some_and(|env| env.values().any(|v| v.as_str().is_some_and(|v| v.contains("//rest:3000"))))
        })
        .map(|(name, _)| name.as_str().unwrap().to_string())
        .collect();
    assert!(calls_rest.contains(&"storage".to_string()), "Storage calls rest:3000 directly: {calls_rest:?}");
    let lds = read("tests/supabase/lds.template.yaml");
    for route in ["rest-v1-openapi-protected", "rest-v1-protected", "graphql-v1-protected"] {
        let at = lds.find(&format!("name: {route}")).unwrap_or_else(|| panic!("Envoy's {route} route"));
        let block = &lds[at..at + 400.min(lds.len() - at)];
        assert!(block.contains("cluster: rest"), "{route} goes to the rest cluster: {block}");
    }
    assert!(guard["image"].as_str().unwrap().starts_with("pgrst-guard"));
    let guard_env: BTreeMap<String, String> =
        environment(&guard).into_iter().map(|(k, v)| (k, substitute(&v))).collect();
    let guard_keys: RawConfig =
        guard_env.iter().filter(|(k, _)| k.starts_with("PGRST_GUARD_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    for key in guard_keys.keys() {
        assert!(KEYS.iter().any(|k| k.env == key), "{key} is not a pgrst-guard key");
    }
    let config = Config::from_raw(&guard_keys).expect("the guard's environment is valid");
    assert_eq!(config.listen.port(), 3000, "the gateway and Storage call rest:3000");
    let flags: Vec<&str> = guard["command"].as_vec().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(flags, ["--listen", "0.0.0.0:3000"], "Supabase's `postgrest` command is replaced by valid flags");
    let check: Vec<&str> = guard["healthcheck"]["test"].as_vec().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(check.iter().any(|t| t.contains("/readyz")), "the guard's own health check: {check:?}");

    // Compose merges environments: what the guard inherits from Supabase's `rest` is emptied.
    for (key, value) in &guard_env {
        if !key.starts_with("PGRST_GUARD_") {
            assert!(value.is_empty(), "the guard inherits {key}={value} from Supabase's rest");
        }
    }
    // The log router reads container supabase-rest as PostgREST: that is the real PostgREST.
    assert_eq!(base_rest["container_name"].as_str(), Some("supabase-rest"));
    assert_eq!(postgrest["container_name"].as_str(), Some("supabase-rest"));
    assert_ne!(guard["container_name"].as_str(), Some("supabase-rest"));

    // Everything Supabase sets for PostgREST still reaches PostgREST, as Supabase sets it, but for
    // what the guard needs, each with its reason.
    let changed: BTreeMap<&str, (&str, &str)> =
        [("PGRST_ADMIN_SERVER_HOST", ("0.0.0.0", "the guard reads the load counter from another container"))]
            .into_iter()
            .collect();
    let added: BTreeMap<&str, &str> = [
        ("PGRST_SERVER_HOST", "`postgrest --ready` refuses the default wildcard"),
        ("PGRST_SERVER_PORT", "the port the guard forwards to"),
    ]
    .into_iter()
    .collect();
    let theirs_env = environment(base_rest);
    let postgrest_env = environment(postgrest);
    for (key, value) in &theirs_env {
        let ours = postgrest_env.get(key).unwrap_or_else(|| panic!("{key} does not reach PostgREST"));
        match changed.get(key.as_str()) {
            Some((expected, _why)) => assert_eq!(ours, expected, "{key}"),
            None => assert_eq!(ours, value, "{key} reaches PostgREST changed"),
        }
    }
    for key in postgrest_env.keys() {
        assert!(theirs_env.contains_key(key) || added.contains_key(key.as_str()), "{key} is new without a reason");
    }
    assert_eq!(postgrest_env["PGRST_JWT_SECRET"], "${JWT_JWKS:-${JWT_SECRET}}", "asymmetric keys (ES256) verify");
    assert!(!postgrest_env.contains_key("PGRST_APP_SETTINGS_JWT_SECRET"), "removed upstream");
    assert_eq!(postgrest["image"].as_str(), base_rest["image"].as_str(), "the same PostgREST as Supabase's");
    assert_eq!(config.upstream.to_string(), format!("http://postgrest:{}", postgrest_env["PGRST_SERVER_PORT"]));
    assert_eq!(
        config.upstream_admin[0].to_string(),
        format!("http://postgrest:{}", postgrest_env["PGRST_ADMIN_SERVER_PORT"])
    );
    assert_eq!(guard["depends_on"]["postgrest"]["condition"].as_str(), Some("service_healthy"));
    // The NOTIFY goes to the database PostgREST listens on, and the schemas are PostgREST's.
    let db_of = |uri: &str| uri.rsplit('@').next().unwrap().to_string();
    assert_eq!(db_of(&guard_env["PGRST_GUARD_DB_URI"]), db_of(&substitute(&postgrest_env["PGRST_DB_URI"])));
    assert_eq!(guard_env["PGRST_GUARD_DB_SCHEMAS"], substitute(&postgrest_env["PGRST_DB_SCHEMAS"]));

    // Envoy ends a REST request after 30 s with its own 504: a heal (the first answer, then the
    // heal's deadline, which bounds its replays) and the guard's own upstream timeout end before.
    let gateway_timeout = lds
        .match_indices("name: rest-v1-protected")
        .next()
        .and_then(|(at, _)| lds[at..].lines().find_map(|l| l.trim().strip_prefix("timeout: ")))
        .and_then(|t| t.trim_end_matches('s').parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
        .expect("the rest route's timeout");
    assert_eq!(gateway_timeout, std::time::Duration::from_secs(30));
    assert!(config.heal_deadline + std::time::Duration::from_secs(1) < gateway_timeout, "{:?}", config.heal_deadline);
    assert!(config.upstream_timeout < gateway_timeout, "{:?}", config.upstream_timeout);
}
