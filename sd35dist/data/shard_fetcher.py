"""Fetch cache shards ahead of the consumer, in the order it will need them.

A rank knows its shard order far ahead (`stream_order`), so `ShardFetcher.schedule()` takes
that order and a few daemon threads fetch up to `max_ahead` shards beyond the one the
consumer is on; `get()` hands over a shard's verified bytes, usually without waiting.

- Memory: at most `max_ahead + 1` payloads are held (the window of the schedule starting at
  the consumer's position); a payload leaves the fetcher when `get()` returns it, unless the
  same shard is needed again inside the window, in which case it is kept, not refetched.
- Integrity: every payload is checked against the manifest's length and sha256
  (`ShardCorrupt`); only checked payloads reach the disk cache.
- Faults: transient errors (connection refused, timeouts, 5xx) are retried with jittered
  exponential backoff inside a time budget, then `ShardUnavailable`; a missing object fails
  at once. Errors of a background fetch are raised by `get()` of that shard.
- Disk cache (optional): files named by sha256, written atomically, kept under a byte limit
  by evicting the least recently used; recency is seeded from mtimes, so a restarted
  process reuses them. Give each process its own directory: the limit is per process.

The pure pieces (`is_transient`, `backoff_delay`, `lru_evictions`, `stream_storage_options`)
carry the policy; the classes are the threads, files and network around them.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from sd35dist.data.manifest import ShardEntry
from sd35dist.data.storage import Store, sha256_hex

log = logging.getLogger(__name__)

SHA256_NAME = re.compile(r"[0-9a-f]{64}")
STALE_TEMP_S = 3600.0
"""A temporary file this old in the disk cache was left by a process that died mid-write."""


class ShardCorrupt(Exception):
    """A payload whose length or sha256 differs from the manifest."""

    def __init__(self, url: str, expected: str, got: str) -> None:
        super().__init__(url, expected, got)
        self.url, self.expected, self.got = url, expected, got

    def __str__(self) -> str:
        return (f"{self.url}: corrupt shard, expected {self.expected}, got {self.got} "
                "(the object changed after the manifest was written: rebuild the cache)")


class ShardUnavailable(Exception):
    """A shard that could not be read: missing, forbidden, or the store stayed unreachable."""

    def __init__(self, url: str, attempts: int, last_cause: BaseException) -> None:
        super().__init__(url, attempts, last_cause)
        self.url, self.attempts, self.last_cause = url, attempts, last_cause

    def __str__(self) -> str:
        if isinstance(self.last_cause, FileNotFoundError):
            return (f"{self.url}: shard missing (the manifest lists it): restore it, or rebuild the cache "
                    "with `sd35dist cache`")
        cause = " ".join(f"{type(self.last_cause).__name__}: {self.last_cause}".split())
        return f"{self.url}: unavailable after {self.attempts} attempt(s); last error {cause}"


class FetcherClosed(RuntimeError):
    """`get()` on a closed fetcher, or a fetch cut short by `close()`."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a shard whose store answers with transient errors."""

    max_attempts: int = 8
    """Attempts in all, the first included."""
    base_delay_s: float = 0.2
    """Backoff ceiling before the first retry; it doubles at every retry."""
    max_delay_s: float = 5.0
    """Cap on one backoff delay."""
    budget_s: float = 120.0
    """No new attempt starts later than this many seconds after the first one."""


# ---------------------------------------------------------------------------- pure policy


def stream_storage_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for a streaming Store: for s3, short botocore timeouts and retries.

    botocore's defaults keep a dead endpoint inside its own retry loop for ~10 s before an
    error surfaces; the fetcher retries itself, so botocore should give up quickly. A
    user's own `config_kwargs` wins; other protocols are left as they are.
    """
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")) and "config_kwargs" not in options:
        options["config_kwargs"] = {
            "connect_timeout": 3,
            "read_timeout": 30,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
    return options


_TRANSIENT_CLIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
})


def _client_error_is_transient(error: BaseException) -> bool | None:
    """For a botocore ClientError (or an error translated from one): decide by status and code."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    if code in _TRANSIENT_CLIENT_CODES:
        return True
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return None


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: the store may answer later; False for a definite answer."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ShardCorrupt, ShardUnavailable, FetcherClosed)):
        return False
    verdict = _client_error_is_transient(error)
    if verdict is None and error.__cause__ is not None:
        # s3fs turns a ClientError into an OSError and keeps the original as the cause
        verdict = _client_error_is_transient(error.__cause__)
    if verdict is not None:
        return verdict
    # OSError covers ConnectionError, TimeoutError, most aiohttp errors and fsspec timeouts
    return isinstance(error, (OSError, http.client.HTTPException, *_network_error_types()))


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transient error types of the s3 client stack, when it is installed."""
    found: list[type[BaseException]] = []
    try:
        import aiohttp
        found.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore import exceptions as boto
        found += [boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError]
    except ImportError:
        pass
    return tuple(found)


def backoff_delay(retry: int, policy: RetryPolicy, jitter: float) -> float:
    """Seconds to wait before retry number `retry` (1, 2, …); `jitter` in [0, 1).

    Equal jitter: half of the exponential ceiling is fixed, half random, so ranks that lost
    the store together do not come back in lockstep, and no retry fires immediately.
    """
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(retry - 1, 60))
    return ceiling / 2 + ceiling / 2 * jitter


def lru_evictions(
    files_oldest_first: Sequence[tuple[str, int]],
    capacity_bytes: int,
    incoming_bytes: int,
    pinned: Collection[str] = (),
) -> list[str] | None:
    """Names to delete, least recently used first, so `incoming_bytes` fits under the limit.

    Pinned files (being read) are never chosen; None when it cannot fit even so.
    """
    if incoming_bytes > capacity_bytes:
        return None
    excess = sum(size for _, size in files_oldest_first) + incoming_bytes - capacity_bytes
    victims = []
    for name, size in files_oldest_first:
        if excess <= 0:
            break
        if name not in pinned:
            victims.append(name)
            excess -= size
    return victims if excess <= 0 else None


def payload_problem(entry: ShardEntry, data: bytes, verify: bool) -> tuple[str, str] | None:
    """(expected, got) when the payload does not match the manifest entry, else None."""
    if len(data) != entry.bytes:
        return f"{entry.bytes} bytes", f"{len(data)} bytes"
    if verify:
        digest = sha256_hex(data)
        if digest != entry.sha256:
            return f"sha256 {entry.sha256}", f"sha256 {digest}"
    return None


def read_with_retries(
    read: Callable[[], bytes],
    url: str,
    policy: RetryPolicy,
    *,
    stopped: threading.Event | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    jitter: Callable[[], float] = random.random,
) -> bytes:
    """`read()` until it succeeds, retrying transient errors within the policy's limits."""
    started = time.monotonic()
    stopped = stopped or threading.Event()
    attempt = 0
    while True:
        attempt += 1
        try:
            return read()
        except Exception as error:
            if not is_transient(error):
                raise ShardUnavailable(url, attempt, error) from error
            remaining = policy.budget_s - (time.monotonic() - started)
            if attempt >= policy.max_attempts or remaining <= 0:
                raise ShardUnavailable(url, attempt, error) from error
            # the last wait is cut to the budget: one more attempt right at its end
            delay = min(backoff_delay(attempt, policy, jitter()), remaining)
            if on_retry is not None:
                on_retry(attempt, error, delay)
            if stopped.wait(delay):
                raise FetcherClosed(f"{url}: fetch stopped by close()") from error


# ---------------------------------------------------------------------------- disk cache


class ShardDiskCache:
    """Checked shard payloads on local disk, one file per sha256, under a byte limit (LRU)."""

    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int) -> None:
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()
        """sha256 → size, least recently used first."""
        self._pins: Counter[str] = Counter()
        self._reserved = 0
        """Bytes of writes in progress, counted against the limit before they land."""
        self._load_index()

    def _load_index(self) -> None:
        found = []
        now = time.time()
        for item in os.scandir(self.directory):
            try:
                stat = item.stat()
                if SHA256_NAME.fullmatch(item.name) and item.is_file():
                    found.append((stat.st_mtime, item.name, stat.st_size))
                elif ".tmp-" in item.name and now - stat.st_mtime > STALE_TEMP_S:
                    os.unlink(item.path)
            except FileNotFoundError:
                continue  # another process renamed or evicted it meanwhile
        for _, name, size in sorted(found):
            self._files[name] = size

    def names(self) -> list[str]:
        """Cached sha256 names, least recently used first."""
        with self._lock:
            return list(self._files)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._files.values()) + self._reserved

    def read(self, sha256: str) -> bytes | None:
        """The cached payload, or None; the file cannot be evicted while it is read."""
        with self._lock:
            if sha256 not in self._files:
                return None
            self._pins[sha256] += 1
            self._files.move_to_end(sha256)
        path = self.directory / sha256
        try:
            data = path.read_bytes()
            os.utime(path)  # the mtime seeds recency when the next process starts
            return data
        except FileNotFoundError:
            with self._lock:
                self._files.pop(sha256, None)
            return None
        finally:
            with self._lock:
                self._pins[sha256] -= 1
                if self._pins[sha256] <= 0:
                    del self._pins[sha256]

    def discard(self, sha256: str) -> None:
        """Forget and delete a file (found corrupt), unless someone is reading it."""
        with self._lock:
            if self._pins.get(sha256) or self._files.pop(sha256, None) is None:
                return
            (self.directory / sha256).unlink(missing_ok=True)

    def write(self, sha256: str, data: bytes) -> bool:
        """Store a checked payload; False when it does not fit (or the disk refused it)."""
        size = len(data)
        with self._lock:
            if sha256 in self._files:
                self._files.move_to_end(sha256)
                return True
            victims = lru_evictions(list(self._files.items()), self.capacity_bytes - self._reserved,
                                    size, pinned=set(self._pins))
            if victims is None:
                return False
            for name in victims:
                del self._files[name]
                (self.directory / name).unlink(missing_ok=True)
            self._reserved += size
        final = self.directory / sha256
        temporary = self.directory / f".{sha256}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            # no fsync: a file torn by a crash fails verification and is fetched again
            temporary.write_bytes(data)
            os.replace(temporary, final)
        except OSError as error:
            log.warning("disk cache %s: cannot write %s (%s); continuing without it", self.directory, sha256, error)
            temporary.unlink(missing_ok=True)
            with self._lock:
                self._reserved -= size
            return False
        with self._lock:
            self._reserved -= size
            self._files[sha256] = size
            self._files.move_to_end(sha256)
        return True


# ---------------------------------------------------------------------------- the fetcher


@dataclasses.dataclass
class _Slot:
    """One shard being fetched or held: the payload or the error, once done."""

    done: bool = False
    data: bytes | None = None
    error: BaseException | None = None
    waiters: int = 0


class ShardFetcher:
    """Background, bounded, verified prefetch of the shards a rank will read, in that order."""

    def __init__(
        self,
        store: Store,
        *,
        threads: int = 4,
        max_ahead: int = 8,
        disk_cache_dir: str | os.PathLike[str] | None = None,
        disk_cache_bytes: int = 0,
        retry: RetryPolicy = RetryPolicy(),
        verify: bool = True,
    ) -> None:
        if threads < 1 or max_ahead < 0:
            raise ValueError(f"threads must be >= 1 and max_ahead >= 0 (got {threads}, {max_ahead})")
        self.store = store
        self.max_ahead = max_ahead
        self.retry = retry
        self.verify = verify
        self.disk_cache = (ShardDiskCache(disk_cache_dir, disk_cache_bytes)
                           if disk_cache_dir is not None and disk_cache_bytes > 0 else None)
        self._cond = threading.Condition()
        self._plan: list[ShardEntry] = []
        self._cursor = 0
        """Position in `_plan` of the next shard the consumer is expected to ask for."""
        self._slots: dict[ShardEntry, _Slot] = {}
        self._stopped = threading.Event()
        self._rng = random.Random()
        self._stats = {"fetched_bytes": 0, "fetch_seconds": 0.0, "wait_seconds": 0.0, "retries": 0,
                       "disk_hits": 0, "network_fetches": 0}
        # daemon threads: a worker stuck in a network read never blocks interpreter exit
        self._workers = [threading.Thread(target=self._work, name=f"shard-fetcher-{i}", daemon=True)
                         for i in range(threads)]
        for worker in self._workers:
            worker.start()

    # -- consumer side

    def schedule(self, entries: Iterable[ShardEntry]) -> None:
        """Append shards to the order of first use; may be called again (e.g. per epoch)."""
        with self._cond:
            self._check_open()
            self._plan.extend(entries)
            self._cond.notify_all()

    def get(self, entry: ShardEntry) -> bytes:
        """The shard's checked bytes, fetched now if it was not scheduled; the caller owns them."""
        started = time.monotonic()
        with self._cond:
            self._check_open()
            slot = self._slots.get(entry)
            fetch_here = slot is None
            if fetch_here:
                slot = self._slots[entry] = _Slot()
            slot.waiters += 1  # before the window moves, so a held payload is not dropped
            self._advance_past(entry)
            self._cond.notify_all()
        if fetch_here:
            self._fill(entry, slot)
        with self._cond:
            while not slot.done and not self._stopped.is_set():
                self._cond.wait()
            slot.waiters -= 1
            if not self._in_window(entry) and self._slots.get(entry) is slot:
                del self._slots[entry]
            elif slot.error is not None and self._slots.get(entry) is slot:
                del self._slots[entry]  # a later get() of the same shard tries again
            self._stats["wait_seconds"] += time.monotonic() - started
            self._cond.notify_all()
        if not slot.done:
            raise FetcherClosed("ShardFetcher was closed while get() waited")
        if slot.error is not None:
            raise slot.error
        assert slot.data is not None
        return slot.data

    def stats(self) -> dict[str, float | int]:
        """Cumulative counters: bytes and seconds fetched, seconds get() waited, retries, …"""
        with self._cond:
            return dict(self._stats)

    def close(self) -> None:
        """Stop the workers (a fetch in flight is abandoned, its thread is a daemon); idempotent."""
        with self._cond:
            if self._stopped.is_set():
                return
            self._stopped.set()
            self._slots.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + 0.5
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> ShardFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- window bookkeeping (call with self._cond held)

    def _check_open(self) -> None:
        if self._stopped.is_set():
            raise FetcherClosed("ShardFetcher is closed")

    def _window(self) -> list[ShardEntry]:
        return self._plan[self._cursor : self._cursor + self.max_ahead + 1]

    def _in_window(self, entry: ShardEntry) -> bool:
        return entry in self._window()

    def _advance_past(self, entry: ShardEntry) -> None:
        """Move the consumer's position past `entry`'s next scheduled use (no move if unscheduled)."""
        if self._cursor < len(self._plan) and self._plan[self._cursor] == entry:
            self._cursor += 1
        else:
            try:
                self._cursor = self._plan.index(entry, self._cursor) + 1
            except ValueError:
                return
        if self._cursor > 4096:
            del self._plan[: self._cursor]
            self._cursor = 0
        window = set(self._window())
        for held in [e for e, s in self._slots.items() if s.done and not s.waiters and e not in window]:
            del self._slots[held]

    def _next_job(self) -> ShardEntry | None:
        for entry in self._window():
            if entry not in self._slots:
                return entry
        return None

    # -- workers

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopped.is_set() and (entry := self._next_job()) is None:
                    self._cond.wait()
                if self._stopped.is_set():
                    return
                slot = self._slots[entry] = _Slot()
            self._fill(entry, slot)

    def _fill(self, entry: ShardEntry, slot: _Slot) -> None:
        """Load one shard into its slot and publish it (or its error)."""
        try:
            data, error = self._load(entry), None
        except Exception as caught:  # noqa: BLE001 — handed to the reader, who raises it (bugs included)
            data, error = None, caught
        with self._cond:
            slot.data, slot.error, slot.done = data, error, True
            unwanted = not slot.waiters and not self._in_window(entry)
            if unwanted and self._slots.get(entry) is slot:
                del self._slots[entry]  # the consumer moved past it while it was in flight
            self._cond.notify_all()

    def _load(self, entry: ShardEntry) -> bytes:
        url = self.store.url_of(entry.path)
        started = time.monotonic()
        if self.disk_cache is not None:
            data = self.disk_cache.read(entry.sha256)
            if data is not None:
                if payload_problem(entry, data, self.verify) is None:
                    with self._cond:
                        self._stats["disk_hits"] += 1
                        self._stats["fetch_seconds"] += time.monotonic() - started
                    return data
                log.warning("disk cache: %s does not match %s; fetching it again", entry.sha256, url)
                self.disk_cache.discard(entry.sha256)
        data = read_with_retries(lambda: self.store.read_bytes(entry.path), url, self.retry,
                                 stopped=self._stopped, on_retry=self._note_retry(url), jitter=self._rng.random)
        with self._cond:
            self._stats["network_fetches"] += 1
            self._stats["fetched_bytes"] += len(data)
            self._stats["fetch_seconds"] += time.monotonic() - started
        problem = payload_problem(entry, data, self.verify)
        if problem is not None:
            raise ShardCorrupt(url, *problem)
        if self.disk_cache is not None:
            self.disk_cache.write(entry.sha256, data)
        return data

    def _note_retry(self, url: str) -> Callable[[int, BaseException, float], None]:
        def note(attempt: int, error: BaseException, delay: float) -> None:
            with self._cond:
                self._stats["retries"] += 1
            log.warning("%s: attempt %d failed (%s: %s); retrying in %.1f s",
                        url, attempt, type(error).__name__, " ".join(str(error).split()), delay)
        return note
