"""The rate coordinator: leases in blocks from buckets and window logs, hand-backs, the cluster-wide
AIMD window, the task side over HTTP, and the fall-back to the static split."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from udfs.llm.client import CallSpec, LLMClient, LLMRequest
from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm.coordinator import CoordinatedBudget, RateCoordinator, task_budget
from udfs.llm.limits import StaticBudget
from udfs.llm.prompts import load_prompt
from tests.support import TEST_PROMPTS

pytest_plugins = ["tests.fake_llm_fixture"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease(coordinator: RateCoordinator, requests: int, tokens: list[int] | None = None, client: str = "a",
          **report: int) -> dict:
    return coordinator.lease({"client": client, "requests": requests, "tokens": tokens or [], **report})


def test_leases_come_in_blocks_from_a_bucket_that_refills_continuously_up_to_one_block():
    clock = Clock()
    coordinator = RateCoordinator(600, None, lease_block=4, clock=clock)  # 10 requests a second
    assert lease(coordinator, 10)["requests"] == 4  # one block, however many wait
    empty = lease(coordinator, 10)
    assert empty["requests"] == 0 and empty["wait_s"] == pytest.approx(0.1)
    clock.now += 0.25
    assert lease(coordinator, 10)["requests"] == 2  # 2.5 refilled
    clock.now += 100.0
    assert lease(coordinator, 10)["requests"] == 4  # an idle minute leaves one block, not a minute's worth
    assert lease(coordinator, 10)["requests"] == 0


def test_the_block_is_never_more_than_a_second_of_the_budget():
    coordinator = RateCoordinator(120, None, lease_block=8, clock=Clock())  # 2 a second
    assert lease(coordinator, 8)["requests"] == 2


def test_no_10_second_window_gets_more_than_its_share_of_the_budget():
    clock = Clock()
    coordinator = RateCoordinator(600, None, lease_block=4, clock=clock)  # 100 per 10 s
    grants: list[float] = []
    for step in range(3000):  # 60 s of greedy leasing by three tasks, idle now and then so the bucket fills
        clock.now += 0.02
        if step % 500 < 50:
            continue
        granted = lease(coordinator, 4, client="abc"[step % 3])["requests"]
        grants += [clock.now] * granted
    worst = max(sum(1 for t in grants if start <= t < start + 10.0) for start in grants)
    assert worst <= 100
    assert len(grants) >= 0.85 * 600  # most of the minute's budget was granted


def test_returned_allowance_is_granted_again_and_leaves_the_window():
    clock = Clock()
    coordinator = RateCoordinator(240, None, lease_block=4, window_s=10.0, grace_s=0.0, clock=clock)  # 40 per 10 s
    for _ in range(10):
        assert lease(coordinator, 4)["requests"] == 4
        clock.now += 1.0
    clock.now -= 0.1
    full = lease(coordinator, 1)
    assert full["requests"] == 0 and full["wait_s"] == pytest.approx(0.1)  # the bucket has 3.6, the window none
    assert lease(coordinator, 1, returned_requests=1)["requests"] == 1  # a returned request makes room
    assert coordinator.stats()["returned_requests"] == 1


def test_tokens_are_granted_with_their_requests_and_an_oversized_one_waits_for_a_full_bucket():
    clock = Clock()
    coordinator = RateCoordinator(None, 6000, lease_block=4, clock=clock)  # 100 tokens a second, capacity 100
    reply = lease(coordinator, 3, [60, 60, 60])
    assert (reply["requests"], reply["tokens"]) == (1, 60)  # the second would pass the bucket
    clock.now += 0.3
    assert lease(coordinator, 1, [500])["requests"] == 0  # alone, but the bucket is not full
    clock.now += 0.3
    assert lease(coordinator, 1, [500]) | {"wait_s": 0} == {"requests": 1, "tokens": 500, "wait_s": 0,
                                                              "share": 32, "epoch": 0}
    clock.now += 4.0  # 400 of the 500 paid back: still below zero
    assert lease(coordinator, 1, [10])["requests"] == 0


def test_refunded_tokens_come_back_and_charged_ones_are_taken():
    clock = Clock()
    coordinator = RateCoordinator(None, 6000, clock=clock)
    assert lease(coordinator, 1, [100])["tokens"] == 100
    assert lease(coordinator, 1, [40], returned_tokens=60)["tokens"] == 40  # used 40 of the 100 estimated
    clock.now += 1.0
    assert lease(coordinator, 1, [10], charged_tokens=100)["requests"] == 0  # used 100 more than estimated


def test_a_429_storm_halves_the_cluster_window_once_and_scattered_429s_do_not():
    coordinator = RateCoordinator(600, None, max_in_flight_per_task=32, max_tasks=2, clock=Clock())
    lease(coordinator, 1, client="a")
    assert lease(coordinator, 1, client="b")["share"] == 32  # 64 over two tasks
    epoch = coordinator.stats()["epoch"]
    lowered = [coordinator.overload({"client": "ab"[i % 2], "epoch": epoch})["lowered"] for i in range(12)]
    assert lowered.count(True) == 1  # one storm, one halving, whichever task saw it
    assert coordinator.stats()["window"] == 32 and coordinator.stats()["decreases"] == 1
    assert lease(coordinator, 0, client="b")["share"] == 16  # the other task learns it at its next lease
    for i in range(500):  # one 429 in ten, spread out: a busy endpoint, not a storm
        if i % 10 == 9:
            coordinator.overload({"client": "a", "epoch": coordinator.stats()["epoch"]})
        else:
            lease(coordinator, 0, client="a", successes=1)
    assert coordinator.stats()["decreases"] == 1


def test_successes_grow_the_window_additively():
    coordinator = RateCoordinator(600, None, max_in_flight_per_task=32, max_tasks=2, clock=Clock())
    for _ in range(10):
        coordinator.overload({"client": "a", "epoch": 0})
    assert coordinator.stats()["window"] == 32
    lease(coordinator, 0, successes=33)  # about one window's worth of successes adds one
    assert coordinator.stats()["window"] == 33


def test_the_share_follows_the_tasks_leasing_now():
    clock = Clock()
    coordinator = RateCoordinator(600, None, max_in_flight_per_task=32, max_tasks=4, idle_s=30.0, clock=clock)
    for _ in range(10):
        coordinator.overload({"client": "a", "epoch": coordinator.stats()["epoch"]})  # window 64
    for client in "abcd":
        lease(coordinator, 0, client=client)
    assert lease(coordinator, 0, client="a")["share"] == 16
    assert coordinator.bye({"client": "d"})["share"] == 22  # ceil(64 / 3)
    clock.now += 31.0  # b and c died without a word
    assert lease(coordinator, 0, client="a")["share"] == 32  # never above the per-task maximum
    assert coordinator.stats()["clients"] == 1


def test_a_coordinator_needs_a_budget():
    with pytest.raises(ValueError, match="requests_per_minute or tokens_per_minute"):
        RateCoordinator(None, None)


# -- the task side, over HTTP ---------------------------------------------------------------------


def llm_config(**overrides) -> LLMConfig:
    settings = dict(base_url="http://127.0.0.1:9/v1", api_key_env="GLAN_TEST_KEY_UNSET", max_in_flight_per_task=8,
                    backoff_initial_s=0.01, max_attempts=4, timeout_s=5.0, requests_per_minute=600)
    settings.update(overrides)
    return LLMConfig(**settings)


def dead_url() -> str:
    """The address of a coordinator that has stopped: nothing listens there."""
    with RateCoordinator(60, None) as gone:
        return gone.url


def test_task_budget_is_shared_only_with_a_coordinator_and_a_budget():
    assert isinstance(task_budget(llm_config(), 2, "http://127.0.0.1:1"), CoordinatedBudget)
    assert isinstance(task_budget(llm_config(), 2, None), StaticBudget)
    assert isinstance(task_budget(llm_config(requests_per_minute=None), 2, "http://127.0.0.1:1"), StaticBudget)


def test_a_task_leases_over_http_and_hands_back_what_it_holds_at_the_end():
    async def scenario(url: str) -> CoordinatedBudget:
        budget = CoordinatedBudget(url, llm_config(), 2)
        tickets = await asyncio.gather(*(budget.acquire(100) for _ in range(3)))
        assert all(kind == "shared" for kind, _ in tickets)
        budget.held_requests += 2  # as if two leased requests had been cancelled before they went
        for ticket in tickets:
            budget.succeeded(ticket)
            budget.release()
        await budget.aclose()
        return budget

    with RateCoordinator(600, None, lease_block=4) as coordinator:
        budget = asyncio.run(scenario(coordinator.url))
        stats = coordinator.stats()
    assert budget.static is None
    assert stats["granted_requests"] == 3  # one lease for the three that waited together
    assert stats["returned_requests"] == 2  # the two cancelled, handed back at the end
    assert stats["successes"] == 3 and stats["clients"] == 0


def test_one_task_s_429s_shrink_the_other_task_s_share():
    async def scenario(url: str) -> tuple[int, int]:
        first, second = CoordinatedBudget(url, llm_config(), 2), CoordinatedBudget(url, llm_config(), 2)
        await second.acquire(0)
        second.release()
        before = second.limiter.allowed
        for _ in range(10):
            ticket = await first.acquire(0)
            first.release()
            await first.overloaded(ticket)
        await second.acquire(0)
        second.release()
        after = second.limiter.allowed
        await first.aclose()
        await second.aclose()
        return before, after

    with RateCoordinator(6000, None, max_in_flight_per_task=8, max_tasks=2) as coordinator:
        before, after = asyncio.run(scenario(coordinator.url))
    assert (before, after) == (8, 4)


def test_an_unreachable_coordinator_falls_back_to_the_static_split_with_one_warning(caplog):
    url = dead_url()
    caplog.set_level(logging.WARNING, logger="glan.llm")

    async def scenario() -> list[CoordinatedBudget]:
        budgets = [CoordinatedBudget(url, llm_config(requests_per_minute=6000), 2) for _ in range(2)]
        for budget in budgets:  # two tasks in one worker process
            tickets = await asyncio.gather(*(budget.acquire(10) for _ in range(6)))
            assert all(kind == "static" for kind, _ in tickets)
            for ticket in tickets:
                budget.succeeded(ticket)
                budget.release()
            await budget.aclose()
        return budgets

    budgets = asyncio.run(scenario())
    assert all(b.static is not None and b.static.rpm is not None for b in budgets)
    assert budgets[0].static.rpm.rate == pytest.approx(6000 / 60 / 2)  # this task's 1/2 of the budget
    warnings = [r.getMessage() for r in caplog.records if r.name == "glan.llm" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0] and "falls back to the static split" in warnings[0]


# -- LLMClient through the coordinator, against the test server -----------------------------------

SPEC = CallSpec(prompt=load_prompt("echo_topic", TEST_PROMPTS), stage=StageLLMConfig(model="m"), schema=None)


def run_task(llm: LLMConfig, coordinator: str | None, topics: list[str], results: dict[str, list]) -> None:
    with LLMClient(llm, concurrent_tasks=2, coordinator=coordinator) as client:
        requests = [LLMRequest(messages=SPEC.prompt.render(topic=t)) for t in topics]
        results[topics[0]] = client.run(SPEC, requests)


def run_tasks(llm: LLMConfig, coordinator: str | None, sizes: list[int]) -> tuple[float, dict[str, list]]:
    """Tasks with `sizes` rows each, at once in threads (each client owns its event loop, as tasks do)."""
    results: dict[str, list] = {}
    threads = [threading.Thread(target=run_task, args=(llm, coordinator, [f"t{n}-{i}" for i in range(size)], results))
               for n, size in enumerate(sizes)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return time.monotonic() - started, results


def test_a_long_task_uses_what_a_short_one_left_and_the_server_sees_the_budget(fake_llm):
    fake_llm.latency_ms = 20
    llm = llm_config(base_url=fake_llm.url, requests_per_minute=600)  # 10/s for the cluster
    with RateCoordinator(600, None, max_in_flight_per_task=8, max_tasks=2) as coordinator:
        seconds, results = run_tasks(llm, coordinator.url, [5, 45])
    assert all(r["error_class"] is None for rows in results.values() for r in rows)
    times = sorted(r.received_at for r in fake_llm.requests)
    assert len(times) == 50
    assert seconds < 7.5  # the static split would give the long task 5/s: 9 s
    assert (len(times) - 4) / (times[-1] - times[0]) <= 10 * 1.05  # the cluster's rate, after one block's burst


def test_the_coordinator_stopping_mid_stage_leaves_every_row_answered(fake_llm, caplog):
    fake_llm.latency_ms = 20
    llm = llm_config(base_url=fake_llm.url, requests_per_minute=1200)
    coordinator = RateCoordinator(1200, None, max_in_flight_per_task=8, max_tasks=2).start()
    threading.Timer(0.5, coordinator.stop).start()
    seconds, results = run_tasks(llm, coordinator.url, [10, 30])
    assert sorted(len(rows) for rows in results.values()) == [10, 30]
    assert all(r["error_class"] is None for rows in results.values() for r in rows)
    assert fake_llm.count() == 40
