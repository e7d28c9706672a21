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
--   client's own error, never stale. What the rule cannot tell apart from a stale cast (a trigger
--   of the table failing a cast of its own), the guard learns from (see mod.rs).
--
-- One row per key: $1 schemas, $2 tables, $3 the body's columns as a JSON array, $4 the type cast
-- to, $5 the column (42804) or NULL, $6 its current type (42804) or NULL. The fingerprint is the
-- table's catalog row and its body columns' rows: ALTER COLUMN ... TYPE changes them.
WITH k AS (
  SELECT k.idx, k.schema, k.tbl, k.cast_to, k.col, k.cur,
         ARRAY(SELECT jsonb_array_elements_text(k.cols::jsonb)) AS cols
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
         WITH ORDINALITY AS k(schema, tbl, cols, cast_to, col, cur, idx)
),
rel AS (
  SELECT k.idx, c.oid, c.xmin
    FROM k
    JOIN pg_namespace n ON n.nspname = k.schema
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.tbl
   WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
),
-- Every spelling of each body column's current type, without a schema.
spelled AS (
  SELECT r.idx, a.attname::text AS col, a.attnum, a.xmin,
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
       EXISTS (SELECT 1 FROM rel r WHERE r.idx = k.idx)
       AND (SELECT count(DISTINCT s.col) FROM spelled s WHERE s.idx = k.idx) = cardinality(k.cols)
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
       (SELECT string_agg(r.oid::text || ':' || r.xmin::text, ',') FROM rel r WHERE r.idx = k.idx) || '/' ||
       coalesce((SELECT string_agg(DISTINCT s.attnum::text || ':' || s.xmin::text, ',') FROM spelled s WHERE s.idx = k.idx), '')
         AS fingerprint
  FROM k
