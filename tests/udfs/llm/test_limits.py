"""The AIMD concurrency limiter and the RPM/TPM token buckets."""

from __future__ import annotations

import asyncio
import time

import pytest

from udfs.llm.limits import AdaptiveLimiter, TokenBucket, per_task_buckets


def test_a_burst_of_429s_halves_the_limit_once():
    limiter = AdaptiveLimiter(32)
    epochs = [asyncio.run(limiter.acquire()) for _ in range(10)]  # ten requests sent under one limit
    lowered = [limiter.on_overload(epoch) for epoch in epochs]  # ... all answered 429
    assert lowered.count(True) == 1  # the burst counts once
    assert limiter.allowed == 16
    assert limiter.decreases == 1


def test_scattered_429s_do_not_shrink_the_window():
    limiter = AdaptiveLimiter(32)
    for i in range(1000):  # one request in ten is rate limited, evenly spread
        if i % 10 == 9:
            limiter.on_overload(limiter.epoch)
        else:
            limiter.on_success()
    assert limiter.decreases == 0 and limiter.allowed == 32


def burst(limiter: AdaptiveLimiter, size: int = 8) -> None:
    epoch = limiter.epoch
    for _ in range(size):
        limiter.on_overload(epoch)


def test_repeated_bursts_keep_decreasing_down_to_the_minimum():
    limiter = AdaptiveLimiter(32, minimum=2)
    for _ in range(10):
        burst(limiter)
    assert limiter.decreases == 10
    assert limiter.allowed == 2


def test_successes_raise_the_limit_additively_back_to_the_maximum():
    limiter = AdaptiveLimiter(32)
    burst(limiter)
    assert limiter.allowed == 16
    for _ in range(17):  # about one limit's worth of successes adds one slot
        limiter.on_success()
    assert limiter.allowed == 17
    for _ in range(2000):
        limiter.on_success()
    assert limiter.allowed == 32


def test_acquire_blocks_at_the_limit():
    async def scenario() -> tuple[int, int]:
        limiter = AdaptiveLimiter(4, initial=2)
        peak = 0

        async def job() -> None:
            nonlocal peak
            await limiter.acquire()
            peak = max(peak, limiter.in_flight)
            await asyncio.sleep(0.01)
            limiter.release()

        await asyncio.gather(*(job() for _ in range(20)))
        return peak, limiter.in_flight

    peak, left = asyncio.run(scenario())
    assert peak == 2 and left == 0


def test_limiter_rejects_bad_bounds():
    with pytest.raises(ValueError, match="minimum=5"):
        AdaptiveLimiter(4, minimum=5)


def test_token_bucket_paces_requests_at_its_rate():
    async def scenario() -> float:
        bucket = TokenBucket(rate_per_s=20.0, capacity=2.0)
        start = time.monotonic()
        for _ in range(12):
            await bucket.acquire(1)
        return time.monotonic() - start

    elapsed = asyncio.run(scenario())
    assert 0.45 <= elapsed < 1.0  # 2 at once, then 10 at 20/s


def test_token_bucket_refund_returns_an_over_estimate():
    clock = [0.0]
    bucket = TokenBucket(rate_per_s=1.0, capacity=100.0, clock=lambda: clock[0])
    asyncio.run(bucket.acquire(80))
    bucket.refund(50)
    assert bucket.tokens == pytest.approx(70.0)


def test_budgets_are_split_across_concurrent_tasks():
    rpm, tpm = per_task_buckets(600, 120_000, concurrent_tasks=4)
    assert rpm.rate == pytest.approx(600 / 60 / 4)
    assert tpm.rate == pytest.approx(120_000 / 60 / 4)
    assert per_task_buckets(None, None, 4) == (None, None)
