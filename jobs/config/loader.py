"""Configuration: YAML files in `conf/`, loaded once into typed, frozen dataclasses.

Order: the packaged `conf/base.yaml`, then every `--conf FILE` (later wins), then every
`--set dotted.key=value`. Unknown keys, wrong types and bad values are a `ConfigError` that names
the key and the file (or `--set`) it came from. Each section's dataclass checks its own values.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from jobs.config.decontam import DecontamConfig
from jobs.config.export import ExportConfig, TrainConfig
from jobs.config.files import find_conf_file, read_yaml
from jobs.config.stages import (
    AnswersConfig,
    PipelineConfig,
    QuestionsConfig,
    SubjectsConfig,
    SyllabusConfig,
)
from jobs.errors import ConfigError
from jobs.glan.combinations import CombinationsConfig
from jobs.glan.taxonomy import TaxonomyConfig
from udfs.config_checks import SettingError, at_least
from udfs.llm.config import LLMConfig

BASE_CONF = "base.yaml"


@dataclass(frozen=True)
class StorageConfig:
    """Which Delta backend writes the tables. `auto` picks native Delta when its jars load."""

    backend: Literal["auto", "native", "embedded"] = "auto"
    catalog: str | None = None  # native backend: also register tables as <catalog>.<schema>.<name>
    schema: str | None = None
    commit_retries: int = 3  # embedded backend: re-plan an append this often after a conflicting commit

    def __post_init__(self) -> None:
        if self.catalog and not self.schema:
            raise SettingError("schema", "schema is required when catalog is set")
        at_least(self, 0, "commit_retries")


@dataclass(frozen=True)
class SparkConfig:
    """Session settings used only when glan starts Spark itself (never over a spark-submit master)."""

    master: str | None = None
    shuffle_partitions: int = 8
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        at_least(self, 1, "shuffle_partitions")


@dataclass(frozen=True)
class GlanConfig:
    """The whole configuration of one run."""

    run_root: str = "runs/glan"
    storage: StorageConfig = field(default_factory=StorageConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    taxonomy: TaxonomyConfig = field(default_factory=TaxonomyConfig)
    subjects: SubjectsConfig = field(default_factory=SubjectsConfig)
    syllabus: SyllabusConfig = field(default_factory=SyllabusConfig)
    combinations: CombinationsConfig = field(default_factory=CombinationsConfig)
    questions: QuestionsConfig = field(default_factory=QuestionsConfig)
    answers: AnswersConfig = field(default_factory=AnswersConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sources: tuple[str, ...] = ()  # where the values came from, for the run record; not a YAML key

    def __post_init__(self) -> None:
        if not self.run_root or not str(self.run_root).strip():
            raise SettingError("run_root", "run_root must not be empty")

    def table_uri(self, name: str) -> str:
        """`<run_root>/<name>`: local paths are made absolute, URIs are kept as they are."""
        # Here, not at the top: it imports pyspark and pyarrow, which loading a config does not need.
        from jobs.spark.session import is_local_path, local_path

        if is_local_path(self.run_root):
            return str(local_path(self.run_root) / name)
        return f"{self.run_root.rstrip('/')}/{name}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("sources", None)
        return data


# ---------------------------------------------------------------------------------------------
# Loading


def _merge(into: dict[str, Any], new: dict[str, Any], origin: dict[str, str], source: str,
           prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, source, f"{dotted}.")
        else:
            into[key] = value
            origin[dotted] = source
            if isinstance(value, dict):
                for sub in _dotted_keys(value, f"{dotted}."):
                    origin[sub] = source


def _dotted_keys(data: dict[str, Any], prefix: str) -> list[str]:
    keys = []
    for key, value in data.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return key, nested


def _where(origin: dict[str, str], key: str) -> str:
    probe = key
    while probe:
        if probe in origin:
            return origin[probe]
        probe = probe.rpartition(".")[0]
    return "defaults"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, origin: dict[str, str]) -> Any:
    """Check `value` against the annotation `tp`; return the value in the dataclass's own type."""
    source = _where(origin, key)
    kind = typing.get_origin(tp)
    args = typing.get_args(tp)

    if kind in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{source}: {key} must not be null")
    if kind is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, origin, f"{key}.")
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
        return tuple(items) if kind is tuple else items
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, key, origin): _coerce(v, val_tp, f"{key}.{k}", origin)
                for k, v in value.items()}
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, key, source)


def _coerce_scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    """A bool, int, float or str; an int is taken for a float, and a `--set` number or date for a str."""
    if value is None:
        raise ConfigError(f"{source}: {key} must be a {_type_name(tp)}, not null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if source == "--set" and isinstance(value, (int, float, bool, datetime.date)):
            return str(value)  # `--set run_root=2024` or `--set llm.api_version=2024-06-01` mean the string
    raise ConfigError(f"{source}: {key} must be a {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], origin: dict[str, str], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "sources"}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise ConfigError(f"{_where(origin, dotted)}: unknown key '{dotted}'")
    kwargs = {}
    for name in fields:
        if name not in data:
            continue
        value = data[name]
        default = _default_of(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A partial section keeps this field's own defaults (answers.llm is T 0.7, not the
            # StageLLMConfig class default), not those of the section's class.
            value = _merge_defaults(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", origin)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # A section's message starts with its own field name: prefix it with the section's path and
        # name the file that set that field (a plain ValueError names no field: the section's file).
        field_name = exc.field if isinstance(exc, SettingError) else None
        key = f"{prefix}{field_name}" if field_name in fields else prefix.rstrip(".")
        raise ConfigError(f"{_where(origin, key)}: {prefix}{exc}") from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _merge_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_defaults(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(conf_files: list[str] | tuple[str, ...] = (), sets: list[str] | tuple[str, ...] = ()) -> GlanConfig:
    """Load base.yaml, then each file, then each `--set`, into a validated `GlanConfig`."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    sources = []
    for name in (BASE_CONF, *conf_files):
        path = find_conf_file(name)
        source = str(name) if name != BASE_CONF else "conf/base.yaml"
        _merge(merged, read_yaml(path), origin, source)
        sources.append(source)
    for item in sets:
        _, nested = _parse_set(item)
        _merge(merged, nested, origin, "--set")
        sources.append(f"--set {item}")
    cfg = _build(GlanConfig, merged, origin)
    return dataclasses.replace(cfg, sources=tuple(sources))


def with_overrides(cfg: GlanConfig, **sections: Any) -> GlanConfig:
    """A copy of `cfg` with whole sections or top-level values replaced (tests and jobs)."""
    return dataclasses.replace(cfg, **sections)
