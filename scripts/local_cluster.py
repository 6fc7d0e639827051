"""A local standalone Spark cluster for tests and benchmarks: one master and N workers started from
the pyspark installation in `.venv`, on the loopback interface only, each with its own cores, work
directory and log file, as separate JVMs.

The workers' Python is a virtual environment of its own (`<dir>/worker-venv`) that sees `.venv`'s
third-party packages but not glan-spark itself: executors import the project only from the
`--py-files` zip that `submit` ships, as on a real cluster.

    python scripts/local_cluster.py start [--dir DIR] [--workers N]   # prints master=spark://127.0.0.1:<port>
    python scripts/local_cluster.py status [--dir DIR]
    python scripts/local_cluster.py stop [--dir DIR]

then `.venv/bin/spark-submit --master <url> --py-files dist/glan_spark-<version>-pyfiles.zip
--conf spark.pyspark.python=<dir>/worker-venv/bin/python jobs/taxonomy.py --conf ...`. From Python:

    from scripts.local_cluster import LocalCluster
    with LocalCluster(tmp_path / "cluster", workers=2) as cluster:
        proc = cluster.submit(["jobs/taxonomy.py", "--conf", "my.yaml"], cwd=tmp_path)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
sys.path.insert(0, str(REPO))  # run as a script from .venv: the project's own helpers below

from jobs.spark.session import QUIET_LOG4J  # noqa: E402
from jobs.storage.owners import pid_alive  # noqa: E402

STATE = "cluster.json"  # in the cluster folder: ports and pids, for `status` and `stop` from another process
DEPS_PTH = "_glan_deps.pth"
HOST = "127.0.0.1"
# What the daemons and spark-submit keep of the caller's environment: nothing that points at the repo.
_KEEP_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "JAVA_HOME", "TMPDIR")
# Short-lived JVMs on a small machine: the C1 compiler alone starts and warms up much faster (a
# stage's spark-submit took 25-40% less on 2 cores), and one GC thread leaves the cores to the work.
# LocalCluster(jvm_options="") keeps the JVM's defaults, e.g. for a long benchmark.
QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def spark_home() -> Path:
    """The pyspark package of the running interpreter: its `bin/` holds spark-class and its jars."""
    import pyspark  # noqa: PLC0415 - only the cluster's launcher needs it, not `--help`

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def make_worker_venv(target: Path, source: Path = VENV) -> Path:
    """A virtual environment at `target` whose site-packages lists `source`'s site-packages in a
    `.pth` file: its third-party packages import, but the `.pth` files inside that folder (the
    project's editable install among them) are not processed, so glan-spark does not. Returns its
    python."""
    python = target / "bin" / "python"
    if not python.exists():
        subprocess.run([str(source / "bin" / "python"), "-m", "venv", "--without-pip", str(target)], check=True)
    deps = subprocess.run([str(source / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / DEPS_PTH).write_text(deps + "\n")
    return python


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first seen through /proc), not `pid` itself."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL, wait_s: float = 10.0) -> None:
    """Send `sig` to `pid` and everything below it (the executor JVM, pyspark's daemon and its
    workers, which sit in a process group of their own); SIGKILL what is left after `wait_s`."""
    pids = [pid, *descendants(pid)]
    for target in pids:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for target in pids + descendants(pid):
        if pid_alive(target):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_spark_daemon(pid: int, marker: str) -> bool:
    """Guard for `stop` from another process: the pid is still our JVM, not a reused number."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "org.apache.spark.deploy" in cmdline and marker in cmdline


class LocalCluster:
    """A standalone master and `workers` workers on 127.0.0.1 (each `cores_per_worker` cores and
    `memory` for executors), with their work directories, logs and the workers' Python under
    `work_dir`."""

    def __init__(self, work_dir: Path, workers: int = 2, cores_per_worker: int = 1, memory: str = "1g",
                 jvm_options: str = QUICK_JVM):
        if workers < 1 or cores_per_worker < 1:
            raise ValueError(f"workers={workers} and cores_per_worker={cores_per_worker} must be at least 1")
        self.work_dir = Path(work_dir).resolve()
        self.workers = workers
        self.cores_per_worker = cores_per_worker
        self.memory = memory
        self.jvm_options = jvm_options
        self.master_url: str | None = None
        self.webui_url: str | None = None
        self.worker_python = self.work_dir / "worker-venv" / "bin" / "python"
        self._procs: dict[str, subprocess.Popen] = {}
        self._pids: dict[str, int] = {}  # name -> pid; from the state file when another process started us
        self._zip: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> LocalCluster:
        """Start the master, then the workers; return once every worker has registered."""
        for sub in ("logs", "conf", "submit-conf"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.work_dir / "submit-conf" / "log4j2.properties").write_text(QUIET_LOG4J)
        make_worker_venv(self.work_dir / "worker-venv")
        port, webui = free_port(), free_port()
        self.master_url, self.webui_url = f"spark://{HOST}:{port}", f"http://{HOST}:{webui}"
        try:
            self._daemon("master", ["org.apache.spark.deploy.master.Master", "--host", HOST,
                                    "--port", str(port), "--webui-port", str(webui)])
            self._wait(lambda state: True, timeout, "the master's web UI to answer")
            for i in range(self.workers):
                work = self.work_dir / f"worker-{i}"
                work.mkdir(exist_ok=True)
                self._daemon(f"worker-{i}", [
                    "org.apache.spark.deploy.worker.Worker", "--host", HOST, "--port", str(free_port()),
                    "--webui-port", str(free_port()), "--cores", str(self.cores_per_worker),
                    "--memory", self.memory, "--work-dir", str(work), self.master_url])
            self._wait(lambda state: state.get("aliveworkers", 0) >= self.workers, timeout,
                       f"{self.workers} worker(s) to register")
        except BaseException:
            self.stop()
            raise
        self._save()
        return self

    def stop(self) -> None:
        """Stop the workers (and their executors), then the master."""
        names = sorted((n for n in self._pids if n != "master"), reverse=True) + ["master"]
        for name in names:
            pid = self._pids.pop(name, None)
            if pid is not None and (name in self._procs or _is_spark_daemon(pid, self._marker(name))):
                kill_tree(pid, signal.SIGTERM)
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.wait(timeout=30)
        (self.work_dir / STATE).unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def attach(cls, work_dir: Path) -> LocalCluster:
        """The cluster a `start` in another process left running in `work_dir` (its state file)."""
        path = Path(work_dir).resolve() / STATE
        if not path.exists():
            raise FileNotFoundError(f"no local cluster in {work_dir} ({STATE} is missing)")
        state = json.loads(path.read_text())
        cluster = cls(work_dir, state["workers"], state["cores_per_worker"], state["memory"], state.get("jvm_options", QUICK_JVM))
        cluster.master_url, cluster.webui_url, cluster._pids = state["master_url"], state["webui_url"], state["pids"]
        return cluster

    # -- workers -----------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The worker JVMs' pids, in worker order (a killed worker keeps its place)."""
        return [self._pids[f"worker-{i}"] for i in range(self.workers) if f"worker-{i}" in self._pids]

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker `i`'s JVM with its executor and Python processes: a lost machine."""
        pid = self._pids[f"worker-{i}"]
        kill_tree(pid, signal.SIGKILL)
        proc = self._procs.get(f"worker-{i}")
        if proc is not None:
            proc.wait(timeout=30)

    def state(self) -> dict:
        """The master's JSON status (workers, their state and cores, applications)."""
        with urllib.request.urlopen(f"{self.webui_url}/json", timeout=5) as response:
            return json.load(response)

    # -- jobs ----------------------------------------------------------------------------------------

    def pyfiles(self) -> Path:
        """The `--py-files` zip of the project, built once per cluster by `jobs.spark.package`."""
        if self._zip is None:
            out = self.work_dir / "dist"
            built = subprocess.run([str(VENV / "bin" / "python"), "-m", "jobs.spark.package", "--out", str(out)],
                                   cwd=REPO, check=True, capture_output=True, text=True)
            self._zip = Path(built.stdout.strip().splitlines()[-1])
        return self._zip

    def submit_command(self, app_args: list[str], conf: dict[str, str] | None = None) -> list[str]:
        script = Path(app_args[0])
        if not script.is_absolute() and (REPO / script).exists():
            script = REPO / script
        settings = {"spark.pyspark.python": str(self.worker_python),
                    "spark.pyspark.driver.python": str(VENV / "bin" / "python"),
                    "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                    "spark.executor.memory": self.memory, **(conf or {})}
        if self.jvm_options:
            for side in ("driver", "executor"):
                settings.setdefault(f"spark.{side}.extraJavaOptions", self.jvm_options)
        command = [str(VENV / "bin" / "spark-submit"), "--master", str(self.master_url),
                   "--py-files", str(self.pyfiles())]
        for key, value in settings.items():
            command += ["--conf", f"{key}={value}"]
        return [*command, str(script), *app_args[1:]]

    def submit_env(self, env: dict | None = None) -> dict[str, str]:
        """The caller's environment without anything that points Python or Spark at the repo."""
        clean = {k: v for k, v in os.environ.items()
                 if k != "PYTHONPATH" and not k.startswith(("SPARK_", "PYSPARK_"))}
        return {**clean, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": HOST, "SPARK_CONF_DIR": str(self.work_dir / "submit-conf"), **(env or {})}

    def submit(self, app_args: list[str], conf: dict[str, str] | None = None, env: dict | None = None,
               cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """`spark-submit --master <url> --py-files <zip> <app_args>`: app_args[0] is the script (a
        path relative to the repo is made absolute), the rest its arguments. The driver runs
        `.venv`'s python in `cwd` (default: the cluster folder), the executors the worker python."""
        return subprocess.run(self.submit_command(app_args, conf), env=self.submit_env(env),
                              cwd=cwd or self.work_dir, capture_output=True, text=True, timeout=timeout)

    # -- internals -------------------------------------------------------------------------------------

    def _daemon_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
        env.update(SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP=HOST, SPARK_CONF_DIR=str(self.work_dir / "conf"),
                   SPARK_LOG_DIR=str(self.work_dir / "logs"), SPARK_DAEMON_MEMORY="512m",
                   SPARK_DAEMON_JAVA_OPTS=self.jvm_options, PYSPARK_PYTHON=str(self.worker_python))
        return env

    def _daemon(self, name: str, args: list[str]) -> None:
        log = (self.work_dir / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen([str(spark_home() / "bin" / "spark-class"), *args], cwd=self.work_dir,
                                env=self._daemon_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs[name], self._pids[name] = proc, proc.pid

    def _marker(self, name: str) -> str:
        """A string only this daemon's command line holds."""
        if name == "master":
            return f"--webui-port {self.webui_url.rsplit(':', 1)[1]}" if self.webui_url else "Master"
        return str(self.work_dir / name)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"local cluster: {name} exited ({proc.returncode}) while waiting for {what}; "
                                       f"see {self.work_dir / 'logs' / (name + '.log')}")
            try:
                if ready(self.state()):
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"local cluster: gave up after {timeout:.0f}s waiting for {what}; "
                           f"see the logs in {self.work_dir / 'logs'}")

    def _save(self) -> None:
        state = {"master_url": self.master_url, "webui_url": self.webui_url, "workers": self.workers,
                 "cores_per_worker": self.cores_per_worker, "memory": self.memory, "jvm_options": self.jvm_options, "pids": self._pids,
                 "worker_python": str(self.worker_python)}
        (self.work_dir / STATE).write_text(json.dumps(state, indent=2) + "\n")


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"glan-local-cluster-{os.getuid()}"


def _describe(cluster: LocalCluster) -> Iterator[str]:
    yield f"master={cluster.master_url}"
    yield f"webui={cluster.webui_url}"
    yield f"worker_python={cluster.worker_python}"
    yield f"dir={cluster.work_dir}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=default_dir(), help="the cluster's folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="1g", help="executor memory per worker")
    args = parser.parse_args(argv)
    if args.action == "start":
        if (args.dir / STATE).exists():
            print(f"local cluster: one is already running in {args.dir} (stop it first)", file=sys.stderr)
            return 1
        cluster = LocalCluster(args.dir, args.workers, args.cores, args.memory).start()
        # The daemons outlive this process: they are in sessions of their own.
        cluster._procs.clear()
        print("\n".join(_describe(cluster)))
        return 0
    try:
        cluster = LocalCluster.attach(args.dir)
    except FileNotFoundError as exc:
        print(f"local cluster: {exc}", file=sys.stderr)
        return 1
    if args.action == "stop":
        cluster.stop()
        print(f"stopped the local cluster in {cluster.work_dir}")
        return 0
    print("\n".join(_describe(cluster)))
    try:
        state = cluster.state()
    except OSError as exc:
        print(f"status=unreachable ({exc})")
        return 1
    print(f"status={state.get('status')} alive_workers={state.get('aliveworkers')} "
          f"cores={state.get('cores')} active_apps={len(state.get('activeapps', []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
