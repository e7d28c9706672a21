-- The definitions a write takes from PostgREST's schema cache, as the catalog has them now: for a
-- relation, each column's nominal type with its modifier and its default expression (what
-- `json_to_recordset(...) AS _(col <type>)` casts a body to, and what `Prefer: missing=default`
-- copies; SchemaCache.hs `format_type(atttypid, atttypmod)` and `pg_get_expr(adbin, adrelid)`,
-- every family 11.2.2-16.2); for a function, every overload's arguments (names, modes, types,
-- defaults), result, kind and volatility, hashed (`funcsSqlQuery`). Content only: TRUNCATE,
-- GRANT, VACUUM FULL or an identical CREATE OR REPLACE leave every row of this the same.
--
-- Three statements (split at the `;` lines): relations and functions, each in two forms:
-- for named targets (`{names}` becomes `AND <name> = ANY ($2::text[])`, which the catalog's name
-- indexes serve) and for a whole snapshot (`{names}` becomes nothing). $1 the schemas, $2 the
-- names. One row per relation or function name.
SELECT 'r' AS kind, n.nspname::text AS schema, c.relname::text AS name,
       array_agg(a.attname::text ORDER BY a.attnum) AS columns,
       array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) AS types,
       array_agg(coalesce(pg_get_expr(d.adbin, d.adrelid), '') ORDER BY a.attnum) AS defaults,
       NULL::text AS fingerprint
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE n.nspname = ANY ($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
   {names}
 GROUP BY n.nspname, c.relname
;
-- functions
SELECT 'f' AS kind, o.schema, o.name, NULL::text[] AS columns, NULL::text[] AS types, NULL::text[] AS defaults,
        md5(string_agg(o.definition, ',' ORDER BY o.definition)) AS fingerprint
  FROM (SELECT n.nspname::text AS schema, p.proname::text AS name,
               concat_ws(':', pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prokind::text,
                         p.provolatile::text) AS definition
          FROM pg_proc p
          JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = ANY ($1::text[]) {names}) AS o
 GROUP BY o.schema, o.name
;
-- named relations, column by column: the cheapest statement to plan for the one query every write
-- batch pays (about a third of the grouped form's planning); PostgreSQL resolves each name itself.
SELECT t.schema, t.name, a.attname::text AS col, format_type(a.atttypid, a.atttypmod) AS type,
       coalesce(pg_get_expr(d.adbin, d.adrelid), '') AS def
  FROM unnest($1::text[], $2::text[]) AS t(schema, name)
  JOIN pg_attribute a ON a.attrelid = to_regclass(quote_ident(t.schema) || '.' || quote_ident(t.name))
                     AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 ORDER BY t.schema, t.name, a.attnum
