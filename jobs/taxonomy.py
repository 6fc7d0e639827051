"""GLAN step 1: the taxonomy. Reads `taxonomy.file` (conf/taxonomy.yaml), writes table `taxonomy`.

Run:   spark-submit jobs/taxonomy.py --conf conf/local.yaml
Also:  glan taxonomy validate [--file F]
       glan taxonomy propose --out review.yaml     (the LLM proposes nodes; a human marks keep/remove)
       glan taxonomy apply review1.yaml [review2.yaml ...] [--out conf/taxonomy.yaml]   (majority vote)
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from jobs.cli.args import add_config_args, config_from_args
from jobs.config.loader import GlanConfig
from jobs.glan.taxonomy import (
    PROPOSE_PROMPT,
    PROPOSE_SCHEMA,
    Taxonomy,
    apply_reviews,
    dump_taxonomy,
    load_taxonomy,
    propose_taxonomy,
    review_candidates,
    write_review_file,
)
from jobs.pipeline.stage import Stage, StageContext
from jobs.spark.session import get_spark
from jobs.storage.tables import TAXONOMY
from udfs.llm.client import CallSpec, LLMClient, LLMRequest
from udfs.llm.config import StageLLMConfig
from udfs.llm.prompts import load_prompt
from udfs.servers.embedded import embedded_endpoint


def taxonomy_rows(taxonomy: Taxonomy) -> list[tuple]:
    columns = TAXONOMY.schema.fieldNames()
    return [tuple(getattr(row, c) for c in columns) for row in taxonomy.disciplines()]


def run(ctx: StageContext) -> dict:
    """Load and validate the taxonomy file; rewrite the table only when the file changed.

    The table always holds the whole taxonomy: `--disciplines` limits what later stages expand,
    not what the taxonomy is."""
    taxonomy = load_taxonomy(ctx.cfg.taxonomy.path())
    for names in (ctx.disciplines, ctx.cfg.taxonomy.disciplines):
        if names:
            taxonomy.select(names)  # unknown names are an error now, before any LLM call
    rows = taxonomy_rows(taxonomy)
    storage = ctx.storage

    def behind():
        if storage.exists("taxonomy") and {tuple(r) for r in storage.read("taxonomy").collect()} == set(rows):
            return None
        return ctx.spark.createDataFrame(rows, TAXONOMY.schema)

    # Runs started together on a fresh run root both write it; the later one finds it equal.
    written = storage.rebuild("taxonomy", behind)
    return {"disciplines": len(rows), "changed": int(written is not None)}


STAGE = Stage(name="taxonomy", reads=(), writes=("taxonomy",), run=run,
              description="loads `taxonomy.file` (fields > sub-fields > disciplines), validated; no LLM")


def _propose(cfg: GlanConfig, out: Path, field_names: list[str]) -> int:
    stage = StageLLMConfig(model=cfg.subjects.llm.model, temperature=1.0, top_p=0.95, max_tokens=8192)
    spec = CallSpec(prompt=load_prompt(PROPOSE_PROMPT), stage=stage, schema=PROPOSE_SCHEMA,
                    repair_prompt=load_prompt("repair"))
    with ExitStack() as stack:
        if cfg.llm.endpoint == "embedded":
            endpoint = stack.enter_context(embedded_endpoint(cfg.llm.embedded))
            cfg = replace(cfg, llm=replace(cfg.llm, base_url=endpoint.base_url))
        client = stack.enter_context(LLMClient(cfg.llm, base_url=cfg.llm.base_url))
        calls = {"n": 0}

        def call_llm(prompt_text: str, _name: str):
            calls["n"] += 1
            result = client.run(spec, [LLMRequest(messages=[{"role": "user", "content": prompt_text}],
                                                  seed=calls["n"])])[0]
            if result["error_class"]:
                print(f"taxonomy propose: call {calls['n']} failed: {result['error_class']}: "
                      f"{result['error_message']}", file=sys.stderr)
                return None
            return json.loads(result["parsed"])

        candidates = propose_taxonomy(cfg.taxonomy.propose_instructions, call_llm,
                                      proposals_per_instruction=cfg.taxonomy.proposals_per_instruction,
                                      field_names=field_names)
    current = load_taxonomy(cfg.taxonomy.path())
    write_review_file(review_candidates(current, candidates), out)
    print(f"wrote {out}: mark each node keep or remove, then: glan taxonomy apply {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="glan taxonomy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action")
    add_config_args(sub.add_parser("load", help="validate the taxonomy file and write the taxonomy table"))
    validate = add_config_args(sub.add_parser("validate", help="check a taxonomy file; errors name the node path"))
    validate.add_argument("--file", help="taxonomy YAML (default: taxonomy.file)")
    propose = add_config_args(sub.add_parser("propose", help="ask the LLM for candidate nodes; write a review file"))
    propose.add_argument("--out", default="taxonomy_review.yaml")
    propose.add_argument("--fields", default="", help="comma-separated top-level fields to keep proposals under")
    apply = add_config_args(sub.add_parser("apply", help="apply review files (majority vote) to the taxonomy"))
    apply.add_argument("reviews", nargs="+")
    apply.add_argument("--out", help="where to write the new taxonomy (default: print it)")
    # spark-submit jobs/taxonomy.py --conf ...: the stage itself
    if not argv or argv[0].startswith("-"):
        argv = ["load", *argv]
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.action == "validate":
        taxonomy = load_taxonomy(args.file or cfg.taxonomy.path())
        fields = {row.field for row in taxonomy.disciplines()}
        print(f"ok: {len(fields)} fields, {len(taxonomy.disciplines())} disciplines")
        return 0
    if args.action == "propose":
        return _propose(cfg, Path(args.out), [f.strip() for f in args.fields.split(",") if f.strip()])
    if args.action == "apply":
        result = apply_reviews(load_taxonomy(cfg.taxonomy.path()), args.reviews)
        text = dump_taxonomy(result, args.out)
        if args.out:
            print(f"wrote {args.out}: {len(result.disciplines())} disciplines")
        else:
            print(text)
        return 0
    spark = get_spark("glan-taxonomy", master=cfg.spark.master, run_root=cfg.run_root)
    print(json.dumps(run(StageContext("taxonomy", spark, cfg))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
