"""Fine-tuning pieces: the token-budget sampler, prompt masking, the schedule, the DeepSpeed config,
and one CPU smoke run of jobs/train.py through deepspeed.initialize (a subprocess with a timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs.common.training import (
    IGNORE_INDEX,
    PLAIN_PROMPT,
    Example,
    batch_cost,
    encode_pair,
    gradient_accumulation_steps,
    join_prompt_answer,
    lr_at,
    pack_batches,
    pad_batch,
    plan_summary,
    prompt_text,
    total_optimizer_steps,
)

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
WORDS = ("what is the colour of sky grass snow coal blood sea sun leaf milk night ? "
         "red green white black blue yellow dark the is it colour of").split()


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer over the test's own words; no downloads."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "user", "assistant", "system", ":", "Question", "Answer"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + WORDS + [str(i) for i in range(100)]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_batches_respect_budget_use_every_example_once_and_match_across_ranks(world_size, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 500, size=1001)
    budget = 2048
    for epoch in range(2):
        plan = pack_batches(lengths, budget, seed=seed, epoch=epoch, world_size=world_size, sort_window=128)
        assert len(plan) == world_size
        assert len({len(batches) for batches in plan}) == 1  # equal batch counts on every rank
        used = Counter(i for batches in plan for batch in batches for i in batch)
        assert sorted(used) == list(range(len(lengths)))  # every example, once
        assert max(used.values()) == 1
        for batches in plan:
            for batch in batches:
                assert batch and batch_cost(lengths[batch].tolist()) <= budget


def test_batches_fill_the_budget_and_change_with_seed_and_epoch():
    lengths = np.random.default_rng(3).integers(20, 200, size=2000)
    plan = pack_batches(lengths, 4096, seed=1, epoch=0)
    summary = plan_summary(plan, lengths)
    assert summary["pairs_dropped"] == 0
    assert summary["mean_padded_tokens"] > 0.9 * 4096  # tokens per batch stay near the budget
    assert summary["padding_fraction"] < 0.1
    assert pack_batches(lengths, 4096, seed=1, epoch=0) == plan  # deterministic
    assert pack_batches(lengths, 4096, seed=1, epoch=1) != plan
    assert pack_batches(lengths, 4096, seed=2, epoch=0) != plan


def test_remainder_rule_drops_only_when_batches_cannot_be_split():
    # Three one-example batches over two ranks: none can be split, so one is dropped.
    plan = pack_batches([100, 100, 100], 150, seed=0, epoch=0, world_size=2)
    assert [len(b) for b in plan] == [1, 1]
    assert plan_summary(plan, [100, 100, 100])["pairs_dropped"] == 1
    # Three examples in one batch over two ranks: the batch is split, nothing is dropped.
    plan = pack_batches([10, 10, 10], 150, seed=0, epoch=0, world_size=2)
    assert sorted(len(b[0]) for b in plan) == [1, 2]


def test_example_longer_than_budget_is_an_error():
    with pytest.raises(ValueError, match="token_budget=10"):
        pack_batches([5, 11], 10, seed=0, epoch=0)


def test_accumulation_and_total_steps():
    assert gradient_accumulation_steps(512, mean_pairs_per_batch=32, world_size=8) == 2
    assert gradient_accumulation_steps(512, mean_pairs_per_batch=1000, world_size=8) == 1
    assert total_optimizer_steps([10, 11, 9], accumulation=4) == 7


# ---------------------------------------------------------------------------------------------
# Masking


def test_labels_are_ignored_exactly_on_the_prompt():
    example = join_prompt_answer([1, 2, 3], [7, 8], eos_id=9, max_len=100)
    assert example.input_ids == [1, 2, 3, 7, 8, 9]
    assert example.labels == [IGNORE_INDEX] * 3 + [7, 8, 9]


def test_truncation_keeps_the_answer_start_and_the_prompt_end():
    example = join_prompt_answer(list(range(10)), list(range(100, 110)), eos_id=999, max_len=8)
    assert len(example) == 8
    assert example.input_ids == [6, 7, 8, 9, 100, 101, 102, 103]
    assert example.labels == [IGNORE_INDEX] * 4 + [100, 101, 102, 103]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None], ids=["chat-template", "plain"])
def test_encoded_pair_masks_the_rendered_prompt(template):
    tokenizer = make_tokenizer(template)
    example = encode_pair(tokenizer, "what is the colour of snow ?", "it is white", max_len=64)
    prompt = prompt_text(tokenizer, "what is the colour of snow ?")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("it is white", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example.input_ids == prompt_ids + answer_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if template:
        assert prompt == "<s> user : what is the colour of snow ? <s> assistant : "
    else:
        assert prompt == "<s>" + PLAIN_PROMPT.format(question="what is the colour of snow ?")


def test_padding_is_masked():
    batch = pad_batch([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"] == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Schedule and DeepSpeed config


def test_schedule_warms_up_linearly_then_decays_to_the_final_lr():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, peak_lr=3e-6) for s in range(101)]
    assert lrs[0] == pytest.approx(3e-7) and lrs[9] == pytest.approx(3e-6)
    assert lrs[4] == pytest.approx(1.5e-6)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(1.5e-6)  # half-way through the cosine
    assert lrs[100] == pytest.approx(0.0, abs=1e-18)


def test_deepspeed_config_is_filled_in_and_refuses_auto():
    from jobs.train import build_deepspeed_config, resolve_deepspeed_config

    for name in ("zero2_bf16.json", "zero3_bf16.json", "cpu_fp32.json"):
        base = json.loads(resolve_deepspeed_config(f"conf/deepspeed/{name}").read_text())
        cfg = build_deepspeed_config(base, lr=1e-5, weight_decay=0.1, max_grad_norm=1.0, accumulation=4,
                                     world_size=8, bf16=False)
        assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 4
        assert cfg["optimizer"]["params"]["lr"] == 1e-5 and cfg["optimizer"]["params"]["torch_adam"] is True
        assert cfg["bf16"] == {"enabled": False}
    with pytest.raises(ValueError, match="auto"):
        build_deepspeed_config({"zero_optimization": {"stage": "auto"}}, lr=1e-5, weight_decay=0,
                               max_grad_norm=1, accumulation=1, world_size=1, bf16=False)


# ---------------------------------------------------------------------------------------------
# CPU smoke run


COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sea": "blue", "sun": "yellow", "leaf": "green", "milk": "white", "night": "dark"}


@pytest.fixture(scope="module")
def tiny_export(spark, tmp_path_factory) -> Path:
    from jobs.common.export_config import ExportConfig
    from jobs.export import build_export

    rows = [(f"id-{i:04d}", "Academic-Natural Science", f"Discipline {i % 3}", "Colours", "school",
             f"what is the colour of {thing} {i % 50} ?", f"it is {colour}")
            for i, (thing, colour) in enumerate(list(COLOURS.items()) * 30)]
    instructions = spark.createDataFrame(rows, "instruction_id string, field string, discipline string, "
                                               "subject string, level string, question string, answer string")
    path = tmp_path_factory.mktemp("train_export")
    build_export(instructions, ExportConfig(heldout_per_discipline=5, shard_size_mb=0.005), str(path), 0)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama built from a config, saved with its on-the-fly tokenizer."""
    pytest.importorskip("deepspeed")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_train(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_cpu_smoke_run_learns_saves_and_resumes(tiny_export, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "run"
    common = ["--export", str(tiny_export), "--model", str(tiny_model), "--output", str(output),
              "--deepspeed-config", "conf/deepspeed/cpu_fp32.json", "--lr", "3e-3", "--warmup-steps", "2",
              "--micro-batch-tokens", "256", "--max-seq-len", "64", "--pairs-per-step", "16",
              "--save-every-steps", "0", "--log-every-steps", "5"]
    run_train([*common, "--max-steps", "20"])

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < 0.7 * first, (first, last)
    assert records[0]["lr"] < records[2]["lr"]  # warming up

    hf = output / "hf"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template == CHAT_TEMPLATE
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-20"

    # Resume from the DeepSpeed checkpoint: steps 21..24 continue the same schedule.
    run_train([*common, "--max-steps", "24", "--resume"])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-24"


def _bench_train():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parents[1] / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_model_is_1b_and_its_flops_per_token_match_a_hand_count():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _bench_train()
    shape = bench.MODEL_SIZES["1b"]
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**shape)).parameters())
    d, ff, layers, vocab = 2048, 5632, 22, 32000
    kv = d // 32 * 4  # 4 key/value heads of 64
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q, o, k, v, MLP, two norms
    assert params == layers * per_layer + 2 * vocab * d + d == 1_100_048_384  # TinyLlama-1.1B
    # The input embedding is a lookup, not a product; the output projection is counted.
    expected = 6 * (params - vocab * d) + 12 * layers * d * 2048
    assert bench.flops_per_token(shape, params, 2048) == expected
    assert bench.flops_per_token({**shape, "tie_word_embeddings": True}, params, 2048) == 6 * params + 12 * layers * d * 2048
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops_for("NVIDIA H100 PCIe") == 756e12
