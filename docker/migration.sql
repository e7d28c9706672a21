-- The migration that starts the story: PostgREST's cache does not know the new column until a
-- reload. Apply it without NOTIFY and the guard heals the first insert that uses the column:
--   docker compose exec -T db psql -U postgres < docker/migration.sql
ALTER TABLE public.chat_messages ADD COLUMN artifact_ids text[] DEFAULT '{}';
