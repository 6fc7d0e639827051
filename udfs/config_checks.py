"""Value checks for the frozen config dataclasses' `__post_init__`, and the error they raise.

It lives in `udfs` because the LLM settings (`udfs/llm/config.py`) are pickled into UDF closures
and `udfs` never imports `jobs`; the sections in `jobs/config` and `jobs/glan` use the same checks.

Every message starts with the field's name (`max_attempts=0 must be >= 1`), and `SettingError.field`
names the field outright, so the config loader can prefix the section path and name the file that
set that field without parsing the message.
"""

from __future__ import annotations

from typing import Any


class SettingError(ValueError):
    """A config value that its dataclass refuses; `field` is the dataclass field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds from `args` (the message alone), which does not fit __init__.
        return type(self), (self.field, str(self))


def require(obj: Any, field: str, ok: bool, rule: str) -> None:
    """Raise `<field>=<value> <rule>` unless `ok`; for ranges and rules between fields."""
    if not ok:
        raise SettingError(field, f"{field}={getattr(obj, field)} {rule}")


def at_least(obj: Any, minimum: float, *fields: str, optional: bool = False, note: str = "") -> None:
    """Each field must be >= `minimum`; `optional`: None passes. `note` ends the message."""
    for field in fields:
        value = getattr(obj, field)
        if optional and value is None:
            continue
        if value < minimum:
            raise SettingError(field, f"{field}={value} must be >= {minimum}{note}")


def positive(obj: Any, *fields: str, optional: bool = False, note: str = "") -> None:
    """Each field must be > 0; `optional`: None passes. `note` ends the message."""
    for field in fields:
        value = getattr(obj, field)
        if optional and value is None:
            continue
        if value <= 0:
            raise SettingError(field, f"{field}={value} must be > 0{note}")
