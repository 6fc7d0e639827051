"""Export and training settings: the `export:` and `train:` sections of the config.

Defaults are the GLAN paper's values (step 7: 3 epochs, lr 3e-6, 1000 linear warm-up steps, cosine
to a final lr of 0, about 512 pairs a batch with a constant token count per batch; GLAN-Test holds
out 50 pairs per discipline). Each error is a `SettingError` (udfs/config_checks.py) that starts
with and names the field; the loader prefixes the section path and names the file that set it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from udfs.config_checks import at_least, positive, require


@dataclass(frozen=True)
class ExportConfig:
    """How the `instructions` table becomes training-ready Parquet shards."""

    heldout_per_discipline: int = 50      # GLAN-Test: pairs per discipline kept out of training
    # Never hold out more than this share of a small discipline, so it still has training rows.
    heldout_max_fraction: float = 0.5
    seed: int = 42                        # the shuffle: order = xxhash64(seed, instruction_id)
    shard_size_mb: float = 256.0          # target shard size, measured in uncompressed text bytes
    row_group_rows: int = 10_000          # fixed, so the same rows always give the same bytes
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    compression_level: int | None = None  # None: the codec's default
    system_prompt: str | None = None      # when set, `messages` starts with a system turn

    def __post_init__(self) -> None:
        at_least(self, 0, "heldout_per_discipline")
        require(self, "heldout_max_fraction", 0.0 <= self.heldout_max_fraction <= 1.0, "must be in [0, 1]")
        positive(self, "shard_size_mb")
        at_least(self, 1, "row_group_rows")
        require(self, "compression_level", self.compression_level is None or self.compression not in ("none", "snappy"),
                f"is not supported by compression={self.compression!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning on the exported shards with DeepSpeed (jobs/train.py)."""

    model: str | None = None              # HF model id or directory (the paper: Mistral-7B base)
    deepspeed_config: str = "conf/deepspeed/zero2_bf16.json"
    epochs: int = 3
    lr: float = 3e-6
    final_lr: float = 0.0
    warmup_steps: int = 1000              # the paper's; 1.7% of its run, most of a small one
    warmup_ratio: float | None = None     # when set: warm-up is this share of the run's steps instead
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    pairs_per_step: int = 512             # the paper's batch; reached with gradient accumulation
    micro_batch_tokens: int = 16_384      # per rank and micro-batch: sequences x longest <= this
    max_seq_len: int = 2048
    gradient_checkpointing: bool = True
    seed: int = 42
    save_every_steps: int = 500           # DeepSpeed checkpoint for --resume; 0: only at the end
    eval_every_steps: int = 500           # loss on the held-out test split; 0: only at the end
    log_every_steps: int = 10
    bf16: bool = True                     # ignored on CPU, which trains in fp32

    def __post_init__(self) -> None:
        at_least(self, 1, "epochs")
        positive(self, "lr")
        require(self, "final_lr", 0 <= self.final_lr <= self.lr, f"must be in [0, lr={self.lr}]")
        at_least(self, 0, "warmup_steps", "weight_decay")
        require(self, "warmup_ratio", self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)")
        at_least(self, 0, "max_grad_norm", note=" (0 disables clipping)")
        at_least(self, 1, "pairs_per_step")
        at_least(self, 2, "max_seq_len")
        require(self, "micro_batch_tokens", self.micro_batch_tokens >= self.max_seq_len,
                f"must be >= max_seq_len={self.max_seq_len} so that every sequence fits a batch")
        at_least(self, 0, "save_every_steps", "eval_every_steps")
        at_least(self, 1, "log_every_steps")
