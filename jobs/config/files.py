"""Finding and reading the YAML files in `conf/`: a path as given, else the packaged copy."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import ConfigError


def find_conf_file(name: str) -> Path | Traversable:
    """A path as given, else a file of that name in the packaged `conf/` (so `--conf emr.yaml`
    works on a cluster where only the installed package, or the --py-files zip, is present).
    Either way the result has `.read_text()` and `.name`."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    packaged = resources.files("conf") / Path(name).name
    if packaged.is_file():
        return packaged
    if not Path(name).suffix:
        return find_conf_file(f"{name}.yaml")
    raise ConfigError(f"config file not found: {name}")


def read_yaml(path: Path | Traversable) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data
