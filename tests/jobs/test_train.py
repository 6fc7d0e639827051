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

from jobs.config.loader import load_config
from jobs.errors import ConfigError
from jobs.training.recipe import (
    IGNORE_INDEX,
    PLAIN_PROMPT,
    Example,
    batch_cost,
    batch_label_tokens,
    encode_pair,
    gradient_accumulation_steps,
    join_prompt_answer,
    label_tokens,
    loss_divisor,
    lr_at,
    pack_batches,
    pad_batch,
    plan_summary,
    prompt_text,
    step_label_tokens,
    total_optimizer_steps,
    warmup_for,
    warmup_warning,
)

from tests.support import REPO

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


def test_step_tokens_sum_every_rank_and_micro_batch_across_epochs():
    counts = np.array([5, 1, 7, 2, 3, 4])
    epoch0 = batch_label_tokens([[[0, 1], [2]], [[3], [4, 5]]], counts)  # 2 ranks x 2 micro-batches
    epoch1 = batch_label_tokens([[[5], [0]], [[1, 2, 3], [4]]], counts)
    assert epoch0.tolist() == [[6, 7], [2, 7]]
    # 3 micro-batches a step: step 0 = epoch 0 both + epoch 1 first; step 1 would need a 6th.
    assert step_label_tokens([epoch0, epoch1], accumulation=3, total_steps=1).tolist() == [6 + 7 + 4 + 2 + 7 + 10]
    assert step_label_tokens([epoch0, epoch1], accumulation=2, total_steps=2).tolist() == [22, 9 + 13]
    with pytest.raises(ValueError, match="need 6 micro-batches"):
        step_label_tokens([epoch0, epoch1], accumulation=3, total_steps=2)
    assert loss_divisor(40, accumulation=2, world_size=4) == 5.0
    assert loss_divisor(0, accumulation=1, world_size=1) == 1.0  # never a division by zero


def test_label_tokens_skip_the_prompt_and_the_first_position():
    assert label_tokens(np.array([6, 4, 3]), np.array([3, 0, 3])).tolist() == [3, 3, 0]


@pytest.mark.slow
def test_token_weighted_loss_through_hf_equals_the_mean_over_all_answer_tokens():
    """The model's own loss with num_items_in_batch=loss_divisor, scaled as DeepSpeed scales it
    (1/accumulation, mean over ranks), has the gradient of the mean over every answer token."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    examples = [join_prompt_answer([5, 6, 7], [8] * (1 + 20 * (i % 2)), eos_id=3, max_len=64) for i in range(8)]
    counts = label_tokens(np.array([len(e) for e in examples]), np.array([3] * 8))
    plan = [[[0, 2], [4]], [[1, 3], [5, 6, 7]]]  # 2 ranks, 2 micro-batches each, uneven answers
    accumulation, world_size = 2, 2
    total = int(step_label_tokens([batch_label_tokens(plan, counts)], accumulation, 1)[0])
    assert total == int(counts.sum())

    def batch(indices):
        return {k: torch.tensor(v) for k, v in pad_batch([examples[i] for i in indices], 0).items()}

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    divisor = loss_divisor(total, accumulation, world_size)
    ours = grads(sum(model(**batch(b), num_items_in_batch=divisor).loss for rank in plan for b in rank)
                 / (accumulation * world_size))
    everything = pad_batch(examples, 0)
    expected = grads(model(**{k: torch.tensor(v) for k, v in everything.items()}).loss)  # HF's mean over tokens
    naive = grads(sum(model(**batch(b)).loss for rank in plan for b in rank) / (accumulation * world_size))
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(naive, expected, rtol=1e-2, atol=1e-5)  # a mean of batch means is not


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
    from jobs.config.export import ExportConfig
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


def train_env() -> dict[str, str]:
    return {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def run_train(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *args], cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


# ---------------------------------------------------------------------------------------------
# The tokenised split


def shard_pairs(export: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    manifest = json.loads((export / "manifest.json").read_text())
    tables = [pq.read_table(export / f, columns=["question", "answer"]) for f in manifest["splits"]["train"]["files"]]
    return ([q for t in tables for q in t.column("question").to_pylist()],
            [a for t in tables for a in t.column("answer").to_pylist()])


def prepare(export: Path | str, cache: Path, tokenizer, **kwargs):
    from jobs.training.tokenized import prepare_split
    from jobs.train import load_manifest

    manifest, root = load_manifest(str(export))
    return prepare_split(manifest, root, "train", tokenizer, max_len=kwargs.pop("max_len", 64), system_prompt=None,
                         cache_root=cache, **kwargs)


def counting_tokenizer(monkeypatch) -> list[int]:
    """Counts the shards tokenised from now on."""
    from jobs.training import tokenized

    calls: list[int] = []
    real = tokenized.tokenize_shard
    monkeypatch.setattr(tokenized, "tokenize_shard", lambda table, *a, **k: calls.append(table.num_rows) or real(table, *a, **k))
    return calls


def test_tokenised_split_matches_pairwise_encoding_and_is_memory_mapped(tiny_export, tmp_path):
    tokenizer = make_tokenizer()
    data = prepare(tiny_export, tmp_path, tokenizer)
    questions, answers = shard_pairs(tiny_export)
    assert len(data) == len(questions) > 0
    for i in (0, 1, len(data) // 2, len(data) - 1):
        assert data.example(i) == encode_pair(tokenizer, questions[i], answers[i], max_len=64)
    assert data.lengths.tolist() == [len(encode_pair(tokenizer, q, a, 64)) for q, a in zip(questions, answers)]
    assert all(isinstance(t, np.memmap) and t.dtype == np.uint16 for t in data.tokens)  # a small vocabulary
    first = data.example(0)
    assert data.label_counts()[0] == len(first) - first.labels.count(IGNORE_INDEX)
    through_uri = prepare(f"file://{tiny_export}", tmp_path / "uri", tokenizer)  # how s3:// etc. are read
    assert through_uri.lengths.tolist() == data.lengths.tolist()
    from jobs.training.tokenized import prepare_split

    nothing = prepare_split({"shards": [], "splits": {}}, str(tiny_export), "test", tokenizer, max_len=64,
                            system_prompt=None, cache_root=tmp_path)
    assert len(nothing) == 0 and nothing.lengths.tolist() == [] and nothing.label_counts().tolist() == []


def test_tokenised_split_is_reused_and_keyed_by_what_the_tokens_depend_on(tiny_export, tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    calls = counting_tokenizer(monkeypatch)
    data = prepare(tiny_export, tmp_path, tokenizer)
    shards = len(json.loads((tiny_export / "manifest.json").read_text())["splits"]["train"]["files"])
    assert len(calls) == shards > 1
    again = prepare(tiny_export, tmp_path, tokenizer)
    assert len(calls) == shards  # nothing tokenised twice
    assert again.directory == data.directory and again.lengths.tolist() == data.lengths.tolist()
    shorter = prepare(tiny_export, tmp_path, tokenizer, max_len=8)
    assert shorter.directory != data.directory and max(shorter.lengths) == 8
    other = prepare(tiny_export, tmp_path, make_tokenizer(chat_template=None))
    assert other.directory not in (data.directory, shorter.directory)
    assert len(calls) == 3 * shards


def test_ranks_tokenise_their_own_shards_and_a_missing_share_is_an_error(tiny_export, tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    calls = counting_tokenizer(monkeypatch)
    shards = len(json.loads((tiny_export / "manifest.json").read_text())["splits"]["train"]["files"])
    # Rank 1 of 2 alone (as if rank 0 wrote to another node's disk): its parts, then a clear error.
    with pytest.raises(RuntimeError, match=r"no tokens for \d+ shard\(s\).*every node sees"):
        prepare(tiny_export, tmp_path, tokenizer, rank=1, world_size=2)
    assert len(calls) == shards // 2
    # Rank 0 then writes the other half; every part is there and nothing was done twice.
    data = prepare(tiny_export, tmp_path, tokenizer, rank=0, world_size=2)
    assert len(calls) == shards
    assert len(data) == len(shard_pairs(tiny_export)[0])


def test_a_corrupt_shard_is_named_and_a_half_written_part_is_redone(tiny_export, tmp_path, monkeypatch):
    import shutil

    tokenizer = make_tokenizer()
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / "manifest.json").read_text())
    victim = export / manifest["splits"]["train"]["files"][1]
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ValueError, match=f"{victim.name}: sha256 does not match manifest.json"):
        prepare(export, tmp_path / "cache", tokenizer)
    victim.write_bytes(original)
    data = prepare(export, tmp_path / "cache", tokenizer)
    # A part without its index (killed mid-write) is tokenised again; complete ones are kept.
    (data.directory / "part-00001.index.npz").unlink()
    calls = counting_tokenizer(monkeypatch)
    assert len(prepare(export, tmp_path / "cache", tokenizer)) == len(data)
    assert len(calls) == 1


@pytest.mark.slow
def test_a_missing_export_is_one_line(tiny_model, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--export", str(tmp_path / "none"),
                             "--model", str(tiny_model), "--output", str(tmp_path / "out")],
                            cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"jobs/train.py: no manifest.json in {tmp_path / 'none'}; "
                                                       "run `glan export` first")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_deepspeed_step_follows_the_token_mean_on_one_and_two_ranks(tiny_model, tmp_path):
    """DeepSpeed's own scaling (1/accumulation, mean over ranks, ZeRO-2 reduce-scatter) with our
    divisor gives the gradient of the mean over every answer token of the step."""
    script = REPO / "tests" / "ds_gradient_check.py"
    for world_size, stage in ((1, 0), (2, 2)):
        out = tmp_path / f"grad-{world_size}-{stage}.json"
        launcher = ([sys.executable, str(script)] if world_size == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(world_size), str(script)])
        env = {**train_env(), "MASTER_PORT": str(29600 + os.getpid() % 300 + world_size)}
        if world_size > 1:
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        result = subprocess.run([*launcher, str(tiny_model), str(stage), str(out)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        figures = json.loads(out.read_text())
        assert figures["world_size"] == world_size
        assert figures["token_mean_error"] < 1e-4, figures
        assert figures["batch_mean_error"] > 1e-2, figures  # the check can tell the two apart


@pytest.mark.slow
def test_cpu_smoke_run_learns_saves_and_resumes(tiny_export, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "run"
    common = ["--export", str(tiny_export), "--model", str(tiny_model), "--output", str(output),
              "--deepspeed-config", "conf/deepspeed/cpu_fp32.json", "--lr", "3e-3", "--warmup-steps", "2",
              "--micro-batch-tokens", "256", "--max-seq-len", "64", "--pairs-per-step", "16",
              "--save-every-steps", "0", "--log-every-steps", "5", "--eval-every-steps", "10"]
    first_run = run_train([*common, "--max-steps", "20"])
    assert "tokenised" in first_run.stderr and list((output / "tokenized").iterdir())

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(0 < r["answer_tokens"] < r["tokens"] for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20]
    assert records[19]["eval_loss"] < records[9]["eval_loss"] < records[0]["loss"]
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < 0.7 * first, (first, last)
    assert records[0]["lr"] < records[2]["lr"]  # warming up

    hf = output / "hf"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template == CHAT_TEMPLATE
    # The recorded held-out loss is the reloaded model's token mean over the whole test split.
    from jobs.training.tokenized import prepare_split
    from jobs.train import load_manifest

    manifest, root = load_manifest(str(tiny_export))
    heldout = prepare_split(manifest, root, "test", tokenizer, max_len=64, system_prompt=None,
                            cache_root=output / "tokenized")
    assert len(heldout) == 15  # 5 per discipline
    batch = pad_batch([heldout.example(i) for i in range(len(heldout))], tokenizer.pad_token_id)
    expected = model(**{k: torch.tensor(v) for k, v in batch.items()}).loss.item()
    assert records[19]["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-20"

    # Resume from the DeepSpeed checkpoint: steps 21..24 continue the same schedule.
    resumed = run_train([*common, "--max-steps", "24", "--resume"])
    assert "tokenised" not in resumed.stderr  # the tokens come from the first run's cache
    plan = json.loads((output / "checkpoints" / "step-24" / "glan_plan.json").read_text())
    assert plan["micro_step"] == 24 * plan["accumulation"] and plan["world_size"] == 1
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-24"

    # Another batch plan (here another seed) would make the step count point at other batches.
    other = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *common, "--max-steps", "28",
                            "--resume", "--seed", "7"], cwd=REPO, env=train_env(), capture_output=True, text=True,
                           timeout=240)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1] == (
        f"jobs/train.py: cannot resume from {output / 'checkpoints' / 'step-24'}: it was trained with seed=42 "
        "(now 7), so its step count would point at other batches; resume with the same settings or start a "
        "new --output")
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-24"


def _bench_train():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
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


def test_warmup_ratio_sets_the_warmup_from_the_run_length_and_a_long_warmup_is_named():
    assert warmup_for(59_000, 1000) == 1000  # the paper's 1,000 steps, whatever the run
    assert warmup_for(2_200, 1000, 0.017) == 37  # the paper's share of a 0.4M-pair run
    assert warmup_warning(1000, 59_000) is None  # 1.7%
    line = warmup_warning(1000, 2_200)  # about 45%
    assert "1000 of the run's 2200" in line and "45%" in line and "train.warmup_ratio" in line
    assert warmup_warning(220, 2_200) is None  # exactly 10% is fine
    with pytest.raises(ConfigError, match=r"warmup_ratio=1.0 must be in \[0, 1\)"):
        load_config([], ["train.warmup_ratio=1.0"])
