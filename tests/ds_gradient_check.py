"""Run by tests/test_train.py, one process per rank (torchrun or a plain python launch).

One optimizer step of DeepSpeed over two micro-batches per rank, with the loss normalisation
jobs/train.py uses, must move the weights by -lr x the gradient of the mean loss over every answer
token of the step, computed here on one model from all ranks' examples with plain torch. The
result (relative errors of this and of the mean of micro-batch means) goes to a JSON file.

    python tests/ds_gradient_check.py MODEL_DIR ZERO_STAGE OUT.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ACCUMULATION = 2


def make_examples(vocab: int, count: int):
    """Examples whose answers differ a lot in length, so that the weighting matters."""
    import torch

    from jobs.training.recipe import join_prompt_answer

    generator = torch.Generator().manual_seed(7)
    examples = []
    for i in range(count):
        prompt = torch.randint(4, vocab, (3 + i % 4,), generator=generator).tolist()
        answer = torch.randint(4, vocab, (2 if i % 3 else 24,), generator=generator).tolist()
        examples.append(join_prompt_answer(prompt, answer, eos_id=3, max_len=64))
    return examples


def summed_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def main() -> None:
    model_dir, stage, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    from jobs.train import build_deepspeed_config, set_single_process_defaults, skip_cpu_shm_op

    set_single_process_defaults()
    skip_cpu_shm_op()
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from jobs.training import recipe as training

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    examples = make_examples(model.config.vocab_size, 4 * ACCUMULATION * world_size)
    # plan[rank] = that rank's micro-batches, as jobs/common/training.pack_batches lays them out.
    batches = [list(range(i, i + 4)) for i in range(0, len(examples), 4)]
    plan = [batches[r::world_size] for r in range(world_size)]
    counts = training.label_tokens(np.array([len(e) for e in examples]),
                                   np.array([e.labels.count(training.IGNORE_INDEX) for e in examples]))
    step_tokens = training.step_label_tokens([training.batch_label_tokens(plan, counts)], ACCUMULATION, 1)

    def tensors(indices):
        return {k: torch.tensor(v) for k, v in training.pad_batch([examples[i] for i in indices], 0).items()}

    config = build_deepspeed_config({"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True},
                                    lr=1.0, weight_decay=0.0, max_grad_norm=0.0, accumulation=ACCUMULATION,
                                    world_size=world_size, bf16=False)
    config.pop("optimizer")
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    for indices in plan[rank]:
        divisor = training.loss_divisor(step_tokens[0], ACCUMULATION, world_size)
        engine.backward(engine(**tensors(indices), num_items_in_batch=divisor).loss)
        engine.step()
    moved = {name: (p.detach() - before[name]) for name, p in engine.module.named_parameters()}

    def gradient(loss_of_all):
        reference.zero_grad()
        loss_of_all().backward()
        return {name: -p.grad for name, p in reference.named_parameters() if p.grad is not None}

    token_mean = gradient(lambda: sum(summed_loss(reference, tensors(b)) for b in batches) / int(step_tokens[0]))
    batch_means = gradient(lambda: sum(summed_loss(reference, tensors(b)) / int(counts[b].sum())
                                       for b in batches) / len(batches))

    def relative_error(expected):
        diff = max(float((moved[n] - expected[n]).abs().max()) for n in expected)
        return diff / max(float(expected[n].abs().max()) for n in expected)

    if rank == 0:
        out.write_text(json.dumps({"world_size": world_size, "stage": stage, "step_tokens": int(step_tokens[0]),
                                   "token_mean_error": relative_error(token_mean),
                                   "batch_mean_error": relative_error(batch_means)}))
    dist.barrier()


if __name__ == "__main__":
    main()
