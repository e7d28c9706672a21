// supabase-js pointed at pgrst-guard in Supabase gateway mode. Started by tests/it/gateway.rs with
// GUARD_URL, ORIGIN_PORT and ANON_KEY; it runs the stand-in Supabase origin for the non-REST paths
// (auth, storage, functions, and a WebSocket echo on the realtime path) and exits 0 when every
// check passed.
import http from 'node:http';
import { WebSocketServer, WebSocket } from 'ws';
import { createClient } from '@supabase/supabase-js';

const { GUARD_URL, ORIGIN_PORT, ANON_KEY } = process.env;
const seen = [];

const origin = http.createServer((req, res) => {
  let body = '';
  req.on('data', (chunk) => (body += chunk));
  req.on('end', () => {
    seen.push({ method: req.method, url: req.url, apikey: req.headers.apikey, authorization: req.headers.authorization });
    res.setHeader('content-type', 'application/json');
    if (req.url.startsWith('/auth/v1/user')) {
      res.end(JSON.stringify({
        id: 'user-1', aud: 'authenticated', role: 'authenticated', email: 'a@example.com',
        app_metadata: {}, user_metadata: {}, created_at: '2026-01-01T00:00:00Z',
      }));
    } else if (req.url.startsWith('/storage/v1/bucket')) {
      res.end(JSON.stringify([{ id: 'avatars', name: 'avatars', public: true }]));
    } else if (req.url.startsWith('/functions/v1/hello')) {
      res.end(JSON.stringify({ echoed: JSON.parse(body || 'null') }));
    } else {
      res.statusCode = 404;
      res.end('{}');
    }
  });
});
const sockets = new WebSocketServer({ noServer: true });
origin.on('upgrade', (req, socket, head) => {
  if (!req.url.startsWith('/realtime/v1/websocket')) return socket.destroy();
  seen.push({ method: 'UPGRADE', url: req.url });
  sockets.handleUpgrade(req, socket, head, (ws) => ws.on('message', (m) => ws.send(m.toString())));
});
await new Promise((resolve) => origin.listen(Number(ORIGIN_PORT), '127.0.0.1', resolve));

function check(ok, what, detail) {
  if (!ok) {
    console.error(`FAILED: ${what}: ${JSON.stringify(detail)}`);
    process.exit(1);
  }
}

// Node 20 has no global WebSocket; realtime-js takes ws's.
const supabase = createClient(GUARD_URL, ANON_KEY, {
  auth: { persistSession: false, autoRefreshToken: false },
  realtime: { transport: WebSocket },
});

// The column was added after PostgREST loaded its cache: the guard heals the insert.
const inserted = await supabase.from('chat_messages').insert({ content: 'from supabase-js', artifact_ids: ['a1', 'a2'] });
check(!inserted.error && inserted.status === 201, 'insert with the new column', inserted);
const selected = await supabase.from('chat_messages').select('content, artifact_ids');
check(!selected.error && selected.data.length === 1 && selected.data[0].artifact_ids.join() === 'a1,a2', 'select', selected);

const user = await supabase.auth.getUser('user.jwt.token');
check(!user.error && user.data.user.id === 'user-1', 'auth', user);
const buckets = await supabase.storage.listBuckets();
check(!buckets.error && buckets.data[0].name === 'avatars', 'storage', buckets);
const invoked = await supabase.functions.invoke('hello', { body: { n: 1 } });
check(!invoked.error && invoked.data.echoed.n === 1, 'functions', invoked);

const wsUrl = `${GUARD_URL.replace(/^http/, 'ws')}/realtime/v1/websocket?apikey=${ANON_KEY}&vsn=1.0.0`;
const echoed = await new Promise((resolve, reject) => {
  const ws = new WebSocket(wsUrl);
  const timer = setTimeout(() => reject(new Error('no WebSocket echo within 5 s')), 5000);
  ws.on('open', () => ws.send('ping through the guard'));
  ws.on('message', (m) => { clearTimeout(timer); resolve(m.toString()); ws.close(); });
  ws.on('error', reject);
}).catch((e) => e.message);
check(echoed === 'ping through the guard', 'realtime WebSocket', echoed);

const authCall = seen.find((s) => s.url.startsWith('/auth/v1/user'));
check(authCall.apikey === ANON_KEY && authCall.authorization === 'Bearer user.jwt.token', 'apikey and Authorization untouched', authCall);
check(!seen.some((s) => s.url.startsWith('/rest/v1')), 'REST requests never reach the origin', seen);

console.log(JSON.stringify({ ok: true, seen }));
origin.close();
process.exit(0);
