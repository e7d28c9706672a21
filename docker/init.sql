-- Schema and roles for the docker-compose demo (run once by the postgres image at first start).
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN PASSWORD 'authenticator';
GRANT anon TO authenticator;

CREATE TABLE public.chat_messages (
  id bigserial PRIMARY KEY,
  content text NOT NULL,
  created_at timestamptz DEFAULT now()
);
GRANT USAGE ON SCHEMA public TO anon;
GRANT ALL ON public.chat_messages TO anon;
GRANT USAGE ON SEQUENCE public.chat_messages_id_seq TO anon;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon;
