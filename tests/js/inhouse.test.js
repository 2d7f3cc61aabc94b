// In-house queues through phoenix.js: two members of one org see each other's actions live.
// The hub under test runs with RATE_LIMIT_MAX=3 (tests/it/js.rs).
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

const iso = (secondsAhead) => new Date(Date.now() + secondsAhead * 1000).toISOString();

function nextUpdate(channel, event, timeout = 5000, matches = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { channel.off("queue_update", ref); reject(new Error(`no queue_update ${event}`)); }, timeout);
    const ref = channel.on("queue_update", (payload) => {
      if (payload.event !== event || !matches(payload)) return;
      clearTimeout(timer);
      channel.off("queue_update", ref);
      resolve(payload);
    });
  });
}

test("two players of one org see joins, check-ins and the deadline close live", { timeout: 30000 }, async () => {
  const org = h.unique("org");
  const queueId = h.unique("q");
  const alice = h.connect({ token: h.playerToken("alice", org) });
  const bob = h.connect({ token: h.playerToken("bob", org) });
  const aliceChannel = alice.channel(`inhouse:${org}`);
  const bobChannel = bob.channel(`inhouse:${org}`);
  const joinReply = await h.join(aliceChannel);
  assert.equal(joinReply.queue, null);
  assert.match(joinReply.position, /^[A-Za-z0-9]+:\d+$/);
  await h.join(bobChannel);

  const opened = nextUpdate(bobChannel, "queue_opened");
  await h.publish({ type: "inhouse.queue_opened", org_id: org, user_id: "rails", payload: { queue_id: queueId } });
  assert.equal((await opened).status, "open");

  const bobSeesAlice = nextUpdate(bobChannel, "player_joined", 5000, (u) => u.player_id === "alice");
  const joined = await h.push(aliceChannel, "join_queue", { player_id: "alice", role: "top" });
  assert.equal(joined.status, "ok");
  assert.equal(joined.response.player_count, 1);
  assert.deepEqual(joined.response.entries, { alice: { role: "top", checked_in: false } });
  assert.equal(typeof joined.response.version, "number");
  const seen = await bobSeesAlice;
  assert.equal(seen.player_id, "alice");
  assert.equal(seen.player_count, 1);
  assert.equal(seen.queue_id, queueId);

  const aliceSeesBob = nextUpdate(aliceChannel, "player_joined", 5000, (u) => u.player_id === "bob");
  assert.equal((await h.push(bobChannel, "join_queue", { player_id: "bob", role: "jungle" })).response.player_count, 2);
  assert.equal((await aliceSeesBob).player_id, "bob");

  // Players act only for themselves; malformed pushes get invalid_params and the channel lives on.
  assert.deepEqual(await h.push(aliceChannel, "join_queue", { player_id: "bob", role: "mid" }), { status: "error", response: { reason: "unauthorized" } });
  for (const payload of [{}, { player_id: "alice" }, { player_id: "alice", role: 5 }, "text", [1, 2]]) {
    assert.deepEqual(await h.push(aliceChannel, "join_queue", payload), { status: "error", response: { reason: "invalid_params" } }, JSON.stringify(payload));
  }
  assert.deepEqual(await h.push(aliceChannel, "checkin", { player_id: "alice" }), { status: "error", response: { reason: "not_in_check_in_phase" } });

  // Check-in phase with a deadline 2 s ahead: joining is closed, check-ins are seen by the other member.
  const checkInStarted = nextUpdate(aliceChannel, "check_in_started");
  await h.publish({ type: "inhouse.check_in_started", org_id: org, user_id: "rails", payload: { queue_id: queueId, check_in_deadline: iso(2) } });
  assert.equal((await checkInStarted).status, "check_in");
  assert.deepEqual(await h.push(aliceChannel, "join_queue", { player_id: "alice", role: "top" }), { status: "error", response: { reason: "queue_not_open" } });
  const bobSeesCheckin = nextUpdate(bobChannel, "player_checked_in");
  assert.equal((await h.push(aliceChannel, "checkin", { player_id: "alice" })).status, "ok");
  assert.equal((await bobSeesCheckin).player_id, "alice");

  // Only one of two checked in: the deadline closes the queue.
  const expired = await nextUpdate(bobChannel, "check_in_expired", 10000);
  assert.equal(expired.queue_closed, true);
  assert.equal(expired.removed_count, 1);
  assert.equal(expired.checked_in_count, 1);
  assert.equal(expired.status, "closed");
  assert.deepEqual(await h.push(bobChannel, "checkin", { player_id: "bob" }), { status: "error", response: { reason: "no_active_queue" } });
  await h.disconnect(alice, bob);
});

test("the 4th join_queue of an org within the window is rate_limited (limit 3)", async () => {
  const org = h.unique("org");
  const coach = h.connect({ token: h.userToken("coach", org) });
  const channel = coach.channel(`inhouse:${org}`);
  await h.join(channel);
  const opened = nextUpdate(channel, "queue_opened");
  await h.publish({ type: "inhouse.queue_opened", org_id: org, user_id: "rails", payload: { queue_id: h.unique("q") } });
  await opened;
  for (let i = 1; i <= 3; i++) {
    const result = await h.push(channel, "join_queue", { player_id: `p${i}`, role: "mid" });
    assert.equal(result.status, "ok");
    assert.equal(result.response.player_count, i);
  }
  assert.deepEqual(await h.push(channel, "join_queue", { player_id: "p4", role: "mid" }), { status: "error", response: { reason: "rate_limited" } });
  // Leaving is not rate limited.
  assert.equal((await h.push(channel, "leave_queue", { player_id: "p1" })).response.player_count, 2);
  await h.disconnect(coach);
});
