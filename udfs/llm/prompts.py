"""Prompt templates: `prompts/<name>.j2`, one file per LLM call.

A template is Jinja2 with `StrictUndefined` (a missing variable is an error, never an empty
string) and gives its chat messages as blocks:

    {# what the call is for and what it must return #}
    {% block system %}You are ...{% endblock %}
    {% block user %}Discipline: {{ discipline }}{% endblock %}

`system` is optional; a template with no `user` block is rendered whole as the user message.
Whitespace at both ends of each message is stripped. The version is a short sha256 of the file's
text, stored on every output row so a changed prompt is visible in the data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

MESSAGE_BLOCKS = ("system", "user")


def _environment() -> jinja2.Environment:
    # No autoescape: prompts are plain text, and HTML-escaping would change what the model reads.
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass(frozen=True)
class Prompt:
    """One call's template. Pickles as its text (the compiled template is rebuilt on first use),
    so it can be read on the driver and shipped to tasks in a UDF closure."""

    name: str
    text: str
    version: str = ""
    _compiled: list = field(default_factory=list, repr=False, compare=False)  # lazy cache, not state

    def __post_init__(self) -> None:
        if not self.version:
            object.__setattr__(self, "version", prompt_version(self.text))
        try:
            template = _environment().from_string(self.text)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"prompt {self.name!r} line {exc.lineno}: {exc.message}") from None
        unknown = set(template.blocks) - set(MESSAGE_BLOCKS)
        if unknown:
            raise ValueError(f"prompt {self.name!r} has unknown blocks {sorted(unknown)}; use {MESSAGE_BLOCKS}")

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "text": self.text, "version": self.version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_compiled", [])

    def _template(self) -> jinja2.Template:
        if not self._compiled:
            self._compiled.append(_environment().from_string(self.text))
        return self._compiled[0]

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages for these variables; raises jinja2.UndefinedError when one is missing."""
        template = self._template()
        if "user" not in template.blocks:
            return [{"role": "user", "content": template.render(**variables).strip()}]
        context = template.new_context(variables)
        messages = []
        for role in MESSAGE_BLOCKS:
            block = template.blocks.get(role)
            if block is not None:
                content = "".join(block(context)).strip()
                if content or role == "user":
                    messages.append({"role": role, "content": content})
        return messages


def prompt_version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def load_prompt(name: str, directory: str | Path | None = None) -> Prompt:
    """Read `prompts/<name>.j2` from the installed package (or from `directory`, for tests)."""
    if directory is not None:
        path = Path(directory) / f"{name}.j2"
        if not path.is_file():
            raise FileNotFoundError(f"prompt template not found: {path}")
        return Prompt(name=name, text=path.read_text(encoding="utf-8"))
    resource = resources.files("prompts") / f"{name}.j2"
    if not resource.is_file():
        raise FileNotFoundError(f"prompt template not found: prompts/{name}.j2")
    return Prompt(name=name, text=resource.read_text(encoding="utf-8"))
