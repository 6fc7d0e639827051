"""Per-task flow control for LLM calls: an AIMD concurrency limiter and token buckets for the
requests-per-minute and tokens-per-minute budgets, and `StaticBudget`, which puts them together as
one task's static share of the cluster-wide budgets. Pure asyncio, one event loop per task. The
cluster-wide alternative, leased from the driver, is udfs/llm/coordinator.py."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class AdaptiveLimiter:
    """How many requests may be in flight, adjusted AIMD-style (as TCP does its window).

    Each success adds 1/limit (about +1 per limit's worth of successes: additive increase). A burst
    of 429s halves the limit (multiplicative decrease). "Burst" is measured by an exponentially
    weighted share of 429s among recent outcomes: a few scattered 429s (a busy shared endpoint)
    do not shrink the window, several in a row do. A burst answers requests that were all sent
    under the old limit, so it counts once: a request started before the last decrease cannot
    decrease it again.
    """

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int | None = None,
        decrease: float = 0.5,
        burst_share: float = 0.3,
        smoothing: float = 0.05,
    ):
        if not 1 <= minimum <= maximum:
            raise ValueError(f"minimum={minimum} must be in [1, maximum={maximum}]")
        if not 0.0 < decrease < 1.0:
            raise ValueError(f"decrease={decrease} must be in (0, 1)")
        if not 0.0 < burst_share <= 1.0 or not 0.0 < smoothing <= 1.0:
            raise ValueError(f"burst_share={burst_share} and smoothing={smoothing} must be in (0, 1]")
        self.minimum, self.maximum, self.decrease = minimum, maximum, decrease
        self.burst_share, self.smoothing = burst_share, smoothing
        self.limit = float(maximum if initial is None else min(max(initial, minimum), maximum))
        self.overload_share = 0.0  # EWMA of "this outcome was a 429"
        self.in_flight = 0
        self.epoch = 0  # bumped on every decrease
        self.decreases = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def allowed(self) -> int:
        return max(self.minimum, int(self.limit))

    async def acquire(self) -> int:
        """Wait for a slot (first come, first served); returns the epoch to pass to `on_overload`."""
        if self.in_flight < self.allowed and not self._waiters:
            self.in_flight += 1
            return self.epoch
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # whoever resolved it has already counted this request in `in_flight`
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            else:
                self._waiters.remove(waiter)
            raise
        return self.epoch

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        # Wakes exactly as many waiters as there are free slots (a Condition.notify_all would wake
        # every one of thousands of queued requests on each release).
        while self._waiters and self.in_flight < self.allowed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def set_limit(self, limit: float) -> None:
        """Take a window decided elsewhere (the rate coordinator's share for this task)."""
        self.limit = float(min(max(limit, self.minimum), self.maximum))
        self._wake()

    def on_success(self) -> None:
        self.overload_share *= 1.0 - self.smoothing
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        self._wake()

    def on_overload(self, epoch: int) -> bool:
        """A request started in `epoch` got a 429; True if that lowered the limit."""
        self.overload_share = self.overload_share * (1.0 - self.smoothing) + self.smoothing
        if epoch != self.epoch or self.overload_share < self.burst_share:
            return False
        self.limit = max(float(self.minimum), self.limit * self.decrease)
        self.epoch += 1
        self.decreases += 1
        self.overload_share = 0.0  # the next decrease needs a fresh burst under the new limit
        return True


class TokenBucket:
    """`rate_per_s` units per second, holding at most `capacity` (the allowed burst).

    `acquire(n)` waits until n units are there (n above capacity waits for a full bucket, so one
    huge request cannot block forever); `refund(n)` gives back an over-estimate once the real
    count is known. Waiters are served first come, first served.
    """

    def __init__(self, rate_per_s: float, capacity: float, *, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError(f"rate_per_s={rate_per_s} and capacity={capacity} must be > 0")
        self.rate, self.capacity, self.clock = rate_per_s, capacity, clock
        self.tokens = capacity
        self.stamp = clock()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        need = min(amount, self.capacity)
        async with self._lock:
            while True:
                self._refill()
                if self.tokens >= need:
                    self.tokens -= amount  # may go below zero for n > capacity: later callers wait it off
                    return
                await asyncio.sleep((need - self.tokens) / self.rate)

    def refund(self, amount: float) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + amount)

    def charge(self, amount: float) -> None:
        """Take more than was reserved (the real usage exceeded the estimate); may go negative."""
        self._refill()
        self.tokens -= amount


def per_task_buckets(
    requests_per_minute: int | None, tokens_per_minute: int | None, concurrent_tasks: int
) -> tuple[TokenBucket | None, TokenBucket | None]:
    """This task's share of the cluster-wide budgets. The burst is one second of the share (at
    least one request), so a minute never sees more than the budget plus that second."""
    tasks = max(1, concurrent_tasks)
    rpm = tpm = None
    if requests_per_minute:
        rate = requests_per_minute / 60.0 / tasks
        rpm = TokenBucket(rate, max(1.0, rate))
    if tokens_per_minute:
        rate = tokens_per_minute / 60.0 / tasks
        tpm = TokenBucket(rate, max(1.0, rate))
    return rpm, tpm


class StaticBudget:
    """One task's static share of the budgets: `per_task_buckets` and its own AIMD window.

    The interface LLMClient sends through (udfs/llm/coordinator.py's CoordinatedBudget has the same
    one): `acquire` a slot and the budget for one request (its tokens estimated up front), then
    `succeeded` or `overloaded` (a 429) with the ticket it returned, `unused` for tokens a failed
    request did not spend, `settle` once the real usage is known, and `release` the slot.
    """

    def __init__(self, max_in_flight: int, requests_per_minute: int | None, tokens_per_minute: int | None,
                 concurrent_tasks: int, *, limiter: AdaptiveLimiter | None = None):
        self.limiter = limiter or AdaptiveLimiter(max_in_flight)
        self.rpm, self.tpm = per_task_buckets(requests_per_minute, tokens_per_minute, concurrent_tasks)

    async def acquire(self, estimate: int) -> int:
        """Wait for a slot, then for the budget (a request holding budget must be able to go at
        once); returns the limiter's epoch as the ticket."""
        epoch = await self.limiter.acquire()
        try:
            await self.take(estimate)
        except BaseException:
            self.limiter.release()
            raise
        return epoch

    async def take(self, estimate: int) -> None:
        """The budget alone, for a request that already holds its slot."""
        if self.rpm is not None:
            await self.rpm.acquire(1)
        if self.tpm is not None:
            await self.tpm.acquire(estimate)

    def succeeded(self, ticket: int) -> None:
        self.limiter.on_success()

    async def overloaded(self, ticket: int) -> None:
        self.limiter.on_overload(ticket)

    def unused(self, ticket: int, estimate: int) -> None:
        if self.tpm is not None:
            self.tpm.refund(estimate)

    def settle(self, ticket: int, estimate: int, used: int) -> None:
        if self.tpm is None:
            return
        if used <= estimate:
            self.tpm.refund(estimate - used)
        else:
            self.tpm.charge(used - estimate)

    def release(self) -> None:
        self.limiter.release()

    async def aclose(self) -> None:
        """Nothing to hand back: the share was this task's alone."""
