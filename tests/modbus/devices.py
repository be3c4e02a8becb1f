"""Modbus devices for sensorgate's tests, served by pymodbus: the same units on a
loopback TCP port and on an RS-485 line emulated by two pseudo-terminal pairs joined by a
relay (the way socat joins them), so the adapter end can be unplugged and plugged back.

Usage: devices.py DIR. Prints one JSON line when ready:
    {"tcp": "127.0.0.1:PORT", "serial": "DIR/usb-RS485_adapter-if00-port0"}
then reads commands on stdin, one a line, and answers "ok" to each:
    mute UNIT / unmute UNIT      the unit stops answering / answers again
    corrupt UNIT / uncorrupt UNIT the unit's answers get a wrong CRC (RTU) / are right again
    unplug / plug                the adapter disappears (tty hung up, link removed) / comes back
The units (register tables as in sensorgate's presets):
    1  XY-MD02: input registers 1 = 215 (21.5 degC), 2 = 452 (45.2 %RH)
    2  SDM120: input registers, f32 ABCD: 0 = 230.1 V, 6 = 1.5 A, 12 = 345.25 W,
       70 = 50.0 Hz, 342 = 1234.5 kWh
    3  soil probe: holding registers 0 = 312 (31.2 %), 1 = -25 (-2.5 degC)
Registers 0 to 399 exist; reading past them is answered with exception 2. Other units
are silent.
"""

import asyncio
import errno
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import tty

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

SIZE = 400


def floats(table):
    registers = [0] * SIZE
    for address, value in table.items():
        high, low = struct.unpack(">HH", struct.pack(">f", value))
        registers[address] = high
        registers[address + 1] = low
    return registers


def block(values):
    # In pymodbus 3.16 a sequential block starts at address 1, which is register 0 on
    # the wire.
    return ModbusSequentialDataBlock(1, values)


def units():
    xy = [0] * SIZE
    xy[1] = 215
    xy[2] = 452
    sdm = floats({0: 230.1, 6: 1.5, 12: 345.25, 70: 50.0, 342: 1234.5})
    soil = [0] * SIZE
    soil[0] = 312
    soil[1] = (-25) & 0xFFFF
    return {
        1: ModbusDeviceContext(ir=block(xy), hr=block(list(xy))),
        2: ModbusDeviceContext(ir=block(sdm)),
        3: ModbusDeviceContext(hr=block(soil)),
    }


muted = set()
corrupted = set()
# pymodbus 3.16 answers an unknown unit with exception 4 even with
# ignore_missing_devices; on a real bus an absent unit is silent.
PRESENT = {1, 2, 3}


def trace(rtu):
    """Drops or corrupts what a unit sends, as a silent or noisy device would."""

    def packet(sending, data):
        if not sending or not data:
            return data
        unit = data[0] if rtu else (data[6] if len(data) > 6 else None)
        if unit in muted or unit not in PRESENT:
            return b""
        if rtu and unit in corrupted:
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    return packet


def raw_pty():
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


class Line:
    """Two pty pairs and a relay between their masters: the device end (where pymodbus
    listens) and the adapter end (the daemon's port, behind a by-id style link)."""

    def __init__(self, link):
        self.link = link
        self.lock = threading.Lock()
        self.device_master, self.device_slave, self.device_path = raw_pty()
        self.adapter = None
        self.plug()
        threading.Thread(target=self.relay, daemon=True).start()

    def plug(self):
        with self.lock:
            master, slave, path = raw_pty()
            # Only the daemon holds the adapter's tty open, as with a real adapter.
            os.close(slave)
            self.adapter = master
            os.symlink(path, self.link + ".new")
            os.replace(self.link + ".new", self.link)

    def unplug(self):
        with self.lock:
            os.unlink(self.link)
            os.close(self.adapter)
            self.adapter = None

    def relay(self):
        while True:
            with self.lock:
                adapter = self.adapter
            fds = [self.device_master] + ([adapter] if adapter is not None else [])
            try:
                ready, _, _ = select.select(fds, [], [], 0.05)
            except OSError:
                continue
            for fd in ready:
                with self.lock:
                    if fd != self.device_master and fd != self.adapter:
                        continue
                    other = self.adapter if fd == self.device_master else self.device_master
                    try:
                        data = os.read(fd, 4096)
                    except OSError as e:
                        # EIO: nobody holds the other side open (the daemon closed the
                        # port to reopen it).
                        if e.errno != errno.EIO:
                            raise
                        data = b""
                    if data and other is not None:
                        try:
                            os.write(other, data)
                        except OSError:
                            pass
                if not data:
                    time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(loop, line):
    for text in sys.stdin:
        words = text.split()
        if not words:
            continue
        verb, args = words[0], [int(w) for w in words[1:]]
        if verb == "mute":
            muted.update(args)
        elif verb == "unmute":
            muted.difference_update(args)
        elif verb == "corrupt":
            corrupted.update(args)
        elif verb == "uncorrupt":
            corrupted.difference_update(args)
        elif verb == "unplug":
            line.unplug()
        elif verb == "plug":
            line.plug()
        else:
            print(f"unknown command {verb}", flush=True)
            continue
        print("ok", flush=True)
    # The test closed our stdin: it is done.
    os._exit(0)


async def main(directory):
    context = ModbusServerContext(devices=units(), single=False)
    line = Line(os.path.join(directory, "usb-RS485_adapter-if00-port0"))
    port = free_port()
    tcp = ModbusTcpServer(
        context,
        address=("127.0.0.1", port),
        ignore_missing_devices=True,
        trace_packet=trace(rtu=False),
    )
    serial = ModbusSerialServer(
        context,
        port=line.device_path,
        baudrate=9600,
        ignore_missing_devices=True,
        trace_packet=trace(rtu=True),
    )
    servers = [asyncio.create_task(tcp.serve_forever()), asyncio.create_task(serial.serve_forever())]
    # Ready when the TCP port answers.
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    print(json.dumps({"tcp": f"127.0.0.1:{port}", "serial": line.link}), flush=True)
    threading.Thread(target=commands, args=(asyncio.get_running_loop(), line), daemon=True).start()
    await asyncio.gather(*servers)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
