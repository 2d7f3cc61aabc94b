// The long-poll transport through the stock phoenix.js `LongPoll` (Node's fetch), behind a
// round-robin balancer over two hubs: no sticky sessions, so consecutive requests of one
// session land on different instances and are routed to the session's owner through Redis.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const http = require("node:http");
const { LongPoll, Presence } = require("phoenix");
const h = require("./lib/harness");

/** An HTTP balancer that sends each request to the next of `ports`; `cut()` drops everything. */
function roundRobin(ports) {
  const balancer = { counts: ports.map(() => 0), down: false };
  const open = new Set();
  let next = 0;
  const server = http.createServer((req, res) => {
    if (balancer.down) return req.socket.destroy();
    const index = next++ % ports.length;
    balancer.counts[index] += 1;
    const upstream = http.request(
      { host: "127.0.0.1", port: ports[index], method: req.method, path: req.url, headers: req.headers, agent: false },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      },
    );
    upstream.on("error", () => res.destroy());
    req.pipe(upstream);
  });
  server.on("connection", (socket) => {
    open.add(socket);
    socket.on("close", () => open.delete(socket));
  });
  balancer.cut = () => { for (const socket of open) socket.destroy(); };
  balancer.close = () => { balancer.cut(); server.close(); };
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => {
    balancer.endPoint = `http://127.0.0.1:${server.address().port}/socket`;
    resolve(balancer);
  }));
}

function transferred(org, n) {
  return { type: "player.transferred", org_id: org, user_id: "u", id: `${org}-${n}`, payload: { n } };
}

test("long-poll without sticky sessions: phoenix.js LongPoll behind a round-robin balancer over two hubs joins, receives, shows presence and recovers", async () => {
  const org = h.unique("lprr");
  const topic = `org_events:${org}`;
  const port = await h.freePort();
  const other = await h.startHub(port, { LONGPOLL_HOLD_MS: "2000" });
  const balancer = await roundRobin([Number(new URL(h.HUB_HTTP()).port), port]);
  const state = { events: [], replies: [], lastPosition: null };
  const socket = h.connect({ token: h.userToken("lp-user", org) }, { endPoint: balancer.endPoint, transport: LongPoll });
  const watcher = h.connect({ token: h.playerToken("watcher", org) }, { endPoint: `ws://127.0.0.1:${port}/socket` });
  try {
    const channel = socket.channel(topic, () => (state.lastPosition ? { since: state.lastPosition } : {}));
    channel.on("player.transferred", (payload, ref) => {
      state.events.push(payload.payload.n);
      state.lastPosition = ref;
    });
    const presence = new Presence(channel);
    const keys = () => presence.list((key) => key).sort().join();
    const joined = new Promise((resolve) => channel.join().receive("ok", (reply) => {
      state.replies.push(reply);
      if (!state.lastPosition) state.lastPosition = reply.position;
      resolve();
    }));
    await joined;
    assert.equal(socket.transport, LongPoll);

    const watching = watcher.channel(topic);
    const watcherPresence = new Presence(watching);
    await h.join(watching);
    await h.waitFor("the long-poll user sees the watcher", () => keys() === "player:watcher,user:lp-user");
    await h.waitFor("the watcher (WebSocket, other hub) sees the long-poll user",
      () => watcherPresence.list((key) => key).sort().join() === "player:watcher,user:lp-user");

    for (const n of [1, 2, 3]) await h.publish(transferred(org, n));
    await h.waitFor("three events over long-poll", () => state.events.length === 3);
    assert.deepEqual(state.events, [1, 2, 3]);
    assert.ok(balancer.counts.every((count) => count >= 2), `both hubs served the session: ${balancer.counts}`);

    // The balancer drops everything for a while; two events go out meanwhile.
    balancer.down = true;
    balancer.cut();
    await h.sleep(300);
    await h.publish(transferred(org, 4));
    await h.publish(transferred(org, 5));
    await h.sleep(500);
    balancer.down = false;
    await h.waitFor("the rejoin recovered 4 and 5", () => state.events.length >= 5 && state.replies.length >= 2, 15000);
    assert.deepEqual(state.events, [1, 2, 3, 4, 5], "in order, no gap, no duplicate");
    assert.equal(state.replies.at(-1).recovered, true, JSON.stringify(state.replies));
  } finally {
    await h.disconnect(socket, watcher);
    balancer.close();
    other.kill("SIGKILL");
    await other.exited;
  }
});
