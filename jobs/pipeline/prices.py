"""Prices (`conf/prices.yaml`), what calls cost at them, and the spending guard of a run
(`pipeline.max_usd`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from jobs.config.files import find_conf_file
from jobs.errors import BudgetError, ConfigError


@dataclass(frozen=True)
class Price:
    """USD per million tokens; `batch`: the provider's Batch API prices, when it has them."""

    input: float
    cached_input: float
    output: float
    batch: Price | None = None

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        return ((prompt - cached) * self.input + cached * self.cached_input + completion * self.output) / 1e6

    def at(self, billing: str | None) -> Price:
        """The prices of tokens billed `billing` (online | batch; None: online): the batch prices where
        the model has them, else the online ones (a provider without a Batch API bills online)."""
        return self.batch if billing == "batch" and self.batch is not None else self


def load_prices(path: str = "prices.yaml") -> tuple[dict[str, Price], dict[str, Any]]:
    source = find_conf_file(path)
    data = yaml.safe_load(source.read_text()) or {}
    prices = {}
    for model, values in (data.get("models") or {}).items():
        try:
            batch = None
            if "batch_input" in values or "batch_output" in values:
                batch = Price(float(values["batch_input"]),
                              float(values.get("batch_cached_input", values["batch_input"])),
                              float(values["batch_output"]))
            prices[model] = Price(float(values["input"]), float(values.get("cached_input", values["input"])),
                                  float(values["output"]), batch)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: models.{model} needs numbers input, output (and cached_input; batch_input "
                              "and batch_output together)") from None
    return prices, data.get("estimate") or {}


def price_for(prices: dict[str, Price], model: str | None) -> Price | None:
    """Exact name first, then the longest configured name the model starts with
    (`gpt-4o-2024-08-06` is priced as `gpt-4o`)."""
    if model is None:
        return None
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


def priced(rows: list[dict[str, Any]], prices: dict[str, Price]) -> list[dict[str, Any]]:
    """Usage rows (`usage_by_stage`) with `usd`, what their tokens cost at the price they were billed
    at (`billing`: online | batch; missing or None: online), and `usd_online`, the same tokens at
    online prices (the saving is the difference). Both None when the model has no price."""
    out = []
    for row in rows:
        billing = row.get("billing") or "online"
        price = price_for(prices, row["model"])
        tokens = (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"])
        billed = price.at(billing).cost(*tokens) if price else None
        online = price.cost(*tokens) if price else None
        out.append({**row, "billing": billing, "usd": _rounded(billed, 4), "usd_online": _rounded(online, 4)})
    return out


def planned_cost(call: str, model: str, calls: int, assumptions: dict[str, Any],
                 prices: dict[str, Price], mode: str = "online") -> dict[str, Any]:
    """Tokens and money of `calls` calls of prompt `call` on `model` in `mode` (online | batch), at
    the assumed tokens per call (conf/prices.yaml `estimate:`): `usd` at the mode's prices (online
    where the model has no batch prices), `usd_online` online, `usd_batch` at the model's Batch API
    prices (None when it has none). All None when the model has no price."""
    per_call = (assumptions.get("tokens") or {}).get(call) or {"prompt": 0, "completion": 0}
    prompt = calls * int(per_call.get("prompt", 0))
    completion = calls * int(per_call.get("completion", 0))
    cached = int(prompt * float((assumptions.get("cached_share") or {}).get(call, 0.0)))
    price = price_for(prices, model)
    cost = price.at(mode).cost(prompt, cached, completion) if price else None
    online = price.cost(prompt, cached, completion) if price else None
    batch = price.batch.cost(prompt, cached, completion) if price and price.batch else None
    return {"call": call, "model": model, "mode": mode, "calls": calls, "prompt_tokens": prompt,
            "cached_tokens": cached, "completion_tokens": completion, "usd": _rounded(cost, 2),
            "usd_online": _rounded(online, 2), "usd_batch": _rounded(batch, 2)}


def _rounded(usd: float | None, digits: int) -> float | None:
    return None if usd is None else round(usd, digits)


def spent_usd(usage: Sequence[dict[str, Any]], prices: dict[str, Price]) -> float:
    """What recorded usage rows (`usage_by_stage`) cost at the prices they were billed at; models
    without a price count nothing."""
    return math.fsum(row["usd"] or 0.0 for row in priced(list(usage), prices))


class Budget:
    """The spending guard of a run (`pipeline.max_usd`): what the run root had spent when the run
    started, plus what this run's calls have cost so far, priced with conf/prices.yaml. A stage
    does not start when its estimate would take the total past the limit; a running LLM step stops
    asking once the total reaches it."""

    def __init__(self, limit_usd: float | None, spent_usd: float, prices: dict[str, Price],
                 assumptions: dict[str, Any]) -> None:
        self.limit_usd, self.spent_usd = limit_usd, spent_usd
        self.prices, self.assumptions = prices, assumptions

    def charge(self, model: str | None, prompt: int, cached: int, completion: int,
               billing: str | None = "online") -> None:
        """Add what calls cost at the price they were billed at (online | batch; None: online)."""
        price = price_for(self.prices, model)
        if price is not None:
            self.spent_usd += price.at(billing).cost(prompt, cached, completion)

    def check_start(self, stage: str, planned: Sequence[dict[str, Any]]) -> None:
        """Raise BudgetError when the stage's planned calls would take the spend past the limit."""
        cost = math.fsum(row["usd"] or 0.0 for row in planned)
        calls = sum(row["calls"] for row in planned)
        if self.limit_usd is None or not calls or self.spent_usd + cost <= self.limit_usd:
            return
        raise BudgetError(
            f"stage {stage} would make {calls:,} LLM call(s) estimated at ${cost:,.2f} (conf/prices.yaml), "
            f"with ${self.spent_usd:,.2f} already spent under this run root: past pipeline.max_usd="
            f"{self.limit_usd:g}; nothing was asked. Raise it with --set pipeline.max_usd="
            f"{_raised(self.spent_usd + cost)} (null: no limit)")

    def check_running(self, stage: str) -> None:
        """Raise BudgetError once the recorded spend has reached the limit (after a commit)."""
        if self.limit_usd is not None and self.spent_usd >= self.limit_usd:
            raise BudgetError(
                f"stage {stage}: ${self.spent_usd:,.2f} spent under this run root reached pipeline.max_usd="
                f"{self.limit_usd:g}; what was answered is committed and the next run asks for the rest. "
                f"Raise it with --set pipeline.max_usd=... (null: no limit)")


def _raised(needed: float) -> str:
    """A round limit above `needed`: 1, 2 or 5 times a power of ten."""
    magnitude = 10 ** math.floor(math.log10(max(needed, 1.0)))
    return f"{next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= needed):g}"
