// Shared helpers for the conformance suite. The Rust test `js::phoenix_js_suite` starts a hub
// and a redis-server and passes their addresses in the environment.
"use strict";
const crypto = require("node:crypto");
const net = require("node:net");
const WebSocket = require("ws");

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run this suite through \`cargo test\` (tests/it/js.rs)`);
  return value;
};

const HUB_HTTP = () => env("HUB_HTTP"); // http://127.0.0.1:PORT
const HUB_SOCKET = () => HUB_HTTP().replace(/^http/, "ws") + "/socket";
const SECRET = () => env("HUB_SECRET");

const b64url = (data) => Buffer.from(data).toString("base64url");

/** Signs claims as a JWT (HS256 by default; `alg: "none"` produces an unsigned token). */
function sign(claims, { secret = SECRET(), alg = "HS256" } = {}) {
  const header = b64url(JSON.stringify({ alg, typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  if (alg === "none") return `${header}.${body}.`;
  const signature = crypto.createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

const now = () => Math.floor(Date.now() / 1000);
const userToken = (userId, orgId, extra = {}) => sign({ user_id: userId, org_id: orgId, ...extra });
const playerToken = (playerId, orgId) => sign({ entity_type: "player", player_id: playerId, organization_id: orgId });
const internalToken = () => sign({ type: "internal", iss: "prostaff-api" });

let uniqueCounter = 0;
/** A fresh id so tests never share orgs, users or rate-limit windows. */
const unique = (prefix) => `${prefix}-${process.pid}-${Date.now().toString(36)}-${++uniqueCounter}`;

/**
 * Opens a phoenix.js socket. Every frame received is recorded raw in `socket.rawIn` and every
 * frame sent in `socket.rawOut`, so tests can check exact bytes.
 */
function connect(params, opts = {}, Phoenix = require("phoenix")) {
  const rawIn = [];
  const rawOut = [];
  const socket = new Phoenix.Socket(opts.endPoint || HUB_SOCKET(), {
    transport: WebSocket,
    params,
    reconnectAfterMs: () => 100,
    rejoinAfterMs: () => 100,
    decode: (raw, callback) => {
      rawIn.push(raw);
      return Phoenix.Serializer.decode(raw, callback);
    },
    encode: (msg, callback) =>
      Phoenix.Serializer.encode(msg, (encoded) => {
        rawOut.push(encoded);
        callback(encoded);
      }),
    ...opts,
  });
  socket.rawIn = rawIn;
  socket.rawOut = rawOut;
  socket.connect();
  return socket;
}

/** Resolves with the join response, rejects with the error response or on timeout. */
function join(channel, timeout = 5000) {
  return new Promise((resolve, reject) => {
    channel
      .join(timeout)
      .receive("ok", resolve)
      .receive("error", (response) => reject(Object.assign(new Error(`join refused: ${JSON.stringify(response)}`), { response })))
      .receive("timeout", () => reject(new Error("join timeout")));
  });
}

/** Resolves with `{status, response}` of a channel push. */
function push(channel, event, payload, timeout = 5000) {
  return new Promise((resolve, reject) => {
    channel
      .push(event, payload, timeout)
      .receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => reject(new Error(`push ${event} timed out`)));
  });
}

/** Resolves with the payload of the next `event` on `channel`. */
function nextEvent(channel, event, timeout = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      channel.off(event, ref);
      reject(new Error(`no ${event} within ${timeout} ms`));
    }, timeout);
    const ref = channel.on(event, (payload) => {
      clearTimeout(timer);
      channel.off(event, ref);
      resolve(payload);
    });
  });
}

async function waitFor(what, predicate, timeout = 5000) {
  const deadline = Date.now() + timeout;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** POST /api/events with an internal token. */
async function publish(envelope) {
  const response = await fetch(`${HUB_HTTP()}/api/events`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${internalToken()}` },
    body: JSON.stringify(envelope),
  });
  if (response.status !== 202) throw new Error(`publish failed: ${response.status} ${await response.text()}`);
  return response.json();
}

/** The HTTP status of a raw WebSocket upgrade (101 on success). */
function upgradeStatus(url, headers = {}) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers });
    ws.on("open", () => {
      ws.terminate();
      resolve(101);
    });
    ws.on("unexpected-response", (_req, res) => {
      resolve(res.statusCode);
      ws.terminate();
    });
    ws.on("error", () => {});
  });
}

function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Starts another hub (the real binary, `HUB_BIN`) on `port` against the suite's Redis, with
 * `extraEnv` on top of the test settings; resolves once it serves /health. `child.exited`
 * resolves with its exit.
 */
async function startHub(port, extraEnv = {}) {
  const { spawn } = require("node:child_process");
  const child = spawn(env("HUB_BIN"), [], {
    env: {
      ...process.env,
      PORT: String(port),
      BIND_ADDR: "127.0.0.1",
      INTERNAL_JWT_SECRET: SECRET(),
      REDIS_URL: env("REDIS_URL"),
      RAILS_API_URL: "http://127.0.0.1:9",
      RECONCILER_RETRY_DELAYS_MS: "10",
      RUST_LOG: "warn",
      ...extraEnv,
    },
    stdio: ["ignore", "ignore", "inherit"],
  });
  child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  await waitFor("hub /health", async () => {
    try {
      return (await fetch(`http://127.0.0.1:${port}/health`)).ok;
    } catch {
      return false;
    }
  }, 10000);
  return child;
}

function disconnect(...sockets) {
  return Promise.all(sockets.map((socket) => new Promise((resolve) => socket.disconnect(resolve, 4000))));
}

module.exports = {
  HUB_HTTP, HUB_SOCKET, SECRET, sign, now, userToken, playerToken, internalToken, unique,
  connect, join, push, nextEvent, waitFor, sleep, publish, upgradeStatus, freePort, disconnect,
  startHub,
};
