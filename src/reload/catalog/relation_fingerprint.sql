-- What PostgREST caches of one relation, hashed: its kind and name, and per column (in order) the
-- name, nominal type with its modifier (`format_type(atttypid, atttypmod)`, what a write's body is
-- cast to), nullability, default expression, generated and identity kinds (SchemaCache.hs
-- `tablesSqlQuery`'s `columns`). Content, never row versions: TRUNCATE, GRANT, VACUUM FULL or
-- CLUSTER leave it as it is; ALTER COLUMN ... TYPE, SET DEFAULT, ADD and DROP COLUMN change it.
-- `:rel` is the pg_class alias the including query names.
md5(concat_ws('|', :rel.relkind::text, :rel.relispartition::text, :rel.relname::text,
  (SELECT string_agg(concat_ws(':', quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                               a.attnotnull::text, a.attgenerated::text, a.attidentity::text,
                               pg_get_expr(d.adbin, d.adrelid)), ',' ORDER BY a.attnum)
     FROM pg_attribute a
     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = :rel.oid AND a.attnum > 0 AND NOT a.attisdropped)))
