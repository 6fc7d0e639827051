"""Training throughput of the DeepSpeed setup jobs/train.py uses: tokens per second and, on a GPU,
model FLOPs utilisation.

MFU = flops_per_token * tokens/s / peak, with flops_per_token = 6 * (parameters that take part in
a matrix product: all but the input embedding, unless it is tied to the output) + 12 * layers *
hidden * sequence length (attention scores and values, PaLM's convention, causal masking not
discounted). Recomputation by gradient checkpointing is not counted (that would be HFU).

GPU (a ~1B Llama, bf16, ZeRO-2):
    deepspeed --num_gpus 1 bench/train.py --model-size 1b --bf16 --zero-stage 2
    torchrun --standalone --nproc_per_node 8 bench/train.py --model-size 1b --bf16 --zero-stage 3
A device machine has torch and transformers but not DeepSpeed: `bash bench/device_wheels.sh`
here, then carry `.whl` and install it there first (the script's header has the command).
CPU (a tiny Llama, fp32, a few steps):
    OMP_NUM_THREADS=1 python bench/train.py --model-size tiny --steps 8

Batches are random tokens of one length (sequences x length = --micro-batch-tokens per rank), so
the figure is the model's and DeepSpeed's speed, not the data pipeline's. The last line is exactly
`tokens_per_s=<x>` (all ranks together).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 peak FLOPs by a substring of the device name (first match wins).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12),
)

MODEL_SIZES = {
    # TinyLlama-1.1B's shape.
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def peak_flops_for(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_FLOPS if key.lower() in device_name.lower()), None)


def flops_per_token(config: dict, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a Llama of this shape; see the docstring."""
    embedding = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * config["hidden_size"]
    attention = 12 * config["num_hidden_layers"] * config["hidden_size"] * seq_len
    return 6 * (num_params - embedding) + attention


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None,
                        help="default: 1b on a GPU, tiny on CPU")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for a GPU; CPU always runs fp32")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 8 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 GPU, 128 CPU")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="default 16384 GPU, 1024 CPU")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations (jobs/train.py's default for big models; the 1B "
                             "model's activations fit in one H100 without it)")
    parser.add_argument("--attn-implementation", default="sdpa", help="transformers attention kernel")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model through DeepSpeed")
    parser.add_argument("--peak-flops", type=float, default=None, help="per device; default from a table")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    from jobs.train import (build_deepspeed_config, enable_activation_checkpointing, resolve_deepspeed_config,
                            set_single_process_defaults, skip_cpu_shm_op)

    args = parse_args(argv)
    set_single_process_defaults()

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    accelerator = get_accelerator()
    on_gpu = accelerator.device_name() != "cpu"
    if not on_gpu:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        accelerator.set_device(int(__import__("os").environ.get("LOCAL_RANK", 0)))
    size = args.model_size or ("1b" if on_gpu else "tiny")
    bf16 = bool(on_gpu and (args.bf16 if args.bf16 is not None else True))
    steps = args.steps or (20 if on_gpu else 8)
    seq_len = args.seq_len or (2048 if on_gpu else 128)
    budget = args.micro_batch_tokens or (16384 if on_gpu else 1024)
    sequences = max(1, budget // seq_len)

    base_name = "cpu_fp32.json" if not on_gpu else ("zero3_bf16.json" if args.zero_stage == 3 else "zero2_bf16.json")
    base = json.loads(resolve_deepspeed_config(f"conf/deepspeed/{base_name}").read_text())
    base.setdefault("zero_optimization", {})["stage"] = args.zero_stage if on_gpu else min(args.zero_stage, 2)
    ds_config = build_deepspeed_config(base, lr=1e-5, weight_decay=0.0, max_grad_norm=1.0, accumulation=1,
                                       world_size=world_size, bf16=bf16)
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_SIZES[size])
    config._attn_implementation = args.attn_implementation
    if ds_config["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if args.compile:
        engine.compile()

    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, config.vocab_size, (sequences, seq_len), generator=generator).to(engine.device)
    batch = {"input_ids": tokens, "labels": tokens, "attention_mask": torch.ones_like(tokens)}
    for step in range(args.warmup + steps):
        if step == args.warmup:
            accelerator.synchronize()
            dist.barrier()
            started = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    accelerator.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - started
    tokens_per_s = steps * sequences * seq_len * world_size / elapsed

    if rank == 0:
        device = accelerator.get_device_name() if on_gpu else "cpu"
        print(f"model={size} params={num_params / 1e6:.1f}M device={device} world_size={world_size} "
              f"zero_stage={ds_config['zero_optimization']['stage']} bf16={bf16} "
              f"batch={sequences}x{seq_len} steps={steps} seconds={elapsed:.2f} loss={loss.item():.3f}")
        if on_gpu:
            peak = args.peak_flops or peak_flops_for(device)
            per_token = flops_per_token(MODEL_SIZES[size], num_params, seq_len)
            if peak:
                mfu = per_token * tokens_per_s / (peak * world_size)
                print(f"tokens_per_s_per_gpu={tokens_per_s / world_size:.1f} "
                      f"model_tflops_per_gpu={per_token * tokens_per_s / world_size / 1e12:.1f} "
                      f"peak_tflops={peak / 1e12:.0f}")
                print(f"mfu={mfu:.3f} ({per_token / 1e9:.2f} GFLOPs per token"
                      f"{'; checkpointing recompute not counted' if args.gradient_checkpointing else ''})")
            else:
                print(f"mfu=unknown (no peak FLOPs for {device!r}; pass --peak-flops)")
        print(f"tokens_per_s={tokens_per_s:.1f}")
    return tokens_per_s


if __name__ == "__main__":
    main()
