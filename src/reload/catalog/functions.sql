-- Would a call to this function resolve after a reload? Models PostgREST's `funcsSqlQuery` in
-- SchemaCache.hs (which functions are cached) and `findProc` in Plan.hs (which cached overload a
-- call picks), alike in every family from 11.2.2 to 16.2:
-- * cached: prokind 'f' (no procedures, aggregates or window functions), not RETURNS trigger, in the
--   request's schema, and "callable": every input argument named, or exactly one unnamed input
--   argument of type bytea, json, jsonb, text or xml;
-- * a call with keys K picks an overload whose required argument names are K minus its optional
--   ones (K empty for none; not for a text/xml/bytea body), else, on a POST only, the one overload
--   with a single argument of the body's type (json/jsonb for JSON). From 14.2 on (PostgREST
--   #4553, `hasSingleUnnamedParam`) that argument must also be unnamed: a function with one named
--   jsonb argument called with other keys is PGRST202 there, and 42883 from PostgreSQL before.
--   Exactly one pick resolves; two are PGRST203, not a stale cache.
--
-- One row per key: $1 schemas, $2 names, $3 the keys as a JSON array, $4 the call's shape (get,
-- json, text, xml, bytea), $5 'true' where the single body argument must be unnamed (14.2+). The
-- identity is the name in its schema (a reload that saw every overload of it in their current
-- definitions cannot be cured by another, whatever keys a call sends); the fingerprint what
-- PostgREST caches of every overload: arguments with names, modes and defaults, result, kind,
-- volatility. Never the body or the row version: an identical CREATE OR REPLACE changes nothing.
WITH k AS (
  SELECT k.idx, k.schema, k.name, k.shape, k.strict = 'true' AS unnamed_body_argument,
         ARRAY(SELECT jsonb_array_elements_text(k.keys::jsonb)) AS keys
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
         WITH ORDINALITY AS k(schema, name, keys, shape, strict, idx)
),
overloads AS (
  SELECT k.idx, n.oid AS nsp, p.oid, p.prokind, p.prorettype,
         concat_ws(':', pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prokind::text,
                   p.provolatile::text) AS definition,
         coalesce(a.names, '{}') AS names, coalesce(a.types, '{}') AS types,
         coalesce(a.required, '{}') AS required, coalesce(a.callable, true) AS callable
    FROM k
    JOIN pg_namespace n ON n.nspname = k.schema
    JOIN pg_proc p ON p.pronamespace = n.oid AND p.proname = k.name
    LEFT JOIN LATERAL (
      SELECT array_agg(coalesce(arg.name, '') ORDER BY arg.ord) AS names,
             array_agg(arg.type ORDER BY arg.ord) AS types,
             coalesce(array_agg(coalesce(arg.name, '') ORDER BY arg.ord)
                      FILTER (WHERE arg.ord <= p.pronargs - p.pronargdefaults), '{}') AS required,
             CASE count(*) - count(arg.name)
               WHEN 0 THEN true
               WHEN 1 THEN (array_agg(arg.type ORDER BY arg.ord))[1]
                           IN ('bytea'::regtype, 'json'::regtype, 'jsonb'::regtype, 'text'::regtype, 'xml'::regtype)
               ELSE false
             END AS callable
        FROM unnest(p.proargnames, p.proargtypes::oid[], p.proargmodes) WITH ORDINALITY AS arg(name, type, mode, ord)
       WHERE arg.type IS NOT NULL
    ) AS a ON true
),
judged AS (
  SELECT o.idx, o.nsp, o.definition,
         o.prokind = 'f' AND o.prorettype <> 'trigger'::regtype AND o.callable AS cached,
         -- K minus the optional names equals the required names: the required ones all among K,
         -- and K all among the names. No parameters want no keys, and no raw body.
         (o.required <@ k.keys AND k.keys <@ o.names
           AND (cardinality(o.names) > 0 OR (cardinality(k.keys) = 0 AND k.shape IN ('get', 'json')))) AS by_names,
         (k.shape <> 'get' AND cardinality(o.types) = 1
           AND (NOT k.unnamed_body_argument OR o.names[1] = '')
           AND CASE k.shape
                 WHEN 'json' THEN o.types[1] IN ('json'::regtype, 'jsonb'::regtype)
                 WHEN 'text' THEN o.types[1] = 'text'::regtype
                 WHEN 'xml' THEN o.types[1] = 'xml'::regtype
                 WHEN 'bytea' THEN o.types[1] = 'bytea'::regtype
                 ELSE false
               END) AS single_body_argument
    FROM overloads o JOIN k ON k.idx = o.idx
)
SELECT k.idx,
       coalesce(count(*) FILTER (WHERE j.cached AND j.by_names) = 1
                OR (count(*) FILTER (WHERE j.cached AND j.by_names) = 0
                    AND count(*) FILTER (WHERE j.cached AND j.single_body_argument) = 1), false) AS cached,
       'fn:' || min(j.nsp)::text || ':' || quote_ident(k.name) AS identity,
       md5(string_agg(j.definition, ',' ORDER BY j.definition)) AS fingerprint
  FROM k LEFT JOIN judged j ON j.idx = k.idx
 GROUP BY k.idx, k.name
