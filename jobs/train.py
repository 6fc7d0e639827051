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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

if not __package__:  # `python jobs/train.py` from a checkout that is not installed: find `jobs` there
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from jobs.cli.args import add_config_args, config_from_args
from jobs.cli.guard import run_guarded
from jobs.config.export import TrainConfig
from jobs.errors import EXIT_OK, ConfigError, GlanError
from jobs.spark.session import arrow_filesystem
from jobs.training import recipe as training
from jobs.training.tokenized import TokenizedSplit, prepare_split

log = logging.getLogger("glan.train")

PROG = "jobs/train.py"  # how this job's one-line errors start

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
        raise GlanError(f"no DeepSpeed checkpoint to resume from in {resume_dir}")
    saved_path = resume_dir / latest.read_text().strip() / PLAN_FILE
    if not saved_path.is_file():
        log.warning("%s has no %s; cannot check that it was trained with this batch plan", saved_path.parent,
                    PLAN_FILE)
        return
    saved = json.loads(saved_path.read_text())
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in plan.items() if saved.get(key) != value]
    if changed:
        raise GlanError(f"cannot resume from {saved_path.parent}: it was trained with {', '.join(changed)}, so "
                        "its step count would point at other batches; resume with the same settings or start a "
                        "new --output")


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
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
    parser.add_argument("--warmup-ratio", dest="warmup_ratio", type=float, help="train.warmup_ratio")
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


_TRAIN_FLAGS = ("model", "deepspeed_config", "epochs", "lr", "final_lr", "warmup_steps", "warmup_ratio", "weight_decay",
                "max_grad_norm", "pairs_per_step", "micro_batch_tokens", "max_seq_len",
                "gradient_checkpointing", "bf16", "seed", "save_every_steps", "eval_every_steps",
                "log_every_steps")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The `train:` section with every flag given on the command line applied over it; a model is
    required."""
    cfg = config_from_args(args)
    overrides = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    try:
        tcfg = dataclasses.replace(cfg.train, **overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not tcfg.model:
        raise ConfigError("no model; pass --model or set train.model")
    return tcfg


# ---------------------------------------------------------------------------------------------
# Start-up: ranks, data, the batch plan, the engine


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int
    world_size: int
    on_gpu: bool
    barrier: Callable[[], None]  # waits for every rank


def init_distributed(seed: int) -> Ranks:
    """Join the process group through DeepSpeed on this rank's device; rank 0 logs at INFO, the
    others only warnings."""
    # heavy: torch and DeepSpeed load only once training starts
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() != "cpu"
    if not on_gpu:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    torch.manual_seed(seed)
    return Ranks(rank=rank, world_size=world_size, on_gpu=on_gpu, barrier=dist.barrier)


def load_data(args: argparse.Namespace, tcfg: TrainConfig, ranks: Ranks,
              output: Path) -> tuple[Any, TokenizedSplit, TokenizedSplit]:
    """The tokenizer and the train and held-out splits. The ranks tokenise the shards between them
    into OUTPUT/tokenized (every rank must call this); an export that cannot be read is a GlanError."""
    # heavy: transformers loads only for training
    from transformers import AutoTokenizer

    try:
        manifest, root = load_manifest(args.export)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or tcfg.model)
        system_prompt = (manifest.get("config", {}).get("export") or {}).get("system_prompt")
        prepare = partial(prepare_split, manifest, root, tokenizer=tokenizer, max_len=tcfg.max_seq_len,
                          system_prompt=system_prompt, cache_root=output / "tokenized", rank=ranks.rank,
                          world_size=ranks.world_size, barrier=ranks.barrier, verify=not args.no_verify)
        return tokenizer, prepare(split="train"), prepare(split="test")
    except (OSError, ValueError, RuntimeError) as exc:
        raise GlanError(str(exc)) from None


@dataclass(frozen=True)
class BatchPlan:
    """What every rank computes alike from the same lengths, so nothing else is exchanged."""

    epoch: Callable[..., list[list[list[int]]]]  # epoch(epoch=e)[rank]: that rank's micro-batches
    summary: dict[str, float]                    # plan_summary of epoch 0, for the log
    accumulation: int                            # micro-batches per optimizer step
    total_steps: int
    step_tokens: np.ndarray                      # answer tokens of each step, over every rank
    warmup_steps: int = 0                        # train.warmup_steps, or warmup_ratio of total_steps

    def identity(self, tcfg: TrainConfig, world_size: int, data: TokenizedSplit) -> dict[str, Any]:
        """What the micro-step count of a checkpoint means; a resume must find the same."""
        return {"world_size": world_size, "accumulation": self.accumulation, "seed": tcfg.seed,
                "micro_batch_tokens": tcfg.micro_batch_tokens, "data": data.directory.name}


def plan_batches(data: TokenizedSplit, tcfg: TrainConfig, world_size: int, max_steps: int | None) -> BatchPlan:
    """Token-budget batches of every epoch, the accumulation that reaches about `pairs_per_step`
    pairs a step, the number of steps and each step's answer tokens (the loss's divisor)."""
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
    if max_steps:
        total_steps = min(total_steps, max_steps)
    if total_steps < 1:
        raise ConfigError(f"{len(data)} pairs give no optimizer step with {accumulation} micro-batches per "
                          "step; lower --pairs-per-step")
    step_tokens = training.step_label_tokens(epoch_tokens, accumulation, total_steps)
    warmup = training.warmup_for(total_steps, tcfg.warmup_steps, tcfg.warmup_ratio)
    warning = training.warmup_warning(warmup, total_steps)
    if warning:
        log.warning("%s", warning)
    return BatchPlan(epoch=plan_for, summary=first, accumulation=accumulation, total_steps=total_steps,
                     step_tokens=step_tokens, warmup_steps=warmup)


def resume_directory(resume: str | None, checkpoints: Path, identity: dict[str, Any]) -> Path | None:
    """The checkpoint folder `--resume` names (None without it), checked before the model loads."""
    if not resume:
        return None
    resume_dir = checkpoints if resume == "latest" else Path(resume)
    check_resumable(resume_dir, identity)
    return resume_dir


@dataclass(frozen=True)
class Engine:
    """The DeepSpeed engine and its lr scheduler."""

    engine: Any
    scheduler: Any
    zero3: bool
    hf_config: Any = None  # ZeRO-3: transformers partitions the weights only while this lives


def build_engine(tcfg: TrainConfig, plan: BatchPlan, ranks: Ranks) -> Engine:
    """The model in a DeepSpeed engine with AdamW and the warm-up + cosine schedule."""
    # heavy: torch, DeepSpeed and transformers load only for training
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    use_bf16 = tcfg.bf16 and ranks.on_gpu  # CPU trains in fp32
    base = json.loads(resolve_deepspeed_config(tcfg.deepspeed_config).read_text())
    ds_config = build_deepspeed_config(base, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                       max_grad_norm=tcfg.max_grad_norm, accumulation=plan.accumulation,
                                       world_size=ranks.world_size, bf16=use_bf16)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    hf_config = None
    if zero3:
        # heavy: part of transformers
        from transformers.integrations import HfDeepSpeedConfig

        # Must stay alive while the model loads: from_pretrained then partitions as it loads.
        hf_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(tcfg.model, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    if tcfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    schedule = partial(training.lr_factor, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                       final_ratio=tcfg.final_lr / tcfg.lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return Engine(engine=engine, scheduler=scheduler, zero3=zero3, hf_config=hf_config)


def resume_micro_step(engine: Any, resume_dir: Path | None, accumulation: int) -> int:
    """Load the checkpoint in `resume_dir`; the micro-step it reached (0 for a new run)."""
    if resume_dir is None:
        return 0
    load_path, client_state = engine.load_checkpoint(str(resume_dir))
    if load_path is None:
        raise GlanError(f"no DeepSpeed checkpoint to resume from in {resume_dir}")
    start_micro = int(client_state["micro_step"])
    log.info("resumed from %s at optimizer step %d", load_path, start_micro // accumulation)
    return start_micro


# ---------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """The training loop and its parts: batches as tensors, the held-out loss, checkpoints, metrics."""

    def __init__(self, built: Engine, data: TokenizedSplit, heldout: TokenizedSplit, plan: BatchPlan, *,
                 tcfg: TrainConfig, ranks: Ranks, output: Path, pad_id: int, identity: dict[str, Any]) -> None:
        self.engine, self.scheduler = built.engine, built.scheduler
        self.data, self.heldout, self.plan, self.tcfg, self.ranks = data, heldout, plan, tcfg, ranks
        self.pad_id, self.identity = pad_id, identity
        self.checkpoints, self.metrics_path = output / "checkpoints", output / "metrics.jsonl"
        # The held-out split (GLAN-Test) in budget-packed batches, the same number on every rank.
        self.heldout_batches = (training.pack_batches(heldout.lengths, tcfg.micro_batch_tokens, seed=tcfg.seed,
                                                      epoch=0, world_size=ranks.world_size)[ranks.rank]
                                if len(heldout) else [])
        self.heldout_counts = heldout.label_counts()

    def tensors(self, examples: TokenizedSplit, indices: list[int]) -> dict[str, Any]:
        # heavy: torch loads only for training
        import torch

        padded = training.pad_batch([examples.example(i) for i in indices], self.pad_id)
        return {key: torch.tensor(value, device=self.engine.device) for key, value in padded.items()}

    def evaluate(self) -> float | None:
        """Mean loss over every answer token of the held-out split (all ranks take part)."""
        # heavy: torch loads only for training
        import torch
        import torch.distributed as dist

        if not len(self.heldout):
            return None
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.engine.device)
        with torch.no_grad():
            for indices in self.heldout_batches:
                summed = self.engine(**self.tensors(self.heldout, indices), num_items_in_batch=1.0).loss  # a sum
                answer_tokens = totals.new_tensor(float(self.heldout_counts[indices].sum()))
                totals += torch.stack([summed.double(), answer_tokens])
        dist.all_reduce(totals)
        self.engine.train()
        return float(totals[0] / totals[1].clamp(min=1.0))

    def save(self, step: int, micro: int) -> None:
        """A DeepSpeed checkpoint for --resume, with the batch plan it was trained under."""
        self.engine.save_checkpoint(str(self.checkpoints), tag=f"step-{step}", client_state={"micro_step": micro})
        if self.ranks.rank == 0:
            plan = json.dumps({**self.identity, "micro_step": micro})
            (self.checkpoints / f"step-{step}" / PLAN_FILE).write_text(plan)

    def micro_step(self, indices: list[int], micro: int) -> tuple[Any, float]:
        """Forward and backward of one micro-batch; its loss (on the device) and the lr it used."""
        batch = self.tensors(self.data, indices)
        # Summed token loss over a share of the step's answer tokens: the step's gradient is that
        # of the mean over all of its answer tokens, on every rank and micro-batch.
        divisor = training.loss_divisor(self.plan.step_tokens[micro // self.plan.accumulation],
                                         self.plan.accumulation, self.ranks.world_size)
        loss = self.engine(**batch, num_items_in_batch=divisor).loss
        self.engine.backward(loss)
        lr_used = self.scheduler.get_last_lr()[0]  # the lr of the update engine.step() may apply now
        self.engine.step()
        return loss.detach(), lr_used

    def finish_step(self, step: int, epoch: int, window_loss: Any, window_tokens: int, lr_used: float,
                    step_started: float, eval_loss: float | None) -> float | None:
        """After a step's last micro-batch: its loss and tokens over all ranks, the held-out loss
        when due, and rank 0's metrics line. Returns the latest held-out loss."""
        # heavy: torch loads only for training
        import torch
        import torch.distributed as dist

        summary = torch.stack([window_loss.float() / self.plan.accumulation,
                               torch.tensor(float(window_tokens), device=window_loss.device)])
        dist.all_reduce(summary)
        elapsed = time.monotonic() - step_started  # the step's own time, without the evaluation
        every = self.tcfg.eval_every_steps
        evaluated = step == self.plan.total_steps or (every and step % every == 0)
        if evaluated:
            eval_loss = self.evaluate()
        if self.ranks.rank == 0:
            record = {"step": step, "epoch": epoch, "loss": summary[0].item() / self.ranks.world_size,
                      "lr": lr_used, "tokens": int(summary[1].item()),
                      "answer_tokens": int(self.plan.step_tokens[step - 1]),
                      "tokens_per_s": summary[1].item() / max(elapsed, 1e-9)}
            if evaluated and eval_loss is not None:
                record["eval_loss"] = eval_loss
            self.report(record)
        return eval_loss

    def report(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl per step; the log every `log_every_steps` and at evaluations."""
        with self.metrics_path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        step, total = record["step"], self.plan.total_steps
        if step % self.tcfg.log_every_steps == 0 or step == total:
            log.info("step %d/%d epoch %d loss %.4f lr %.3g tokens/s %.0f", step, total, record["epoch"],
                     record["loss"], record["lr"], record["tokens_per_s"])
        if "eval_loss" in record:
            log.info("step %d: held-out loss %.4f over %d pairs", step, record["eval_loss"], len(self.heldout))

    def run(self, start_micro: int) -> tuple[int, float | None]:
        """Micro-batches back to back across epochs, skipping the `start_micro` a resume has done;
        returns the last optimizer step and the last held-out loss."""
        accumulation, end = self.plan.accumulation, self.plan.total_steps * self.plan.accumulation
        micro, window_loss, window_tokens, last_saved, eval_loss = 0, None, 0, -1, None
        step_started = time.monotonic()
        self.engine.train()
        for epoch in range(self.tcfg.epochs):
            if micro >= end:
                break
            for indices in self.plan.epoch(epoch=epoch)[self.ranks.rank]:
                if micro >= end:
                    break
                if micro < start_micro:
                    micro += 1
                    continue
                loss, lr_used = self.micro_step(indices, micro)
                micro += 1
                # Kept on the device until the step ends: no host sync per micro-batch.
                window_loss = loss if window_loss is None else window_loss + loss
                window_tokens += int(self.data.lengths[indices].sum())
                if micro % accumulation:
                    continue
                step = micro // accumulation
                eval_loss = self.finish_step(step, epoch, window_loss, window_tokens, lr_used, step_started,
                                             eval_loss)
                window_loss, window_tokens = None, 0
                step_started = time.monotonic()
                if self.tcfg.save_every_steps and step % self.tcfg.save_every_steps == 0:
                    self.save(step, micro)
                    last_saved = step
        final_step = micro // accumulation
        if final_step != last_saved and final_step > start_micro // accumulation:
            self.save(final_step, micro)
        return final_step, eval_loss


# ---------------------------------------------------------------------------------------------
# The job


def train(args: argparse.Namespace) -> dict[str, Any]:
    """The job, phase by phase; returns the figures it logs at the end."""
    tcfg = train_config(args)
    set_single_process_defaults()
    ranks = init_distributed(tcfg.seed)
    output = Path(args.output)
    started = time.monotonic()

    # Phase 1: data and plan. The ranks tokenise the shards between them into a shared cache;
    # then every rank computes the same plan from the same lengths, so nothing else is exchanged.
    tokenizer, data, heldout = load_data(args, tcfg, ranks, output)
    plan = plan_batches(data, tcfg, ranks.world_size, args.max_steps)
    identity = plan.identity(tcfg, ranks.world_size, data)
    resume_dir = resume_directory(args.resume, output / "checkpoints", identity)
    log.info("data: %d pairs, %d ranks, %s; %d micro-batches per step, %d optimizer steps, %.0f answer tokens "
             "per step", len(data), ranks.world_size, {k: round(v, 3) for k, v in plan.summary.items()},
             plan.accumulation, plan.total_steps, float(plan.step_tokens.mean()))

    # Phase 2: model and engine.
    built = build_engine(tcfg, plan, ranks)
    start_micro = resume_micro_step(built.engine, resume_dir, plan.accumulation)

    # Phase 3: the loop.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if ranks.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(built, data, heldout, plan, tcfg=tcfg, ranks=ranks, output=output, pad_id=pad_id,
                      identity=identity)
    final_step, eval_loss = trainer.run(start_micro)

    # Phase 4: the Hugging Face checkpoint.
    save_hf_checkpoint(built.engine, tokenizer, output / "hf", zero3=built.zero3, rank=ranks.rank)
    ranks.barrier()
    result = {"steps": final_step, "total_steps": plan.total_steps, "accumulation": plan.accumulation,
              "world_size": ranks.world_size, "eval_loss": eval_loss, "seconds": time.monotonic() - started}
    log.info("done: %s", result)
    return result


def _train_reporting_errors(argv: list[str] | None) -> int:
    """`train`, with this job's own errors as the one line its users know, `jobs/train.py: <message>`,
    and their exit codes; any other error is left to run_guarded."""
    try:
        train(parse_args(argv))
    except GlanError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python jobs/train.py ...` under any launcher: 0, or one line on stderr and an exit code of
    jobs/errors.py (each rank that fails says so)."""
    return run_guarded(partial(_train_reporting_errors, argv), argv)


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
    sys.exit(main())
