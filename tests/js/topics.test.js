// Topic families: allowed and refused joins per identity; refused tokens.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./lib/harness");

async function joinOutcome(socket, topic) {
  try {
    await h.join(socket.channel(topic));
    return "ok";
  } catch (error) {
    return error.response ? error.response.reason : error.message;
  }
}

test("join rules for User, Player and Internal identities", async () => {
  const org = h.unique("o");
  const other = h.unique("o");
  const user = h.unique("u");
  const cases = [
    [h.userToken(user, org), [
      [`notifications:${user}`, "ok"], [`notifications:${h.unique("u")}`, "unauthorized"],
      [`tournament:${org}`, "ok"], [`inhouse:${org}`, "ok"], [`inhouse:${other}`, "unauthorized"],
      [`org_events:${org}`, "ok"], [`org_events:${other}`, "unauthorized"], ["chat:1", "unmatched topic"],
    ]],
    // A Rails access token (organization_id, numeric ids) signed with JWT_SECRET_KEY.
    [h.sign({ user_id: 42, organization_id: 7, exp: h.now() + 60 }, { secret: process.env.RAILS_SECRET }), [
      ["notifications:42", "ok"], ["org_events:7", "ok"], ["inhouse:7", "ok"], ["org_events:8", "unauthorized"],
    ]],
    [h.playerToken("p1", org), [
      ["notifications:p1", "unauthorized"], [`tournament:${org}`, "ok"], [`inhouse:${org}`, "ok"],
      [`inhouse:${other}`, "unauthorized"], [`org_events:${org}`, "ok"], [`org_events:${other}`, "unauthorized"],
    ]],
    [h.internalToken(), [
      [`notifications:${user}`, "ok"], [`tournament:${org}`, "ok"], [`inhouse:${other}`, "ok"], [`org_events:${other}`, "ok"],
    ]],
  ];
  for (const [token, topics] of cases) {
    const socket = h.connect({ token });
    for (const [topic, expected] of topics) {
      assert.equal(await joinOutcome(socket, topic), expected, topic);
    }
    await h.disconnect(socket);
  }
});

test("expired, wrong-secret, alg none and missing-claims tokens are refused before the upgrade", async () => {
  const tokens = {
    expired: h.userToken("u1", "o1", { exp: h.now() - 5 }),
    wrongSecret: h.sign({ user_id: "u1", org_id: "o1" }, { secret: "not-the-secret" }),
    algNone: h.sign({ user_id: "u1", org_id: "o1" }, { alg: "none" }),
    missingClaims: h.sign({ sub: "u1" }),
    internalWrongIssuer: h.sign({ type: "internal", iss: "someone" }),
  };
  for (const [name, token] of Object.entries(tokens)) {
    assert.equal(await h.upgradeStatus(`${h.HUB_SOCKET()}/websocket?vsn=2.0.0&token=${token}`), 403, name);
    const socket = h.connect({ token });
    let errors = 0;
    socket.onError(() => errors++);
    await h.waitFor(`${name} refused`, () => errors >= 1);
    assert.equal(socket.isConnected(), false, name);
    await h.disconnect(socket);
  }
});
