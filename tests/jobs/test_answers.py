"""GLAN step 5's prompt: the question alone, as the paper sends it."""

from __future__ import annotations

from jobs.config.loader import load_config
from udfs.llm.prompts import load_prompt

QUESTION = "A ball is thrown straight up at 12 m/s. How long until it returns to the thrower's hand?"


def test_the_answer_prompt_is_the_question_alone_by_default():
    cfg = load_config([], [])
    assert cfg.answers.system_prompt is None
    messages = load_prompt("answer").render(question=QUESTION, system_prompt=cfg.answers.system_prompt or "")
    assert messages == [{"role": "user", "content": QUESTION}]


def test_a_system_prompt_is_sent_only_when_set():
    cfg = load_config([], ["answers.system_prompt=Show your reasoning step by step."])
    messages = load_prompt("answer").render(question=QUESTION, system_prompt=cfg.answers.system_prompt)
    assert messages == [{"role": "system", "content": "Show your reasoning step by step."},
                        {"role": "user", "content": QUESTION}]
