"""Row keys: deterministic ids from input columns (DESIGN.md, "Keys")."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F


def stable_id(*columns: str | Column, length: int = 16) -> Column:
    """A deterministic id from input columns: the first `length` hex digits of their SHA-256.
    Same inputs, same id, on every run and every machine (DESIGN.md, "Keys")."""
    parts = [F.coalesce((F.col(c) if isinstance(c, str) else c).cast("string"), F.lit("\u2400")) for c in columns]
    return F.substring(F.sha2(F.concat_ws("\u241f", *parts), 256), 1, length)
