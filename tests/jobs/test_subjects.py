"""GLAN step 2's merge of the samples into subjects (no LLM): pure DataFrame logic."""

from __future__ import annotations

import json

from jobs.subjects import build_subjects


def conversion(spark, rows):
    return spark.createDataFrame(
        [("d1", index, json.dumps({"subjects": subjects})) for index, subjects in rows],
        "discipline_id string, sample_index int, subjects_json string")


def test_a_subject_named_by_several_samples_keeps_the_first_samples_own_subtopics_and_level(spark):
    frame = conversion(spark, [
        (1, [{"subject_name": "Calculus", "level": "graduate", "subtopics": ["series", "limits"]}]),
        (0, [{"subject_name": "Algebra", "level": "intro", "subtopics": ["groups"]},
             {"subject_name": " calculus ", "level": "undergraduate", "subtopics": ["limits", "derivatives"]}]),
        (2, [{"subject_name": "CALCULUS", "level": "intro", "subtopics": None}]),
    ])
    subjects = {r["subject_name"].lower(): r for r in build_subjects(frame).collect()}
    calculus = subjects["calculus"]
    assert calculus["subject_name"] == "calculus"              # sample 0's own spelling, trimmed
    assert calculus["level"] == "undergraduate"                # sample 0's level, not the most common
    assert calculus["subtopics"] == ["limits", "derivatives"]  # in its order, no union of the others
    assert (calculus["num_samples"], calculus["sample_indices"]) == (3, [0, 1, 2])
    assert subjects["algebra"]["num_samples"] == 1 and len(subjects) == 2
