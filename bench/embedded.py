"""Embedded endpoint throughput on this machine: the previous layout and the current one side by side.

    .venv/bin/python bench/embedded.py [--prompts 48] [--concurrency 16] [--max-tokens 160]
                                       [--servers N] [--threads N] [--slots N] [--skip-previous]

- previous: llama-cpp-python's server (`python -m llama_cpp.server`), one single-threaded process
  per usable core, requests spread over them in turn. Needs `pip install
  "llama-cpp-python[server]==0.3.36"` (compiles llama.cpp, about 8 minutes on 2 cores); skipped
  with a message when it is not installed.
- current: `udfs.servers.embedded.embedded_endpoint` with the default config (one xllamacpp server on all
  usable cores, slots sized from the machine, continuous batching); --servers, --threads and
  --slots override llm.embedded's settings to try other layouts.

Both get the same chat prompts at the same concurrency, max_tokens, greedy sampling and repeat
penalty, after one warm-up request per server. Prints completion tokens/s of each and their ratio.
Last line: `embedded_speedup=<current / previous>` (`nan` when the previous layout was skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from udfs.servers.embedded import embedded_endpoint, find_model_path, usable_cores  # noqa: E402
from udfs.llm.config import EmbeddedEndpointConfig  # noqa: E402

TOPICS = [
    "photosynthesis", "plate tectonics", "the French Revolution", "prime numbers", "supply and demand",
    "the water cycle", "black holes", "the Roman Empire", "vaccines", "machine learning",
    "the printing press", "climate change", "the human heart", "jazz music", "the Silk Road",
    "volcanoes", "the theory of evolution", "electric circuits", "the Renaissance", "ocean currents",
    "the immune system", "the stock market", "ancient Egypt", "renewable energy", "the moon landing",
    "DNA replication", "the Industrial Revolution", "honeybees", "the Pythagorean theorem", "glaciers",
    "the Cold War", "antibiotics", "the internet", "rainforests", "Shakespeare's plays",
    "nuclear fission", "the Great Wall of China", "earthquakes", "inflation", "the solar system",
    "coral reefs", "the Olympic Games", "probability", "the nervous system", "medieval castles",
    "recycling", "the speed of light", "democracy",
]


def prompts(count: int) -> list[str]:
    return [f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


def complete(base_url: str, prompt: str, max_tokens: int, repeat_penalty: float) -> int:
    """One chat completion; its completion tokens."""
    body = {
        "model": "smollm2", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0.0, "seed": 1, "repeat_penalty": repeat_penalty,
    }
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as response:
        return json.load(response)["usage"]["completion_tokens"]


def measure(base_urls: list[str], texts: list[str], concurrency: int, max_tokens: int,
            repeat_penalty: float) -> tuple[int, float]:
    """(completion tokens, seconds) for all prompts, `concurrency` in flight, spread over the URLs."""
    for url in base_urls:  # warm-up: first-request costs (threads, allocations) are not measured
        complete(url, "Say hello.", 8, repeat_penalty)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = list(pool.map(lambda item: complete(base_urls[item[0] % len(base_urls)], item[1], max_tokens,
                                                     repeat_penalty), enumerate(texts)))
    return sum(tokens), time.perf_counter() - started


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_models(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama_cpp.server at {url} not ready after {timeout_s} s") from None
            time.sleep(0.25)


@contextmanager
def previous_layout(model: Path, servers: int, n_ctx: int):
    """One single-threaded llama-cpp-python server per core, as udfs/servers/embedded.py ran them before."""
    processes, urls = [], []
    log_dir = Path(tempfile.mkdtemp(prefix="glan-bench-llama-cpp-"))
    try:
        for index in range(servers):
            port = free_port()
            log_path = log_dir / f"server-{index}.log"
            with open(log_path, "wb") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                     "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
                     "--n_threads", "1", "--n_threads_batch", "1", "--model_alias", model.stem],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))
            urls.append(f"http://127.0.0.1:{port}/v1")
            _wait_models(urls[-1], processes[-1], log_path, timeout_s=180)
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--servers", type=int, help="llm.embedded.servers for the current layout")
    parser.add_argument("--threads", type=int, help="llm.embedded.n_threads for the current layout")
    parser.add_argument("--slots", type=int, help="llm.embedded.slots for the current layout")
    parser.add_argument("--skip-previous", action="store_true", help="measure the current layout only")
    args = parser.parse_args(argv)
    cfg = EmbeddedEndpointConfig()
    chosen = {"servers": args.servers, "n_threads": args.threads, "slots": args.slots}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in chosen.items() if v is not None})
    texts = prompts(args.prompts)
    cores = usable_cores()
    print(f"{len(texts)} prompts, {args.concurrency} in flight, max_tokens {args.max_tokens}, "
          f"{cores} usable core(s)", flush=True)

    rates: dict[str, float] = {}
    if args.skip_previous:
        print("previous layout skipped (--skip-previous)", flush=True)
    elif importlib.util.find_spec("llama_cpp") is None:
        print('previous layout skipped: llama-cpp-python is not installed '
              '(pip install "llama-cpp-python[server]==0.3.36"; it compiles llama.cpp)', flush=True)
    else:
        with previous_layout(find_model_path(cfg), cores, cfg.n_ctx) as urls:
            tokens, seconds = measure(urls, texts, args.concurrency, args.max_tokens, cfg.repeat_penalty)
        rates["previous"] = tokens / seconds
        print(f"previous (llama-cpp-python, {cores} single-thread servers): {tokens} completion tokens "
              f"in {seconds:.1f} s = {rates['previous']:.1f} tokens/s", flush=True)

    with embedded_endpoint(cfg) as endpoint:
        tokens, seconds = measure(endpoint.base_urls, texts, args.concurrency, args.max_tokens, cfg.repeat_penalty)
    rates["current"] = tokens / seconds
    plan = endpoint.plan
    print(f"current (xllamacpp, {plan.servers} server(s), {plan.threads} thread(s), {plan.slots} slots): "
          f"{tokens} completion tokens in {seconds:.1f} s = {rates['current']:.1f} tokens/s", flush=True)
    speedup = rates["current"] / rates["previous"] if "previous" in rates else float("nan")
    print(f"embedded_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
