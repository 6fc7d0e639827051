"""Pure pieces of the fine-tuning job: prompt masking, token-budget batching, the lr schedule.

None of this imports torch or DeepSpeed, so it is unit-tested on its own (tests/test_train.py);
`jobs/train.py` wires it to a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and every HF causal LM) skips

# Used when the tokenizer has no chat template. Plain text, so any base model can learn it.
PLAIN_PROMPT = "Question:\n{question}\n\nAnswer:\n"


# ---------------------------------------------------------------------------------------------
# Prompt + answer -> input_ids, labels


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_text(tokenizer: Any, question: str, system_prompt: str | None = None) -> str:
    """The text before the answer: the tokenizer's chat template with a generation prompt when it
    has one, else `bos` + PLAIN_PROMPT."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return (tokenizer.bos_token or "") + prefix + PLAIN_PROMPT.format(question=question)


def cut_to_length(prompt_ids: Sequence[int], answer_ids: Sequence[int], eos_id: int | None,
                  max_len: int) -> tuple[list[int], list[int]]:
    """Prompt and `answer + eos`, cut so that together they fit `max_len`.

    Too long: the answer keeps at least half of `max_len` (or all of itself if shorter), the
    prompt is cut from the left (its end, the question's last words and the assistant header,
    matters most), then the answer is cut from the right. The eos is dropped only with a cut answer.
    """
    answer = list(answer_ids) + ([eos_id] if eos_id is not None else [])
    prompt = list(prompt_ids)
    if len(prompt) + len(answer) > max_len:
        answer_room = max(min(len(answer), max_len // 2), max_len - len(prompt))
        answer = answer[:answer_room]
        prompt_room = max_len - len(answer)
        prompt = prompt[len(prompt) - prompt_room:] if prompt_room > 0 else []
    return prompt, answer


def join_prompt_answer(prompt_ids: Sequence[int], answer_ids: Sequence[int], eos_id: int | None,
                       max_len: int) -> Example:
    """One sequence `prompt + answer + eos` with labels only on the answer and eos (cut as
    `cut_to_length` says)."""
    prompt, answer = cut_to_length(prompt_ids, answer_ids, eos_id, max_len)
    return Example(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer)


def example_from_tokens(input_ids: list[int], prompt_length: int) -> Example:
    """The example of a sequence whose first `prompt_length` tokens are the prompt."""
    return Example(input_ids=input_ids, labels=[IGNORE_INDEX] * prompt_length + input_ids[prompt_length:])


def label_tokens(lengths: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
    """Tokens each example adds to the loss: a causal LM predicts position t from the ones before,
    so the first position is never a target (HF shifts labels by one)."""
    return np.maximum(np.asarray(lengths) - np.maximum(np.asarray(prompt_lengths), 1), 0)


def encode_pair(tokenizer: Any, question: str, answer: str, max_len: int,
                system_prompt: str | None = None) -> Example:
    """Tokenise prompt and answer separately (so the boundary is exact) and join them."""
    prompt_ids = tokenizer(prompt_text(tokenizer, question, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return join_prompt_answer(prompt_ids, answer_ids, tokenizer.eos_token_id, max_len)


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad to the longest sequence: padding is masked out of attention and of the loss."""
    longest = max(len(e) for e in examples)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        pad = longest - len(e)
        batch["input_ids"].append(e.input_ids + [pad_id] * pad)
        batch["labels"].append(e.labels + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(e) + [0] * pad)
    return batch


# ---------------------------------------------------------------------------------------------
# Token-budget batches


def batch_cost(lengths: Sequence[int]) -> int:
    """Tokens a padded batch occupies: sequences x longest."""
    return len(lengths) * max(lengths) if len(lengths) else 0


def pack_batches(lengths: Sequence[int] | np.ndarray, token_budget: int, *, seed: int, epoch: int,
                 world_size: int = 1, sort_window: int = 1024) -> list[list[list[int]]]:
    """Plan one epoch: `plan[rank]` is that rank's list of batches (lists of example indices).

    - Every batch satisfies `len(batch) * max(length) <= token_budget`, so the tokens per batch
      stay near the budget whatever the lengths (the paper's dynamic batch size).
    - The order is a permutation seeded by (seed, epoch); inside windows of `sort_window`
      examples the lengths are sorted so that a batch's sequences are of similar length (little
      padding), then the batches are shuffled.
    - Remainder rule: every example is used exactly once per epoch. When the batch count is not
      a multiple of `world_size`, the batches with the most sequences are split in two until it
      is; every rank gets the same number of batches, so the collectives never wait on a rank
      that has run out. Only if there are fewer examples than ranks can no split help: then the
      last `len(batches) % world_size` batches are dropped for that epoch (stated in the plan's
      length; `plan_summary` reports it).
    Every rank computes the same plan from the same lengths, so no communication is needed.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if token_budget < 1 or world_size < 1:
        raise ValueError(f"token_budget={token_budget} and world_size={world_size} must be >= 1")
    if len(lengths) and int(lengths.max()) > token_budget:
        raise ValueError(f"token_budget={token_budget} is smaller than the longest example "
                         f"({int(lengths.max())} tokens); truncate examples to the budget first")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))

    batches: list[list[int]] = []
    for start in range(0, len(order), sort_window):
        window = order[start:start + sort_window]
        # A stable sort keeps the permuted order among equal lengths, so the result stays seeded.
        window = window[np.argsort(-lengths[window], kind="stable")]
        current: list[int] = []
        longest = 0
        for index in window.tolist():
            size = int(lengths[index])
            if current and (len(current) + 1) * max(longest, size) > token_budget:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, size)
        if current:
            batches.append(current)
    batches = [batches[i] for i in rng.permutation(len(batches))]

    while len(batches) % world_size:
        widest = max(range(len(batches)), key=lambda i: (len(batches[i]), -i), default=None)
        if widest is None or len(batches[widest]) < 2:
            batches = batches[: len(batches) - len(batches) % world_size]
            break
        batch = batches[widest]
        half = len(batch) // 2
        batches[widest: widest + 1] = [batch[:half], batch[half:]]
    return [batches[rank::world_size] for rank in range(world_size)]


def plan_summary(plan: list[list[list[int]]], lengths: Sequence[int]) -> dict[str, float]:
    """Figures for the log: batches per rank, pairs, padded and real tokens per batch."""
    lengths = np.asarray(lengths)
    flat = [b for rank in plan for b in rank]
    used = sum(len(b) for b in flat)
    costs = [batch_cost(lengths[b].tolist()) for b in flat]
    real = [int(lengths[b].sum()) for b in flat]
    return {
        "batches_per_rank": len(plan[0]) if plan else 0,
        "pairs_used": used,
        "pairs_dropped": len(lengths) - used,
        "mean_pairs_per_batch": used / max(1, len(flat)),
        "mean_padded_tokens": float(np.mean(costs)) if costs else 0.0,
        "padding_fraction": 1.0 - sum(real) / max(1, sum(costs)),
    }


def gradient_accumulation_steps(pairs_per_step: int, mean_pairs_per_batch: float, world_size: int) -> int:
    """Micro-batches to accumulate so one optimizer step sees about `pairs_per_step` pairs."""
    return max(1, round(pairs_per_step / max(mean_pairs_per_batch * world_size, 1e-9)))


def total_optimizer_steps(batches_per_epoch: Sequence[int], accumulation: int) -> int:
    """Optimizer steps over all epochs. Micro-batches run back to back across epoch boundaries;
    the last incomplete accumulation is not run (it would never reach an optimizer step)."""
    return sum(batches_per_epoch) // accumulation


# ---------------------------------------------------------------------------------------------
# Loss normalisation


def batch_label_tokens(plan: list[list[list[int]]], label_counts: np.ndarray) -> np.ndarray:
    """`out[rank, k]`: answer tokens the loss sees in that rank's k-th micro-batch of this epoch."""
    label_counts = np.asarray(label_counts)
    return np.array([[int(label_counts[batch].sum()) for batch in batches] for batches in plan],
                    dtype=np.int64).reshape(len(plan), -1)


def step_label_tokens(epochs: Sequence[np.ndarray], accumulation: int, total_steps: int) -> np.ndarray:
    """Answer tokens of each optimizer step, over every rank and micro-batch of the step.

    `epochs` holds `batch_label_tokens` of each epoch in order; micro-batches run back to back
    across epoch boundaries, so a step may take its micro-batches from two epochs.
    """
    per_rank = np.concatenate(list(epochs), axis=1) if len(epochs) else np.zeros((1, 0), np.int64)
    needed = total_steps * accumulation
    if per_rank.shape[1] < needed:
        raise ValueError(f"{total_steps} steps of {accumulation} micro-batches need {needed} micro-batches "
                         f"per rank; the plan has {per_rank.shape[1]}")
    return per_rank[:, :needed].sum(axis=0).reshape(total_steps, accumulation).sum(axis=1)


def loss_divisor(step_tokens: int, accumulation: int, world_size: int) -> float:
    """What a micro-batch's summed token loss is divided by, so that one optimizer step's gradient
    is the gradient of the mean loss over every answer token of the step.

    DeepSpeed scales each micro-batch's loss by 1 / accumulation and averages gradients over the
    ranks, so dividing the summed loss by step_tokens / (accumulation x world_size) gives
    sum over the step / step_tokens. A per-micro-batch mean instead would give a short answer's
    tokens more weight than a long one's, and the weights would change with the packing.
    """
    return max(int(step_tokens), 1) / (accumulation * world_size)


# ---------------------------------------------------------------------------------------------
# Learning rate


# A warm-up longer than this share of the run is named in the log (the paper's: 1,000 of ~59,000).
WARMUP_WARN_SHARE = 0.10


def warmup_for(total_steps: int, warmup_steps: int, warmup_ratio: float | None = None) -> int:
    """The run's warm-up steps: `warmup_ratio` of `total_steps` when set, else `warmup_steps`."""
    if warmup_ratio is not None:
        return int(round(warmup_ratio * total_steps))
    return warmup_steps


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """A line for the log when warm-up takes more than WARMUP_WARN_SHARE of the run, else None."""
    if total_steps <= 0 or warmup_steps <= WARMUP_WARN_SHARE * total_steps:
        return None
    return (f"warm-up is {warmup_steps} of the run's {total_steps} optimizer steps ({warmup_steps / total_steps:.0%}, "
            f"more than {WARMUP_WARN_SHARE:.0%}): the learning rate barely reaches its peak; set train.warmup_ratio "
            f"(the paper's share is about 0.017) or a lower train.warmup_steps")


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine to `final_lr` at
    `total_steps`. `step` counts optimizer steps from 0; the lr of step s is used for update s."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, final_ratio: float = 0.0) -> float:
    """`lr_at` as a multiplier of the peak lr (what torch's LambdaLR wants)."""
    return lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=1.0, final_lr=final_ratio)
