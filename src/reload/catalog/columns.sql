-- Would PostgREST cache this column after a reload? Models the `columns` CTE of `tablesSqlQuery` in
-- PostgREST's SchemaCache.hs, the same in every family from 11.2.2 to 16.2: a column of a cached
-- relation (see tables.sql) with attnum > 0 (no system columns) that is not dropped. Generated and
-- identity columns count; a view's columns are its own attributes. PGRST204's message names the
-- table unqualified: the schema is the request's.
--
-- One row per key: $1 schemas, $2 tables, $3 columns. The identity is the relation (a reload that
-- saw its current definition saw every column of it); the fingerprint what PostgREST caches of it.
SELECT k.idx,
       coalesce(c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
                AND a.attnum > 0 AND NOT a.attisdropped, false)
         AND k.schema NOT IN ('pg_catalog', 'information_schema') AS cached,
       'rel:' || c.oid::text AS identity,
       {relation_fingerprint(c)} AS fingerprint
  FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(schema, tbl, col, idx)
  LEFT JOIN pg_namespace n ON n.nspname = k.schema
  LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.tbl
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = k.col
