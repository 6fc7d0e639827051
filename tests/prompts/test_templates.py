"""Every production prompt, rendered with fixed variables, is compared with its snapshot in
`snapshots/<name>.txt`: a change to a template's text shows up here, on purpose or not. After a
deliberate change, rewrite the snapshots with `GLAN_UPDATE_SNAPSHOTS=1 pytest tests/prompts`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs.config.loader import load_config
from jobs.pipeline.stage import stages
from udfs.llm.prompts import load_prompt

SNAPSHOTS = Path(__file__).parent / "snapshots"
PROMPTS = Path(__file__).resolve().parents[2] / "prompts"

# One set of variables per call, named after the input columns (and constants) the call declares.
VARIABLES: dict[str, dict] = {
    "subjects_list": {"discipline": "Mathematics", "sub_field": "Pure mathematics", "field": "Natural sciences"},
    "subjects_convert": {"discipline": "Mathematics",
                         "subjects_text": "1. Calculus (undergraduate): limits, derivatives, integrals\n"
                                          "2. Linear Algebra (undergraduate): vectors, matrices"},
    "syllabus": {"subject_name": "Calculus", "level": "undergraduate", "subtopics": ["limits", "derivatives"],
                 "discipline": "Mathematics"},
    "syllabus_extract": {"subject_name": "Calculus",
                         "syllabus_text": "Session 1: Limits. Key concepts: epsilon-delta, continuity."},
    "question": {"subject_name": "Calculus", "level": "undergraduate",
                 "syllabus_text": "Session 1: Limits.\nSession 2: Derivatives.",
                 "concepts": ["continuity", "chain rule"], "session_names": ["Limits", "Derivatives"],
                 "learned_up_to": 1, "learned_up_to_name": "Derivatives"},
    "answer": {"question": "What is the derivative of x^2?", "system_prompt": ""},
    "repair": {"output": "{\"subjects\": [", "error": "unexpected end of JSON",
               "schema": json.dumps({"type": "object"})},
    "taxonomy_propose": {"instruction": "List all fields of human knowledge.", "fields": ["Mathematics"],
                         "max_fields": 8, "max_sub_fields": 10, "max_disciplines": 12},
}


def rendered(name: str) -> str:
    messages = load_prompt(name).render(**VARIABLES[name])
    return "".join(f"--- {m['role']}\n{m['content']}\n" for m in messages)


def test_every_production_prompt_has_a_snapshot_case():
    assert sorted(p.stem for p in PROMPTS.glob("*.j2")) == sorted(VARIABLES)


def test_every_declared_call_sends_the_variables_its_snapshot_uses():
    cfg = load_config()
    for stage in stages():
        for call in stage.calls:
            constants = set(call.constants(cfg) if call.constants else ())
            assert set(VARIABLES[call.prompt]) == set(call.inputs) | constants, call.prompt


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_prompt_renders_as_its_snapshot(name):
    path = SNAPSHOTS / f"{name}.txt"
    text = rendered(name)
    if os.environ.get("GLAN_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert path.exists(), f"no snapshot for {name}: run with GLAN_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text()
