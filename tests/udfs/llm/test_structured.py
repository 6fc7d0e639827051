"""Parsers, the schema validator and prompt rendering: pure functions, no server, no Spark."""

from __future__ import annotations

import pickle

import jinja2
import pytest

from udfs.llm.prompts import Prompt, load_prompt
from udfs.llm.structured import check_schema, coerce_to_schema, extract_json, parse_output, validate
from tests.support import TEST_PROMPTS, items_schema


ITEMS_SCHEMA = items_schema(1, 4, closed=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('{"items": ["a", "b"]}', {"items": ["a", "b"]}, id="clean"),
        pytest.param('```json\n{"items": ["a"]}\n```', {"items": ["a"]}, id="fenced"),
        pytest.param('Sure! Here it is:\n```json\n{"items": ["a"]}\n```\nHope this helps.', {"items": ["a"]},
                     id="fenced-with-prose"),
        pytest.param('```\n{"items": ["a"]}\n```', {"items": ["a"]}, id="fence-without-language"),
        pytest.param('```json\n{"items": ["a"]}\n', {"items": ["a"]}, id="unterminated-fence"),
        pytest.param('The answer is {"items": ["a", "b"]} as requested.', {"items": ["a", "b"]}, id="prose-around"),
        pytest.param('{"items": ["a", "b",],}', {"items": ["a", "b"]}, id="trailing-commas"),
        pytest.param('"a"\n', "a", id="bare-string"),
        pytest.param('{"items": ["line one\nline two"]}', {"items": ["line one\nline two"]},
                     id="raw-newline-in-string"),
        pytest.param('{"x": 1}\n{"x": 2}\n', [{"x": 1}, {"x": 2}], id="jsonl"),
        pytest.param('```jsonl\n{"x": 1}\n{"x": 2}\n```', [{"x": 1}, {"x": 2}], id="fenced-jsonl"),
    ],
)
def test_extract_json_finds_the_value(text, expected):
    value, error = extract_json(text)
    assert error is None
    assert value == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "empty output", id="empty"),
        pytest.param("   \n", "empty output", id="blank"),
        pytest.param(None, "empty output", id="none"),
        pytest.param('{"items": ["a", ', "no JSON value", id="cut-off"),
        pytest.param("I cannot help with that.", "no JSON value", id="refusal"),
        pytest.param("```json\n{items: [a]}\n```", "no JSON value", id="not-json-in-fence"),
    ],
)
def test_extract_json_reports_malformed_output(text, message):
    value, error = extract_json(text)
    assert value is None
    assert message in error


def test_parse_output_wraps_jsonl_into_the_single_array_property():
    value, error = parse_output('"alpha"\n"beta"', ITEMS_SCHEMA)
    assert error is not None  # bare strings per line are not JSONL objects: no silent guess
    value, error = parse_output('["alpha", "beta"]', ITEMS_SCHEMA)
    assert error is None and value == {"items": ["alpha", "beta"]}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param('{"items": []}', "$.items: has 0 items, minItems is 1", id="too-few"),
        pytest.param('{"items": ["a","b","c","d","e"]}', "$.items: has 5 items, maxItems is 4", id="too-many"),
        pytest.param('{"items": [1]}', "$.items[0]: 1 is not of type 'string'", id="wrong-item-type"),
        pytest.param('{"things": ["a"]}', "$: 'items' is a required property", id="missing-required"),
        pytest.param('{"items": ["a"], "extra": 1}', "('extra' was unexpected)", id="additional"),
    ],
)
def test_parse_output_rejects_schema_violations(text, fragment):
    value, error = parse_output(text, ITEMS_SCHEMA)
    assert value is None
    assert error.startswith("schema validation failed")
    assert fragment in error


@pytest.mark.parametrize(
    ("value", "schema", "ok"),
    [
        (3, {"type": "integer", "minimum": 1, "maximum": 5}, True),
        (7, {"type": "integer", "maximum": 5}, False),
        (True, {"type": "integer"}, False),
        (2.5, {"type": "number"}, True),
        ("b", {"enum": ["a", "b"]}, True),
        ("c", {"enum": ["a", "b"]}, False),
        (None, {"type": ["string", "null"]}, True),
        ("x", {"type": "string", "minLength": 2}, False),
        ({"a": 1}, {"anyOf": [{"type": "string"}, {"type": "object"}]}, True),
        ([1, "x"], {"type": "array", "items": {"type": "integer"}}, False),
    ],
)
def test_validate_keywords(value, schema, ok):
    assert (validate(value, schema) == []) is ok


def test_validation_messages_stay_short_for_the_repair_prompt():
    (problem,) = validate({"items": ["x" * 5000]}, {"type": "object", "properties": {"items": {"type": "integer"}}})
    assert problem.startswith("$.items: ") and problem.endswith("is not of type 'integer'")
    assert len(problem) < 300


def test_an_invalid_schema_is_a_one_line_error_naming_the_call_and_the_place():
    with pytest.raises(ValueError) as err:
        check_schema({"type": "object", "properties": {"n": {"type": "integr"}}}, "subjects_convert")
    message = str(err.value)
    assert "\n" not in message and "'subjects_convert'" in message and "properties/n/type" in message
    check_schema(ITEMS_SCHEMA, "items")  # a valid one passes


def test_coerce_unwraps_single_list_object_for_array_schema():
    assert coerce_to_schema({"rows": [1, 2]}, {"type": "array"}) == [1, 2]
    assert coerce_to_schema({"rows": [1], "n": 1}, {"type": "array"}) == {"rows": [1], "n": 1}


# -- prompts -----------------------------------------------------------------------------------


def test_prompt_renders_system_and_user_blocks_exactly():
    prompt = load_prompt("echo_topic", TEST_PROMPTS)
    assert prompt.render(topic="tides") == [
        {"role": "system", "content": "You are a helpful teacher."},
        {"role": "user", "content": "Write about tides."},
    ]


def test_prompt_without_blocks_is_one_user_message():
    assert load_prompt("plain", TEST_PROMPTS).render(word="hi") == [{"role": "user", "content": "Say hi"}]


def test_prompt_missing_variable_raises():
    with pytest.raises(jinja2.UndefinedError):
        load_prompt("echo_topic", TEST_PROMPTS).render()


def test_prompt_version_is_a_hash_of_the_text_and_survives_pickling():
    a = Prompt(name="x", text="{% block user %}A {{ v }}{% endblock %}")
    b = Prompt(name="x", text="{% block user %}B {{ v }}{% endblock %}")
    assert a.version != b.version and len(a.version) == 12
    copy = pickle.loads(pickle.dumps(a))
    assert copy.version == a.version
    assert copy.render(v=1) == [{"role": "user", "content": "A 1"}]


def test_prompt_rejects_unknown_blocks():
    with pytest.raises(ValueError, match="unknown blocks"):
        Prompt(name="bad", text="{% block assistant %}x{% endblock %}")


def test_repair_prompt_carries_output_error_and_schema():
    messages = load_prompt("repair").render(output="{oops", error="no JSON value", schema='{"type": "object"}')
    assert messages[0]["role"] == "system"
    user = messages[1]["content"]
    assert "{oops" in user and "no JSON value" in user and '{"type": "object"}' in user


def test_every_registered_schema_bounds_its_arrays():
    from udfs.llm.schemas import SCHEMAS, unbounded_arrays

    for call, schema in SCHEMAS.items():
        assert unbounded_arrays(schema) == [], f"{call}: give these arrays maxItems"
    assert unbounded_arrays({"type": "object", "properties": {"a": {"type": "array"}}}) == ["$.a"]
