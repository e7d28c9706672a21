//! The schema cache: tables, columns, keys, foreign keys and functions of the exposed schemas, read
//! from the real catalog in one read-only transaction, as PostgREST's SchemaCache.hs does.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tokio_postgres::Client;

#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub name: String,
    pub data_type: String,
    pub default: Option<String>,
    pub nullable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub is_view: bool,
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A foreign key `table(columns) -> foreign_table(foreign_columns)`.
#[derive(Debug, Clone, Serialize)]
pub struct ForeignKey {
    pub constraint: String,
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
    pub foreign_schema: String,
    pub foreign_table: String,
    pub foreign_columns: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutineParam {
    pub name: String,
    pub data_type: String,
    pub has_default: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Routine {
    pub schema: String,
    pub name: String,
    pub params: Vec<RoutineParam>,
    pub returns_set: bool,
    /// Returns a row type (composite or TABLE), so the answer is an object per row.
    pub returns_composite: bool,
    pub volatile: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct SchemaCache {
    #[serde(rename = "dbTables")]
    pub tables: BTreeMap<String, Table>,
    #[serde(rename = "dbRelationships")]
    pub foreign_keys: Vec<ForeignKey>,
    #[serde(rename = "dbRoutines")]
    pub routines: BTreeMap<String, Vec<Routine>>,
}

pub fn qualified(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}

impl SchemaCache {
    pub fn table(&self, schema: &str, name: &str) -> Option<&Table> {
        self.tables.get(&qualified(schema, name))
    }

    pub fn routines_named(&self, schema: &str, name: &str) -> &[Routine] {
        self.routines.get(&qualified(schema, name)).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn table_names(&self, schema: &str) -> Vec<&str> {
        self.tables.values().filter(|t| t.schema == schema).map(|t| t.name.as_str()).collect()
    }

    pub fn routine_names(&self, schema: &str) -> Vec<&str> {
        self.routines.values().flatten().filter(|r| r.schema == schema).map(|r| r.name.as_str()).collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "Schema cache loaded {} Relations, {} Relationships, {} Functions",
            self.tables.len(),
            self.foreign_keys.len() * 2,
            self.routines.values().map(Vec::len).sum::<usize>()
        )
    }

    /// Runs the catalog queries in one READ ONLY transaction on `client`.
    pub async fn load(client: &mut Client, schemas: &[String]) -> Result<SchemaCache, tokio_postgres::Error> {
        let tx = client.build_transaction().read_only(true).start().await?;
        tx.batch_execute("set local schema ''").await?;
        let mut cache = SchemaCache::default();

        let rows = tx
            .query(
                "SELECT n.nspname::text, c.relname::text, c.relkind::text IN ('v','m'),
                        a.attname::text, format_type(a.atttypid, a.atttypmod),
                        pg_get_expr(d.adbin, d.adrelid), NOT a.attnotnull
                 FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
                 WHERE n.nspname = ANY($1) AND c.relkind IN ('r','v','m','f','p')
                 ORDER BY n.nspname, c.relname, a.attnum",
                &[&schemas],
            )
            .await?;
        for row in rows {
            let (schema, name): (String, String) = (row.get(0), row.get(1));
            let table = cache.tables.entry(qualified(&schema, &name)).or_insert_with(|| Table {
                schema: schema.clone(),
                name: name.clone(),
                is_view: row.get(2),
                columns: Vec::new(),
                primary_key: Vec::new(),
            });
            if let Some(column) = row.get::<_, Option<String>>(3) {
                table.columns.push(Column {
                    name: column,
                    data_type: row.get(4),
                    default: row.get(5),
                    nullable: row.get(6),
                });
            }
        }

        let rows = tx
            .query(
                "SELECT n.nspname::text, c.relname::text, con.conname::text, con.contype::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(num, i)
                              JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num ORDER BY k.i),
                        fn.nspname::text, fc.relname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(num, i)
                              JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num ORDER BY k.i)
                 FROM pg_constraint con
                 JOIN pg_class c ON c.oid = con.conrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_class fc ON fc.oid = con.confrelid
                 LEFT JOIN pg_namespace fn ON fn.oid = fc.relnamespace
                 WHERE con.contype IN ('p', 'f') AND n.nspname = ANY($1)
                 ORDER BY con.conname",
                &[&schemas],
            )
            .await?;
        for row in rows {
            let (schema, table, constraint, kind): (String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let columns: Vec<String> = row.get(4);
            if kind == "p" {
                if let Some(t) = cache.tables.get_mut(&qualified(&schema, &table)) {
                    t.primary_key = columns;
                }
            } else if let (Some(foreign_schema), Some(foreign_table)) = (row.get(5), row.get(6)) {
                cache.foreign_keys.push(ForeignKey {
                    constraint,
                    schema,
                    table,
                    columns,
                    foreign_schema,
                    foreign_table,
                    foreign_columns: row.get(7),
                });
            }
        }

        let rows = tx
            .query(
                "SELECT n.nspname::text, p.proname::text,
                        COALESCE(ARRAY(SELECT COALESCE(p.proargnames[i], '')::text
                                 FROM generate_series(1, COALESCE(array_length(p.proargtypes::oid[], 1), 0)) i
                                 ORDER BY i), '{}'),
                        COALESCE(ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) t), '{}'),
                        p.pronargdefaults::int, p.proretset,
                        (rt.typtype = 'c' OR 't' = ANY(COALESCE(p.proargmodes::text[], '{}'))),
                        p.provolatile = 'v'
                 FROM pg_proc p
                 JOIN pg_namespace n ON n.oid = p.pronamespace
                 JOIN pg_type rt ON rt.oid = p.prorettype
                 WHERE n.nspname = ANY($1) AND p.prokind = 'f'
                 ORDER BY n.nspname, p.proname",
                &[&schemas],
            )
            .await?;
        for row in rows {
            let (schema, name): (String, String) = (row.get(0), row.get(1));
            let names: Vec<String> = row.get(2);
            let types: Vec<String> = row.get(3);
            let defaults = row.get::<_, i32>(4) as usize;
            let first_default = names.len().saturating_sub(defaults);
            let params = names
                .into_iter()
                .zip(types)
                .enumerate()
                .map(|(i, (name, data_type))| RoutineParam { name, data_type, has_default: i >= first_default })
                .collect();
            cache.routines.entry(qualified(&schema, &name)).or_default().push(Routine {
                schema,
                name,
                params,
                returns_set: row.get(5),
                returns_composite: row.get(6),
                volatile: row.get(7),
            });
        }
        tx.commit().await?;
        Ok(cache)
    }
}

/// FuzzySet-like best match (Data.FuzzySet with Levenshtein rescoring): the candidate with the
/// highest `1 - distance / max_len`, when it reaches `min_score`.
pub fn fuzzy_best<'a>(candidates: impl IntoIterator<Item = &'a str>, wanted: &str, min_score: f64) -> Option<String> {
    let wanted = wanted.to_lowercase();
    let mut best: Option<(f64, &str)> = None;
    for candidate in candidates {
        let score = similarity(&candidate.to_lowercase(), &wanted);
        if score >= min_score && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    best.map(|(_, c)| c.to_string())
}

pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    1.0 - previous[b.len()] as f64 / longest as f64
}

/// Relationships seen from one table: many-to-one through its own foreign keys, one-to-many through
/// foreign keys that point at it.
#[derive(Debug, Clone)]
pub enum Relationship<'a> {
    ManyToOne(&'a ForeignKey),
    OneToMany(&'a ForeignKey),
}

impl<'a> Relationship<'a> {
    pub fn target_table(&self) -> (&'a str, &'a str) {
        match self {
            Relationship::ManyToOne(fk) => (&fk.foreign_schema, &fk.foreign_table),
            Relationship::OneToMany(fk) => (&fk.schema, &fk.table),
        }
    }

    pub fn foreign_key(&self) -> &'a ForeignKey {
        match self {
            Relationship::ManyToOne(fk) | Relationship::OneToMany(fk) => fk,
        }
    }
}

impl SchemaCache {
    pub fn relationships_of(&self, schema: &str, table: &str) -> Vec<Relationship<'_>> {
        let mut out = Vec::new();
        for fk in &self.foreign_keys {
            if fk.schema == schema && fk.table == table {
                out.push(Relationship::ManyToOne(fk));
            }
            if fk.foreign_schema == schema && fk.foreign_table == table {
                out.push(Relationship::OneToMany(fk));
            }
        }
        out
    }

    /// Tables of `schema` that take part in any relationship (PostgREST's relationship map keys).
    pub fn tables_with_relationships(&self, schema: &str) -> Vec<&str> {
        let mut names: HashMap<&str, ()> = HashMap::new();
        for fk in &self.foreign_keys {
            if fk.schema == schema {
                names.insert(&fk.table, ());
            }
            if fk.foreign_schema == schema {
                names.insert(&fk.foreign_table, ());
            }
        }
        names.into_keys().collect()
    }
}
