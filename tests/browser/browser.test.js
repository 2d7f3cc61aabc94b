// The phoenix npm package's browser build in headless Chromium (Debian's `chromium`, driven by
// puppeteer-core over the DevTools protocol) against a live hub and a real redis-server, both
// started by tests/it/browser.rs. Pages come from a server of this suite, on another origin
// than the hub, through a proxy that can cut connections or block WebSockets.
"use strict";
const { test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const puppeteer = require("puppeteer-core");
const h = require("../js/lib/harness");
const { startPageServer, startProxy } = require("./lib/servers");

const HUB_PORT = Number(new URL(h.HUB_HTTP()).port);
let browser;
let pageServer;

before(async () => {
  browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  pageServer = await startPageServer();
});

after(async () => {
  if (browser) await browser.close();
  if (pageServer) pageServer.close();
});

/** A page of the suite in its own browser context (no shared sessionStorage). */
async function newPage() {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error("page error:", error.message));
  await page.goto(pageServer.url);
  await page.waitForFunction(() => typeof window.Phoenix === "object" && typeof window.startClient === "function");
  page.closeContext = () => context.close();
  return page;
}

const snapshot = (page) => page.evaluate(() => window.snapshot());

async function waitForPage(page, what, predicate, timeout = 15000) {
  let last;
  await h.waitFor(what, async () => {
    last = await snapshot(page);
    return predicate(last);
  }, timeout).catch((error) => {
    throw new Error(`${error.message}; last state: ${JSON.stringify(last)}`);
  });
  return last;
}

function transferred(org, n) {
  return { type: "player.transferred", org_id: org, user_id: "u", id: `${org}-${n}`, payload: { n } };
}

async function withProxy(body) {
  const proxy = await startProxy(HUB_PORT);
  try {
    await body(proxy);
  } finally {
    proxy.close();
  }
}

test("browser: WebSocket connect, join, and an event published on Redis", async () => {
  const org = h.unique("br");
  const page = await newPage();
  try {
    await page.evaluate((options) => window.startClient(options), {
      endPoint: h.HUB_SOCKET(), token: h.userToken("u1", org), topic: `org_events:${org}`,
    });
    await waitForPage(page, "joined", (s) => s.replies.length === 1);
    await h.publish(transferred(org, 1));
    const state = await waitForPage(page, "the event", (s) => s.events.length === 1);
    assert.equal(state.transport, "WebSocket");
    assert.deepEqual(state.events, [1]);
    assert.match(state.positions[0], /^[^:]+:\d+$/, "the position arrives as the callback's ref");
  } finally {
    await page.closeContext();
  }
});

test("browser: after the page's socket is cut, the rejoin with `since` recovers what was missed", async () => {
  const org = h.unique("brcut");
  await withProxy(async (proxy) => {
    const page = await newPage();
    try {
      await page.evaluate((options) => window.startClient(options), {
        endPoint: proxy.endPoint, token: h.userToken("u1", org), topic: `org_events:${org}`,
      });
      await waitForPage(page, "joined", (s) => s.replies.length === 1);
      await h.publish(transferred(org, 1));
      await waitForPage(page, "event 1", (s) => s.events.length === 1);

      // The network goes away: connections cut, reconnects refused while two events go out.
      proxy.down = true;
      proxy.cut();
      await waitForPage(page, "the page noticed", (s) => !s.connected);
      await h.publish(transferred(org, 2));
      await h.publish(transferred(org, 3));
      await h.sleep(300);
      proxy.down = false;

      const state = await waitForPage(page, "recovered events 2 and 3", (s) => s.events.length >= 3 && s.replies.length >= 2);
      assert.deepEqual(state.events, [1, 2, 3], "in order, no gap, no duplicate");
      assert.equal(state.replies.at(-1).recovered, true, JSON.stringify(state.replies));
      await h.publish(transferred(org, 4));
      const live = await waitForPage(page, "live again", (s) => s.events.length === 4);
      assert.deepEqual(live.events, [1, 2, 3, 4]);
    } finally {
      await page.closeContext();
    }
  });
});

test("browser: presence onSync with two pages (one over WebSocket, one over long-poll)", async () => {
  const org = h.unique("brpres");
  const topic = `org_events:${org}`;
  const alice = await newPage();
  const bob = await newPage();
  try {
    await alice.evaluate((options) => window.startClient(options), {
      endPoint: h.HUB_SOCKET(), token: h.userToken("alice", org), topic, presence: true,
    });
    await bob.evaluate((options) => window.startClient(options), {
      endPoint: h.HUB_SOCKET(), token: h.playerToken("bob", org), topic, presence: true, transport: "longpoll",
    });
    const both = ["player:bob", "user:alice"];
    await waitForPage(alice, "alice sees both", (s) => JSON.stringify(s.presenceKeys) === JSON.stringify(both));
    const b = await waitForPage(bob, "bob sees both", (s) => JSON.stringify(s.presenceKeys) === JSON.stringify(both));
    assert.equal(b.transport, "LongPoll");
    // Bob leaves (the page goes away): alice's list follows.
    await bob.closeContext();
    await waitForPage(alice, "alice sees bob leave", (s) => JSON.stringify(s.presenceKeys) === JSON.stringify(["user:alice"]), 30000);
  } finally {
    await alice.closeContext();
  }
});

test("browser: forced long-poll (`transport: LongPoll`) joins, pushes and receives", async () => {
  const org = h.unique("brlp");
  await withProxy(async (proxy) => {
    const page = await newPage();
    try {
      await page.evaluate((options) => window.startClient(options), {
        endPoint: proxy.endPoint, token: h.userToken("u1", org), topic: `org_events:${org}`, transport: "longpoll",
      });
      const joined = await waitForPage(page, "joined over long-poll", (s) => s.replies.length === 1);
      assert.equal(joined.transport, "LongPoll");
      assert.ok(joined.replies[0].position, JSON.stringify(joined.replies));
      const reply = await page.evaluate(() => new Promise((resolve) => {
        window.client.channel.push("no_such_event", {}).receive("error", resolve).receive("ok", resolve);
      }));
      assert.deepEqual(reply, { reason: "unknown_event" });
      for (const n of [1, 2, 3]) await h.publish(transferred(org, n));
      const state = await waitForPage(page, "three events", (s) => s.events.length === 3);
      assert.deepEqual(state.events, [1, 2, 3]);
      assert.equal(proxy.upgradesRefused, 0);
      assert.equal(proxy.upgrades, 0, "no WebSocket was opened");
      assert.ok(proxy.httpConnections >= 1, "it went over plain HTTP");
    } finally {
      await page.closeContext();
    }
  });
});

test("browser: automatic fallback to long-poll when /socket/websocket is blocked", async () => {
  const org = h.unique("brfb");
  await withProxy(async (proxy) => {
    proxy.blockWebSocket = true;
    const page = await newPage();
    try {
      await page.evaluate((options) => window.startClient(options), {
        endPoint: proxy.endPoint, token: h.userToken("u1", org), topic: `org_events:${org}`, fallbackMs: 500,
      });
      const joined = await waitForPage(page, "joined after falling back", (s) => s.replies.length >= 1);
      assert.equal(joined.transport, "LongPoll");
      assert.ok(proxy.upgradesRefused >= 1, "the WebSocket was tried first");
      await h.publish(transferred(org, 1));
      await waitForPage(page, "the event over the fallback", (s) => s.events.length === 1);
    } finally {
      await page.closeContext();
    }
  });
});

test("browser: an expiring token is replaced through the `params` function on reconnect", async () => {
  const org = h.unique("brexp");
  const page = await newPage();
  try {
    await page.evaluate((options) => window.startClient(options), {
      endPoint: h.HUB_SOCKET(), token: h.userToken("u1", org, { exp: h.now() + 2 }), topic: `org_events:${org}`,
    });
    await waitForPage(page, "joined", (s) => s.replies.length === 1);
    // The app refreshes its token; phoenix.js reads it when it reconnects.
    await page.evaluate((token) => { window.currentToken = token; }, h.userToken("u1", org, { exp: h.now() + 600 }));
    const state = await waitForPage(page, "closed for expiry and rejoined", (s) => s.closes.includes(1008) && s.replies.length >= 2);
    assert.ok(state.paramsCalls >= 2, `params() read again: ${state.paramsCalls}`);
    assert.ok(state.opens >= 2);
    await h.publish(transferred(org, 1));
    await waitForPage(page, "events after the new token", (s) => s.events.length === 1);
  } finally {
    await page.closeContext();
  }
});

test("browser: the /admin status page shows live figures that change when a client connects (screenshot)", async () => {
  const org = h.unique("bradmin");
  const adminContext = await browser.createBrowserContext();
  const admin = await adminContext.newPage();
  const client = await newPage();
  try {
    await admin.setViewport({ width: 1280, height: 800 });
    const refused = await admin.goto(`${h.HUB_HTTP()}/admin`);
    assert.equal(refused.status(), 401);
    await admin.goto(`${h.HUB_HTTP()}/admin?token=${h.internalToken()}`);
    await admin.waitForFunction(() => Number(document.body.dataset.updates) >= 1, { timeout: 10000 });
    const figure = (id) => admin.$eval(`#${id}`, (node) => Number(node.textContent));
    // Earlier tests' pages may still be closing (a closed page's long-poll session ends after
    // its timeout): start from the page's own socket alone, so the change is this client's.
    const shows = (expected) => admin.waitForFunction(
      (wanted) => Object.entries(wanted).every(([id, value]) => document.getElementById(id).textContent === value),
      { timeout: 20000 }, expected,
    );
    await shows({ "sockets": "1", "kind-admin": "1", "kind-user": "0", "kind-player": "0" });
    const socketsBefore = await figure("sockets");

    // A queue with a player in it, and a user connecting: the page follows.
    await h.publish({ type: "inhouse.queue_opened", org_id: org, user_id: "coach", id: h.unique("ev"), payload: { queue_id: "q1" } });
    await client.evaluate((options) => window.startClient(options), {
      endPoint: h.HUB_SOCKET(), token: h.playerToken("p1", org), topic: `inhouse:${org}`, presence: true,
    });
    await waitForPage(client, "player joined", (s) => s.replies.length === 1);
    const joinedQueue = await client.evaluate(() => new Promise((resolve) => {
      window.client.channel.push("join_queue", { player_id: "p1", role: "mid" })
        .receive("ok", (r) => resolve({ ok: r })).receive("error", (e) => resolve({ error: e }));
    }));
    assert.ok(joinedQueue.ok, JSON.stringify(joinedQueue));
    await shows({ "sockets": "2", "kind-admin": "1", "kind-user": "0", "kind-player": "1" });
    await admin.waitForFunction(
      (orgId) => [...document.querySelectorAll("#queues tr")].some((row) => row.dataset.org === orgId && row.textContent.includes("p1")),
      { timeout: 15000 }, org,
    );
    assert.ok((await figure("sockets")) > socketsBefore);
    // A revocation the hub cannot apply is dropped: the page lists its reason (never the envelope).
    await h.publish({ type: "access.revoked", org_id: org, id: h.unique("ev"), payload: { identity: "nobody", scope: "org" } });
    await admin.waitForFunction(
      () => [...document.querySelectorAll("#dead-counts tr")].some((row) => row.textContent.includes("invalid_revocation"))
        && [...document.querySelectorAll("#dead-latest tr")].some((row) => row.textContent.includes("access.revoked")),
      { timeout: 15000 },
    );
    assert.equal(await admin.$eval("#redis", (node) => node.textContent), "up");
    const live = await admin.$eval("#live-text", (node) => node.textContent);
    assert.equal(live, "live");

    const dir = process.env.ARTIFACTS_DIR;
    if (dir) {
      fs.mkdirSync(dir, { recursive: true });
      const file = path.join(dir, "admin-status.png");
      await admin.screenshot({ path: file, fullPage: true });
      assert.ok(fs.statSync(file).size > 10_000, "a real screenshot");
      console.log(`screenshot: ${file}`);
    }
  } finally {
    await client.closeContext();
    await adminContext.close();
  }
});
