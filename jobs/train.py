"""Fine-tune a causal LM on a GLAN export with DeepSpeed (the paper's step 7).

Reads `manifest.json` of `glan export` (a local folder or any URI pyarrow reads), tokenises question
and answer separately and joins them (labels -100 on the prompt: loss on answer tokens only). The
ranks share that work: each tokenises its share of the shards (checksums verified) into flat arrays
under OUTPUT/tokenized/, and every rank memory-maps all of them, so a node holds one copy of the
tokens and a resumed run does not tokenise again (jobs/training/tokenized.py). Micro-batches are
packed to a token budget (sequences x longest <= --micro-batch-tokens); gradients accumulate to
about --pairs-per-step pairs per optimizer step, and each step's loss is the mean over all of its
answer tokens (on every rank and micro-batch), not a mean of micro-batch means. A linear warm-up +
cosine schedule runs to a final lr of 0. Every --eval-every-steps and at the end, the same token-mean
loss is measured on the held-out test split (GLAN-Test) and recorded as `eval_loss` in
OUTPUT/metrics.jsonl. DeepSpeed checkpoints are saved for --resume and, at the end, a Hugging Face
checkpoint (config, safetensors, tokenizer) in OUTPUT/hf that `AutoModelForCausalLM.from_pretrained`
reloads. Defaults come from the `train:` section of the config (the paper's values); flags override
them.

Launch (single node, 8 GPUs):
    deepspeed --num_gpus 8 jobs/train.py --export runs/export --model mistralai/Mistral-7B-v0.1 \
        --output runs/train --deepspeed-config conf/deepspeed/zero3_bf16.json
    torchrun --standalone --nproc_per_node 8 jobs/train.py --export runs/export \
        --model mistralai/Mistral-7B-v0.1 --output runs/train --deepspeed-config conf/deepspeed/zero3_bf16.json

Multi node (4 nodes x 8 GPUs; run the torchrun line on every node with its --node_rank):
    deepspeed --hostfile hostfile --num_nodes 4 --num_gpus 8 --master_addr node0 --master_port 29500 \
        jobs/train.py --export s3://bucket/export --model mistralai/Mistral-7B-v0.1 --output /shared/train \
        --deepspeed-config conf/deepspeed/zero3_bf16.json
    torchrun --nnodes 4 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr node0 --master_port 29500 \
        jobs/train.py --export s3://bucket/export --model mistralai/Mistral-7B-v0.1 --output /shared/train \
        --deepspeed-config conf/deepspeed/zero3_bf16.json
    (`hostfile` lines: `node0 slots=8`. --output must be a filesystem every node sees.)

Resume after a stop: the same command plus `--resume` (latest checkpoint in OUTPUT/checkpoints) or
`--resume DIR`.

CPU, one process (tests and laptops; fp32, DeepSpeed's CPU accelerator, gloo):
    OMP_NUM_THREADS=1 python jobs/train.py --export runs/export --model DIR --output runs/train \
        --deepspeed-config conf/deepspeed/cpu_fp32.json --warmup-steps 10 --max-steps 100
    A plain `python` launch gets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and
    MASTER_PORT=29500 unless they are set, so DeepSpeed does not fall back to MPI discovery.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger("glan.train")

_DIST_DEFAULTS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# ---------------------------------------------------------------------------------------------
# Environment


def set_single_process_defaults() -> None:
    """A plain `python` launch: pretend to be rank 0 of 1 (else DeepSpeed tries MPI discovery)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for key, value in _DIST_DEFAULTS.items():
        os.environ.setdefault(key, value)


def skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory op (minutes) that only inference uses."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward pass (transformers 5 renamed the call)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def resolve_deepspeed_config(name: str) -> Path:
    """A path as given, else the file of that name shipped in the `conf` package."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    from importlib import resources

    packaged = resources.files("conf") / "deepspeed" / Path(name).name
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(f"DeepSpeed config not found: {name}")


def build_deepspeed_config(base: dict[str, Any], *, lr: float, weight_decay: float, max_grad_norm: float,
                           accumulation: int, world_size: int, bf16: bool) -> dict[str, Any]:
    """Fill in what depends on the run. DeepSpeed does not understand HF's "auto" values, so any
    left in the file are an error rather than a silent default."""
    cfg = json.loads(json.dumps(base))
    cfg["train_micro_batch_size_per_gpu"] = 1           # one packed batch is one micro-batch
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = accumulation * world_size
    cfg["gradient_clipping"] = max_grad_norm
    optimizer = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update(lr=lr, weight_decay=weight_decay)
    optimizer["params"].setdefault("torch_adam", True)  # else DeepSpeed JIT-compiles its own Adam
    cfg.pop("scheduler", None)                           # the job passes its own schedule
    cfg.pop("fp16", None)
    cfg["bf16"] = {"enabled": bool(bf16)}
    leftover = [key for key, value in _walk(cfg) if value == "auto"]
    if leftover:
        raise ValueError(f"DeepSpeed config has 'auto' values, which DeepSpeed cannot resolve: {leftover}")
    return cfg


def _walk(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [item for k, v in data.items() for item in _walk(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), data)]


# ---------------------------------------------------------------------------------------------
# Data


def load_manifest(export: str) -> tuple[dict[str, Any], str]:
    """The export's manifest and its folder; `export` is a folder or its manifest.json, a local
    path or any URI pyarrow reads (s3://, gs://, abfs://, hdfs://, dbfs:/)."""
    from jobs.spark.session import arrow_filesystem

    export = export.rstrip("/")
    root = export[: -len("/manifest.json")] if export.endswith("/manifest.json") else export
    filesystem, path = arrow_filesystem(f"{root}/manifest.json")
    try:
        with filesystem.open_input_stream(path) as source:
            return json.loads(source.readall()), root
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest.json in {export}; run `glan export` first") from None


# ---------------------------------------------------------------------------------------------
# Resuming

PLAN_FILE = "glan_plan.json"  # next to each DeepSpeed checkpoint: what its micro-step counts refer to


def check_resumable(resume_dir: Path, plan: dict[str, Any]) -> None:
    """Stop before the model loads if the checkpoint was trained under another batch plan: its
    micro-step count would then point at other batches, repeating or skipping examples."""
    latest = resume_dir / "latest"
    if not latest.is_file():
        raise SystemExit(f"jobs/train.py: no DeepSpeed checkpoint to resume from in {resume_dir}")
    saved_path = resume_dir / latest.read_text().strip() / PLAN_FILE
    if not saved_path.is_file():
        log.warning("%s has no %s; cannot check that it was trained with this batch plan", saved_path.parent,
                    PLAN_FILE)
        return
    saved = json.loads(saved_path.read_text())
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in plan.items() if saved.get(key) != value]
    if changed:
        raise SystemExit(f"jobs/train.py: cannot resume from {saved_path.parent}: it was trained with "
                         f"{', '.join(changed)}, so its step count would point at other batches; resume with "
                         "the same settings or start a new --output")


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from jobs.cli.args import add_config_args

    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--export", required=True, help="export directory (or its manifest.json)")
    parser.add_argument("--output", required=True, help="checkpoints, metrics.jsonl and the final hf/ model")
    parser.add_argument("--model", help="HF model id or directory (train.model)")
    parser.add_argument("--tokenizer", help="tokenizer id or directory; default: the model's")
    parser.add_argument("--deepspeed-config", dest="deepspeed_config", help="train.deepspeed_config")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--final-lr", dest="final_lr", type=float)
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    parser.add_argument("--weight-decay", dest="weight_decay", type=float)
    parser.add_argument("--max-grad-norm", dest="max_grad_norm", type=float)
    parser.add_argument("--pairs-per-step", dest="pairs_per_step", type=int)
    parser.add_argument("--micro-batch-tokens", dest="micro_batch_tokens", type=int)
    parser.add_argument("--max-seq-len", dest="max_seq_len", type=int)
    parser.add_argument("--gradient-checkpointing", dest="gradient_checkpointing",
                        action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--save-every-steps", dest="save_every_steps", type=int)
    parser.add_argument("--eval-every-steps", dest="eval_every_steps", type=int)
    parser.add_argument("--log-every-steps", dest="log_every_steps", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from OUTPUT/checkpoints (or the DeepSpeed checkpoint DIR given)")
    parser.add_argument("--no-verify", action="store_true", help="skip the shard sha256 check")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK wins
    return parser.parse_args(argv)


_TRAIN_FLAGS = ("model", "deepspeed_config", "epochs", "lr", "final_lr", "warmup_steps", "weight_decay",
                "max_grad_norm", "pairs_per_step", "micro_batch_tokens", "max_seq_len",
                "gradient_checkpointing", "bf16", "seed", "save_every_steps", "eval_every_steps",
                "log_every_steps")


def train_config(args: argparse.Namespace):
    """The `train:` section with every flag given on the command line applied over it."""
    from jobs.cli.args import config_from_args

    cfg = config_from_args(args)
    overrides = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    try:
        return cfg, dataclasses.replace(cfg.train, **overrides)
    except ValueError as exc:
        raise SystemExit(f"jobs/train.py: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The job


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg, tcfg = train_config(args)
    if not tcfg.model:
        raise SystemExit("jobs/train.py: no model; pass --model or set train.model")
    set_single_process_defaults()

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.training import recipe as training
    from jobs.training.tokenized import prepare_split

    on_gpu = get_accelerator().device_name() != "cpu"
    if not on_gpu:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        get_accelerator().set_device(local_rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    use_bf16 = tcfg.bf16 and on_gpu  # CPU trains in fp32
    torch.manual_seed(tcfg.seed)
    output = Path(args.output)
    checkpoints = output / "checkpoints"
    started = time.monotonic()

    # Phase 1: data and plan. The ranks tokenise the shards between them into a shared cache;
    # then every rank computes the same plan from the same lengths, so nothing else is exchanged.
    try:
        manifest, root = load_manifest(args.export)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or tcfg.model)
        system_prompt = (manifest.get("config", {}).get("export") or {}).get("system_prompt")
        prepare = partial(prepare_split, manifest, root, tokenizer=tokenizer, max_len=tcfg.max_seq_len,
                          system_prompt=system_prompt, cache_root=output / "tokenized", rank=rank,
                          world_size=world_size, barrier=dist.barrier, verify=not args.no_verify)
        data, heldout = prepare(split="train"), prepare(split="test")
    except (OSError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"jobs/train.py: {exc}") from None
    lengths, label_counts = data.lengths, data.label_counts()
    plan_for = partial(training.pack_batches, lengths, tcfg.micro_batch_tokens, seed=tcfg.seed,
                       world_size=world_size)
    first_plan = plan_for(epoch=0)
    first = training.plan_summary(first_plan, lengths)
    accumulation = training.gradient_accumulation_steps(tcfg.pairs_per_step, first["mean_pairs_per_batch"],
                                                        world_size)
    epoch_tokens = [training.batch_label_tokens(first_plan, label_counts)]
    del first_plan
    epoch_tokens += [training.batch_label_tokens(plan_for(epoch=e), label_counts) for e in range(1, tcfg.epochs)]
    total_steps = training.total_optimizer_steps([t.shape[1] for t in epoch_tokens], accumulation)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    if total_steps < 1:
        raise SystemExit(f"jobs/train.py: {len(data)} pairs give no optimizer step with "
                         f"{accumulation} micro-batches per step; lower --pairs-per-step")
    step_tokens = training.step_label_tokens(epoch_tokens, accumulation, total_steps)
    del epoch_tokens
    if tcfg.warmup_steps >= total_steps:
        log.warning("warm-up (%d steps) is not shorter than the run (%d steps)", tcfg.warmup_steps, total_steps)
    # What the micro-step count of a checkpoint means; a resume must find the same.
    plan_identity = {"world_size": world_size, "accumulation": accumulation, "seed": tcfg.seed,
                     "micro_batch_tokens": tcfg.micro_batch_tokens, "data": data.directory.name}
    resume_dir = None
    if args.resume:
        resume_dir = checkpoints if args.resume == "latest" else Path(args.resume)
        check_resumable(resume_dir, plan_identity)
    log.info("data: %d pairs, %d ranks, %s; %d micro-batches per step, %d optimizer steps, %.0f answer tokens "
             "per step", len(data), world_size, {k: round(v, 3) for k, v in first.items()}, accumulation,
             total_steps, float(step_tokens.mean()))
    # The held-out split (GLAN-Test) in budget-packed batches, the same number on every rank.
    heldout_batches = (training.pack_batches(heldout.lengths, tcfg.micro_batch_tokens, seed=tcfg.seed, epoch=0,
                                             world_size=world_size)[rank] if len(heldout) else [])
    heldout_counts = heldout.label_counts()

    # Phase 2: model and engine.
    base = json.loads(resolve_deepspeed_config(tcfg.deepspeed_config).read_text())
    ds_config = build_deepspeed_config(base, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                       max_grad_norm=tcfg.max_grad_norm, accumulation=accumulation,
                                       world_size=world_size, bf16=use_bf16)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must stay alive while the model loads: from_pretrained then partitions as it loads.
        ds_hf_config = HfDeepSpeedConfig(ds_config)  # noqa: F841
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(tcfg.model, dtype=dtype)
    if tcfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    schedule = partial(training.lr_factor, total_steps=total_steps, warmup_steps=tcfg.warmup_steps,
                       final_ratio=tcfg.final_lr / tcfg.lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )

    start_micro = 0
    if resume_dir is not None:
        load_path, client_state = engine.load_checkpoint(str(resume_dir))
        if load_path is None:
            raise SystemExit(f"jobs/train.py: no DeepSpeed checkpoint to resume from in {resume_dir}")
        start_micro = int(client_state["micro_step"])
        log.info("resumed from %s at optimizer step %d", load_path, start_micro // accumulation)

    # Phase 3: the loop. Micro-batches run back to back across epochs.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    metrics_path = output / "metrics.jsonl"
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)

    def tensors(examples: Any, indices: list[int]) -> dict[str, Any]:
        padded = training.pad_batch([examples.example(i) for i in indices], pad_id)
        return {key: torch.tensor(value, device=engine.device) for key, value in padded.items()}

    def evaluate() -> float | None:
        """Mean loss over every answer token of the held-out split (all ranks take part)."""
        if not len(heldout):
            return None
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
        with torch.no_grad():
            for indices in heldout_batches:
                summed = engine(**tensors(heldout, indices), num_items_in_batch=1.0).loss  # a sum
                totals += torch.stack([summed.double(), totals.new_tensor(float(heldout_counts[indices].sum()))])
        dist.all_reduce(totals)
        engine.train()
        return float(totals[0] / totals[1].clamp(min=1.0))

    def save(step: int) -> None:
        engine.save_checkpoint(str(checkpoints), tag=f"step-{step}", client_state={"micro_step": micro})
        if rank == 0:
            (checkpoints / f"step-{step}" / PLAN_FILE).write_text(json.dumps({**plan_identity, "micro_step": micro}))

    micro, window_loss, window_tokens, last_saved, eval_loss = 0, None, 0, -1, None
    step_started = time.monotonic()
    engine.train()
    for epoch in range(tcfg.epochs):
        if micro >= total_steps * accumulation:
            break
        batches = plan_for(epoch=epoch)[rank]
        for indices in batches:
            if micro >= total_steps * accumulation:
                break
            if micro < start_micro:
                micro += 1
                continue
            batch = tensors(data, indices)
            # Summed token loss over a share of the step's answer tokens: the step's gradient is
            # that of the mean over all of its answer tokens, on every rank and micro-batch.
            divisor = training.loss_divisor(step_tokens[micro // accumulation], accumulation, world_size)
            loss = engine(**batch, num_items_in_batch=divisor).loss
            engine.backward(loss)
            lr_used = scheduler.get_last_lr()[0]  # the lr of the update engine.step() may apply now
            engine.step()
            micro += 1
            # Kept on the device until the step ends: no host sync per micro-batch.
            window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()
            window_tokens += int(lengths[indices].sum())
            if micro % accumulation:
                continue
            step = micro // accumulation
            summary = torch.stack([window_loss.float() / accumulation,
                                   torch.tensor(float(window_tokens), device=window_loss.device)])
            dist.all_reduce(summary)
            window_loss, window_tokens = None, 0
            elapsed = time.monotonic() - step_started  # the step's own time, without the evaluation
            evaluated = step == total_steps or (tcfg.eval_every_steps and step % tcfg.eval_every_steps == 0)
            if evaluated:
                eval_loss = evaluate()
            if rank == 0:
                record = {"step": step, "epoch": epoch, "loss": summary[0].item() / world_size,
                          "lr": lr_used, "tokens": int(summary[1].item()),
                          "answer_tokens": int(step_tokens[step - 1]),
                          "tokens_per_s": summary[1].item() / max(elapsed, 1e-9)}
                if evaluated and eval_loss is not None:
                    record["eval_loss"] = eval_loss
                with metrics_path.open("a") as out:
                    out.write(json.dumps(record) + "\n")
                if step % tcfg.log_every_steps == 0 or step == total_steps:
                    log.info("step %d/%d epoch %d loss %.4f lr %.3g tokens/s %.0f", step, total_steps, epoch,
                             record["loss"], record["lr"], record["tokens_per_s"])
                if "eval_loss" in record:
                    log.info("step %d: held-out loss %.4f over %d pairs", step, eval_loss, len(heldout))
            step_started = time.monotonic()
            if tcfg.save_every_steps and step % tcfg.save_every_steps == 0:
                save(step)
                last_saved = step

    final_step = micro // accumulation
    if final_step != last_saved and final_step > start_micro // accumulation:
        save(final_step)
    save_hf_checkpoint(engine, tokenizer, output / "hf", zero3=zero3, rank=rank)
    dist.barrier()
    result = {"steps": final_step, "total_steps": total_steps, "accumulation": accumulation,
              "world_size": world_size, "eval_loss": eval_loss, "seconds": time.monotonic() - started}
    log.info("done: %s", result)
    return result


def save_hf_checkpoint(engine: Any, tokenizer: Any, directory: Path, *, zero3: bool, rank: int) -> None:
    """config.json, model.safetensors and the tokenizer, loadable with from_pretrained."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None  # all ranks take part
    if rank != 0:
        return
    model = engine.module
    model.config.use_cache = True
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model.save_pretrained(directory, state_dict=state_dict)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    log.info("saved Hugging Face checkpoint to %s", directory)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/train.py` from a checkout
    main()
