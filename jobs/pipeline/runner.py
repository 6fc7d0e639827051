"""`glan run`: the declared stages (jobs/pipeline/stage.py) in order, each resumable (input keys
minus output keys), and each stage's own spark-submit entry point."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace

from jobs.cli.args import add_config_args, config_from_args
from jobs.cli.guard import run_guarded
from jobs.config.loader import GlanConfig
from jobs.errors import EXIT_FAILED_CALLS, EXIT_OK
from jobs.pipeline.costs import stage_plan, usage_by_stage
from jobs.pipeline.prices import Budget, load_prices, spent_usd
from jobs.pipeline.progress import Progress, ProgressLine
from jobs.pipeline.slices import split_names
from jobs.pipeline.stage import Stage, StageContext, select
from jobs.pipeline.stage import stages as all_stages
from jobs.spark.cluster import check_executors
from jobs.spark.session import get_spark
from udfs.servers.embedded import embedded_endpoint

log = logging.getLogger(__name__)


def run_pipeline(cfg: GlanConfig, stages: Sequence[str] | None = None, disciplines: Sequence[str] | None = None,
                 *, declared: Sequence[Stage] | None = None) -> int:
    """Run `stages` (names; default all) of `declared` (default: every stage in jobs/) over the
    slice `disciplines`. Returns the exit code: EXIT_FAILED_CALLS when more LLM calls failed than
    pipeline.max_failed_share allows."""
    chosen = select(all_stages() if declared is None else declared, stages)
    for stage in chosen:
        if stage.check is not None:
            stage.check(cfg)
    spark = get_spark("glan-run", master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                      run_root=cfg.run_root, extra_conf=cfg.spark.conf)
    check_executors(spark, cfg, chosen)  # on a cluster: the run root, the endpoint and the key, seen from the executors
    started = time.monotonic()
    failed: dict[str, int] = {}
    asked = 0
    budget = _budget(spark, cfg, chosen)
    with ExitStack() as stack:
        cfg = _start_endpoint(stack, cfg, chosen)
        for stage in chosen:
            figures = _run_stage(StageContext(stage.name, spark, cfg, disciplines, Progress(), budget), stage)
            calls = sum(v for k, v in figures.items() if k.endswith("_failed"))
            asked += sum(v for k, v in figures.items() if k.endswith("_todo"))
            if calls:
                failed[stage.name] = calls
            if _in_flight(stage, figures, chosen):
                break
    print(f"pipeline finished in {time.monotonic() - started:.1f}s; tables under {cfg.table_uri('')}",
          file=sys.stderr)
    last = chosen[-1].final_table if chosen else "taxonomy"
    print(f"query them with:  glan sql \"SELECT * FROM {last} LIMIT 5\""
          + "".join(f" --conf {s}" for s in cfg.sources if not s.startswith(("conf/base.yaml", "--set"))),
          file=sys.stderr)
    return _failed_calls_verdict(cfg, failed, asked)


def _budget(spark, cfg: GlanConfig, chosen: Sequence[Stage]) -> Budget:
    """The run's spending guard: what the run root has spent so far (`glan cost`), and the limit."""
    prices, assumptions = load_prices()
    needed = cfg.pipeline.max_usd is not None and any(stage.uses_llm for stage in chosen)
    return Budget(cfg.pipeline.max_usd, spent_usd(usage_by_stage(spark, cfg), prices) if needed else 0.0,
                  prices, assumptions)


def _check_plan(ctx: StageContext, stage: Stage) -> None:
    """Before an LLM stage asks anything: say how many calls it will make and what they cost, and
    stop it here if that would pass pipeline.max_usd."""
    budget = ctx.budget
    plan = stage_plan(ctx, stage, budget.prices, budget.assumptions)
    calls = sum(row["calls"] for row in plan)
    cost = sum(row["usd"] or 0.0 for row in plan)
    # Without a limit the run root's spend is not read (it costs a pass over every LLM table).
    limit = ("no spending limit" if budget.limit_usd is None
             else f"spent so far ${budget.spent_usd:,.2f} (pipeline.max_usd {budget.limit_usd:g})")
    print(f"[{stage.name}] to ask: {calls:,} call(s) ("
          + ", ".join(f"{row['call']} {row['calls']:,}" for row in plan)
          + f"), about ${cost:,.2f} at conf/prices.yaml; {limit}",
          file=sys.stderr, flush=True)
    budget.check_start(stage.name, plan)


def _run_stage(ctx: StageContext, stage: Stage) -> dict:
    t0 = time.monotonic()
    print(f"[{stage.name}] running", file=sys.stderr, flush=True)
    if stage.uses_llm and ctx.budget is not None:
        _check_plan(ctx, stage)
    with ProgressLine(ctx.spark, stage.name, ctx.progress):
        figures = stage.run(ctx) or {}
    summary = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"[{stage.name}] done in {time.monotonic() - t0:.1f}s{': ' + summary if summary else ''}",
          file=sys.stderr, flush=True)
    return figures


def _in_flight(stage: Stage, figures: dict, chosen: Sequence[Stage]) -> bool:
    """True when the stage left requests in the provider's batches (batch mode): the stages after
    it would work on part of its output, so the run ends here; a rerun collects the batches."""
    requests = sum(v for k, v in figures.items() if k.endswith("_in_flight"))
    if not requests:
        return False
    later = [s.name for s in chosen[chosen.index(stage) + 1:]]
    print(f"[{stage.name}] {requests:,} request(s) are in the provider's batches (glan status shows them; "
          f"glan sql \"SELECT * FROM llm_batches WHERE state != 'collected'\"); run glan run again to collect "
          f"them{' and go on with ' + ', '.join(later) if later else ''} (llm.batch.wait_s sets how long a run waits)",
          file=sys.stderr, flush=True)
    return True


def _failed_calls_verdict(cfg: GlanConfig, failed: dict[str, int], asked: int) -> int:
    if not failed:
        return EXIT_OK
    where = ", ".join(f"{stage} {n}" for stage, n in failed.items())
    share = sum(failed.values()) / max(asked, 1)
    over = share > cfg.pipeline.max_failed_share
    print(f"glan: {'error: ' if over else ''}{sum(failed.values())} of {asked} LLM call(s) failed ({where}); they "
          "are in the failures table (glan sql \"SELECT stage, error_class, count(*) FROM failures GROUP BY 1, 2\") "
          "and the next run asks only for them"
          + (f" (exit {EXIT_FAILED_CALLS})" if over else
             f" (within pipeline.max_failed_share={cfg.pipeline.max_failed_share:g}: exit 0)"), file=sys.stderr)
    return EXIT_FAILED_CALLS if over else EXIT_OK


def _start_endpoint(stack: ExitStack, cfg: GlanConfig, chosen: Sequence[Stage]) -> GlanConfig:
    """For `llm.endpoint: embedded`, start the local llama.cpp server(s) for the whole run; they
    stop when the run ends, also on Ctrl-C or an error."""
    if not any(stage.uses_llm for stage in chosen) or cfg.llm.endpoint != "embedded":
        return cfg
    endpoint = stack.enter_context(embedded_endpoint(cfg.llm.embedded))
    print(f"embedded endpoint: SmolLM2 on {', '.join(endpoint.base_urls)}", file=sys.stderr, flush=True)
    return replace(cfg, llm=replace(cfg.llm, base_url=endpoint.base_url, base_urls=tuple(endpoint.base_urls)))


def stage_main(stage: Stage, argv: list[str] | None = None) -> int:
    """The spark-submit entry point of one stage: `jobs/<stage>.py --conf ... [--disciplines ...]`."""
    parser = add_config_args(argparse.ArgumentParser(prog=f"jobs/{stage.name}.py"))
    parser.add_argument("--disciplines", help='limit to these disciplines, e.g. "Mathematics,Physics"')
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        return run_pipeline(config_from_args(args), stages=[stage.name], disciplines=split_names(args.disciplines),
                            declared=[stage])

    return run_guarded(run)
