"""Who is writing a folder, and whether they are still alive: an owner file (run id, host, pid,
disciplines) rewritten every HEARTBEAT_S seconds by a daemon thread of the driver. The spool's run
folders and the markers of table writes in progress both use it, so that another run's cleanup
takes only what a dead writer left."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

OWNER = "_owner.json"
HEARTBEAT_S = 30.0




class Heartbeat:
    """One daemon thread per driver that rewrites the owner file of every open folder it is given
    (the spool's run folders, the markers of table writes in progress)."""

    def __init__(self) -> None:
        self.folders: dict[str, tuple[pafs.FileSystem, str, dict]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, uri: str, fs: pafs.FileSystem, root: str, owner: dict) -> None:
        with self.lock:
            self.folders[uri] = (fs, root, owner)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="glan-heartbeat", daemon=True)
                self.thread.start()

    def discard(self, uri: str) -> None:
        with self.lock:
            self.folders.pop(uri, None)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                folders = list(self.folders.values())
            for fs, root, owner in folders:
                try:
                    write_owner(fs, root, owner)
                except OSError as exc:  # storage hiccup: the next beat tries again
                    log.debug("heartbeat for %s failed: %s", root, exc)


HEARTBEATS = Heartbeat()


def write_owner(fs: pafs.FileSystem, root: str, owner: dict) -> None:
    """The owner file: who writes the folder (run id, host, pid), since when, for which disciplines
    (None: all), and the time of this heartbeat."""
    with fs.open_output_stream(f"{root}/{OWNER}") as sink:
        sink.write(json.dumps({**owner, "heartbeat": time.time()}).encode())


def read_owner(fs: pafs.FileSystem, root: str) -> dict | None:
    try:
        return json.loads(fs.open_input_stream(f"{root}/{OWNER}").read())
    except (OSError, ValueError):  # none, or cut off mid-write: the writer died
        return None


def pid_alive(pid: int) -> bool:
    """A process of this machine exists and is not a zombie (a child not yet waited for is gone
    for every purpose here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone since kill(0), unless there is no /proc at all (macOS): then kill(0) decides
        return not Path("/proc").is_dir()


def owner_is_dead(owner: dict | None, stale_after_s: float, now: float | None = None) -> bool:
    """A folder's writer is gone: no owner file, no heartbeat for `stale_after_s`, or (same host)
    its process no longer exists."""
    if not owner:
        return True
    now = time.time() if now is None else now
    if now - float(owner.get("heartbeat", 0)) > stale_after_s:
        return True
    return owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1)))
