"""A loopback TCP proxy in front of a local S3 server: per-request latency as a remote bucket has, or a gate.

    with LatencyProxy(server.port, delay_s=0.015) as proxy:   # benchmarks/bench_storage.py --latency-ms 15
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint       # boto3 now pays ~15 ms per request exchange
    with LatencyProxy(server.port) as gate:                    # tests: hold every byte until released
        gate.hold(); ...; gate.release()
        gate.hold_on(b"step_0000006/")   # hold from the first request whose bytes contain this
        gate.cut_once(after=3 * 2**20)   # drop the next connection that has sent 3 MiB to the client

On loopback the server answers in well under a millisecond, so a benchmark there measures CPU, not the
round trips that bound a real bucket (10-20 ms to a cloud region); this proxy puts them back. The delay is
added once per request: when the client starts sending after the server has answered (or on a new
connection), i.e. one round trip per HTTP exchange; a streaming body is not slowed further. The proxy is
transparent (no HTTP parsing): SigV4 signatures cover the Host header, which the client sets to the proxy's
address and the server checks as received.

Bounded: binds 127.0.0.1 only, at most `max_connections` at once (more wait in the listen queue), 256 KiB
reads; runs an asyncio loop in one daemon thread; `close()` ends every connection.
"""

from __future__ import annotations

import asyncio
import sys
import threading

CHUNK = 256 * 1024


class LatencyProxy:
    def __init__(self, target_port: int, delay_s: float = 0.0, target_host: str = "127.0.0.1",
                 max_connections: int = 256):
        if not 0.0 <= delay_s <= 1.0:
            raise ValueError(f"delay_s: expected 0..1 s per request, found {delay_s}")
        self.target = (target_host, int(target_port))
        self.delay_s = delay_s
        self.max_connections = max_connections
        self.port: int | None = None
        self.requests = 0  # request exchanges seen (each paid delay_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wmvla-latency-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()
        self._pattern: bytes | None = None
        self.held = threading.Event()  # set when hold_on's pattern was seen (the gate closed by it)
        self._cut_after: int | None = None
        self.cuts = 0  # connections dropped by cut_once

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> "LatencyProxy":
        self._thread.start()

        async def setup():
            self._open = asyncio.Event()
            self._open.set()
            self._slots = asyncio.Semaphore(self.max_connections)
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            return self._server.sockets[0].getsockname()[1]

        self.port = self._call(setup())
        return self

    def hold(self) -> None:
        """From now on no byte passes (either way) until release(); connections stay open."""
        self._loop.call_soon_threadsafe(self._open.clear)

    def release(self) -> None:
        self._pattern = None
        self._loop.call_soon_threadsafe(self._open.set)

    def hold_on(self, pattern: bytes) -> None:
        """Close the gate when a client chunk contains `pattern` (e.g. a key in a request line), before it passes:
        a test can freeze an upload at an exact object. `held` is set then; release() opens the gate again."""
        self.held.clear()
        self._pattern = pattern

    def cut_once(self, after: int) -> None:
        """Drop (both sides of) the first connection whose bytes sent to the client pass `after`: a connection
        lost in the middle of a download's body."""
        self._cut_after = after

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            async with self._slots:
                try:
                    server_r, server_w = await asyncio.open_connection(*self.target)
                except OSError:
                    client_w.close()
                    return
                answered = [True]  # a new connection starts with a request: pay the delay once
                sent_down = [0]

                async def pump(reader, writer, upstream: bool) -> None:
                    try:
                        while chunk := await reader.read(CHUNK):
                            if upstream and self._pattern is not None and self._pattern in chunk:
                                self._pattern = None
                                self._open.clear()
                                self.held.set()
                            await self._open.wait()
                            if upstream and answered[0]:
                                answered[0] = False
                                self.requests += 1
                                if self.delay_s:
                                    await asyncio.sleep(self.delay_s)
                            elif not upstream:
                                answered[0] = True
                                limit = self._cut_after
                                if limit is not None and sent_down[0] + len(chunk) > limit:
                                    self._cut_after = None
                                    self.cuts += 1
                                    writer.write(chunk[: max(0, limit - sent_down[0])])
                                    await writer.drain()
                                    for w in (client_w, server_w):
                                        w.transport.abort()
                                    return
                                sent_down[0] += len(chunk)
                            writer.write(chunk)
                            await writer.drain()
                    except (ConnectionError, asyncio.IncompleteReadError):
                        pass
                    finally:
                        if writer.can_write_eof():
                            try:
                                writer.write_eof()
                            except OSError:
                                pass

                try:
                    await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))
                finally:
                    for w in (server_w, client_w):
                        w.close()
        except asyncio.CancelledError:
            pass  # close(): the connection ends here (a cancelled task would be reported by asyncio's streams)
        finally:
            self._tasks.discard(task)

    def close(self) -> None:
        if self.port is None:
            return

        async def stop():
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            self._call(stop(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self.port = None

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    """`python -m vla_core.storage.netproxy TARGET_PORT DELAY_MS`: prints its port, runs until stdin closes.
    A separate process, so a benchmark's client does not share its interpreter lock with the forwarding."""
    proxy = LatencyProxy(int(sys.argv[1]), float(sys.argv[2]) / 1000).start()
    print(proxy.port, flush=True)
    try:
        sys.stdin.read()
    finally:
        proxy.close()


if __name__ == "__main__":
    main()
