// The browser suite's own servers: the test page (with the phoenix npm package's browser build)
// and a TCP proxy between the page and the hub that can cut connections, refuse them, or refuse
// WebSocket upgrades only (a network that blocks WebSockets).
"use strict";
const http = require("node:http");
const net = require("node:net");
const fs = require("node:fs");
const path = require("node:path");

const PHOENIX_BROWSER_BUILD = path.join(__dirname, "..", "node_modules", "phoenix", "priv", "static", "phoenix.js");

// Helpers the tests call with page.evaluate; state lives in `window.client`.
const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>prostaff-events browser suite</title>
<script src="/phoenix.js"></script>
<script>
"use strict";
window.currentToken = null;
window.startClient = function ({ endPoint, token, transport, fallbackMs, topic, presence, events = "player.transferred" }) {
  window.currentToken = token;
  const state = { events: [], positions: [], replies: [], joinErrors: [], opens: 0, closes: [], paramsCalls: 0,
                  presenceKeys: [], syncs: 0, lastPosition: null };
  const options = {
    params: () => { state.paramsCalls += 1; return { token: window.currentToken }; },
    reconnectAfterMs: () => 200,
    rejoinAfterMs: () => 200,
  };
  if (transport === "longpoll") options.transport = Phoenix.LongPoll;
  if (fallbackMs) options.longPollFallbackMs = fallbackMs;
  const socket = new Phoenix.Socket(endPoint, options);
  socket.onOpen(() => { state.opens += 1; });
  socket.onClose((event) => { state.closes.push(event && event.code); });
  socket.connect();
  // Rejoins (phoenix.js re-reads a params function every time) resume from the last position.
  const channel = socket.channel(topic, () => (state.lastPosition ? { since: state.lastPosition } : {}));
  channel.on(events, (payload, ref) => {
    state.events.push(payload.payload.n);
    state.positions.push(ref);
    state.lastPosition = ref;
  });
  if (presence) {
    const tracker = new Phoenix.Presence(channel);
    tracker.onSync(() => { state.syncs += 1; state.presenceKeys = tracker.list((key) => key).sort(); });
  }
  channel.join()
    .receive("ok", (response) => {
      state.replies.push(response);
      if (!state.lastPosition && response.position) state.lastPosition = response.position;
    })
    .receive("error", (error) => state.joinErrors.push(error));
  state.transportName = () => (socket.transport === Phoenix.LongPoll ? "LongPoll" : "WebSocket");
  state.socket = socket;
  state.channel = channel;
  window.client = state;
  return true;
};
window.snapshot = function () {
  const c = window.client;
  return { events: c.events, positions: c.positions, replies: c.replies, joinErrors: c.joinErrors, opens: c.opens,
           closes: c.closes, paramsCalls: c.paramsCalls, presenceKeys: c.presenceKeys, syncs: c.syncs,
           transport: c.transportName(), connected: c.socket.isConnected() };
};
</script></head><body><h1>prostaff-events browser suite</h1></body></html>`;

function listen(server) {
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server.address().port)));
}

/** Serves the test page at `/` and the phoenix browser build at `/phoenix.js`. */
async function startPageServer() {
  const phoenix = fs.readFileSync(PHOENIX_BROWSER_BUILD);
  const server = http.createServer((req, res) => {
    if (req.url === "/phoenix.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      return res.end(phoenix);
    }
    if (req.url === "/" || req.url.startsWith("/?")) {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      return res.end(PAGE);
    }
    res.writeHead(404).end();
  });
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}/`, close: () => server.close() };
}

/**
 * A TCP proxy to `targetPort`. `blockWebSocket` answers WebSocket upgrades 403 (HTTP still
 * passes); `down` refuses every connection; `cut()` drops the open ones.
 */
async function startProxy(targetPort) {
  const open = new Set();
  const proxy = { blockWebSocket: false, down: false, upgradesRefused: 0, upgrades: 0, httpConnections: 0 };
  const server = net.createServer((client) => {
    if (proxy.down) return client.destroy();
    client.once("data", (first) => {
      const head = first.toString("latin1");
      const upgrade = /^GET [^ ]*\/websocket[? ]/.test(head) && /\r\nupgrade: *websocket/i.test(head);
      if (upgrade && proxy.blockWebSocket) {
        proxy.upgradesRefused += 1;
        client.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return;
      }
      if (upgrade) proxy.upgrades += 1; else proxy.httpConnections += 1;
      const upstream = net.connect(targetPort, "127.0.0.1");
      const pair = { client, upstream };
      open.add(pair);
      const drop = () => { open.delete(pair); client.destroy(); upstream.destroy(); };
      client.on("error", drop).on("close", drop);
      upstream.on("error", drop).on("close", drop);
      upstream.write(first);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    client.on("error", () => client.destroy());
  });
  const port = await listen(server);
  proxy.endPoint = `ws://127.0.0.1:${port}/socket`;
  proxy.cut = () => { for (const { client, upstream } of open) { client.destroy(); upstream.destroy(); } open.clear(); };
  proxy.close = () => { proxy.cut(); server.close(); };
  return proxy;
}

module.exports = { startPageServer, startProxy };
