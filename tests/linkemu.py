"""An emulated mobile uplink for tests and benchmarks (root only): the far side (a PACS, an object store)
lives in its own network namespace behind a veth pair, the truck-to-PACS direction is rate-limited with
the kernel's ``tbf`` qdisc, an outage sets the link down (and resets the TCP connections through it, as
a 4G reconnect with a new address does), and a user-space TCP proxy on the truck side adds the delay
and approximates loss (this kernel has no ``netem``): every forwarded chunk waits ``delay_s``, and a
``loss`` fraction of chunks waits a further 200 ms, the minimum TCP retransmission timeout a lost
segment costs.  The proxy counts the bytes it forwards each way.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import threading
import time
from typing import Any

_COUNTER = itertools.count()


def available() -> str | None:
    """Why the emulator cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"needs {tool} (iproute2)"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Link:
    """``with Link(rate_mbit=8) as link:`` the far side answers at ``link.far_ip`` (run servers there
    with ``link.prefix + [...]``)."""

    def __init__(self, rate_mbit: float = 8.0, down_rate_mbit: float = 30.0) -> None:
        n = f"{os.getpid() % 10000}{next(_COUNTER)}"
        self.ns, self.host_if, self.far_if = f"msx{n}", f"msxh{n}", f"msxp{n}"
        octet = 10 + (int(n) % 200)
        self.host_ip, self.far_ip = f"10.77.{octet}.1", f"10.77.{octet}.2"
        self.rate_mbit, self.down_rate_mbit = rate_mbit, down_rate_mbit
        self.prefix = ["ip", "netns", "exec", self.ns]
        self.outage_s = 0.0
        self._down_since: float | None = None

    def __enter__(self) -> "Link":
        _sh("ip", "netns", "add", self.ns)
        _sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.far_if)
        _sh("ip", "link", "set", self.far_if, "netns", self.ns)
        _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _sh("ip", "link", "set", self.host_if, "up")
        _sh(*self.prefix, "ip", "addr", "add", f"{self.far_ip}/24", "dev", self.far_if)
        _sh(*self.prefix, "ip", "link", "set", self.far_if, "up")
        _sh(*self.prefix, "ip", "link", "set", "lo", "up")
        # uplink (truck -> PACS): the host side's egress; downlink: the far side's egress
        _sh("tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
            "burst", "32kbit", "latency", "400ms")
        _sh(*self.prefix, "tc", "qdisc", "add", "dev", self.far_if, "root", "tbf", "rate",
            f"{self.down_rate_mbit}mbit", "burst", "64kbit", "latency", "400ms")
        return self

    def down(self) -> None:
        self._down_since = time.monotonic()
        _sh("ip", "link", "set", self.host_if, "down")

    def up(self) -> None:
        _sh("ip", "link", "set", self.host_if, "up")
        if self._down_since is not None:
            self.outage_s += time.monotonic() - self._down_since
            self._down_since = None

    def __exit__(self, *exc: Any) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


class DelayProxy:
    """127.0.0.1:``port`` -> ``target``, with ``delay_s`` each way and ``loss`` approximated (see above)."""

    def __init__(self, target: tuple[str, int], delay_s: float = 0.03, loss: float = 0.01, seed: int = 0) -> None:
        self.target, self.delay_s, self.loss = target, delay_s, loss
        self.rng = random.Random(seed)
        self.up_bytes = 0        # truck -> destination
        self.down_bytes = 0
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            far_reader, far_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, far_writer}
        await asyncio.gather(self._pipe(reader, far_writer, True), self._pipe(far_reader, writer, False),
                             return_exceptions=True)
        for w in (writer, far_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upward: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(16384)
                if upward:
                    self.up_bytes += len(data)
                else:
                    self.down_bytes += len(data)
                extra = 0.2 if data and self.rng.random() < self.loss else 0.0
                queue.put_nowait((self.loop.time() + self.delay_s + extra, data))
                if not data:
                    break
                while queue.qsize() > 64:  # back-pressure: the link, not this proxy, holds the bytes
                    await asyncio.sleep(0.005)
            await task
        finally:
            task.cancel()

    def reset_all(self) -> None:
        """Every connection through the proxy dies (the 4G modem came back with a new address)."""
        def _reset() -> None:
            for w in list(self._writers):
                w.transport.abort()
        self.loop.call_soon_threadsafe(_reset)

    def close(self) -> None:
        """Every connection reset; the loop's thread (a daemon thread) stays for the process's life."""
        self.reset_all()


class Outages:
    """A ``down_s`` outage every ``period_s`` (the first after ``period_s - down_s`` of link)."""

    def __init__(self, link: Link, proxy: DelayProxy, period_s: float, down_s: float) -> None:
        self.link, self.proxy, self.period_s, self.down_s = link, proxy, period_s, down_s
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.period_s - self.down_s):
            self.link.down()
            self.proxy.reset_all()
            self.count += 1
            self.stop.wait(self.down_s)
            self.link.up()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(self.down_s + 5)
        self.link.up()
