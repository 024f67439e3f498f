"""`trialign rollout` on a tiny random model: row structure, rewards and returns against NumPy, behavior
log-probabilities against the training collator's forward pass, manifest, sharding, resume, and every bad input."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trialign.errors import TriAlignError
from trialign.groups import load_groups
from trialign.preferences import preference_score
from trialign.prompts import build_messages
from trialign.rollout.command import main, parse_config
from trialign.rollout.config import RolloutConfig
from trialign.rollout.episodes import discounted_returns
from trialign.rollout.sampler import HFSampler, score_actions, score_actions_on_cache
from trialign.tokens import end_of_turn_id
from trialign.rollout.schema import USER_KINDS
from trialign.tasks import load_task

GROUP_IDS = ["neutral", "retired_farmer", "teenager"]
ITEMS, SAMPLES, TURNS = 3, 2, 2
STATES = 3
"""Cross-group states after the episode items: shards 0-1 hold episodes (2 + 1 items), shards 2-3 states (2 + 1)."""
SHARDS = [f"shard-{i:05d}-of-00004.parquet" for i in range(4)]


def base_args(model_dir: str, output: Path, *extra: str) -> list[str]:
    return ["--model", model_dir, "--task", "truthfulqa_mc1", "--limit", str(ITEMS), "--items-per-shard", "2",
            "--states-limit", str(STATES), "--states-per-shard", "2",
            "--group-ids", *GROUP_IDS, "--samples", str(SAMPLES), "--turns", str(TURNS), "--max-new-tokens", "8",
            "--temperature", "1.5", "--alpha", "0.5", "--gamma", "0.8", "--no-progress", "--output", str(output),
            *extra]


def load_rows(folder: Path) -> list[dict]:
    from datasets import load_dataset

    return list(load_dataset("parquet", data_files=str(folder / "shard-*.parquet"), split="train"))


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
            and not p.name.startswith(".")}


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """Same items in the same order, same texts, numbers equal up to float32 noise of batched matmuls."""
    assert [r["item_id"] for r in a] == [r["item_id"] for r in b]

    def flat(value, path=""):
        if isinstance(value, dict):
            for k in sorted(value):
                yield from flat(value[k], f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from flat(v, f"{path}[{i}]")
        else:
            yield path, value

    for x, y in zip(a, b):
        left, right = dict(flat(x)), dict(flat(y))
        assert left.keys() == right.keys()
        for key in left:
            if isinstance(left[key], float):
                assert math.isclose(left[key], right[key], rel_tol=1e-4, abs_tol=1e-4), key
            else:
                assert left[key] == right[key], key


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    """One uninterrupted run: 3 items (2 shards) x 3 groups x 2 samples x 2 turns, and 3 state items (2 shards)."""
    out = tmp_path_factory.mktemp("rollout") / "full"
    assert main(base_args(tiny_model_dir, out)) == 0
    return out


# ---------------------------------------------------------------- rows

def test_rows_have_every_group_sample_and_turn(dataset):
    rows = load_rows(dataset)
    items = load_task("truthfulqa_mc1", limit=ITEMS)
    groups = {g.id: g for g in load_groups("default")}
    assert [r["item_id"] for r in rows[:ITEMS]] == [i.id for i in items]
    assert [r["kind"] for r in rows] == ["episodes"] * ITEMS + ["state"] * STATES
    rows = rows[:ITEMS]
    for row, item in zip(rows, items):
        assert row["options"] == list(item.options) and row["gold_index"] == item.gold
        assert row["gold_text"] == item.options[item.gold] and row["answer_type"] == "option"
        assert [g["group"] for g in row["groups"]] == GROUP_IDS
        for entry in row["groups"]:
            group = groups[entry["group"]]
            assert entry["preferences"] == list(group.preferences) and entry["expression"] == "explicit"
            assert [e["sample"] for e in entry["episodes"]] == list(range(SAMPLES))
            first_user = build_messages(item, group)[-1]["content"]
            assert entry["state"]["user"] == first_user
            for episode in entry["episodes"]:
                turns = episode["turns"]
                assert len(turns) == TURNS
                assert turns[0]["user"] == first_user and turns[0]["user_kind"] == "question"
                assert all(t["user_kind"] in USER_KINDS[1:] for t in turns[1:])
                for turn in turns:
                    assert turn["user"].strip() and turn["assistant"].strip()
                    assert turn["truth"] in (0, 1) and 0.0 <= turn["pers"] <= 1.0
                    assert turn["truth"] == int(int(turn["answer"]) in item.correct_options)
                    assert len(turn["option_logprobs"]) == len(item.options)
                    assert int(turn["answer"]) == int(np.argmax(turn["option_logprobs"]))
                    assert turn["pers"] == pytest.approx(preference_score(turn["assistant"], group.preferences))
                    assert math.isfinite(turn["behavior_logprob"]) and turn["behavior_logprob"] < 0
                    assert math.isfinite(turn["gold_logprob"]) and turn["num_tokens"] >= 2
                rewards = np.array([t["truth"] + 0.5 * t["pers"] for t in turns])
                np.testing.assert_allclose([t["reward"] for t in turns], rewards, rtol=1e-6)
                expected = [sum(0.8 ** (k - t) * rewards[k] for k in range(t, TURNS)) for t in range(TURNS)]
                np.testing.assert_allclose([t["ret"] for t in turns], expected, rtol=1e-6)


def test_discounted_returns_match_numpy():
    rewards = np.random.default_rng(0).uniform(0, 1.5, size=7)
    gamma = 0.7
    expected = [float(np.sum(gamma ** np.arange(7 - t) * rewards[t:])) for t in range(7)]
    np.testing.assert_allclose(discounted_returns(list(rewards), gamma), expected, rtol=1e-12)
    assert discounted_returns([1.0, 2.0], 0.0) == [1.0, 2.0]


def test_behavior_logprob_equals_training_forward_pass(dataset, tiny_model_dir):
    """log mu stored by the rollout = log pi of the same model on the data module's tokens (so pi/mu = 1)."""
    assert_log_mu_is_the_training_forward(load_rows(dataset), tiny_model_dir)


def assert_log_mu_is_the_training_forward(rows: list[dict], model_dir: str) -> None:
    from trialign.backbone import load_model_and_tokenizer
    from trialign.datamodules.collate import TrajectoryCollator

    model, tokenizer = load_model_and_tokenizer(model_dir)
    batch = TrajectoryCollator(tokenizer, GROUP_IDS, max_length=4096)(rows[:2])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    token_logprobs = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    stored = [[t["behavior_logprob"] for t in e["turns"]] for r in rows[:2] for g in r["groups"] for e in g["episodes"]]
    stored_tokens = [[t["num_tokens"] for t in e["turns"]] for r in rows[:2] for g in r["groups"]
                     for e in g["episodes"]]
    for n in range(len(stored)):
        for t in range(TURNS):
            in_action = batch["action_turn"][n, 1:] == t + 1
            assert int(in_action.sum()) == stored_tokens[n][t] == int(batch["num_tokens"][n, t])
            assert float(token_logprobs[n][in_action].sum()) == pytest.approx(stored[n][t], rel=1e-4, abs=2e-3)


def test_score_actions_matches_unpadded_forward(tiny_model, embedded_tokenizer):
    prompts = [[5, 17, 300, 41], [9, 8, 7, 6, 5, 4, 3, 2, 1000], [77]]
    actions = [[12, 2], [400, 401, 402, 2], [2]]
    got = score_actions(tiny_model, embedded_tokenizer, prompts, actions, batch_size=2)
    for prompt, action, value in zip(prompts, actions, got):
        with torch.no_grad():
            logprobs = tiny_model(torch.tensor([prompt + action])).logits[0].double().log_softmax(-1)
        expected = sum(float(logprobs[len(prompt) - 1 + j, tok]) for j, tok in enumerate(action))
        assert value == pytest.approx(expected, abs=1e-4)


def test_sampler_logprobs_from_generate_equal_forward_pass(tiny_model, embedded_tokenizer):
    """log mu from generate's logits, for messages that stopped by themselves and messages cut at max_new_tokens
    (end token scored by one more decode step), equals an unpadded forward pass."""
    tokenizer = embedded_tokenizer
    end = end_of_turn_id(tokenizer)
    head = tiny_model.get_input_embeddings().weight.detach().clone()
    head[end] = head.mean(0) * 0 + 2.0  # the end token gets a fair chance at every step: both kinds of messages
    tiny_model.lm_head.weight = torch.nn.Parameter(head)
    prompts = [list(tokenizer(f"<|im_start|>user\nhello {i}<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False)["input_ids"]) for i in range(8)]
    prompts[0] = prompts[0][:4] + prompts[0]  # unequal lengths: left padding
    sampler = HFSampler(tiny_model, tokenizer)
    samples = sampler.sample(prompts, max_new_tokens=5, temperature=1.0, seed=3).samples
    stopped = [s for s in samples if s.stop is not None]
    assert stopped and len(stopped) < len(samples)
    assert all(s.stop == end and 1 <= len(s.tokens) < 5 for s in stopped)
    assert all(len(s.tokens) == 5 for s in samples if s.stop is None)
    actions = [s.tokens + [end] for s in samples]
    for sample, direct in zip(samples, score_actions(tiny_model, tokenizer, prompts, actions)):
        assert sample.logprob == pytest.approx(direct, abs=1e-3)
    again = sampler.sample(prompts, max_new_tokens=5, temperature=1.0, seed=3).samples
    assert [s.tokens for s in again] == [s.tokens for s in samples]  # seeded
    assert HFSampler(tiny_model, tokenizer, autocast=True).sample(prompts, max_new_tokens=2, temperature=1.0,
                                                                  seed=0).samples[0].logprob is None


def test_sampler_shares_prompts_and_continues_the_previous_turn(tiny_model, embedded_tokenizer):
    """Turn 0: repeated prompts share one prefill. Turn 1: the cache of turn 0 is continued (stopped rows have a
    stop token and padding masked out, cut rows feed their end token anew). log mu equals a fresh forward pass."""
    tokenizer = embedded_tokenizer
    end = end_of_turn_id(tokenizer)
    head = tiny_model.get_input_embeddings().weight.detach().clone()
    head[end] = 2.0
    tiny_model.lm_head.weight = torch.nn.Parameter(head)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts = [encode(f"<|im_start|>user\nquestion {i // 2} {'x' * (i // 2)}<|im_end|>\n<|im_start|>assistant\n")
               for i in range(6)]  # three prompts, each twice (K = 2)
    sampler = HFSampler(tiny_model, tokenizer)
    first = sampler.sample(prompts, max_new_tokens=4, temperature=1.0, seed=1)
    assert {s.stop is None for s in first.samples} == {True, False}
    actions = [s.tokens + [end] for s in first.samples]
    for sample, direct in zip(first.samples, score_actions(tiny_model, tokenizer, prompts, actions)):
        assert sample.logprob == pytest.approx(direct, abs=1e-3)
    user = encode("\n<|im_start|>user\nAre you sure?<|im_end|>\n<|im_start|>assistant\n")
    following = [p + a + user[: 3 + i] + user[-3:] for i, (p, a) in enumerate(zip(prompts, actions))]
    second = sampler.sample(following, max_new_tokens=4, temperature=1.0, seed=2, cache=first.cache)
    actions = [s.tokens + [end] for s in second.samples]
    direct = score_actions(tiny_model, tokenizer, following, actions)
    for sample, value in zip(second.samples, direct):
        assert sample.logprob == pytest.approx(value, abs=1e-3)
    # Actions other than the sampled ones, scored on the cache (how re-tokenized messages get log mu).
    others = [[7, 8, end], [end], [300, end], [11, 12, 13, 14, end], [5, end], [9, 9, end]]
    rows = [4, 0, 2, 5]
    on_cache = score_actions_on_cache(tiny_model, second.cache, rows, [following[r] for r in rows],
                                      [others[r] for r in rows], pad_id=2, batch_size=3)
    assert on_cache == pytest.approx(score_actions(tiny_model, tokenizer, [following[r] for r in rows],
                                                   [others[r] for r in rows]), abs=1e-3)


def test_state_rows_hold_the_behavior_probe_at_s0(dataset, tiny_model_dir, embedded_tokenizer):
    """A state's stored reading equals `AnswerProbe` on the same context (s_0 under the group's persona, the
    template's answer prefix); the states are the items after the episodes' in the task's order."""
    from trialign.backbone import load_model
    from trialign.probe import AnswerProbe, render_context
    from trialign.prompts import DEFAULT_PROBE_TEMPLATE, PROBE_TEMPLATES

    rows = load_rows(dataset)
    items = load_task("truthfulqa_mc1", limit=ITEMS + STATES)
    states = [r for r in rows if r["kind"] == "state"]
    assert [r["item_id"] for r in states] == [i.id for i in items[ITEMS:]]
    groups = {g.id: g for g in load_groups("default")}
    probe = AnswerProbe(load_model(tiny_model_dir), embedded_tokenizer)
    prefix = PROBE_TEMPLATES[DEFAULT_PROBE_TEMPLATE].answer_prefix
    for row, item in zip(rows, [*items[:ITEMS], *items[ITEMS:]]):  # episode rows hold s_0's reading too
        for entry in row["groups"]:
            assert entry["episodes"] == [] if row["kind"] == "state" else len(entry["episodes"]) == SAMPLES
            context = render_context(embedded_tokenizer, build_messages(item, groups[entry["group"]]),
                                     answer_prefix=prefix)
            expected = probe.score_options([context], [list(item.options)])[0]
            state = entry["state"]
            # Stored as float32 after a batch of contexts: equal up to that rounding, on any CPU.
            assert state["option_logprobs"] == pytest.approx(expected.logliks, abs=1e-3)
            assert int(state["answer"]) == expected.acc_choice
            assert state["truth"] == int(expected.acc_choice in item.correct_options)


@pytest.mark.parametrize("extra, expected", [
    (["--states-limit", "-1"], "states_limit: expected 0 or more items, got -1"),
    (["--states-limit", "900"], "states_limit: task truthfulqa_mc1 has 817 items, fewer than limit + states_limit "
                                "= 903"),
    (["--probe-template", "letters"], "probe_template: unknown template 'letters'; expected one of "),
])
def test_bad_state_and_template_settings_are_one_line_errors(tiny_model_dir, tmp_path, extra, expected):
    args = base_args(tiny_model_dir, tmp_path / "out")
    args[args.index("--states-limit"):args.index("--states-limit") + 2] = []
    with pytest.raises(TriAlignError) as error:
        main(args + extra)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_manifest_describes_the_dataset(dataset, tiny_model_dir):
    from trialign.backbone import load_model, weights_fingerprint
    from trialign.rollout.schema import SCHEMA_VERSION

    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["complete"] is True
    assert manifest["group_ids"] == GROUP_IDS and manifest["reference_group"] == "neutral"
    assert manifest["counts"] == {"items": 3, "states": 3, "groups": 3, "samples": 2, "turns": 2, "episodes": 18,
                                  "assistant_turns": 36}
    assert manifest["model"] == {"source": tiny_model_dir,
                                 "weights_fingerprint": weights_fingerprint(load_model(tiny_model_dir))}
    assert manifest["config"]["max_new_tokens"] == 8 and "output" not in manifest["config"]
    assert [s["file"] for s in manifest["shards"]] == SHARDS
    ids = [r["item_id"] for r in load_rows(dataset)]
    assert [s["item_ids"] for s in manifest["shards"]] == [ids[:2], ids[2:3], ids[3:5], ids[5:]]


def test_streaming_load(dataset):
    from datasets import load_dataset

    stream = load_dataset("parquet", data_files=str(dataset / "shard-*.parquet"), split="train", streaming=True)
    assert [row["item_id"] for row in stream] == [r["item_id"] for r in load_rows(dataset)]


# ---------------------------------------------------------------- resume and sharding

def test_sharded_runs_load_as_the_unsharded_dataset(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "sharded"
    for index in (1, 0):
        assert main(base_args(tiny_model_dir, out, "--num-shards", "2", "--shard-index", str(index))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    assert_same_rows(load_rows(out), load_rows(dataset))


def test_rerun_resumes_missing_shards_only(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(dataset, out)
    kept = (out / SHARDS[0]).read_bytes()
    (out / SHARDS[1]).unlink()
    (out / SHARDS[3]).unlink()  # a shard of states
    (out / f".{SHARDS[1]}.tmp999").write_bytes(b"half a file")  # left by a killed writer
    assert main(base_args(tiny_model_dir, out)) == 0
    assert (out / SHARDS[0]).read_bytes() == kept  # not regenerated
    assert not list(out.glob(".shard-*"))
    assert_same_rows(load_rows(out), load_rows(dataset))
    before = folder_digest(out)
    assert main(base_args(tiny_model_dir, out)) == 0  # complete: nothing to do
    assert {k: v for k, v in folder_digest(out).items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def test_same_seed_and_config_write_byte_identical_shards(dataset, tiny_model_dir, tmp_path):
    """Determinism on CPU: a second run of the same command writes the same Parquet bytes (the manifest differs
    only in its run fields: launch id and timestamps). GPU kernels (vLLM, cuBLAS) give no such promise."""
    out = tmp_path / "again"
    assert main(base_args(tiny_model_dir, out)) == 0
    shards = sorted(p.name for p in dataset.glob("shard-*.parquet"))
    assert shards == SHARDS and sorted(p.name for p in out.glob("shard-*.parquet")) == shards
    for name in shards:
        assert (out / name).read_bytes() == (dataset / name).read_bytes(), name
    first, second = (json.loads((folder / "manifest.json").read_text()) for folder in (dataset, out))
    run_fields = {"launch_id", "created_at", "updated_at"}
    assert {k: v for k, v in first.items() if k not in run_fields} == \
        {k: v for k, v in second.items() if k not in run_fields}


def test_torchrun_rank_sets_the_shard(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    config = parse_config(["--output", str(tmp_path)])
    assert (config.num_shards, config.shard_index) == (4, 3)
    with pytest.raises(TriAlignError, match="torchrun launched WORLD_SIZE=4 RANK=3"):
        parse_config(["--output", str(tmp_path), "--num-shards", "2", "--shard-index", "0"])


# ---------------------------------------------------------------- bad input

def test_different_config_is_refused_and_nothing_is_overwritten(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(dataset, out)
    before = folder_digest(out)
    args = base_args(tiny_model_dir, out)
    args[args.index("--max-new-tokens") + 1] = "9"
    args[args.index("--turns") + 1] = "3"
    with pytest.raises(TriAlignError) as error:
        main(args)
    message = str(error.value)
    assert "\n" not in message and "different settings" in message and "--overwrite" in message
    assert "max_new_tokens: 8 in the dataset, 9 now" in message and "turns: 2 in the dataset, 3 now" in message
    assert folder_digest(out) == before


def test_overwrite_replaces_the_dataset(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "replace"
    shutil.copytree(dataset, out)
    (out / "notes.txt").write_text("mine")
    args = base_args(tiny_model_dir, out, "--overwrite")
    args[args.index("--limit") + 1] = "1"
    args[args.index("--states-limit") + 1] = "0"
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["limit"] == 1 and manifest["config"]["states_limit"] == 0 and manifest["complete"]
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000-of-00001.parquet"]
    assert (out / "notes.txt").read_text() == "mine"  # only the dataset's own files are replaced


def test_weights_differing_from_the_dataset_are_refused(dataset, tmp_path, embedded_tokenizer):
    from tests.conftest import make_tiny_model

    other = tmp_path / "other_model"
    make_tiny_model(len(embedded_tokenizer), seed=1).save_pretrained(other)
    embedded_tokenizer.save_pretrained(other)
    out = tmp_path / "weights"
    shutil.copytree(dataset, out)
    (out / SHARDS[1]).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["model"] = str(other)
    manifest["model"]["source"] = str(other)
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = folder_digest(out)
    with pytest.raises(TriAlignError, match=r"other weights of model .*weights_fingerprint"):
        main(base_args(str(other), out))
    assert {k: v for k, v in folder_digest(out).items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


@pytest.mark.parametrize("flag, value, expected", [
    ("--turns", "0", "turns: expected T >= 1 assistant turns per episode, got 0"),
    ("--samples", "0", "samples: expected K >= 1 episodes per (item, group), got 0"),
    ("--temperature", "0", "temperature: expected > 0"),
    ("--shard-index", "2", "shard_index: expected 0 <= shard_index < num_shards=1, got 2"),
])
def test_bad_settings_are_one_line_errors(tiny_model_dir, tmp_path, flag, value, expected):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, out)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(TriAlignError) as error:
        main(args)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()


def test_unknown_group_id(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, out)
    args[args.index("--group-ids") + 1] = "martian"
    with pytest.raises(TriAlignError, match="group_ids: unknown group id 'martian'; known: neutral, "):
        main(args)
    assert not out.exists()


def test_unknown_user_turn_kind(tiny_model_dir, tmp_path):
    with pytest.raises(TriAlignError, match="user_mix: unknown turn kind"):
        main(base_args(tiny_model_dir, tmp_path / "out", "--set", "user_mix={insult: 1}"))


def test_unwritable_output_folder(tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    loaded = []
    monkeypatch.setattr("trialign.backbone.load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(TriAlignError, match=r"output .*a_file/data: not a writable folder"):
        main(base_args(tiny_model_dir, blocker / "data"))
    assert not loaded and blocker.read_text() == "not a folder"


def test_shards_without_manifest_are_refused(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "stray"
    shutil.copytree(dataset, out)
    (out / "manifest.json").unlink()
    with pytest.raises(TriAlignError, match="holds shard files but no manifest.json; pass --overwrite"):
        main(base_args(tiny_model_dir, out))


def test_overwrite_with_manual_shards_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(TriAlignError, match="--overwrite with --num-shards"):
        main(base_args(tiny_model_dir, tmp_path / "o", "--overwrite", "--num-shards", "2", "--shard-index", "0"))


def test_vllm_backend_without_vllm(tiny_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    out = tmp_path / "out"
    with pytest.raises(TriAlignError, match="backend 'vllm': vllm is not installed"):
        main(base_args(tiny_model_dir, out, "--backend", "vllm"))
    assert not out.exists()


def test_vllm_backend_runs_where_installed(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA device")
    out = tmp_path / "vllm"
    assert main(base_args(tiny_model_dir, out, "--backend", "vllm")) == 0
    rows = load_rows(out)
    assert len(rows) == ITEMS and all(math.isfinite(t["behavior_logprob"]) for r in rows for g in r["groups"]
                                      for e in g["episodes"] for t in e["turns"])


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--items-per-shard" in text and "K: episodes sampled per (item, group)" in text


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/rollout/*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(path):
    config = parse_config(["--config", str(path)])
    assert config.output.startswith("runs/rollout/") and config.samples >= 2 and config.turns >= 2


def test_config_content_excludes_run_fields():
    config = RolloutConfig(output="x", num_shards=2, shard_index=1, overwrite=True)
    assert {"output", "num_shards", "shard_index", "overwrite"}.isdisjoint(config.content())
    assert config.content()["user_mix"] == {"challenge": 0.5, "reexplain": 0.25, "reminder": 0.25}


@pytest.mark.slow
def test_embedded_model_rollout(tmp_path, embedded_model, embedded_tokenizer):
    """The real model: 2 items x 2 groups x 1 sample x 2 turns; English messages, consistent numbers, and the probe
    reading continued from the sampler's cache equals the plain probe run on each stored conversation."""
    from trialign.probe import AnswerProbe, render_context

    out = tmp_path / "real"
    assert main(["--limit", "2", "--items-per-shard", "2", "--group-ids", "neutral", "phd_researcher",
                 "--samples", "1", "--turns", "2", "--max-new-tokens", "24", "--no-progress", "--threads", "1",
                 "--output", str(out)]) == 0
    rows = load_rows(out)
    items = load_task("truthfulqa_mc1", limit=2)
    assert len(rows) == 2
    contexts, turns, turn_items = [], [], []
    for row, item in zip(rows, items):
        for group in row["groups"]:
            (episode,) = group["episodes"]
            assert len(episode["turns"]) == 2
            messages = []
            for turn in episode["turns"]:
                assert sum(ch.isalpha() for ch in turn["assistant"]) >= 2  # words (a short answer is fine)
                assert turn["truth"] in (0, 1) and 0 <= turn["pers"] <= 1
                assert -200 < turn["behavior_logprob"] < 0 and 2 <= turn["num_tokens"] <= 25
                messages.append({"role": "user", "content": turn["user"]})
                contexts.append(render_context(embedded_tokenizer, messages, response=turn["assistant"],
                                               answer_prefix="Answer:"))  # the default template's
                messages.append({"role": "assistant", "content": turn["assistant"]})
                turns.append(turn)
                turn_items.append(item)
    readings = AnswerProbe(embedded_model, embedded_tokenizer).answer(turn_items, contexts)
    assert [r.answer for r in readings] == [t["answer"] for t in turns]
    for reading, turn in zip(readings, turns):
        assert turn["option_logprobs"] == pytest.approx(reading.option_logprobs, abs=2e-3)


# ---------------------------------------------------------------- the CTranslate2 backend

def test_ct2_backend_samples_and_stores_the_transformers_log_mu(tiny_model_dir, tmp_path):
    """backend ct2: a complete dataset whose log mu is the transformers model's (pi/mu = 1 at the start)."""
    pytest.importorskip("ctranslate2", reason="the ct2 extra (make setup installs it)")
    out = tmp_path / "ct2"
    assert main(base_args(tiny_model_dir, out, "--backend", "ct2", "--ct2-compute-type", "float32",
                          "--cache-dir", str(tmp_path / "cache"))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["backend"] == "ct2" and manifest["config"]["ct2_compute_type"] == "float32"
    rows = load_rows(out)
    assert len([r for r in rows if r["groups"][0]["episodes"]]) == ITEMS
    assert_log_mu_is_the_training_forward(rows, tiny_model_dir)
    assert (tmp_path / "cache" / "ct2").is_dir()  # converted once, reused by the next run


def test_ct2_float32_sampling_distribution_is_the_models_up_to_rounding(tiny_model_dir, embedded_tokenizer, tmp_path):
    """The bound behind storing the transformers log mu: in float32 the backend's own log-probability of what it
    sampled equals the transformers model's within rounding (int8 weights move it further; bench_rollout measures
    how far)."""
    pytest.importorskip("ctranslate2", reason="the ct2 extra (make setup installs it)")
    from trialign.backbone import load_model
    from trialign.rollout.ct2 import CT2Sampler
    from trialign.rollout.sampler import score_actions

    items = load_task("truthfulqa_mc1", limit=2)
    groups = load_groups("default")[:3]
    prompts = [embedded_tokenizer(embedded_tokenizer.apply_chat_template(build_messages(i, g), tokenize=False,
                                                                         add_generation_prompt=True),
                                  add_special_tokens=False)["input_ids"] for i in items for g in groups]
    sampler = CT2Sampler(tiny_model_dir, embedded_tokenizer, cache_dir=tmp_path, compute_type="float32")
    generation, own = sampler.sample_scored(prompts, max_new_tokens=12, temperature=1.0, seed=0)
    actions = [s.tokens + ([s.stop] if s.stop is not None else []) for s in generation.samples]
    assert all(1 <= len(a) <= 12 for a in actions)
    with torch.no_grad():
        reference = score_actions(load_model(tiny_model_dir), embedded_tokenizer, prompts, actions)
    per_token = [abs(a - b) / len(x) for a, b, x in zip(own, reference, actions)]
    assert max(per_token) < 1e-3, per_token
    again, _ = sampler.sample_scored(prompts, max_new_tokens=12, temperature=1.0, seed=0)
    assert [s.tokens for s in again.samples] == [s.tokens for s in generation.samples]  # seeded


def test_ct2_settings_are_one_line_errors(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(TriAlignError, match=r"^ct2_compute_type: expected one of int8, int8_float32, float32, got "
                                            r"'int4'$"):
        main(base_args(tiny_model_dir, tmp_path / "a", "--backend", "ct2", "--ct2-compute-type", "int4"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else real(name, *a))
    with pytest.raises(TriAlignError, match=r"^backend 'ct2': ctranslate2 is not installed; install it with `pip "
                                            r"install 'trialign\[ct2\]'`, or use backend 'hf'$"):
        main(base_args(tiny_model_dir, tmp_path / "b", "--backend", "ct2"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
