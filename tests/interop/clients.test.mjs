// The daemon's WebSocket and event stream against clients written elsewhere: the `ws`
// package, Node's own WebSocket, and Chromium's WebSocket and EventSource driven by
// playwright-core; and the reference client /sensorgate.js, on Node's WebSocket and in
// Chromium.
// Run with Node 22 or newer (Node's WebSocket): `node clients.test.mjs`.
//
//   SENSORGATE_BIN  the daemon binary (default: target/debug/sensorgate)
//   CHROMIUM        the browser (default: /usr/bin/chromium)

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { chromium } from "playwright-core";
import WebSocketPackage from "ws";
import { CHROMIUM, CHROMIUM_ARGS } from "./chromium.mjs";
import { Daemon, entityEvents, waitFor } from "./daemon.mjs";
import { countedWebSocket, definedIn, localSocket, pageSocket } from "./recording-socket.mjs";
import { CLOSE_WAIT_MS, checkCleanClose, socketChecks } from "./socket-checks.mjs";
import { SensorgateClient } from "../../assets/sensorgate.js";

const NodeWebSocket = globalThis.WebSocket;
const WS_VERSION = (await import("ws/package.json", { with: { type: "json" } })).default.version;

let daemon;
let browser;
let page;

before(async () => {
  assert.equal(typeof NodeWebSocket, "function", `Node ${process.version} has no WebSocket; run with Node 22`);
  daemon = new Daemon();
  await daemon.start();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  page = await browser.newPage();
  // A page of the daemon's own origin, so that its sockets pass the Origin check.
  await page.goto(`${daemon.url}/healthz`);
});

after(async () => {
  if (browser) await browser.close();
  if (daemon) await daemon.remove();
});

// The checks are registered now and run after `before`: they take the daemon and the
// page when they run.
socketChecks(`ws ${WS_VERSION}`, () => ({ daemon, open: localSocket(WebSocketPackage) }));
socketChecks(`Node ${process.version} WebSocket`, () => ({ daemon, open: localSocket(NodeWebSocket) }));
socketChecks("Chromium WebSocket", () => ({ daemon, open: pageSocket(page) }));

test("Chromium EventSource: resumes by itself with Last-Event-ID after a restart, nothing missing", async () => {
  const tipo = "chromium-eventsource";
  await page.evaluate((url) => {
    const source = new EventSource(url);
    globalThis.streamed = { events: [], opened: 0 };
    source.onopen = () => streamed.opened++;
    source.onmessage = (event) => streamed.events.push({ id: event.lastEventId, ...JSON.parse(event.data) });
  }, `/api/v1/events?channel=sensors&tipo=${tipo}`);
  const streamed = () => page.evaluate(() => globalThis.streamed);
  await waitFor("the event stream to open", async () => (await streamed()).opened === 1);
  const before = await daemon.sensorLife(tipo);
  await waitFor("the first events", async () => (await streamed()).events.length === before.length);

  // Hold the browser's reconnection until the events made after the restart exist: a
  // stream without a position starts at the newest event, so only the Last-Event-ID the
  // browser sends brings them. (The header is added below the interception layer, where
  // playwright does not show it.)
  let releaseReconnect;
  const reconnectHeld = new Promise((resolve) => (releaseReconnect = resolve));
  let reconnects = 0;
  await page.route("**/api/v1/events?*", async (route) => {
    reconnects++;
    await reconnectHeld;
    await route.continue();
  });
  await daemon.restart();
  const after = await daemon.sensorLife(tipo);
  releaseReconnect();

  const { events, opened } = await waitFor("the events made after the restart", async () => {
    const state = await streamed();
    return state.events.length >= before.length + after.length && state;
  });
  await page.unroute("**/api/v1/events?*");
  assert.equal(opened, 2, "the stream opened again by itself");
  assert.deepEqual(entityEvents(events), [...before, ...after]);
  assert.deepEqual(
    events.map((e) => e.id),
    events.map((e) => String(e.seq)),
    "each event's id is its seq"
  );
  assert.ok(reconnects >= 1, "the reconnection waited for the events");
});

/** A loopback port where nothing listens (taken and given back). */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A reference client on a port where nothing listens, retrying quickly. */
const referenceClientOptions = (port, received) => ({
  url: `ws://127.0.0.1:${port}/api/v1/ws`,
  channels: ["sensors"],
  filters: { tipo: ["reference-client"] },
  minDelayMs: 50,
  maxDelayMs: 200,
  onEvent: (event) => received.push(event),
});

test("the reference client on Node's WebSocket: refused, retried, live, closed with 1000", async () => {
  const port = await freePort();
  const gateway = new Daemon();
  const received = [];
  const sockets = {};
  globalThis.WebSocket = countedWebSocket(NodeWebSocket, sockets);
  const client = new SensorgateClient(referenceClientOptions(port, received));
  try {
    client.connect();
    // Node's WebSocket reports a refused connection with `error` and nothing else.
    await waitFor("three refused attempts", () => sockets.ended >= 3);
    assert.equal(sockets.errors, sockets.ended, "each refusal reported as an error");
    await gateway.start(`127.0.0.1:${port}`);
    await waitFor("the client to be live", () => client.state === "live", 15000);
    const life = await gateway.sensorLife("reference-client");
    await waitFor("the sensor's events", () => received.length >= life.length);
    assert.deepEqual(entityEvents(received), life);
    assert.equal(sockets.overlapping, 0, "one socket at a time");

    const socket = sockets.last;
    client.close();
    const closed = await waitFor("the close", () => socket.closed, CLOSE_WAIT_MS);
    checkCleanClose(`sensorgate.js on Node ${process.version} WebSocket`, closed);
    assert.equal(client.state, "offline");
    assert.equal(sockets.opened, sockets.ended, "no socket opened after close()");
    assert.deepEqual(gateway.problems(), []);
  } finally {
    client.close();
    globalThis.WebSocket = NodeWebSocket;
    await gateway.remove();
  }
});

test("the reference client in Chromium: a refused socket reports error and close, one retry follows", async () => {
  const tab = await browser.newPage();
  try {
    await tab.goto(`${daemon.url}/healthz`);
    await definedIn(tab);
    const { onEvent, ...options } = referenceClientOptions(await freePort(), []);
    const client = await tab.evaluateHandle(async (options) => {
      const { SensorgateClient } = await import("/sensorgate.js");
      globalThis.sockets = {};
      globalThis.WebSocket = globalThis.countedWebSocket(WebSocket, globalThis.sockets);
      const client = new SensorgateClient(options);
      client.connect();
      return client;
    }, options);
    // Every retry (`attempt`) answers one socket's end: a retry scheduled by both the
    // error and the close would make two per socket.
    const sockets = await waitFor("three refused attempts, each retried once", () =>
      client.evaluate((c) => {
        const { last, ...counts } = globalThis.sockets;
        return counts.ended >= 3 && c.attempt === counts.ended && counts;
      })
    );
    assert.ok(sockets.errors >= 3 && sockets.closes >= 3, `the browser reports both: ${JSON.stringify(sockets)}`);
    assert.equal(sockets.overlapping, 0, "one socket at a time");
    await client.evaluate((c) => c.close());
  } finally {
    await tab.close();
  }
});

test("the daemon logged no error and no panic", () => {
  assert.deepEqual(daemon.problems(), []);
});
