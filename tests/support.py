"""What many test modules share: where the repository and the shared benchmark data are, the test
prompts, and the structured-output schema the LLM tests ask for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLAN_SHARED", REPO.parent / "shared"))
TEST_PROMPTS = REPO / "tests" / "prompts_llm"  # prompts the LLM-layer tests call, beside the product's


def items_schema(min_items: int, max_items: int, *, closed: bool = False) -> dict[str, Any]:
    """A JSON schema of `{"items": [strings]}` with min_items..max_items strings (`closed`: no other
    keys allowed)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"},
                                 "minItems": min_items, "maxItems": max_items}},
        "required": ["items"],
    }
    if closed:
        schema["additionalProperties"] = False
    return schema
