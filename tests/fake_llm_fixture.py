"""The `fake_llm` fixture: a loopback OpenAI-compatible test server (udfs/servers/fake_llm.py).

Use from a test module with `pytest_plugins = ["tests.fake_llm_fixture"]` (or list it in conftest).
One server per test module; it is reset (records, rules, fault history) before every test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from udfs.servers.fake_llm import FakeLLM


@pytest.fixture(scope="module")
def fake_llm_server() -> Iterator[FakeLLM]:
    server = FakeLLM(seed=7).start()
    yield server
    server.stop()


@pytest.fixture()
def fake_llm(fake_llm_server: FakeLLM) -> Iterator[FakeLLM]:
    server = fake_llm_server
    server.reset()
    # Tests tune the fault knobs per test; put the defaults back afterwards.
    saved = dict(vars(server))
    yield server
    for name in ("latency_ms", "jitter_ms", "rate_429", "rate_500", "rate_timeout", "rate_malformed",
                 "rate_truncated", "retry_after_s", "timeout_hold_s", "batch_processing_s", "rate_batch_expired",
                 "rate_batch_line_failed", "batch_fail_whole", "batch_stuck", "batch_max_lines", "batch_max_bytes",
                 "rate_limit_rpm", "rate_limit_window_s"):
        setattr(server, name, saved[name])
    server.reset()
