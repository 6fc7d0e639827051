"""Export and training settings: the `export:` and `train:` sections of the config.

Defaults are the GLAN paper's values (step 7: 3 epochs, lr 3e-6, 1000 linear warm-up steps, cosine
to a final lr of 0, about 512 pairs a batch with a constant token count per batch; GLAN-Test holds
out 50 pairs per discipline). Each `ValueError` message starts with the field's own name; the
loader prefixes the section path and names the file that set it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
        if self.heldout_per_discipline < 0:
            raise ValueError(f"heldout_per_discipline={self.heldout_per_discipline} must be >= 0")
        if not 0.0 <= self.heldout_max_fraction <= 1.0:
            raise ValueError(f"heldout_max_fraction={self.heldout_max_fraction} must be in [0, 1]")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb={self.shard_size_mb} must be > 0")
        if self.row_group_rows < 1:
            raise ValueError(f"row_group_rows={self.row_group_rows} must be >= 1")
        if self.compression_level is not None and self.compression in ("none", "snappy"):
            raise ValueError(f"compression_level={self.compression_level} is not supported by "
                             f"compression={self.compression!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning on the exported shards with DeepSpeed (jobs/train.py)."""

    model: str | None = None              # HF model id or directory (the paper: Mistral-7B base)
    deepspeed_config: str = "conf/deepspeed/zero2_bf16.json"
    epochs: int = 3
    lr: float = 3e-6
    final_lr: float = 0.0
    warmup_steps: int = 1000
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
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.final_lr <= self.lr:
            raise ValueError(f"final_lr={self.final_lr} must be in [0, lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)")
        if self.pairs_per_step < 1:
            raise ValueError(f"pairs_per_step={self.pairs_per_step} must be >= 1")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 2")
        if self.micro_batch_tokens < self.max_seq_len:
            raise ValueError(f"micro_batch_tokens={self.micro_batch_tokens} must be >= "
                             f"max_seq_len={self.max_seq_len} so that every sequence fits a batch")
        if self.save_every_steps < 0:
            raise ValueError(f"save_every_steps={self.save_every_steps} must be >= 0")
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps={self.eval_every_steps} must be >= 0")
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps={self.log_every_steps} must be >= 1")
