"""The slice of the taxonomy a run works on: --disciplines, else taxonomy.disciplines, else all."""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.config.loader import GlanConfig
from jobs.glan.taxonomy import load_taxonomy
from jobs.storage.delta import get_storage


def selected_disciplines(spark, cfg: GlanConfig, disciplines: Sequence[str] | None) -> DataFrame:
    """The `taxonomy` rows this run works on: --disciplines, else taxonomy.disciplines, else all."""
    taxonomy = get_storage(spark, cfg).read_or_empty("taxonomy")
    names = list(disciplines or cfg.taxonomy.disciplines)
    if not names:
        return taxonomy
    ids = [row.discipline_id for row in load_taxonomy(cfg.taxonomy.path()).select(names).disciplines()]
    return taxonomy.filter(F.col("discipline_id").isin(ids))


def split_names(text: str | None) -> list[str] | None:
    """`--disciplines "A,B"` as a list of names (None when not given)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None
