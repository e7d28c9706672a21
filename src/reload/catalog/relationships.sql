-- Would an embed `select=...,target!hint(...)` from `origin` resolve after a reload? Models
-- PostgREST's relationships (SchemaCache.hs: `allM2OandO2ORels`, `addInverseRels`, `addM2MRels`,
-- `allViewsKeyDependencies`, `allComputedRels`, `removeInternal`) and the embed's resolution
-- (Plan.hs `findRel`), alike in every family from 11.2.2 to 16.2. Only relationships within the
-- request's schema can be embedded. The candidates:
-- * a foreign key either way between the origin and a table: the target names that table, or
--   (without a hint) the key's constraint or its single column on the origin's side; a hint must
--   name the constraint or one of the key's single columns;
-- * a self-referencing key, which is many-to-one by its column and one-to-many by the table name
--   (a hint naming the referencing column), never when it is one-to-one;
-- * many-to-many through a junction with two different many-to-one keys (neither one-to-one) whose
--   columns all lie in the junction's primary key; a hint must name the junction;
-- * a computed relationship: a function of the request's schema named like the target, taking the
--   origin's row type as its single argument and returning a table's row type (hints ignored);
-- * views: PostgREST follows a view's plain columns back to its base tables' keys. Here a view on
--   either side is resolved through every relation its definition depends on, a superset of
--   PostgREST's tracing: what this lets through, the guard learns from (see mod.rs).
--
-- One row per key: $1 schemas, $2 origins, $3 targets, $4 hints (NULL: none). The identity is the
-- origin relation and the target it resolved to, never the hint (a reload that saw every candidate
-- in its current definition cannot be cured by another, whatever the hint); the fingerprint is the
-- content of what defines the candidates (`defining` below), never row versions.
WITH RECURSIVE
k AS (
  SELECT k.idx, k.schema, k.origin, k.target, k.hint, n.oid AS nsp
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS k(schema, origin, target, hint, idx)
    LEFT JOIN pg_namespace n ON n.nspname = k.schema
),
named AS (
  SELECT k.idx, c.oid, c.relname, c.relkind, c.reltype, c.relname = k.origin AS is_origin
    FROM k JOIN pg_class c ON c.relnamespace = k.nsp AND c.relname IN (k.origin, k.target)
   WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
),
origin AS (SELECT * FROM named WHERE is_origin),
-- Every key of the database touching an origin: its single columns on each side, and whether it is
-- one-to-one (its columns are exactly a primary key or unique constraint of its table).
fk AS (
  SELECT o.idx, o.oid AS origin_oid, con.oid, con.conname, con.conrelid, con.confrelid, con.conkey,
         CASE WHEN cardinality(con.conkey) = 1 THEN
           (SELECT attname::text FROM pg_attribute WHERE attrelid = con.conrelid AND attnum = con.conkey[1]) END AS col,
         CASE WHEN cardinality(con.confkey) = 1 THEN
           (SELECT attname::text FROM pg_attribute WHERE attrelid = con.confrelid AND attnum = con.confkey[1]) END AS refcol,
         EXISTS (SELECT 1 FROM pg_constraint u
                  WHERE u.conrelid = con.conrelid AND u.contype IN ('p', 'u')
                    AND u.conkey @> con.conkey AND u.conkey <@ con.conkey) AS one_to_one
    FROM origin o
    JOIN pg_constraint con ON con.contype = 'f' AND con.conparentid = 0
                          AND (con.conrelid = o.oid OR con.confrelid = o.oid)
),
direct AS (
  SELECT fk.idx,
         CASE
           WHEN fk.conrelid = fk.confrelid THEN
             NOT fk.one_to_one AND CASE WHEN k.hint IS NULL
               THEN k.target = k.origin OR k.target = fk.col
               ELSE k.target = k.origin AND k.hint = fk.col END
           ELSE
             CASE WHEN k.hint IS NULL
               THEN k.target = f.relname OR k.target = fk.conname
                    OR k.target = CASE WHEN fk.conrelid = fk.origin_oid THEN fk.col ELSE fk.refcol END
               ELSE k.target = f.relname AND k.hint IN (fk.conname, fk.col, fk.refcol) END
         END AS matches
    FROM fk JOIN k ON k.idx = fk.idx
    JOIN pg_class f ON f.oid = CASE WHEN fk.conrelid = fk.origin_oid THEN fk.confrelid ELSE fk.conrelid END
   WHERE f.relnamespace = k.nsp AND f.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT f.relispartition
),
many_to_many AS (
  SELECT a.idx, k.target = t.relname AND (k.hint IS NULL OR k.hint = j.relname) AS matches
    FROM fk a JOIN k ON k.idx = a.idx
    JOIN pg_class j ON j.oid = a.conrelid AND j.relkind IN ('r', 'p') AND NOT j.relispartition
    JOIN pg_constraint b ON b.conrelid = a.conrelid AND b.contype = 'f' AND b.conparentid = 0 AND b.oid <> a.oid
    JOIN pg_class t ON t.oid = b.confrelid AND t.relnamespace = k.nsp AND t.oid <> a.origin_oid
    JOIN pg_constraint pk ON pk.conrelid = j.oid AND pk.contype = 'p'
   WHERE a.confrelid = a.origin_oid AND a.conrelid <> a.origin_oid AND NOT a.one_to_one
     AND NOT EXISTS (SELECT 1 FROM pg_constraint u WHERE u.conrelid = b.conrelid AND u.contype IN ('p', 'u')
                       AND u.conkey @> b.conkey AND u.conkey <@ b.conkey)
     AND pk.conkey @> (a.conkey || b.conkey)
),
computed AS (
  SELECT o.idx, true AS matches
    FROM origin o JOIN k ON k.idx = o.idx
    JOIN pg_proc p ON p.pronamespace = k.nsp AND p.proname = k.target
   WHERE p.pronargs = 1 AND p.proargtypes[0] = o.reltype
     AND p.prorettype IN (SELECT reltype FROM pg_class WHERE relkind IN ('r', 'v', 'm', 'f', 'p'))
),
-- Views on either side, resolved to every relation their definitions depend on.
bases(idx, named_oid, base_oid, is_origin) AS (
  SELECT idx, oid, oid, is_origin FROM named
  UNION
  SELECT b.idx, b.named_oid, d.refobjid, b.is_origin
    FROM bases b
    JOIN pg_rewrite r ON r.ev_class = b.base_oid
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> b.base_oid
),
through_views AS (
  SELECT bo.idx, true AS matches
    FROM bases bo
    JOIN k ON k.idx = bo.idx
    JOIN bases bt ON bt.idx = bo.idx AND NOT bt.is_origin
    JOIN named n ON n.idx = bo.idx AND n.oid IN (bo.named_oid, bt.named_oid) AND n.relkind IN ('v', 'm')
   WHERE bo.is_origin
     AND EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.contype = 'f'
                    -- A hint names the key, a column of either side, or the junction.
                    AND (k.hint IS NULL OR k.hint = c.conname
                         OR EXISTS (SELECT 1 FROM pg_attribute a
                                     WHERE a.attrelid IN (bo.named_oid, bt.named_oid, c.conrelid)
                                       AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = k.hint)
                         OR EXISTS (SELECT 1 FROM pg_class j WHERE j.oid = c.conrelid AND j.relname = k.hint))
                    AND ((c.conrelid = bo.base_oid AND c.confrelid = bt.base_oid)
                      OR (c.conrelid = bt.base_oid AND c.confrelid = bo.base_oid)
                      OR (EXISTS (SELECT 1 FROM pg_constraint c2 WHERE c2.contype = 'f' AND c2.conrelid = c.conrelid
                                    AND c.confrelid = bo.base_oid AND c2.confrelid = bt.base_oid))))
),
matched AS (
  SELECT idx, matches FROM direct
  UNION ALL SELECT idx, matches FROM many_to_many
  UNION ALL SELECT idx, matches FROM computed
  UNION ALL SELECT idx, matches FROM through_views
),
-- What PostgREST caches of the candidates, as content: the named relations, the views' definitions,
-- every key touching them, and the functions named like the target.
defining AS (
  SELECT n.idx, 'r' || {relation_fingerprint(c)} AS row
    FROM named n JOIN pg_class c ON c.oid = n.oid
  UNION SELECT n.idx, 'v' || pg_get_viewdef(n.oid) FROM named n WHERE n.relkind IN ('v', 'm')
  UNION SELECT fk.idx, 'k' || concat_ws(':', c.contype::text, c.conname::text, c.conrelid::regclass::text,
                                         c.confrelid::regclass::text, c.conkey::text, c.confkey::text)
          FROM fk JOIN pg_constraint c ON c.conrelid IN (fk.conrelid, fk.confrelid)
  UNION SELECT k.idx, 'f' || concat_ws(':', pg_get_function_arguments(p.oid), pg_get_function_result(p.oid))
          FROM k JOIN pg_proc p ON p.pronamespace = k.nsp AND p.proname = k.target
)
SELECT k.idx,
       coalesce((SELECT bool_or(m.matches) FROM matched m WHERE m.idx = k.idx), false) AS cached,
       (SELECT 'rel:' || o.oid::text || ':' || quote_ident(k.target) FROM origin o WHERE o.idx = k.idx) AS identity,
       (SELECT md5(string_agg(d.row, ',' ORDER BY d.row)) FROM defining d WHERE d.idx = k.idx) AS fingerprint
  FROM k
