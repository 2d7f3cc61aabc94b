// Presence through the stock phoenix.js `Presence` class, across two hubs: the suite's hub and
// a second one (the real binary) that a test kills with SIGKILL.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const { Presence } = require("phoenix");
const h = require("./lib/harness");

const TTL_MS = 2000;

/** A socket joined to `topic` with a `Presence` whose list is kept in `tracker.keys()`. */
async function present(endPoint, token, topic) {
  const socket = h.connect({ token }, endPoint ? { endPoint } : {});
  const channel = socket.channel(topic);
  const presence = new Presence(channel);
  const tracker = { socket, channel, presence, syncs: 0, joins: [], leaves: [] };
  presence.onSync(() => tracker.syncs++);
  presence.onJoin((key, current) => { if (!current) tracker.joins.push(key); });
  presence.onLeave((key, current) => { if (current.metas.length === 0) tracker.leaves.push({ key, at: Date.now() }); });
  tracker.keys = () => presence.list((key) => key).sort();
  tracker.metas = (key) => presence.list((k, { metas }) => (k === key ? metas : null)).filter(Boolean)[0] || [];
  await h.join(channel);
  return tracker;
}

async function withSecondHub(extraEnv, body) {
  const port = await h.freePort();
  const hub = await h.startHub(port, extraEnv);
  try {
    await body(`ws://127.0.0.1:${port}/socket`, hub);
  } finally {
    if (hub.exitCode === null && hub.signalCode === null) {
      hub.kill("SIGKILL");
      await hub.exited;
    }
  }
}

test("presence: two users on two hubs see each other; a second tab is a meta, not a key; closing it removes the meta", async () => {
  const org = h.unique("org");
  const topic = `org_events:${org}`;
  await withSecondHub({}, async (otherHub) => {
    const alice = await present(null, h.userToken("alice", org), topic);
    const bob = await present(otherHub, h.playerToken("bob", org), topic);
    await h.waitFor("alice sees bob in onSync", () => alice.keys().join() === "player:bob,user:alice");
    await h.waitFor("bob sees alice in onSync", () => bob.keys().join() === "player:bob,user:alice");
    assert.ok(alice.syncs > 0 && bob.syncs > 0);
    const [meta] = alice.metas("player:bob");
    assert.equal(meta.kind, "player");
    assert.equal(typeof meta.phx_ref, "string");
    assert.ok(meta.online_at > 1_700_000_000_000);

    // A second tab of alice, on the other hub: one more meta under the same key.
    const tab = await present(otherHub, h.userToken("alice", org), topic);
    await h.waitFor("bob sees two metas for alice", () => bob.metas("user:alice").length === 2);
    assert.equal(bob.keys().length, 2, "still two keys");
    await h.waitFor("the tab sees both", () => tab.metas("user:alice").length === 2);

    // Closing the tab removes its meta only; alice stays present.
    await h.disconnect(tab.socket);
    await h.waitFor("bob sees one meta for alice", () => bob.metas("user:alice").length === 1);
    assert.deepEqual(bob.keys(), ["player:bob", "user:alice"]);
    assert.deepEqual(bob.leaves, [], "no leave event for a key that is still present");

    // phx_leave leaves at once too.
    await new Promise((resolve) => bob.channel.leave().receive("ok", resolve));
    await h.waitFor("alice sees bob leave", () => alice.keys().join() === "user:alice");
    assert.deepEqual(alice.leaves.map((l) => l.key), ["player:bob"]);
    await h.disconnect(alice.socket, bob.socket);
  });
});

test(`presence: users of a SIGKILLed hub leave on the other hub within PRESENCE_TTL_MS + 1 s`, async () => {
  const org = h.unique("org");
  const topic = `inhouse:${org}`;
  await withSecondHub({ PRESENCE_TTL_MS: String(TTL_MS) }, async (otherHub, hub) => {
    const watcher = await present(null, h.userToken("coach", org), topic);
    const doomed = await present(otherHub, h.playerToken("p1", org), topic);
    await h.waitFor("the watcher sees the player", () => watcher.keys().join() === "player:p1,user:coach");

    hub.kill("SIGKILL");
    const killedAt = Date.now();
    await hub.exited;
    await h.waitFor("the player leaves", () => watcher.leaves.some((l) => l.key === "player:p1"), TTL_MS + 5000);
    const took = watcher.leaves.find((l) => l.key === "player:p1").at - killedAt;
    console.log(`leave arrived ${took} ms after SIGKILL (PRESENCE_TTL_MS=${TTL_MS})`);
    assert.ok(took <= TTL_MS + 1000, `leave took ${took} ms`);
    assert.deepEqual(watcher.keys(), ["user:coach"]);
    await h.disconnect(watcher.socket, doomed.socket);
  });
});

test("presence over PRESENCE_LIST_MAX: the stock Presence class shows the listing, presence_summary counts everyone, and the whole list returns under the bound", async () => {
  const org = h.unique("org");
  const topic = `org_events:${org}`;
  await withSecondHub({ PRESENCE_LIST_MAX: "3" }, async (otherHub) => {
    const watcher = await present(otherHub, h.userToken("watcher", org), topic);
    const summaries = [];
    watcher.channel.on("presence_summary", (summary) => summaries.push(summary));
    const others = [];
    for (const n of [1, 2]) others.push(await present(otherHub, h.playerToken(`p${n}`, org), topic));
    await h.waitFor("three keys, the whole list", () => watcher.keys().length === 3);
    assert.equal(summaries.length, 0, "no summary under the bound");

    for (const n of [3, 4, 5]) others.push(await present(otherHub, h.playerToken(`p${n}`, org), topic));
    await h.waitFor("a summary of six", () => summaries.length > 0 && summaries.at(-1).metas === 6);
    const last = summaries.at(-1);
    assert.deepEqual(last.kinds, { player: 5, user: 1 });
    assert.equal(last.keys, 6);
    assert.equal(last.listed, 3);
    assert.equal(last.complete, false);
    await h.waitFor("Presence lists three", () => watcher.keys().length === 3);
    for (const key of watcher.keys()) {
      assert.ok(key === "user:watcher" || /^player:p[1-5]$/.test(key), key);
    }

    // Under the bound again: Presence shows everyone, and the summary says it is complete.
    await h.disconnect(...others.slice(0, 4).map((o) => o.socket));
    await h.waitFor("a complete summary", () => summaries.at(-1).complete === true);
    await h.waitFor("Presence lists both", () => watcher.keys().join() === "player:p5,user:watcher");
    assert.equal(summaries.at(-1).metas, 2);
    await h.disconnect(watcher.socket, others[4].socket);
  });
});
