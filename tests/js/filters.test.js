// Type filters on join through the stock phoenix.js client: the channel gets only the matching
// broadcasts, live and replayed after a forced reconnect (the params function keeps the filter
// and adds `since`), and a malformed filter is refused with invalid_params.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

test("a types filter holds for live broadcasts and for the replay after a reconnect", { timeout: 30000 }, async () => {
  const org = h.unique("org");
  const socket = h.connect({ token: h.userToken("u1", org) }, { reconnectAfterMs: () => 1000 });
  const types = ["tournament_match.*", "team_goal.completed"];
  let since = null;
  const channel = socket.channel(`org_events:${org}`, () => (since ? { types, since } : { types }));
  const seen = [];
  const remember = (envelope, ref) => {
    since = ref;
    seen.push(envelope.payload.n);
  };
  for (const type of ["tournament_match.confirmed", "team_goal.completed", "roster.player_hired", "team_goal.missed"]) {
    channel.on(type, remember);
  }
  const replies = [];
  channel.join().receive("ok", (reply) => replies.push(reply));
  await h.waitFor("joined", () => replies.length === 1);

  const kinds = ["team_goal.completed", "roster.player_hired", "tournament_match.confirmed", "team_goal.missed"];
  const publish = (n) => h.publish({
    type: kinds[(n - 1) % kinds.length], org_id: org, user_id: "u9", id: `${org}-${n}`,
    payload: { n, goal_id: "g", player_id: "p", tournament_id: "t" },
  });
  for (let n = 1; n <= 4; n++) await publish(n);
  await h.waitFor("the matching live events", () => seen.length === 2);

  socket.conn.close();
  await h.waitFor("socket closed", () => !socket.isConnected());
  for (let n = 5; n <= 8; n++) await publish(n);
  await h.waitFor("rejoined", () => replies.length === 2, 10000);
  assert.equal(replies[1].recovered, true, JSON.stringify(replies[1]));
  await publish(9);
  await h.waitFor("replayed and live", () => seen.includes(9));
  assert.deepEqual(seen, [1, 3, 5, 7, 9], "only the matching events, once, in order");

  const refused = await h.join(socket.channel(`tournament:${h.unique("t")}`, { types: ["*"] })).catch((e) => e.response);
  assert.deepEqual(refused, { reason: "invalid_params" });
  await h.disconnect(socket);
});
