"""The daemon the Python client talks to: a real sensorgate on a loopback port with a data
directory of its own, stopped by its pid; its REST API; and the events a sensor's life
should produce for a subscriber.

SENSORGATE_BIN names the daemon binary (default: target/debug/sensorgate).
"""

import asyncio
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("SENSORGATE_BIN") or ROOT / "target/debug/sensorgate").resolve()

# The suite writes faster than a person would; the default write limits would answer 429.
CONFIG = "[limits]\nwrites_per_second = 10000.0\nwrite_burst = 10000.0\n"

# Whatever ends this process, no daemon it started is left running. (A SIGTERM cannot
# end it through SystemExit: unittest would report that as a failed test and go on.)
_running = set()


def _kill_running():
    for daemon in list(_running):
        daemon.proc.kill()
        shutil.rmtree(daemon.dir, ignore_errors=True)


def _terminated(*_):
    _kill_running()
    os._exit(1)


atexit.register(_kill_running)
signal.signal(signal.SIGTERM, _terminated)


async def wait_for(what, probe, timeout=10.0):
    """Polls `probe` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def entity_events(messages):
    """The entity events among `messages`, as `[event_type, entity_id]` pairs."""
    return [[m["event_type"], m["entity_id"]] for m in messages if m["type"] == "entity_event"]


def event_seqs(messages):
    """The `seq`s of the events among `messages`."""
    return [m["seq"] for m in messages if m["type"] == "entity_event"]


class Daemon:
    """One daemon process at a time, on its own data directory."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="sensorgate-interop-"))
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir()
        self.config = self.dir / "config.toml"
        self.config.write_text(CONFIG)
        self.log_path = self.dir / "daemon.log"
        self.proc = None

    def start(self, listen="127.0.0.1:0"):
        """Starts the daemon and returns once it says it is ready."""
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [BINARY, "--config", self.config, "--listen", listen, "--data-dir", self.data_dir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "RUST_LOG": "warn,sensorgate=info"},
        )
        log.close()
        _running.add(self)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log_path.read_text()
            address = re.search(r"listening on http://([^/\s]+)/", text)
            if address and re.search(r" sensorgate::app\] ready", text):
                self.url = f"http://{address[1]}"
                self.ws_url = f"ws://{address[1]}"
                self.token = (self.data_dir / "admin.token").read_text().strip()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the daemon did not start:\n{self.log_path.read_text()}")

    def stop(self):
        """SIGTERM, as a supervisor would; SIGKILL if it has not exited within 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _running.discard(self)

    def remove(self):
        """Stops it and removes its data."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def problems(self):
        """Log lines that report an error or a panic."""
        return [line for line in self.log_path.read_text().splitlines() if " ERROR " in line or "panicked" in line]

    def request(self, method, route, body=None):
        """A REST call with the admin token; returns the status and the JSON body."""
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def expect(self, status, method, route, body=None):
        answer_status, answer = self.request(method, route, body)
        if answer_status != status:
            raise AssertionError(f"{method} {route}: {answer_status} {answer}, expected {status}")
        return answer

    def sensor_life(self, tipo):
        """Creates a sensor, renames its model and deletes it; returns the events a
        subscriber to its `tipo` gets, in order, as `[event_type, entity_id]` pairs."""
        sensor_id = self.expect(201, "POST", "/api/v1/sensores/", {"tipo": tipo, "modelo": "DHT22"})["id"]
        self.expect(200, "PUT", f"/api/v1/sensores/{sensor_id}", {"modelo": "BME280"})
        self.expect(200, "DELETE", f"/api/v1/sensores/{sensor_id}")
        return [["created", sensor_id], ["updated", sensor_id], ["deleted", sensor_id]]
