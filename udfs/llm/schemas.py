"""JSON schemas of the calls that return structured output, by call (prompt) name.

The client sends a call's schema as `response_format` in JSON-schema mode, validates every parsed
output against it, and gives it to the repair call. The test server answers a call listed here with
a valid instance. Validation is jsonschema's (any draft), but keep to the keywords the test
server's instance generator (`udfs.servers.fake_llm.instance`) draws from: type, properties, required,
additionalProperties, items, minItems/maxItems, enum, const, minLength/maxLength, minimum/maximum,
anyOf. Give every array `maxItems`: grammar-constrained local models (llama.cpp) otherwise may loop
on an array until they run out of tokens.
"""

from __future__ import annotations

from typing import Any

def _text(max_length: int = 400) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


def subjects_schema(max_subjects: int = 40, max_subtopics: int = 12) -> dict[str, Any]:
    """subjects_convert: the subjects of one free-text list (GLAN step 2b). An empty list is not a
    valid answer: it goes to `failures` and is retried, instead of silently losing a sample."""
    return {
        "type": "object",
        "properties": {"subjects": {
            "type": "array", "minItems": 1, "maxItems": max_subjects,
            "items": {
                "type": "object",
                "properties": {
                    "subject_name": _text(200),
                    "level": _text(100),
                    "subtopics": {"type": "array", "items": _text(200), "minItems": 0, "maxItems": max_subtopics},
                },
                "required": ["subject_name", "level", "subtopics"],
                "additionalProperties": False,
            },
        }},
        "required": ["subjects"],
        "additionalProperties": False,
    }


def sessions_schema(max_sessions: int = 30, max_concepts: int = 10) -> dict[str, Any]:
    """syllabus_extract: the class sessions of one syllabus with their key concepts (GLAN step 3b)."""
    return {
        "type": "object",
        "properties": {"sessions": {
            "type": "array", "minItems": 1, "maxItems": max_sessions,
            "items": {
                "type": "object",
                "properties": {
                    "name": _text(200),
                    "description": _text(1000),
                    "key_concepts": {"type": "array", "items": _text(200), "minItems": 1, "maxItems": max_concepts},
                },
                "required": ["name", "description", "key_concepts"],
                "additionalProperties": False,
            },
        }},
        "required": ["sessions"],
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    # The repair call answers with the schema of the call it repairs (sent in its request), so its
    # registry entry only matters for the test server's plain-text path: any JSON object will do.
    "repair": {"type": "object"},
    "subjects_convert": subjects_schema(),
    "syllabus_extract": sessions_schema(),
}


def schema_for(call: str) -> dict[str, Any] | None:
    return SCHEMAS.get(call)


def unbounded_arrays(schema: dict[str, Any], path: str = "$") -> list[str]:
    """Paths of arrays without `maxItems` (see the module docstring); [] when every array is bounded."""
    found: list[str] = []
    if schema.get("type") == "array" or "items" in schema:
        if "maxItems" not in schema:
            found.append(path)
        if isinstance(schema.get("items"), dict):
            found += unbounded_arrays(schema["items"], f"{path}[]")
    for key, sub in (schema.get("properties") or {}).items():
        found += unbounded_arrays(sub, f"{path}.{key}")
    for i, option in enumerate(schema.get("anyOf") or []):
        found += unbounded_arrays(option, f"{path}|{i}")
    return found
