"""One requests/tokens-per-minute budget and one AIMD concurrency window for the whole cluster.

The static split (udfs/llm/limits.py `per_task_buckets`) gives each task 1/N of the budget for the
whole stage: when the short tasks of a skewed stage finish, the long ones keep their small share
and the rest of the budget goes unused, and a 429 storm one task sees teaches the others nothing.
`RateCoordinator` lives with the driver instead: an LLM step starts it (udfs/llm_udf.py
`rate_coordinator`), it serves JSON over HTTP on a daemon thread at the driver's address and a
random port, and each task's `CoordinatedBudget` leases allowance from it in small blocks:

    POST /lease     {"client", "requests": n, "tokens": [estimate, ...], <report>}
                    -> {"requests": k, "tokens": t, "wait_s", "share", "epoch"}
    POST /overload  {"client", "epoch", <report>}  -> {"lowered", "share", "epoch"}   (a 429 was seen)
    POST /bye       {"client", <report>}  -> {"share", "epoch"}   (the task is done: it hands back what it held)
    GET  /stats     what was granted, handed back, overloads, the window, the clients

<report> carries what happened since the last call: `successes`, `returned_requests` and
`returned_tokens` (allowance not spent: held at the end, or tokens estimated above the real usage),
`charged_tokens` (spent above the estimate).

Each budget is a bucket refilling continuously at the budget's rate with a small capacity (one
lease block of requests, at most one second of the budget), and a log of what was granted in the
last `window_s` seconds that never holds more than that window's share: a 10-second window at the
server sees at most budget/6, plus what a task held across its edge (at most one lease block).
The window is an AdaptiveLimiter over the whole cluster (per-task maximum times the tasks that can
run at once); a task's share is the window over the tasks leasing now, and a burst of 429s
halves it once (the epoch of the request that saw the 429 must be the current one).

A task that cannot reach the coordinator falls back to the static split for the rest of its life
and logs one warning per process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from udfs.llm.config import LLMConfig
from udfs.llm.limits import AdaptiveLimiter, StaticBudget

log = logging.getLogger("glan.llm")

Ticket = tuple[str, int]  # ("shared", coordinator epoch) or ("static", the task's own limiter epoch)
REPORT_FIELDS = ("successes", "returned_requests", "returned_tokens", "charged_tokens")
FLUSH_S = 1.0  # reports (successes, token refunds) wait at most this long for a lease to carry them
_EPSILON = 1e-9
_WARNED: set[str] = set()  # coordinator URLs this process has already said it cannot reach


class _Allowance:
    """One budget: a bucket refilling at `per_minute / 60` per second holding at most `capacity`,
    and the grants of the last `window_s` seconds, which never sum above the window's share. A grant
    stays in the log `grace_s` longer than the window: the time it may take to reach the server, so
    that a server counting the same window from its arrivals never sees the grant before it too."""

    def __init__(self, per_minute: float, capacity: float, window_s: float, clock: Callable[[], float],
                 grace_s: float = 0.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, capacity)
        self.limit = per_minute * window_s / 60.0
        self.window_s, self.clock = window_s + grace_s, clock
        self.level = self.capacity
        self.stamp = clock()
        self.granted: deque[list[float]] = deque()  # [time, amount], oldest first
        self.in_window = 0.0

    def _advance(self) -> float:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        while self.granted and self.granted[0][0] <= now - self.window_s:
            self.in_window -= self.granted.popleft()[1]
        if not self.granted:
            self.in_window = 0.0  # no float dust left over
        return now

    def fits(self, amount: float, alone: bool) -> bool:
        """`alone`: the first request of a lease, which may exceed the bucket or the window (a
        huge prompt): it waits for a full bucket and an empty window, then goes."""
        self._advance()
        need = min(amount, self.capacity) if alone else amount
        in_window = self.in_window + amount <= self.limit + _EPSILON or (alone and self.in_window <= _EPSILON)
        return self.level + _EPSILON >= need and in_window

    def take(self, amount: float) -> None:
        if amount > 0:
            now = self._advance()
            self.level -= amount  # may go below zero for an oversized request: later grants wait it off
            self.granted.append([now, amount])
            self.in_window += amount

    def give_back(self, amount: float) -> None:
        """Allowance granted and never spent. It leaves the window log oldest grant first, so the
        log never forgets a grant sooner than it would have."""
        self._advance()
        self.level = min(self.capacity, self.level + amount)
        while amount > _EPSILON and self.granted:
            entry = self.granted[0]
            taken = min(amount, entry[1])
            entry[1] -= taken
            self.in_window -= taken
            amount -= taken
            if entry[1] <= _EPSILON:
                self.granted.popleft()

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount`, asked alone, fits."""
        now = self._advance()
        bucket = max(0.0, (min(amount, self.capacity) - self.level) / self.rate)
        window, left = 0.0, self.in_window
        for at, granted in self.granted:
            if left + amount <= self.limit + _EPSILON or left <= _EPSILON:
                break
            left -= granted
            window = at + self.window_s - now
        return max(bucket, window)


class RateCoordinator:
    """The driver's side: the cluster-wide budgets and concurrency window, served over HTTP."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, *,
                 max_in_flight_per_task: int = 32, max_tasks: int = 1, lease_block: int = 4,
                 window_s: float = 10.0, grace_s: float = 0.5, host: str = "127.0.0.1", port: int = 0,
                 idle_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if not requests_per_minute and not tokens_per_minute:
            raise ValueError("a rate coordinator needs requests_per_minute or tokens_per_minute")
        if lease_block < 1 or max_tasks < 1 or max_in_flight_per_task < 1:
            raise ValueError(f"lease_block={lease_block}, max_tasks={max_tasks} and "
                             f"max_in_flight_per_task={max_in_flight_per_task} must be >= 1")
        self.requests = (_Allowance(requests_per_minute, min(lease_block, requests_per_minute / 60.0), window_s,
                                    clock, grace_s) if requests_per_minute else None)
        self.tokens = (_Allowance(tokens_per_minute, tokens_per_minute / 60.0, window_s, clock, grace_s)
                       if tokens_per_minute else None)
        self.window = AdaptiveLimiter(max_in_flight_per_task * max_tasks)
        self.per_task, self.block, self.idle_s, self.clock = max_in_flight_per_task, lease_block, idle_s, clock
        self.host, self.port = host, port
        self.totals: Counter[str] = Counter()
        self._clients: dict[str, float] = {}  # client id -> when it was last heard from
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the budget, without HTTP ---------------------------------------------------------------

    def lease(self, body: dict[str, Any]) -> dict[str, Any]:
        """Up to a block of the requests asked for, each with its estimated tokens, in order."""
        with self._lock:
            self._heard(body)
            want = min(max(0, int(body.get("requests", 0))), self.block)
            estimates = [max(0, int(e)) for e in body.get("tokens", ())][:want]
            estimates += [0] * (want - len(estimates))
            granted = self._grant(estimates)
            tokens = sum(estimates[:granted])
            self.totals["granted_requests"] += granted
            self.totals["granted_tokens"] += tokens
            wait = self._wait(estimates[0]) if want and not granted else 0.0
            return {"requests": granted, "tokens": tokens, "wait_s": round(wait, 4), **self._share()}

    def _grant(self, estimates: list[int]) -> int:
        granted, tokens = 0, 0
        for estimate in estimates:
            alone = granted == 0
            if self.requests is not None and not self.requests.fits(granted + 1, alone):
                break
            if self.tokens is not None and not self.tokens.fits(tokens + estimate, alone):
                break
            granted, tokens = granted + 1, tokens + estimate
        if self.requests is not None:
            self.requests.take(granted)
        if self.tokens is not None:
            self.tokens.take(tokens)
        return granted

    def _wait(self, estimate: int) -> float:
        waits = [0.0]
        if self.requests is not None:
            waits.append(self.requests.wait_s(1))
        if self.tokens is not None:
            waits.append(self.tokens.wait_s(estimate))
        return max(waits)

    def overload(self, body: dict[str, Any]) -> dict[str, Any]:
        """A request sent under window epoch `epoch` was answered 429."""
        with self._lock:
            self._heard(body)
            self.totals["overloads"] += 1
            lowered = self.window.on_overload(int(body.get("epoch", -1)))
            return {"lowered": lowered, **self._share()}

    def bye(self, body: dict[str, Any]) -> dict[str, Any]:
        """The task is done: its report (what it held comes back as returned) and its leave."""
        with self._lock:
            self._heard(body)
            self._clients.pop(str(body.get("client")), None)
            return self._share()

    def _heard(self, body: dict[str, Any]) -> None:
        """Note the client as leasing now and apply its report."""
        now = self.clock()
        self._clients[str(body.get("client"))] = now
        for client, seen in list(self._clients.items()):
            if seen < now - self.idle_s:  # a task that died without saying bye
                del self._clients[client]
        report = {name: max(0, int(body.get(name, 0))) for name in REPORT_FIELDS}
        for _ in range(min(report["successes"], 100_000)):
            self.window.on_success()
        if self.requests is not None and report["returned_requests"]:
            self.requests.give_back(report["returned_requests"])
        if self.tokens is not None:
            if report["returned_tokens"]:
                self.tokens.give_back(report["returned_tokens"])
            if report["charged_tokens"]:
                self.tokens.take(report["charged_tokens"])
        self.totals.update({name: value for name, value in report.items() if value})

    def _share(self) -> dict[str, Any]:
        """Each leasing task's part of the cluster-wide window, and the window's epoch."""
        share = min(self.per_task, max(1, math.ceil(self.window.allowed / max(1, len(self._clients)))))
        return {"share": share, "epoch": self.window.epoch}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.totals, "window": self.window.allowed, "decreases": self.window.decreases,
                    "epoch": self.window.epoch, "clients": len(self._clients)}

    # -- HTTP -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RateCoordinator:
        self._server = ThreadingHTTPServer((self.host, self.port), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="glan-rate-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> RateCoordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(coordinator: RateCoordinator) -> type[BaseHTTPRequestHandler]:
    routes = {"/lease": coordinator.lease, "/overload": coordinator.overload, "/bye": coordinator.bye}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection per task for the whole stage
        disable_nagle_algorithm = True  # the head and the body go in two writes: no 40 ms delayed-ACK wait

        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            route = routes.get(self.path)
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                if route is None or not isinstance(body, dict):
                    self._send(404, {"error": f"no route POST {self.path}"})
                else:
                    self._send(200, route(body))
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": f"{type(exc).__name__}: {exc}"})

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/stats":
                self._send(200, coordinator.stats())
            else:
                self._send(404, {"error": f"no route GET {self.path}"})

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # a line per lease would flood the driver's log

    return Handler


class CoordinatorUnavailable(Exception):
    """The coordinator did not answer (refused, timed out, or answered nonsense)."""


class _Connection:
    """One keep-alive HTTP/1.1 connection to the coordinator, JSON both ways, one exchange at a
    time. Stdlib asyncio: the openai package's HTTP library is not the same across its versions."""

    def __init__(self, url: str, timeout_s: float):
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.timeout_s = timeout_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = json.dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(raw)}\r\n\r\n").encode("latin-1") + raw
        async with self._lock:
            try:
                return await asyncio.wait_for(self._exchange(request), self.timeout_s)
            except (OSError, EOFError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:
                await self.close()
                raise CoordinatorUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def _exchange(self, request: bytes) -> dict[str, Any]:
        reused = self._streams is not None
        try:
            return await self._send(request)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
            await self.close()  # the kept-alive connection had been closed: open a new one, once
            return await self._send(request)

    async def _send(self, request: bytes) -> dict[str, Any]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        writer.write(request)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        payload = json.loads(await reader.readexactly(int(headers.get("content-length") or 0)) or b"{}")
        if status != 200 or not isinstance(payload, dict):
            raise ValueError(f"HTTP {status}: {payload}")
        return payload

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass


class CoordinatedBudget:
    """One task's side of the coordinator, with StaticBudget's interface (see udfs/llm/limits.py).

    A request waits for a slot in the task's limiter (its size is the coordinator's share for this
    task), then for a request (and its estimated tokens) from the allowance the task holds; when
    that is short, one coroutine leases a block for the waiting requests, first come first served.
    Successes and token refunds ride on the next lease (or go within FLUSH_S); a 429 is reported at
    once. On the first failure to reach the coordinator the task switches to the static split
    (same limiter, back to its own AIMD) for the rest of its life.
    """

    def __init__(self, url: str, llm: LLMConfig, concurrent_tasks: int = 1, *, client_id: str | None = None,
                 timeout_s: float = 10.0):
        self.url, self.llm = url.rstrip("/"), llm
        self.concurrent_tasks = max(1, concurrent_tasks)
        self.limiter = AdaptiveLimiter(llm.max_in_flight_per_task)
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout_s = timeout_s
        self.static: StaticBudget | None = None  # set when the coordinator cannot be reached
        self.epoch = 0
        self.held_requests = 0
        self.held_tokens = 0
        self._counts_tokens = llm.tokens_per_minute is not None
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._report: Counter[str] = Counter()
        self._pump: asyncio.Task[None] | None = None
        self._flush: asyncio.Task[None] | None = None
        self._http: _Connection | None = None

    async def acquire(self, estimate: int) -> Ticket:
        if self.static is not None:
            return "static", await self.static.acquire(estimate)
        await self.limiter.acquire()
        try:
            return await self._budget(estimate)
        except BaseException:
            self.limiter.release()
            raise

    async def _budget(self, estimate: int) -> Ticket:
        """The budget for a request that holds its slot: leased, or the static share once fallen back."""
        if self.static is None:
            try:
                await self._lease(estimate if self._counts_tokens else 0)
                return "shared", self.epoch
            except CoordinatorUnavailable:
                pass
        assert self.static is not None
        await self.static.take(estimate)  # the slot is already held: the limiter is shared
        return "static", self.limiter.epoch

    async def _lease(self, need: int) -> None:
        if not self._waiters and self._holds(need):
            self._hand_out(need)
            return
        entry = (need, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump())
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled() and entry[1].exception() is None:
                self.held_requests, self.held_tokens = self.held_requests + 1, self.held_tokens + need
            elif entry in self._waiters:
                self._waiters.remove(entry)
            raise

    def _holds(self, need: int) -> bool:
        return self.held_requests >= 1 and self.held_tokens >= need

    def _hand_out(self, need: int) -> None:
        self.held_requests, self.held_tokens = self.held_requests - 1, self.held_tokens - need

    async def _run_pump(self) -> None:
        """Lease for the waiting requests until none waits."""
        while self._waiters:
            ask = [need for need, _ in itertools.islice(self._waiters, self.llm.rate_lease_block)]
            try:
                reply = await self._post("/lease", {"requests": len(ask), "tokens": ask})
            except CoordinatorUnavailable as exc:
                self._fall_back(exc)
                return
            self.held_requests += int(reply.get("requests", 0))
            self.held_tokens += int(reply.get("tokens", 0))
            while self._waiters and self._holds(self._waiters[0][0]):
                need, waiter = self._waiters.popleft()
                if not waiter.done():
                    self._hand_out(need)
                    waiter.set_result(None)
            if not reply.get("requests") and self._waiters:
                await asyncio.sleep(min(max(float(reply.get("wait_s", 0.1)), 0.01), 1.0))

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send `body` with the pending report; apply the share and epoch of the answer."""
        if self._http is None:
            self._http = _Connection(self.url, self.timeout_s)
        report, self._report = dict(self._report), Counter()
        reply = await self._http.post(path, {"client": self.client_id, **report, **body})
        try:
            self.epoch = int(reply["epoch"])
            self.limiter.set_limit(int(reply["share"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CoordinatorUnavailable(f"an answer without share and epoch: {reply}") from exc
        return reply

    def _fall_back(self, exc: CoordinatorUnavailable) -> None:
        """From now on this task keeps the static split; requests waiting for a lease take it."""
        if self.static is None:
            self.static = StaticBudget(self.llm.max_in_flight_per_task, self.llm.requests_per_minute,
                                       self.llm.tokens_per_minute, self.concurrent_tasks, limiter=self.limiter)
            if self.url not in _WARNED:
                _WARNED.add(self.url)
                log.warning("rate coordinator at %s cannot be reached (%s): this task falls back to the static "
                            "split of llm.requests_per_minute/tokens_per_minute over %d tasks",
                            self.url, exc, self.concurrent_tasks)
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CoordinatorUnavailable(str(exc)))

    def succeeded(self, ticket: Ticket) -> None:
        if ticket[0] == "static" or self.static is not None:
            self.limiter.on_success()
        else:
            self._report["successes"] += 1
            self._flush_soon()

    async def overloaded(self, ticket: Ticket) -> None:
        kind, epoch = ticket
        if kind == "static":
            self.limiter.on_overload(epoch)
        elif self.static is None:
            try:
                await self._post("/overload", {"epoch": epoch})
            except CoordinatorUnavailable as exc:
                self._fall_back(exc)

    def unused(self, ticket: Ticket, estimate: int) -> None:
        """A failed request did not spend its estimated tokens."""
        self.settle(ticket, estimate, 0)

    def settle(self, ticket: Ticket, estimate: int, used: int) -> None:
        if self.static is not None:
            self.static.settle(ticket[1], estimate, used)
        elif self._counts_tokens:
            self._report["returned_tokens" if used <= estimate else "charged_tokens"] += abs(estimate - used)
            self._flush_soon()

    def release(self) -> None:
        self.limiter.release()

    def _flush_soon(self) -> None:
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(FLUSH_S)
        pumping = self._pump is not None and not self._pump.done()
        if self.static is not None or not any(self._report.values()) or pumping:
            return  # nothing to say, or the pump's next lease carries it
        try:
            await self._post("/lease", {"requests": 0})
        except CoordinatorUnavailable as exc:
            self._fall_back(exc)

    async def aclose(self) -> None:
        """Hand back what the task holds, report the rest and say bye."""
        for task in (self._pump, self._flush):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (self._pump, self._flush) if t is not None), return_exceptions=True)
        if self._http is None:
            return
        if self.static is None:
            self._report["returned_requests"] += self.held_requests
            self._report["returned_tokens"] += self.held_tokens
            self.held_requests = self.held_tokens = 0
            try:
                await self._post("/bye", {})
            except CoordinatorUnavailable:
                pass  # the coordinator forgets a silent task after its idle_s; the stage goes on
        await self._http.close()
        self._http = None


def task_budget(llm: LLMConfig, concurrent_tasks: int, coordinator: str | None) -> StaticBudget | CoordinatedBudget:
    """The budget a task sends through: leased from the coordinator at `coordinator` (a URL) when
    there is one and a budget to share, else the static split."""
    if coordinator and (llm.requests_per_minute or llm.tokens_per_minute):
        return CoordinatedBudget(coordinator, llm, concurrent_tasks)
    return StaticBudget(llm.max_in_flight_per_task, llm.requests_per_minute, llm.tokens_per_minute, concurrent_tasks)
