"""The daemon's WebSocket against Python's `websockets` library: filters, the answers to
client messages, resuming with `since` after a dropped connection, and the close
handshake. Each check uses a `tipo` of its own, so that no check sees another's events.

    python tests/interop/websockets_client.py     (with websockets installed)
"""

import asyncio
import itertools
import json
import time
import unittest
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import connect

from harness import Daemon, entity_events, event_seqs, wait_for

LABEL = f"Python websockets {websockets.__version__}"
# How long a clean close may take: on loopback it takes milliseconds when answered at once.
CLOSE_WITHIN_S = 1.0
# How long to wait for the server's Close before reporting what happened instead.
CLOSE_WAIT_S = 15.0

daemon = None
tipos = itertools.count(1)


def setUpModule():
    global daemon
    daemon = Daemon()
    try:
        daemon.start()
    except BaseException:
        daemon.remove()
        raise


def tearDownModule():
    daemon.remove()


class RecordingSocket:
    """A connection whose every message is kept, read by a task of its own."""

    def __init__(self, connection):
        self.connection = connection
        self.received = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for message in self.connection:
                self.received.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass  # how it closed is the connection's close_code

    def send(self, message):
        return self.connection.send(json.dumps(message))

    def drop(self):
        """Loses the connection without a close handshake, as a network would."""
        self.connection.transport.abort()

    async def close(self):
        """Closes with 1000; returns the code the server answered with and the seconds
        the close took."""
        started = time.monotonic()
        await self.connection.close(1000)
        await self.reader
        return self.connection.close_code, time.monotonic() - started


class WebsocketsClient(unittest.IsolatedAsyncioTestCase):
    async def subscribe(self, **query):
        """Opens /api/v1/ws with `query` and waits for the opening messages: `connection`,
        `stats`, and the snapshot when one is asked for (which fixes the feed position)."""
        connection = await connect(
            f"{daemon.ws_url}/api/v1/ws?{urlencode(query)}", proxy=None, close_timeout=CLOSE_WAIT_S
        )
        socket = RecordingSocket(connection)
        self.addAsyncCleanup(connection.close)
        wanted = 3 if query.get("snapshot") else 2
        await wait_for("the opening messages", lambda: len(socket.received) >= wanted)
        first, second = socket.received[:2]
        self.assertEqual(
            (first["type"], first["status"], first["channel"]), ("connection", "connected", query["channel"])
        )
        self.assertEqual(second["type"], "stats")
        if query.get("snapshot"):
            self.assertEqual(socket.received[2]["type"], "snapshot")
        return socket

    async def receives(self, socket, expected):
        """Waits for the last of `expected` and checks that exactly `expected` arrived, in
        order, with growing `seq`s. Returns the `seq` of the last."""
        await wait_for(f"the event {expected[-1]}", lambda: expected[-1] in entity_events(socket.received))
        self.assertEqual(entity_events(socket.received), expected)
        seqs = event_seqs(socket.received)
        self.assertEqual(seqs, sorted(set(seqs)))
        return seqs[-1]

    async def answer(self, socket, message):
        """Sends a message and waits for the answer that carries its `id`."""
        await socket.send(message)

        def find():
            return next((m for m in socket.received if m.get("id") == message["id"]), None)

        return await wait_for(f"the answer to {message}", find)

    async def test_a_channel_and_filters_let_through_only_their_events(self):
        tipo = f"python-{next(tipos)}"
        socket = await self.subscribe(channel="sensors", tipo=tipo, event_type="created,deleted", snapshot="true")
        daemon.sensor_life(f"{tipo}-other")
        created, _, deleted = daemon.sensor_life(tipo)
        await self.receives(socket, [created, deleted])

    async def test_ping_subscribe_and_unknown_messages_are_answered_with_their_id(self):
        tipo = f"python-{next(tipos)}"
        socket = await self.subscribe(channel="sensors", tipo=tipo, event_type="created", snapshot="true")
        self.assertEqual((await self.answer(socket, {"type": "ping", "id": 1}))["type"], "pong")
        result = await self.answer(
            socket, {"type": "subscribe", "id": "widen", "event_type": ["created", "updated", "deleted"]}
        )
        self.assertEqual((result["type"], result["action"], result["ok"]), ("result", "subscribe", True))
        self.assertEqual(result["subscription"]["event_type"], ["created", "deleted", "updated"])
        self.assertEqual(result["subscription"]["tipo"], [tipo])
        error = await self.answer(socket, {"type": "teleport", "id": 3})
        self.assertEqual((error["type"], error["code"]), ("error", "unknown_action"))
        # The widened subscription is in force: updates arrive now.
        await self.receives(socket, daemon.sensor_life(tipo))

    async def test_reconnecting_with_since_after_a_drop_misses_nothing_and_repeats_nothing(self):
        tipo = f"python-{next(tipos)}"
        first = await self.subscribe(channel="sensors", tipo=tipo, snapshot="true")
        since = await self.receives(first, daemon.sensor_life(tipo))
        first.drop()
        while_away = daemon.sensor_life(tipo)
        second = await self.subscribe(channel="sensors", tipo=tipo, since=str(since))
        await self.receives(second, while_away + daemon.sensor_life(tipo))
        self.assertGreater(event_seqs(second.received)[0], since)

    async def test_a_close_with_1000_is_answered_with_1000_within_a_second(self):
        socket = await self.subscribe(channel="sensors", tipo=f"python-{next(tipos)}")
        code, seconds = await socket.close()
        print(f"clean close: {LABEL}: code {code} after {seconds * 1000:.1f} ms", flush=True)
        self.assertEqual(code, 1000, f"the server answers Close with 1000 (got {code} after {seconds:.1f} s)")
        self.assertLess(seconds, CLOSE_WITHIN_S)

    def test_the_daemon_logged_no_error_and_no_panic(self):
        self.assertEqual(daemon.problems(), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
