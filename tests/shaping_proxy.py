"""A TCP proxy that makes a loopback S3-protocol server behave like a distant one.

Between s3fs and the moto server: each response's first byte waits `first_byte_delay_s`
(real S3 answers a GET in tens of ms; loopback moto in ~1 ms), each connection is paced to
`bytes_per_s` (one S3 connection tops out near 80–100 MB/s), and optionally every
`drop_every`-th response with a body of at least `drop_min_body` bytes is cut off after
`drop_after` body bytes (the connection is reset mid-object, as a flaky network does).

    proxy = ShapingProxy("127.0.0.1", moto_port, first_byte_delay_s=0.03, bytes_per_s=80e6).start()
    ... endpoint_url = proxy.endpoint_url ...
    proxy.stop()

or as its own process (benchmarks: then it never competes with the reader for the GIL):

    python -m tests.shaping_proxy --upstream 127.0.0.1:PORT --port P --delay-ms 30 --mb-per-s 80

Test and benchmark code: HTTP/1.1 requests on a connection are taken one at a time (no
pipelining), which is how botocore and aiohttp use a connection.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import threading
import time

CHUNK = 256 * 1024
PACE_SLICE = 64 * 1024
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


@dataclasses.dataclass
class ProxyStats:
    connections: int = 0
    responses: int = 0
    drops: int = 0
    bytes_down: int = 0


@dataclasses.dataclass
class _Connection:
    request_pending: bool = False
    next_send: float = 0.0
    body_left_to_drop: int | None = None


class ShapingProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0, first_byte_delay_s: float = 0.03,
                 bytes_per_s: float = 80e6, drop_every: int = 0, drop_min_body: int = 64 * 1024,
                 drop_after: int = 16 * 1024) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.first_byte_delay_s = first_byte_delay_s
        self.bytes_per_s = bytes_per_s
        self.drop_every, self.drop_min_body, self.drop_after = drop_every, drop_min_body, drop_after
        self.stats = ProxyStats()
        self._big_responses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- running it ------------------------------------------------------------------------

    def start(self) -> ShapingProxy:
        """Serve from a background thread of this process; returns once listening."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._listen())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the shaping proxy did not start listening")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    # ---- one client connection -------------------------------------------------------------

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        state = _Connection()
        up = asyncio.ensure_future(self._requests(client_reader, upstream_writer, state))
        down = asyncio.ensure_future(self._responses(upstream_reader, client_writer, state))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_writer, upstream_writer):
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection) -> None:
        while data := await reader.read(CHUNK):
            state.request_pending = True  # the next bytes from upstream start this request's response
            writer.write(data)
            await writer.drain()

    async def _responses(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection) -> None:
        while data := await reader.read(CHUNK):
            if state.request_pending:
                state.request_pending = False
                await asyncio.sleep(self.first_byte_delay_s)
                data = self._response_starts(data, state)
            elif state.body_left_to_drop is not None:
                data = self._maybe_cut(data, state)
            if data:
                await self._paced_write(writer, data, state)
            if state.body_left_to_drop == -1:
                self.stats.drops += 1
                writer.transport.abort()  # a reset mid-object: the client sees a truncated body
                return

    def _response_starts(self, data: bytes, state: _Connection) -> bytes:
        self.stats.responses += 1
        head_end = data.find(b"\r\n\r\n")
        match = CONTENT_LENGTH.search(data, 0, head_end if head_end >= 0 else len(data))
        state.body_left_to_drop = None
        if self.drop_every and match and head_end >= 0 and int(match.group(1)) >= self.drop_min_body:
            self._big_responses += 1
            if self._big_responses % self.drop_every == 0:
                state.body_left_to_drop = self.drop_after
                head, body = data[: head_end + 4], data[head_end + 4 :]
                return head + self._maybe_cut(body, state)
        return data

    def _maybe_cut(self, body: bytes, state: _Connection) -> bytes:
        left = state.body_left_to_drop
        assert left is not None and left >= 0
        if len(body) < left:
            state.body_left_to_drop = left - len(body)
            return body
        state.body_left_to_drop = -1
        return body[:left]

    async def _paced_write(self, writer: asyncio.StreamWriter, data: bytes, state: _Connection) -> None:
        for start in range(0, len(data), PACE_SLICE):
            piece = data[start : start + PACE_SLICE]
            now = time.perf_counter()
            state.next_send = max(state.next_send, now) + len(piece) / self.bytes_per_s
            if state.next_send - now > 0.001:
                await asyncio.sleep(state.next_send - now)
            writer.write(piece)
            self.stats.bytes_down += len(piece)
            await writer.drain()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="latency/bandwidth-shaping TCP proxy for an S3-protocol server")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=30.0)
    parser.add_argument("--mb-per-s", type=float, default=80.0)
    parser.add_argument("--drop-every", type=int, default=0)
    args = parser.parse_args(argv)
    host, port = args.upstream.rsplit(":", 1)
    proxy = ShapingProxy(host, int(port), port=args.port, first_byte_delay_s=args.delay_ms / 1000,
                         bytes_per_s=args.mb_per_s * 1e6, drop_every=args.drop_every)

    async def serve_forever() -> None:
        await proxy._listen()
        print(f"listening on {proxy.endpoint_url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve_forever())


if __name__ == "__main__":
    main()
