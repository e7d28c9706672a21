-- Would PostgREST cache this table or view after a reload? Models `tablesSqlQuery` and
-- `removeInternal` in PostgREST's SchemaCache.hs (src/PostgREST/ up to v14, src/library/PostgREST/
-- in v16), the same in every family from 11.2.2 to 16.2: relkind r, v, m, f or p, never a
-- partition, never pg_catalog or information_schema, and the schema one of db-schemas (the request's
-- own profile, which PostgREST has already checked). No privilege filter.
--
-- One row per key: $1 schemas, $2 names (decoded, compared exactly). The identity is the relation's
-- oid (pg_class is unique by schema and name, so one row at most); the fingerprint what PostgREST
-- caches of it (relation_fingerprint.sql).
SELECT k.idx,
       coalesce(c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition, false)
         AND k.schema NOT IN ('pg_catalog', 'information_schema') AS cached,
       'rel:' || c.oid::text AS identity,
       {relation_fingerprint(c)} AS fingerprint
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(schema, name, idx)
  LEFT JOIN pg_namespace n ON n.nspname = k.schema
  LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.name
