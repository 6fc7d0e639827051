"""Structured output: lenient JSON/JSONL extraction and a small JSON-schema validator.

Both are pure functions that never raise on bad model output: they return an error string instead,
which becomes the row's error message (and the repair call's `error`).
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_NOTHING = object()


def _loads(text: str) -> Any:
    """json.loads, then once more with trailing commas removed (a frequent model slip).

    strict=False accepts raw newlines and tabs inside strings: llama.cpp's schema grammar allows
    them, and they are harmless once parsed."""
    try:
        return json.loads(text, strict=False)
    except ValueError:
        pass
    fixed = _TRAILING_COMMA.sub(r"\1", text)
    if fixed != text:
        try:
            return json.loads(fixed, strict=False)
        except ValueError:
            pass
    return _NOTHING


def _jsonl(text: str) -> Any:
    """Several non-empty lines that are each a JSON object or array: a JSONL list."""
    lines = [line.strip().rstrip(",") for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return _NOTHING
    values = [_loads(line) for line in lines]
    if all(isinstance(v, (dict, list)) for v in values):
        return values
    return _NOTHING


def _outermost(text: str) -> Any:
    """The span from the first `{`/`[` to the last matching closer, for JSON wrapped in prose."""
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            value = _loads(text[start : end + 1])
            if value is not _NOTHING:
                return value
    return _NOTHING


def extract_json(text: str | None) -> tuple[Any, str | None]:
    """(value, None) for the first JSON value found in a model's output, else (None, error).

    Tries, in order: the whole text; each fenced block (```json ... ```, unterminated fences too);
    JSONL lines; the outermost {...} or [...] inside prose. Trailing commas are forgiven.
    """
    if text is None or not text.strip():
        return None, "empty output"
    stripped = text.strip()
    candidates = [stripped]
    candidates += [m.group(2).strip() for m in _FENCE.finditer(stripped)]
    for candidate in candidates:
        if not candidate:
            continue
        for attempt in (_loads, _jsonl, _outermost):
            value = attempt(candidate)
            if value is not _NOTHING:
                return value, None
    return None, "no JSON value found in the output"


def coerce_to_schema(value: Any, schema: dict[str, Any] | None) -> Any:
    """Undo the two common shape slips: a bare list where the schema wants an object with exactly
    one array property (JSONL output), and such an object where the schema wants the list."""
    if not schema:
        return value
    kind = schema.get("type")
    if kind == "object" and isinstance(value, list):
        props = schema.get("properties") or {}
        arrays = [k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "array"]
        if len(arrays) == 1 and set(schema.get("required", [])) <= set(arrays):
            return {arrays[0]: value}
    if kind == "array" and isinstance(value, dict) and len(value) == 1:
        (only,) = value.values()
        if isinstance(only, list):
            return only
    return value


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against the subset of JSON schema listed in udfs/schemas.py; [] if valid.
    Unknown keywords are ignored, as JSON schema itself does."""
    errors: list[str] = []
    if "anyOf" in schema:
        if all(validate(value, option, path) for option in schema["anyOf"]):
            errors.append(f"{path}: matches none of anyOf")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return errors + [f"{path}: expected {'/'.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items, fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: {len(value)} items, more than maxItems {schema['maxItems']}")
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                errors += validate(item, items, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                errors += validate(item, extra, f"{path}.{key}")
    return errors


def parse_output(text: str | None, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """(value, None) when `text` holds JSON valid for `schema`, else (None, error message)."""
    value, error = extract_json(text)
    if error:
        return None, error
    value = coerce_to_schema(value, schema)
    if schema:
        problems = validate(value, schema)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            return None, f"schema validation failed: {shown}"
    return value, None
