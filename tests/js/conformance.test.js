// PHOENIX_PROTOCOL.md §6 conformance checklist, driven by the official phoenix npm client.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const WebSocket = require("ws");
const h = require("./lib/harness");

const frames = (socket) => socket.rawIn.filter((raw) => typeof raw === "string").map((raw) => JSON.parse(raw));

test("1. upgrade with vsn=2.0.0 and token; params reach authentication", async () => {
  const user = h.unique("u");
  const socket = h.connect({ token: h.userToken(user, h.unique("o")) });
  const mine = socket.channel(`notifications:${user}`);
  await h.join(mine);
  await assert.rejects(h.join(socket.channel(`notifications:${h.unique("other")}`)), /unauthorized/);
  assert.match(socket.endPointURL(), /vsn=2\.0\.0/);
  await h.disconnect(socket);
});

test("2. no vsn speaks V1 objects; vsn=9.0.0 is refused with 403", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) }, {
    vsn: "1.0.0",
    encode: (msg, callback) => callback(JSON.stringify(msg)),
    decode: (raw, callback) => callback(JSON.parse(raw)),
  });
  const channel = socket.channel(`org_events:${org}`);
  await h.join(channel);
  const received = h.nextEvent(channel, "team_goal.completed");
  await h.publish({ type: "team_goal.completed", org_id: org, user_id: "u1", payload: { v: 1 } });
  assert.equal((await received).payload.v, 1);
  await h.disconnect(socket);

  const token = h.userToken("u1", org);
  assert.equal(await h.upgradeStatus(`${h.HUB_SOCKET()}/websocket?vsn=9.0.0&token=${token}`), 403);
  // Without vsn the raw socket gets V1 object frames.
  const ws = new WebSocket(`${h.HUB_SOCKET()}/websocket?token=${token}`);
  await new Promise((resolve) => ws.on("open", resolve));
  ws.send(JSON.stringify({ topic: "phoenix", event: "heartbeat", payload: {}, ref: "1" }));
  const [reply] = await new Promise((resolve) => ws.once("message", (data) => resolve([JSON.parse(data)])));
  assert.deepEqual(reply, { topic: "phoenix", event: "phx_reply", payload: { status: "ok", response: {} }, ref: "1" });
  ws.close();
});

test("3. a refused connect is a non-101 response and the client keeps retrying", async () => {
  const socket = h.connect({ token: h.sign({ user_id: "u", org_id: "o" }, { secret: "wrong-secret" }) });
  let errors = 0;
  socket.onError(() => errors++);
  await h.waitFor("3 connection errors", () => errors >= 3, 8000);
  assert.equal(socket.isConnected(), false);
  await h.disconnect(socket);
  assert.equal(await h.upgradeStatus(`${h.HUB_SOCKET()}/websocket?vsn=2.0.0&token=bad`), 403);
});

test("4. authToken is accepted and answered with the phoenix subprotocol", async () => {
  const user = h.unique("u");
  // A token whose base64 contains + and / exercises the standard-alphabet decoding.
  const token = h.userToken(user, h.unique("o"), { pad: "???>>>~~~" });
  const socket = h.connect({}, { authToken: token });
  await h.join(socket.channel(`notifications:${user}`));
  assert.equal(socket.conn.protocol, "phoenix");
  await h.disconnect(socket);
});

test("5+6. heartbeat is answered at once with the same ref, as a string", async () => {
  const socket = h.connect({ token: h.userToken("u1", h.unique("o")) }, { heartbeatIntervalMs: 100 });
  await h.waitFor("open", () => socket.isConnected());
  await h.sleep(450);
  assert.equal(socket.isConnected(), true, "heartbeats unanswered would close the socket");
  const sent = socket.rawOut.map((raw) => JSON.parse(raw)).filter((f) => f[3] === "heartbeat");
  const replies = frames(socket).filter((f) => f[2] === "phoenix" && f[3] === "phx_reply");
  assert.ok(sent.length >= 2, `heartbeats sent: ${sent.length}`);
  for (const heartbeat of sent.slice(0, -1)) {
    const reply = replies.find((r) => r[1] === heartbeat[1]);
    assert.ok(reply, `reply for heartbeat ${heartbeat[1]}`);
    assert.equal(typeof reply[1], "string");
    assert.deepEqual(reply, [null, heartbeat[1], "phoenix", "phx_reply", { status: "ok", response: {} }]);
  }
  await h.disconnect(socket);
});

test("7. join ok is [J,J,topic,phx_reply,ok]; a refused join has a reason", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`org_events:${org}`);
  await h.join(channel);
  const out = socket.rawOut.map((raw) => JSON.parse(raw)).find((f) => f[3] === "phx_join");
  const reply = frames(socket).find((f) => f[3] === "phx_reply" && f[1] === out[1]);
  // The response carries the topic's history position ("<epoch>:<offset>") and nothing else.
  assert.match(reply[4].response.position, /^[A-Za-z0-9]+:\d+$/);
  assert.deepEqual(reply, [out[0], out[1], `org_events:${org}`, "phx_reply", { status: "ok", response: { position: reply[4].response.position } }]);
  const refused = await h.join(socket.channel(`org_events:${h.unique("other")}`)).catch((e) => e.response);
  assert.deepEqual(refused, { reason: "unauthorized" });
  await h.disconnect(socket);
});

test("8. join or push on an unknown or unjoined topic gets unmatched topic with a null join_ref", async () => {
  const socket = h.connect({ token: h.userToken("u1", h.unique("o")) });
  const refused = await h.join(socket.channel("rooms:lobby")).catch((e) => e.response);
  assert.deepEqual(refused, { reason: "unmatched topic" });
  const reply = frames(socket).find((f) => f[2] === "rooms:lobby");
  assert.equal(reply[0], null);
  // A push on a topic never joined (sent below the channel API).
  socket.push({ topic: "tournament:1", event: "anything", payload: {}, ref: "77", join_ref: "76" });
  await h.waitFor("unmatched reply", () => frames(socket).some((f) => f[1] === "77"));
  assert.deepEqual(frames(socket).find((f) => f[1] === "77"), [null, "77", "tournament:1", "phx_reply", { status: "error", response: { reason: "unmatched topic" } }]);
  await h.disconnect(socket);
});

test("9. channel pushes echo J and R; binary pushes are decoded", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`inhouse:${org}`);
  await h.join(channel);
  const result = await h.push(channel, "leave_queue", { player_id: "p1" });
  assert.deepEqual(result, { status: "error", response: { reason: "no_active_queue" } });
  const pushFrame = socket.rawOut.map((raw) => JSON.parse(raw)).find((f) => f[3] === "leave_queue");
  const reply = frames(socket).find((f) => f[1] === pushFrame[1] && f[3] === "phx_reply");
  assert.equal(reply[0], pushFrame[0]);
  assert.equal(reply[0], channel.joinRef());
  // phoenix.js sends an ArrayBuffer payload as a kind-0 binary frame.
  const binary = await h.push(channel, "checkin", new Uint8Array([1, 2, 3]).buffer);
  assert.deepEqual(binary, { status: "error", response: { reason: "invalid_params" } });
  await h.disconnect(socket);
});

test("10. broadcasts are [null,\"<epoch>:<offset>\",…] and reach channel.on with the position as ref", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`org_events:${org}`);
  await h.join(channel);
  let ref;
  const received = new Promise((resolve) => channel.on("roster.player_hired", (payload, position) => { ref = position; resolve(payload); }));
  const { id } = await h.publish({ type: "roster.player_hired", org_id: org, user_id: "u9", payload: { player: "x" } });
  const payload = await received;
  assert.equal(payload.id, id);
  const raw = frames(socket).find((f) => f[3] === "roster.player_hired");
  assert.equal(raw[0], null);
  assert.match(raw[1], /^[A-Za-z0-9]+:\d+$/);
  assert.equal(ref, raw[1], "phoenix.js hands the position to channel.on as its second argument");
  await h.disconnect(socket);
});

test("11. frames with a stale join_ref are ignored", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`inhouse:${org}`);
  await h.join(channel);
  socket.push({ topic: `inhouse:${org}`, event: "leave_queue", payload: { player_id: "p" }, ref: "900", join_ref: "stale" });
  socket.push({ topic: `inhouse:${org}`, event: "phx_leave", payload: {}, ref: "901", join_ref: "stale" });
  await h.sleep(300);
  assert.equal(frames(socket).some((f) => f[1] === "900" || f[1] === "901"), false);
  // Still joined.
  assert.deepEqual(await h.push(channel, "leave_queue", { player_id: "p" }), { status: "error", response: { reason: "no_active_queue" } });
  await h.disconnect(socket);
});

test("12. leave gets an ok reply, then phx_close with J as join_ref and ref", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`org_events:${org}`);
  await h.join(channel);
  const joinRef = channel.joinRef();
  channel.leave();
  await h.waitFor("phx_close", () => frames(socket).some((f) => f[3] === "phx_close"));
  const leave = socket.rawOut.map((raw) => JSON.parse(raw)).find((f) => f[3] === "phx_leave");
  const all = frames(socket);
  const replyIndex = all.findIndex((f) => f[3] === "phx_reply" && f[1] === leave[1]);
  const closeIndex = all.findIndex((f) => f[3] === "phx_close");
  assert.ok(replyIndex >= 0 && replyIndex < closeIndex, "reply comes before phx_close");
  assert.deepEqual(all[closeIndex], [joinRef, joinRef, `org_events:${org}`, "phx_close", {}]);
  await h.disconnect(socket);
});

test("13. duplicate join: reply with the new J, phx_close with the old J, one channel remains", async () => {
  const org = h.unique("o");
  const topic = `org_events:${org}`;
  const socket = h.connect({ token: h.userToken("u1", org) });
  await h.waitFor("open", () => socket.isConnected());
  // Two raw joins on one socket, below phoenix.js (which would leave the first itself).
  socket.push({ topic, event: "phx_join", payload: {}, ref: "501", join_ref: "501" });
  socket.push({ topic, event: "phx_join", payload: {}, ref: "502", join_ref: "502" });
  await h.waitFor("phx_close", () => frames(socket).some((f) => f[3] === "phx_close"));
  const all = frames(socket);
  const second = all.findIndex((f) => f[1] === "502");
  const close = all.findIndex((f) => f[3] === "phx_close");
  assert.ok(second < close);
  assert.deepEqual(all[close], ["501", "501", topic, "phx_close", {}]);
  // phoenix.js's own duplicate handling (channel() twice) also ends with one working channel.
  const first = socket.channel(`tournament:${org}`);
  const again = socket.channel(`tournament:${org}`);
  await h.join(first);
  await h.join(again);
  const received = h.nextEvent(again, "tournament_match.confirmed");
  await h.publish({ type: "tournament_match.confirmed", org_id: org, user_id: "u", payload: { tournament_id: org } });
  await received;
  await h.sleep(200);
  const onTournament = frames(socket).filter((f) => f[2] === `tournament:${org}` && f[3] === "tournament_match.confirmed");
  assert.equal(onTournament.length, 1);
  await h.disconnect(socket);
});

test("15. a push made before join ok is sent after join ok", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) });
  const channel = socket.channel(`inhouse:${org}`);
  const order = [];
  channel.join().receive("ok", () => order.push("join"));
  const result = await h.push(channel, "leave_queue", { player_id: "p1" });
  order.push("push");
  assert.deepEqual(order, ["join", "push"]);
  assert.deepEqual(result, { status: "error", response: { reason: "no_active_queue" } });
  await h.disconnect(socket);
});

test("16. params functions are re-run on reconnect and rejoin (token refresh on 1008 expiry)", async () => {
  const org = h.unique("o");
  let tokensIssued = 0;
  let joinParamsCalls = 0;
  // Each token lives 2 s: the hub closes the socket with 1008 at expiry and the client
  // reconnects with a fresh token from the params function.
  const socket = h.connect(() => {
    tokensIssued++;
    return { token: h.userToken("u1", org, { exp: h.now() + 2 }) };
  });
  const closeCodes = [];
  socket.onClose((event) => closeCodes.push(event.code));
  const channel = socket.channel(`org_events:${org}`, () => ({ attempt: ++joinParamsCalls }));
  await h.join(channel);
  await h.waitFor("expiry close", () => closeCodes.length >= 1, 6000);
  assert.equal(closeCodes[0], 1008);
  await h.waitFor("rejoin", () => joinParamsCalls >= 2 && channel.state === "joined", 6000);
  assert.ok(tokensIssued >= 2);
  await h.disconnect(socket);
});

test("17. with longPollFallbackMs set the client stays on WebSocket", async () => {
  const org = h.unique("o");
  const socket = h.connect({ token: h.userToken("u1", org) }, { longPollFallbackMs: 300 });
  const channel = socket.channel(`org_events:${org}`);
  await h.join(channel);
  await h.sleep(800);
  assert.equal(socket.transport, WebSocket);
  assert.equal(socket.isConnected(), true);
  await h.disconnect(socket);
});
