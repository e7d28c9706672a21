//! The catalog check: before a reload, ask the database whether the object a schema-cache error
//! names really exists. If it does, PostgREST's cache is stale; if it does not, the error is the
//! client's, and no reload could cure it. Negative answers are remembered for a while, so a client
//! repeating a bad request costs neither a reload nor a query.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::notifier::Notifier;
use crate::heal::classify::MissingObject;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogAnswer {
    Exists,
    Missing,
    /// A recent check said missing.
    RememberedMissing,
    /// The database could not be asked.
    Unknown,
}

impl CatalogAnswer {
    pub fn as_str(self) -> &'static str {
        match self {
            CatalogAnswer::Exists => "exists",
            CatalogAnswer::Missing => "missing",
            CatalogAnswer::RememberedMissing => "remembered_missing",
            CatalogAnswer::Unknown => "unknown",
        }
    }
}

type CheckKey = (String, MissingObject);

pub struct CatalogCheck {
    database: Arc<Notifier>,
    remember_missing: Duration,
    missing: Mutex<HashMap<CheckKey, Instant>>,
    /// Checks under way, so that a burst of identical errors costs one query.
    in_flight: Mutex<HashMap<CheckKey, watch::Receiver<Option<CatalogAnswer>>>>,
}

const MAX_REMEMBERED: usize = 10_000;

impl CatalogCheck {
    pub fn new(database: Arc<Notifier>, remember_missing: Duration) -> CatalogCheck {
        CatalogCheck {
            database,
            remember_missing,
            missing: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Does `object` exist? `schema` is the request's schema (Accept-/Content-Profile or the first
    /// exposed one), used where PostgREST's message does not qualify the name.
    pub async fn exists(&self, object: &MissingObject, schema: &str) -> CatalogAnswer {
        let key = (schema.to_string(), object.clone());
        if let Some(at) = self.missing.lock().expect("catalog lock").get(&key) {
            if at.elapsed() < self.remember_missing {
                return CatalogAnswer::RememberedMissing;
            }
        }
        let publish_or_join = {
            let mut in_flight = self.in_flight.lock().expect("catalog lock");
            match in_flight.get(&key) {
                Some(receiver) => Err(receiver.clone()),
                None => {
                    let (publish, receiver) = watch::channel(None);
                    in_flight.insert(key.clone(), receiver);
                    Ok(publish)
                }
            }
        };
        let mut receiver = match publish_or_join {
            Ok(publish) => {
                let answer = self.query(object, schema, &key).await;
                publish.send_replace(Some(answer));
                self.in_flight.lock().expect("catalog lock").remove(&key);
                return answer;
            }
            Err(receiver) => receiver,
        };
        let answer = match receiver.wait_for(Option::is_some).await {
            Ok(answer) => answer.expect("waited for an answer"),
            Err(_) => CatalogAnswer::Unknown,
        };
        match answer {
            CatalogAnswer::Missing => CatalogAnswer::RememberedMissing,
            other => other,
        }
    }

    async fn query(&self, object: &MissingObject, schema: &str, key: &CheckKey) -> CatalogAnswer {
        let answer = match object {
            MissingObject::Column { table, column } => {
                self.database
                    .query_bool(
                        "SELECT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped)",
                        &[&schema, table, column],
                    )
                    .await
            }
            MissingObject::Table { schema: named, table } => {
                self.database
                    .query_bool(
                        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','v','m','f','p'))",
                        &[named, table],
                    )
                    .await
            }
            MissingObject::Function { schema: named, name, args } => {
                // PostgREST matches by name and argument names; a function whose named inputs cover
                // the request's keys is what a reload would find.
                self.database
                    .query_bool(
                        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                         WHERE n.nspname = $1 AND p.proname = $2
                           AND $3::text[] <@ COALESCE(p.proargnames::text[], '{}'))",
                        &[named, name, args],
                    )
                    .await
            }
            MissingObject::Relationship { parent, child } => {
                // A direct foreign key either way, a junction table with keys to both (many-to-many),
                // or a view on either side (PostgREST infers view relationships from definitions).
                self.database
                    .query_bool(
                        "WITH rel AS (SELECT c.oid, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                      WHERE n.nspname = $1 AND c.relname IN ($2, $3))
                         SELECT EXISTS (SELECT 1 FROM pg_constraint k JOIN rel a ON a.oid = k.conrelid JOIN rel b ON b.oid = k.confrelid
                                        WHERE k.contype = 'f' AND (a.relname <> b.relname OR $2 = $3))
                             OR EXISTS (SELECT 1 FROM pg_constraint k1 JOIN pg_constraint k2 ON k1.conrelid = k2.conrelid AND k1.oid <> k2.oid
                                        JOIN rel a ON a.oid = k1.confrelid JOIN rel b ON b.oid = k2.confrelid
                                        WHERE k1.contype = 'f' AND k2.contype = 'f' AND a.relname = $2 AND b.relname = $3)
                             OR ((SELECT count(*) FROM rel) = 2 AND EXISTS (SELECT 1 FROM rel WHERE relkind IN ('v','m')))",
                        &[&schema, parent, child],
                    )
                    .await
            }
            MissingObject::Unknown => return CatalogAnswer::Unknown,
        };
        match answer {
            Ok(true) => CatalogAnswer::Exists,
            Ok(false) => {
                let mut missing = self.missing.lock().expect("catalog lock");
                if missing.len() >= MAX_REMEMBERED {
                    let ttl = self.remember_missing;
                    missing.retain(|_, at| at.elapsed() < ttl);
                    if missing.len() >= MAX_REMEMBERED {
                        missing.clear();
                    }
                }
                missing.insert(key.clone(), Instant::now());
                CatalogAnswer::Missing
            }
            Err(e) => {
                tracing::warn!(error = %e, "catalog check failed");
                CatalogAnswer::Unknown
            }
        }
    }
}
