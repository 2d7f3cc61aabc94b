// One broadcast reaching 1,000 joined phoenix.js clients with identical payloads and bytes.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

test("a broadcast reaches 1,000 joined clients, byte-identical", { timeout: 120000 }, async () => {
  const org = h.unique("fan");
  const topic = `org_events:${org}`;
  const sockets = [];
  const channels = [];
  for (let i = 0; i < 1000; i++) {
    const socket = h.connect({ token: h.userToken(`u${i}`, org) });
    sockets.push(socket);
    channels.push(socket.channel(topic));
  }
  // Join in batches so the test machine's two cores are not swamped by 1,000 handshakes at once.
  for (let i = 0; i < channels.length; i += 100) {
    await Promise.all(channels.slice(i, i + 100).map((channel) => h.join(channel, 30000)));
  }
  const received = channels.map((channel) => h.nextEvent(channel, "tournament_match.walkover", 30000));
  const { id } = await h.publish({ type: "tournament_match.walkover", org_id: org, user_id: "u0", payload: { tournament_id: "t1", winner: "blue" } });
  const payloads = await Promise.all(received);
  assert.equal(payloads.length, 1000);
  for (const payload of payloads) {
    assert.deepEqual(payload, payloads[0]);
  }
  assert.equal(payloads[0].id, id);
  const rawFrames = new Set(sockets.map((socket) => socket.rawIn.find((raw) => raw.includes("tournament_match.walkover"))));
  assert.equal(rawFrames.size, 1, "every client got the same bytes");
  await h.disconnect(...sockets);
});
