// A crossws server sharing a sync backplane (redis or pgsql) with a Django project.
//
// Environment: DRIVER (redis | pgsql), CHANNEL, REDIS_URL or PG_DSN, PORT.
// WebSocket routes:
//   /topic/<topic>  the peer subscribes to <topic> and receives what is published on it;
//                   a frame it sends is published on <topic> as is (text or binary).
//   /chat/<room>    a chat client: subscribes to "chat_<room>" and receives every message
//                   as the JSON the Django side sends; a frame {"text": ...} it sends is
//                   published as a Channels "chat.message" that Django's consumer handles.
// HTTP: POST /publish?topic=<t>[&binary=1][&namespace=<ns>] publishes the request body.
// It prints "ready" once listening with the backplane subscribed.
import { createServer } from "node:http";
import crossws from "crossws/adapters/node";
import { redis, pgsql } from "crossws/sync";

const { DRIVER, CHANNEL, REDIS_URL, PG_DSN, PORT } = process.env;

let sync;
let backend;
if (DRIVER === "redis") {
  const { default: Redis } = await import("ioredis");
  backend = new Redis(REDIS_URL);
  sync = redis({ client: backend, channel: CHANNEL });
} else {
  const { default: pg } = await import("pg");
  backend = new pg.Client({ connectionString: PG_DSN });
  await backend.connect();
  sync = pgsql({ client: backend, channel: CHANNEL });
}

const route = (request) => {
  const [, kind, name] = new URL(request.url).pathname.split("/");
  return { kind, name: decodeURIComponent(name ?? "") };
};

const ws = crossws({
  sync,
  onError(error, { stage }) {
    console.error(`sync ${stage} error:`, error);
  },
  hooks: {
    open(peer) {
      const { kind, name } = route(peer.request);
      peer.subscribe(kind === "chat" ? `chat_${name}` : name);
      peer.send(JSON.stringify({ type: "welcome", pid: process.pid }));
    },
    message(peer, message) {
      const { kind, name } = route(peer.request);
      if (kind === "chat") {
        const { text } = message.json();
        const event = {
          type: "chat.message",
          kind: "chat",
          room: name,
          author: "crossws",
          text,
          sender: { role: "crossws", pid: process.pid },
        };
        ws.publish(`chat_${name}`, JSON.stringify(event));
      } else {
        // As a crossws app does: the peer publishes (in its namespace, its URL path).
        const data = message.rawData;
        peer.publish(name, typeof data === "string" ? data : message.uint8Array());
      }
    },
  },
});

const server = createServer(async (req, res) => {
  const url = new URL(req.url, "http://127.0.0.1");
  if (req.method !== "POST" || url.pathname !== "/publish") {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const body = Buffer.concat(chunks);
  const data = url.searchParams.get("binary") ? new Uint8Array(body) : body.toString("utf8");
  const namespace = url.searchParams.get("namespace") || undefined;
  ws.publish(url.searchParams.get("topic"), data, namespace ? { namespace } : undefined);
  res.writeHead(200).end("ok");
});
server.on("upgrade", (req, socket, head) => ws.handleUpgrade(req, socket, head));

const stop = async () => {
  await ws.close();
  server.close();
  await (DRIVER === "redis" ? backend.quit() : backend.end());
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

// Let the sync driver finish subscribing before announcing readiness.
await new Promise((resolve) => setTimeout(resolve, 300));
server.listen(Number(PORT), "127.0.0.1", () => console.log("ready"));
