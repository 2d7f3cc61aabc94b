// Checklist 14: the hub never closes with 1000; a drain (SIGTERM) closes with 1012 and the
// client reconnects to the restarted hub. Run with phoenix 1.8.16 and 1.8.12 (the versions
// that do not reconnect after a 1000 close).
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

const startHub = (port) => h.startHub(port, { SHUTDOWN_GRACE_MS: "3000" });

for (const version of ["phoenix", "phoenix-1.8.12"]) {
  test(`14. drain closes with 1012 and ${version} reconnects to the restarted hub`, async () => {
    const Phoenix = require(version);
    const port = await h.freePort();
    let hub = await startHub(port);
    const org = h.unique("o");
    const socket = h.connect({ token: h.userToken("u1", org) }, { endPoint: `ws://127.0.0.1:${port}/socket` }, Phoenix);
    const closes = [];
    let opens = 0;
    socket.onClose((event) => closes.push(event.code));
    socket.onOpen(() => opens++);
    const channel = socket.channel(`org_events:${org}`);
    await h.join(channel);

    hub.kill("SIGTERM");
    await h.waitFor("close frame", () => closes.length >= 1, 5000);
    assert.equal(closes[0], 1012);
    assert.notEqual(closes[0], 1000);
    const exit = await hub.exited;
    assert.deepEqual(exit, { code: 0, signal: null });

    hub = await startHub(port);
    try {
      await h.waitFor("reconnect and rejoin", () => opens >= 2 && channel.state === "joined", 10000);
      const received = h.nextEvent(channel, "player.transferred");
      const response = await fetch(`http://127.0.0.1:${port}/api/events`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${h.internalToken()}` },
        body: JSON.stringify({ type: "player.transferred", org_id: org, user_id: "u1", payload: {} }),
      });
      assert.equal(response.status, 202);
      await received;
    } finally {
      await h.disconnect(socket);
      hub.kill("SIGTERM");
      await hub.exited;
    }
  });
}
