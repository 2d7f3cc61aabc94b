// Access follows the roster (issue 22), seen by the stock phoenix.js client: a roster removal
// closes the org's channels with phx_close and phoenix.js does not try to rejoin them; a
// scope-all revocation closes the socket with 1008 and its old token cannot reconnect.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

const joinsOf = (socket, topic) =>
  socket.rawOut.filter((raw) => {
    const [, , t, event] = JSON.parse(raw);
    return t === topic && event === "phx_join";
  }).length;

test("a roster removal closes the org's channels and phoenix.js does not rejoin them", async () => {
  const org = h.unique("o");
  const player = h.unique("p");
  const socket = h.connect({ token: h.sign({ entity_type: "player", player_id: player, organization_id: org, iat: h.now() }) });
  const events = socket.channel(`org_events:${org}`);
  const notifications = socket.channel(`tournament:${org}`);
  let closed = 0;
  events.onClose(() => closed++);
  await h.join(events);
  await h.join(notifications);
  const joinsBefore = joinsOf(socket, `org_events:${org}`);

  await h.publish({ type: "roster.player_removed", org_id: org, payload: { player_id: player } });
  await h.waitFor("the channel closed", () => closed === 1 && events.state === "closed");
  // Well past phoenix.js's rejoin back-off in this harness (100 ms): no rejoin attempt.
  await h.sleep(1500);
  assert.equal(joinsOf(socket, `org_events:${org}`), joinsBefore, "no rejoin loop");
  assert.equal(socket.isConnected(), true, "the socket itself stays");
  assert.equal(notifications.state, "joined", "other topics are untouched");
  await h.disconnect(socket);
});

test("a scope-all revocation closes the socket with 1008 and the old token cannot come back", async () => {
  const org = h.unique("o");
  const user = h.unique("u");
  const token = h.userToken(user, org, { iat: h.now() });
  const socket = h.connect({ token });
  const codes = [];
  socket.onClose((event) => codes.push(event.code));
  await h.join(socket.channel(`org_events:${org}`));

  const response = await fetch(`${h.HUB_HTTP()}/api/revocations`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${h.internalToken()}` },
    body: JSON.stringify({ identity: `user:${user}`, scope: "all", reason: "logout everywhere" }),
  });
  assert.equal(response.status, 202);
  await h.waitFor("closed with 1008", () => codes.includes(1008));
  assert.equal(await h.upgradeStatus(`${h.HUB_SOCKET()}/websocket?vsn=2.0.0&token=${token}`), 403);
  socket.disconnect();
});
