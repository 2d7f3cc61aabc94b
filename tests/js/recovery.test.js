// Recovery through the stock phoenix.js client: the three-line pattern from the README
// (remember each broadcast's ref per topic, pass it as `since` from a params function, refetch
// when the rejoin says `recovered: false`) across a forced reconnect.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

test("the three-line client pattern recovers every event missed across a forced reconnect", { timeout: 30000 }, async () => {
  const org = h.unique("org");
  const socket = h.connect({ token: h.userToken("u1", org) }, { reconnectAfterMs: () => 1000 });

  // The pattern: 1. a params function, 2. remember the ref, 3. check `recovered` on rejoin.
  let since = null;
  const channel = socket.channel(`org_events:${org}`, () => (since ? { since } : {}));
  const seen = [];
  channel.on("roster.player_hired", (envelope, ref) => {
    since = ref;
    seen.push(envelope.payload.n);
  });
  const replies = [];
  channel.join().receive("ok", (reply) => replies.push(reply));
  await h.waitFor("first join", () => replies.length === 1);
  assert.match(replies[0].position, /^[A-Za-z0-9]+:0$/);
  assert.equal(replies[0].recovered, undefined, "no since, no recovered flag");

  const publish = (n) => h.publish({ type: "roster.player_hired", org_id: org, user_id: "u9", payload: { n } });
  await publish(1);
  await h.waitFor("first event", () => seen.length === 1);

  // The transport drops (not a clean disconnect): phoenix.js reconnects after 1 s and rejoins.
  socket.conn.close();
  await h.waitFor("socket closed", () => !socket.isConnected());
  for (let n = 2; n <= 5; n++) await publish(n);

  await h.waitFor("rejoined", () => replies.length === 2, 10000);
  assert.equal(replies[1].recovered, true, JSON.stringify(replies[1]));
  await h.waitFor("missed events replayed", () => seen.length === 5);
  await publish(6);
  await h.waitFor("live event", () => seen.length === 6);
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6], "every event once, in order");
  assert.match(since, /^[A-Za-z0-9]+:6$/);
  await h.disconnect(socket);
});

test("a since from another epoch says recovered: false so the client refetches", async () => {
  const org = h.unique("org");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`org_events:${org}`, { since: "lostepoch:41" });
  const reply = await h.join(channel);
  assert.equal(reply.recovered, false);
  assert.match(reply.position, /^[A-Za-z0-9]+:\d+$/);
  const refused = await h.join(socket.channel(`tournament:${h.unique("t")}`, { since: "garbage" })).catch((e) => e.response);
  assert.deepEqual(refused, { reason: "invalid_params" });
  await h.disconnect(socket);
});
