"""Structured output: lenient JSON/JSONL extraction, and validation against the call's JSON schema.

Both are pure functions that never raise on bad model output: they return an error string instead,
which becomes the row's error message (and the repair call's `error`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

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


_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}
_SIZES = {"minItems": "items", "maxItems": "items", "minLength": "characters", "maxLength": "characters"}
_MESSAGE_CHARS = 240  # a message goes into the repair prompt: long values in it are cut


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """The validator of `schema` (its `$schema` draft, else 2020-12), built once per schema."""
    text = json.dumps(schema, sort_keys=True)
    found = _VALIDATORS.get(text)
    if found is None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        found = _VALIDATORS[text] = cls(schema)
    return found


def _message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, with the limit where it leaves it out ("[...] is too long")."""
    if error.validator in _SIZES and hasattr(error.instance, "__len__"):
        text = f"has {len(error.instance)} {_SIZES[error.validator]}, {error.validator} is {error.validator_value}"
    else:
        text = error.message
    if len(text) > _MESSAGE_CHARS:
        text = f"{text[: _MESSAGE_CHARS // 2]} ... {text[-_MESSAGE_CHARS // 4:]}"
    return f"{error.json_path}: {text}"


def check_schema(schema: dict[str, Any], call: str) -> None:
    """Raise a one-line ValueError naming the call when `schema` is not a valid JSON schema."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise ValueError(f"the JSON schema of call {call!r} is not valid at {where}: {exc.message}") from None


def validate(value: Any, schema: dict[str, Any]) -> list[str]:
    """Errors of `value` against `schema` (jsonschema), each `<JSON path>: <problem>`; [] if valid."""
    return [_message(error) for error in _validator(schema).iter_errors(value)]


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
