// The checks every WebSocket client goes through, written once: filters, the answers to
// its messages, resuming with `since`, and the close handshake. Each check uses a `tipo`
// of its own, so that no check sees another's events.

import { test } from "node:test";
import assert from "node:assert/strict";
import { entityEvents, eventSeqs, waitFor } from "./daemon.mjs";

/** How long a clean close may take: on loopback it takes milliseconds when answered at once. */
const CLOSE_WITHIN_MS = 1000;
/** How long to wait for the server's Close before reporting what happened instead. */
export const CLOSE_WAIT_MS = 15000;

let tipos = 0;
const uniqueTipo = (label) => `${label.replace(/\W+/g, "-").toLowerCase()}-${++tipos}`;

/** Opens `/api/v1/ws` with `query` and waits for the opening messages: `connection`,
 * `stats`, and the snapshot when one is asked for (from which the feed position is fixed). */
async function subscribe(daemon, open, query) {
  const socket = await open(`${daemon.wsUrl}/api/v1/ws?${new URLSearchParams(query)}`);
  const wanted = query.snapshot ? 3 : 2;
  const { received } = await waitFor("the opening messages", async () => {
    const state = await socket.state();
    return state.received.length >= wanted && state;
  });
  assert.equal(received[0].type, "connection");
  assert.equal(received[0].status, "connected");
  assert.equal(received[0].channel, query.channel);
  assert.equal(received[1].type, "stats");
  if (query.snapshot) assert.equal(received[2].type, "snapshot");
  return socket;
}

/** Waits for the last of `expected` and checks that exactly `expected` arrived, in
 * order, with growing `seq`s: nothing missing, nothing repeated, nothing filtered out
 * let through. Resolves with the `seq` of the last. */
async function receives(socket, expected) {
  const last = JSON.stringify(expected.at(-1));
  const { received } = await waitFor(`the event ${last}`, async () => {
    const state = await socket.state();
    return entityEvents(state.received).some((e) => JSON.stringify(e) === last) && state;
  });
  assert.deepEqual(entityEvents(received), expected);
  const seqs = eventSeqs(received);
  seqs.slice(1).forEach((seq, i) => assert.ok(seq > seqs[i], `seqs grow: ${seqs}`));
  return seqs.at(-1);
}

/** Sends a message and waits for the answer that carries its `id`. */
async function answer(socket, message) {
  await socket.send(message);
  const { received } = await waitFor(`the answer to ${JSON.stringify(message)}`, async () => {
    const state = await socket.state();
    return state.received.some((m) => m.id === message.id) && state;
  });
  return received.find((m) => m.id === message.id);
}

/** Reports how a close with 1000 ended, as `{code, ms}` seen by the client, and checks
 * that the server answered with 1000 soon enough. */
export function checkCleanClose(label, closed) {
  console.log(`clean close: ${label}: code ${closed.code} after ${closed.ms.toFixed(1)} ms`);
  assert.equal(closed.code, 1000, `the server answers Close with 1000 (got ${closed.code} after ${closed.ms} ms)`);
  assert.ok(closed.ms < CLOSE_WITHIN_MS, `the close took ${closed.ms.toFixed(1)} ms`);
}

/**
 * Registers the checks for one client. `context()` gives, once the suite's `before` has
 * run, `{ daemon, open }`, `open(url)` opening a socket with that client.
 */
export function socketChecks(label, context) {
  test(`${label}: a channel and filters let through only their events`, async () => {
    const { daemon, open } = context();
    const tipo = uniqueTipo(label);
    const socket = await subscribe(daemon, open, {
      channel: "sensors",
      tipo,
      event_type: "created,deleted",
      snapshot: "true",
    });
    await daemon.sensorLife(`${tipo}-other`);
    const [created, , deleted] = await daemon.sensorLife(tipo);
    await receives(socket, [created, deleted]);
    await socket.close(1000);
  });

  test(`${label}: ping, subscribe and unknown messages are answered with their id`, async () => {
    const { daemon, open } = context();
    const tipo = uniqueTipo(label);
    const socket = await subscribe(daemon, open, { channel: "sensors", tipo, event_type: "created", snapshot: "true" });
    const pong = await answer(socket, { type: "ping", id: 1 });
    assert.equal(pong.type, "pong");
    const result = await answer(socket, {
      type: "subscribe",
      id: "widen",
      event_type: ["created", "updated", "deleted"],
    });
    assert.equal(result.type, "result");
    assert.equal(result.action, "subscribe");
    assert.equal(result.ok, true);
    assert.deepEqual(result.subscription.event_type, ["created", "deleted", "updated"]);
    assert.deepEqual(result.subscription.tipo, [tipo]);
    const error = await answer(socket, { type: "teleport", id: 3 });
    assert.equal(error.type, "error");
    assert.equal(error.code, "unknown_action");
    // The widened subscription is in force: updates arrive now.
    await receives(socket, await daemon.sensorLife(tipo));
    await socket.close(1000);
  });

  test(`${label}: reconnecting with since misses nothing and repeats nothing`, async () => {
    const { daemon, open } = context();
    const tipo = uniqueTipo(label);
    const first = await subscribe(daemon, open, { channel: "sensors", tipo, snapshot: "true" });
    const since = await receives(first, await daemon.sensorLife(tipo));
    // The next socket opens at once, without waiting for the first one's close.
    await first.close(1000);
    const whileAway = await daemon.sensorLife(tipo);
    const second = await subscribe(daemon, open, { channel: "sensors", tipo, since: String(since) });
    const seqs = await receives(second, [...whileAway, ...(await daemon.sensorLife(tipo))]);
    assert.ok(seqs > since);
    const { received } = await second.state();
    assert.ok(eventSeqs(received)[0] > since, "nothing at or before since is sent again");
    await second.close(1000);
  });

  test(`${label}: a Close with 1000 is answered with 1000 within ${CLOSE_WITHIN_MS} ms`, async () => {
    const { daemon, open } = context();
    const socket = await subscribe(daemon, open, { channel: "sensors", tipo: uniqueTipo(label) });
    await socket.close(1000);
    checkCleanClose(label, await waitFor("the close", async () => (await socket.state()).closed, CLOSE_WAIT_MS));
  });
}
