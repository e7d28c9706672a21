-- Did PostgREST cast a write's body to column types the catalog no longer has? PostgREST builds the
-- body's record from its cache: `json_to_record(set)(...) AS _("col" <colNominalType>, ...)` for
-- the body's columns (SchemaCache.hs `format_type(atttypid, atttypmod)` as nominal_data_type;
-- Query/SqlFragment.hs `fromJsonBodyF`), in every family from 11.2.2 to 16.2. A cast failure
-- names the type cast to (22001, 22003, 22P02, 22007) or, for 42804 (no assignment cast from the
-- cached type to the current one), the column, its current type and the cached one.
--
-- Stale means: the table is cached, every body column exists, and
-- * 42804: the named column is one of the body's, its current type is the one the message names,
--   and the type cast to is not among its current spellings;
-- * otherwise: no body column's current type, in any spelling PostgreSQL may use for it (with or
--   without its modifier, its element type, its domain's base type, with or without schema), is
--   the type cast to. A value too long for a column's *current* varchar(64) names varchar(64): a
--   client's own error, never stale.
--
-- A replay must not repeat what the failed request did, so the evidence must show the error came
-- from the body's cast, which `json_to_recordset` materialises whole before the first row reaches
-- the table. Anything that could raise the same error after a row was written is not stale:
-- * the relation has a trigger of its own (a BEFORE trigger's `nextval`, `http_post` or
--   `dblink_exec` would run again on a replay);
-- * a generated column has the type cast to (its expression runs per row).
-- `select=` casts, filters and form bodies are ruled out by the classifier before this query.
--
-- One row per key: $1 schemas, $2 tables, $3 the body's columns as a JSON array, $4 the type cast
-- to, $5 the column (42804) or NULL, $6 its current type (42804) or NULL. The identity is the
-- relation; the fingerprint what PostgREST caches of it (relation_fingerprint.sql).
WITH k AS (
  SELECT k.idx, k.schema, k.tbl, k.cast_to, k.col, k.cur,
         ARRAY(SELECT jsonb_array_elements_text(k.cols::jsonb)) AS cols
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
         WITH ORDINALITY AS k(schema, tbl, cols, cast_to, col, cur, idx)
),
rel AS (
  SELECT k.idx, c.oid, {relation_fingerprint(c)} AS fingerprint,
         EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = c.oid AND NOT tg.tgisinternal) AS has_triggers
    FROM k
    JOIN pg_namespace n ON n.nspname = k.schema
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.tbl
   WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
),
-- Every spelling of each body column's current type, without a schema.
spelled AS (
  SELECT r.idx, a.attname::text AS col,
         regexp_replace(s.spelling, '^[^.(]*\.', '') AS spelling
    FROM rel r
    JOIN k ON k.idx = r.idx
    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ANY (k.cols)
    JOIN pg_type t ON t.oid = a.atttypid
    CROSS JOIN LATERAL (VALUES
      (format_type(a.atttypid, a.atttypmod)),
      (format_type(a.atttypid, NULL)),
      (CASE WHEN t.typelem <> 0 AND t.typlen = -1 THEN format_type(t.typelem, a.atttypmod) END),
      (CASE WHEN t.typelem <> 0 AND t.typlen = -1 THEN format_type(t.typelem, NULL) END),
      (CASE WHEN t.typbasetype <> 0 THEN format_type(t.typbasetype, t.typtypmod) END),
      (CASE WHEN t.typbasetype <> 0 THEN format_type(t.typbasetype, NULL) END),
      (t.typname::text)
    ) AS s(spelling)
   WHERE s.spelling IS NOT NULL
)
SELECT k.idx,
       EXISTS (SELECT 1 FROM rel r WHERE r.idx = k.idx AND (k.col IS NOT NULL OR NOT r.has_triggers))
       AND (SELECT count(DISTINCT s.col) FROM spelled s WHERE s.idx = k.idx) = cardinality(k.cols)
       AND (k.col IS NOT NULL OR NOT EXISTS (SELECT 1 FROM rel r
                         JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
                                            AND a.attgenerated <> ''
                        WHERE r.idx = k.idx
                          AND regexp_replace(format_type(a.atttypid, NULL), '^[^.(]*\.', '')
                              = regexp_replace(regexp_replace(k.cast_to, '\(.*$', ''), '^[^.(]*\.', '')))
       AND CASE
             WHEN k.col IS NOT NULL THEN
               k.col = ANY (k.cols)
               AND EXISTS (SELECT 1 FROM spelled s WHERE s.idx = k.idx AND s.col = k.col
                              AND s.spelling = regexp_replace(k.cur, '^[^.(]*\.', ''))
               AND NOT EXISTS (SELECT 1 FROM spelled s WHERE s.idx = k.idx AND s.col = k.col
                                  AND s.spelling = regexp_replace(k.cast_to, '^[^.(]*\.', ''))
             ELSE
               NOT EXISTS (SELECT 1 FROM spelled s WHERE s.idx = k.idx
                              AND s.spelling = regexp_replace(k.cast_to, '^[^.(]*\.', ''))
           END AS cached,
       (SELECT 'rel:' || r.oid::text FROM rel r WHERE r.idx = k.idx) AS identity,
       (SELECT r.fingerprint FROM rel r WHERE r.idx = k.idx) AS fingerprint
  FROM k
