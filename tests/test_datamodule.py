"""GroupTrajectoryDataModule and its collator: tensors against the chat template, split, sharding, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from data_factory import synthetic_rows, write_rollout_rows, write_synthetic_rollout
from trialign.datamodules import GroupTrajectoryDataModule, TrajectoryCollator, scan_rollout, split_items
from trialign.datamodules.streams import epoch_plan
from trialign.errors import TriAlignError
from trialign.probe import render_context

EMBEDDED = "smollm2-135m-instruct"
EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def rows_and_groups():
    return synthetic_rows(items=3, groups=3, samples=2, turns=3, seed=1, free_form=1)


@pytest.fixture(scope="module")
def batch(rows_and_groups, embedded_tokenizer):
    rows, groups = rows_and_groups
    return TrajectoryCollator(embedded_tokenizer, groups, max_length=1024)(rows)


def _episodes(rows, groups):
    """(b, g, k, group dict, episode dict) in the collator's order: item, then group, then sample."""
    for b, row in enumerate(rows):
        by_name = {group["group"]: group for group in row["groups"]}
        for g, name in enumerate(groups):
            for k, episode in enumerate(by_name[name]["episodes"]):
                yield b, g, k, by_name[name], episode


def _messages(group, turns, upto_user: int | None = None):
    messages = [{"role": "system", "content": group["system"]}] if group["system"] else []
    for t, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn["user"]})
        if upto_user == t:
            return messages
        messages.append({"role": "assistant", "content": turn["assistant"]})
    return messages


def test_episode_shapes_indices_and_values(batch, rows_and_groups):
    rows, groups = rows_and_groups
    B, G, K, T = 3, 3, 2, 3
    N = B * G * K
    length = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "action_turn"):
        assert batch[key].shape == (N, length) and batch[key].dtype == torch.long
    for key in ("state_end", "num_tokens", "truth"):
        assert batch[key].shape == (N, T) and batch[key].dtype == torch.long
    for key in ("rewards", "returns", "pers", "behavior_logprob"):
        assert batch[key].shape == (N, T) and batch[key].dtype == torch.float32
    assert batch["turn_mask"].dtype == torch.bool and bool(batch["turn_mask"].all())
    assert batch["item_ids"] == [row["item_id"] for row in rows] and batch["group_names"] == groups
    expected = list(_episodes(rows, groups))
    assert batch["item_index"].tolist() == [b for b, *_ in expected]
    assert batch["group_index"].tolist() == [g for _, g, *_ in expected]
    assert batch["sample_index"].tolist() == [e["sample"] for *_, e in expected]
    for n, (*_, episode) in enumerate(expected):
        turns = episode["turns"]
        np.testing.assert_allclose(batch["rewards"][n].numpy(), [t["reward"] for t in turns], rtol=1e-6)
        np.testing.assert_allclose(batch["returns"][n].numpy(), [t["ret"] for t in turns], rtol=1e-6)
        np.testing.assert_allclose(batch["pers"][n].numpy(), [t["pers"] for t in turns], rtol=1e-6)
        np.testing.assert_allclose(batch["behavior_logprob"][n].numpy(), [t["behavior_logprob"] for t in turns],
                                   rtol=1e-6)
        assert batch["truth"][n].tolist() == [t["truth"] for t in turns]
    # right padding: real tokens first, pad token id after, no action on padding
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    assert bool((mask == (torch.arange(length)[None] < lengths[:, None])).all())
    assert bool((batch["input_ids"][~mask] == batch["input_ids"].new_tensor(2)).all())  # SmolLM2 pad = <|im_end|>
    assert not bool(batch["action_turn"][~mask].any())
    counts = torch.stack([(batch["action_turn"] == t + 1).sum(1) for t in range(T)], 1)
    assert torch.equal(counts, batch["num_tokens"]) and bool((counts > 0).all())
    assert int(batch["dropped_turns"]) == 0


def test_labels_decode_to_assistant_messages_and_sequence_is_the_template(batch, rows_and_groups,
                                                                          embedded_tokenizer):
    rows, groups = rows_and_groups
    tok = embedded_tokenizer
    for n, (_, _, _, group, episode) in enumerate(_episodes(rows, groups)):
        ids = batch["input_ids"][n][batch["attention_mask"][n].bool()]
        for t, turn in enumerate(episode["turns"]):
            action = batch["input_ids"][n][batch["action_turn"][n] == t + 1]
            assert tok.decode(action) == turn["assistant"] + EOT
            assert action.tolist() == tok(turn["assistant"] + EOT, add_special_tokens=False)["input_ids"]
        rendered = tok.apply_chat_template(_messages(group, episode["turns"]), tokenize=False)
        assert rendered.endswith(EOT + "\n")
        # The sequence is the template render up to the last end-of-turn token; for SmolLM2 the piecewise
        # tokenization also equals tokenizing the whole render at once (pieces meet at special tokens).
        assert tok.decode(ids) == rendered[:-1]
        assert ids.tolist() == tok(rendered[:-1], add_special_tokens=False)["input_ids"]


def test_state_end_is_the_last_token_of_each_state(batch, rows_and_groups, embedded_tokenizer):
    rows, groups = rows_and_groups
    tok = embedded_tokenizer
    for n, (_, _, _, group, episode) in enumerate(_episodes(rows, groups)):
        for t in range(len(episode["turns"])):
            end = int(batch["state_end"][n, t])
            assert int(batch["action_turn"][n, end]) == 0 and int(batch["action_turn"][n, end + 1]) == t + 1
            state = tok.apply_chat_template(_messages(group, episode["turns"], upto_user=t), tokenize=False,
                                            add_generation_prompt=True)
            assert tok.decode(batch["input_ids"][n, : end + 1]) == state


def test_probe_rows_match_the_answer_probe(batch, rows_and_groups, embedded_tokenizer, tiny_model):
    from trialign.probe import AnswerProbe

    rows, groups = rows_and_groups
    tok = embedded_tokenizer
    options = [row["options"] if row["answer_type"] == "option" else [row["gold_text"]] for row in rows]
    expected_index = [(b, g, o) for b in range(3) for g in range(3) for o in range(len(options[b]))]
    assert batch["probe_index"].tolist() == [list(i) for i in expected_index]
    width = max(len(o) for o in options)
    assert batch["option_mask"].tolist() == [[o < len(opts) for o in range(width)] for opts in options]
    assert batch["has_options"].tolist() == [row["answer_type"] == "option" for row in rows]
    assert batch["gold_index"].tolist() == [row["gold_index"] for row in rows]
    assert batch["gold_index"][2] == -1 and not bool(batch["correct_options"][2].any())
    for b, row in enumerate(rows[:2]):
        assert batch["correct_options"][b].nonzero().flatten().tolist() == row["correct_options"]
    probe = AnswerProbe(tiny_model, tok)
    for m, (b, g, o) in enumerate(expected_index):
        group = {x["group"]: x for x in rows[b]["groups"]}[groups[g]]
        messages = _messages(group, group["episodes"][0]["turns"], upto_user=0)
        context = render_context(tok, messages, None, "Final answer:")
        real = batch["probe_attention_mask"][m].bool()
        continuation = batch["probe_continuation_mask"][m].bool()
        ids = batch["probe_input_ids"][m]
        context_ids, continuation_ids = probe._encode_pairs([context], [options[b]])
        assert ids[real & ~continuation].tolist() == context_ids[0]
        assert ids[continuation].tolist() == continuation_ids[0][o]
        assert tok.decode(ids[continuation]) == " " + options[b][o]
        assert bool((continuation <= real).all())


def test_max_length_drops_whole_trailing_turns(rows_and_groups, embedded_tokenizer, batch):
    rows, groups = rows_and_groups
    ends = torch.stack([(batch["action_turn"] == t + 1).int().cumsum(1).argmax(1) + 1 for t in range(3)], 1)
    limit = int(ends[:, 1].min())  # the episode with the shortest first two turns keeps exactly two
    collator = TrajectoryCollator(embedded_tokenizer, groups, max_length=limit)
    cut = collator(rows)
    kept = (ends <= limit).sum(1)
    assert cut["turn_mask"].tolist() == [[t < k for t in range(3)] for k in kept.tolist()]
    assert int(cut["dropped_turns"]) == int((3 - kept).sum()) == collator.dropped_turns > 0
    for n in range(len(kept)):
        k = int(kept[n])
        length = int(ends[n, k - 1]) if k else limit
        assert int(cut["attention_mask"][n].sum()) == length <= limit
        assert torch.equal(cut["input_ids"][n, :length], batch["input_ids"][n, :length])
        assert not bool(cut["rewards"][n, k:].any()) and not bool(cut["num_tokens"][n, k:].any())
        assert torch.equal(cut["state_end"][n, :k], batch["state_end"][n, :k])
    tiny = TrajectoryCollator(embedded_tokenizer, groups, max_length=8)(rows)  # not even a_0 fits
    assert not bool(tiny["turn_mask"].any()) and not bool(tiny["action_turn"].any())
    assert int(tiny["attention_mask"].sum(1).max()) == 8 and int(tiny["dropped_turns"]) == 3 * 18


def test_ragged_turns_are_padded_and_masked(embedded_tokenizer):
    rows, groups = synthetic_rows(items=2, groups=2, samples=2, turns=3, seed=4)
    rows[1]["groups"][0]["episodes"][1]["turns"] = rows[1]["groups"][0]["episodes"][1]["turns"][:1]
    out = TrajectoryCollator(embedded_tokenizer, groups)(rows)
    n = 2 * 2 + 0 * 2 + 1  # item 1, group 0, sample 1
    assert out["turn_mask"][n].tolist() == [True, False, False]
    assert int(out["turn_mask"].sum()) == 8 * 3 - 2 and int(out["dropped_turns"]) == 0


def test_split_is_disjoint_exact_and_seeded():
    items = [f"item{i}" for i in range(50)]
    train, val = split_items(items, 0.2, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and set(train) | set(val) == set(items)
    assert (train, val) == split_items(items, 0.2, seed=3)
    assert set(split_items(items, 0.2, seed=4)[1]) != set(val)
    assert split_items(items[:2], 0.01, seed=0)[1] and split_items(items, 0.0, seed=0)[1] == []


@pytest.fixture(scope="module")
def rollout_dir(tmp_path_factory):
    return str(write_synthetic_rollout(tmp_path_factory.mktemp("rollout"), items=13, groups=3, samples=2, turns=2,
                                       free_form=3, shards=3))


def _item_batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [batch["item_ids"] for batch in loader]


def test_train_order_is_deterministic_for_a_seed(rollout_dir):
    module = GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=5)
    assert module.group_names == ["reference", "group1", "group2"]
    train, val = module.split()
    assert len(val) == round(0.2 * 13) and len(train) == 13 - len(val)
    first = _item_batches(module.make_dataloader("train"), 0)
    assert [len(b) for b in first] == [2, 2, 2, 2, 2]
    assert sorted(i for b in first for i in b) == sorted(train)
    assert first == _item_batches(GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=5)
                                  .make_dataloader("train"), 0)
    assert first != _item_batches(module.make_dataloader("train"), 1)
    other = GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=6)
    assert _item_batches(other.make_dataloader("train"), 0) != first
    assert len(module.make_dataloader("train")) == 5
    in_memory = GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=5, streaming=False)
    mine, sizes = epoch_plan(train, 2, 0, 1, 1, 5, train=True)
    assert sum(_item_batches(in_memory.make_dataloader("train"), 1), []) == mine


def test_two_ranks_get_disjoint_items_with_all_their_groups(rollout_dir):
    module = GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=0, val_fraction=0.3)
    train, val = module.split()
    for split, items in (("train", train), ("val", val)):
        per_rank, counts = [], []
        for rank in (0, 1):
            loader = module.make_dataloader(split, rank=rank, world_size=2)
            loader.set_epoch(1)
            batches = list(loader)
            counts.append(len(batches))
            assert len(batches) == len(loader)
            for batch in batches:
                B = len(batch["item_ids"])
                pairs = set(zip(batch["item_index"].tolist(), batch["group_index"].tolist()))
                assert pairs == {(b, g) for b in range(B) for g in range(3)}
                assert batch["group_index"].shape[0] == B * 3 * 2
            per_rank.append([i for batch in batches for i in batch["item_ids"]])
        assert counts[0] == counts[1]
        assert not set(per_rank[0]) & set(per_rank[1])
        if split == "val":
            assert sorted(per_rank[0] + per_rank[1]) == sorted(items)
        else:
            assert len(per_rank[0]) == len(per_rank[1]) == len(items) // 2
            assert set(per_rank[0] + per_rank[1]) <= set(items)


def test_states_mix_with_episode_items_deterministically_and_by_item_across_ranks(tmp_path):
    """Cross-group state rows are items like the others: each epoch's seeded permutation mixes both kinds, the same
    for a seed, dealt to ranks by item (all groups of a state on one rank), and a state row yields probe rows only."""
    data = str(write_synthetic_rollout(tmp_path / "states", items=10, groups=3, samples=2, turns=2, states=6,
                                       shards=2))
    module = GroupTrajectoryDataModule(data, EMBEDDED, batch_size=2, seed=4, val_fraction=0.0)
    assert module.index.state_item_ids == [f"synthetic/{i:04d}" for i in range(4, 10)]
    states = set(module.index.state_item_ids)
    first = _item_batches(module.make_dataloader("train"), 0)
    assert sorted(i for b in first for i in b) == sorted(module.index.item_ids)
    assert first == _item_batches(GroupTrajectoryDataModule(data, EMBEDDED, batch_size=2, seed=4, val_fraction=0.0)
                                  .make_dataloader("train"), 0)
    assert first != _item_batches(module.make_dataloader("train"), 1)
    seen = []
    for rank in (0, 1):
        loader = module.make_dataloader("train", rank=rank, world_size=2)
        loader.set_epoch(0)
        for batch in loader:
            ids = batch["item_ids"]
            assert batch["has_episodes"].tolist() == [i not in states for i in ids]
            probed = set(zip(batch["probe_index"][:, 0].tolist(), batch["probe_index"][:, 1].tolist()))
            assert probed == {(b, g) for b in range(len(ids)) for g in range(3)}  # every group of every item
            if "item_index" in batch:
                assert {ids[b] for b in batch["item_index"].tolist()} == {i for i in ids if i not in states}
            seen.append((rank, ids))
    per_rank = [{i for r, ids in seen if r == rank for i in ids} for rank in (0, 1)]
    assert not per_rank[0] & per_rank[1] and len(per_rank[0]) == len(per_rank[1]) == 5


@pytest.fixture(scope="module")
def mixed_rollout(tmp_path_factory):
    """4 items with episodes and 8 cross-group states."""
    return str(write_synthetic_rollout(tmp_path_factory.mktemp("mixed"), items=12, groups=3, samples=2, turns=2,
                                       states=8, shards=2))


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "in-memory"])
def test_batch_mix_puts_episodes_in_every_batch_deterministically_and_ranks_disjoint(mixed_rollout, streaming):
    make = lambda seed=3, **kw: GroupTrajectoryDataModule(mixed_rollout, EMBEDDED, batch_size=3, seed=seed,
                                                          val_fraction=0.0, episodes_per_batch=1,
                                                          streaming=streaming, **kw)
    module = make()
    states = set(module.index.state_item_ids)
    episodes = set(module.index.item_ids) - states
    assert len(states) == 8 and len(episodes) == 4
    first = _item_batches(module.make_dataloader("train"), 0)
    assert len(first) == 4 and all(len(b) == 3 for b in first)  # 8 states, 2 a batch: the states set the epoch
    assert [sum(i in episodes for i in b) for b in first] == [1, 1, 1, 1]
    assert sorted(i for b in first for i in b if i in states) == sorted(states)  # each state once an epoch
    assert {i for b in first for i in b if i in episodes} == episodes  # one pass over the 4 episode items
    assert first == _item_batches(make().make_dataloader("train"), 0)
    assert first != _item_batches(module.make_dataloader("train"), 1)
    assert first != _item_batches(make(seed=4).make_dataloader("train"), 0)
    per_rank = []
    for rank in (0, 1):
        loader = module.make_dataloader("train", rank=rank, world_size=2)
        batches = _item_batches(loader, 2)
        assert len(batches) == len(loader) == 2
        for batch in batches:  # has_episodes follows the kinds; episode items at the end of the batch
            assert [i in episodes for i in batch] == [False, False, True]
        per_rank.append([[i for i in b if i in states] for b in batches] +
                        [[i for i in b if i in episodes] for b in batches])
    states_of = [set(sum(r[:2], [])) for r in per_rank]
    episodes_of = [set(sum(r[2:], [])) for r in per_rank]
    assert not states_of[0] & states_of[1] and len(states_of[0]) == len(states_of[1]) == 4
    assert not episodes_of[0] & episodes_of[1]  # one pass: dealt like the states
    parallel = make(num_workers=2)
    assert _item_batches(parallel.make_dataloader("train"), 1) == _item_batches(module.make_dataloader("train"), 1)


def test_batch_mix_episode_items_cycle_when_the_states_outlast_them(mixed_rollout):
    module = GroupTrajectoryDataModule(mixed_rollout, EMBEDDED, batch_size=2, seed=0, val_fraction=0.0,
                                       episodes_per_batch=1)
    batches = _item_batches(module.make_dataloader("train"), 0)
    states = set(module.index.state_item_ids)
    assert len(batches) == 8  # 8 states, 1 a batch, and the 4 episode items twice over
    passes = [[b[1] for b in batches[:4]], [b[1] for b in batches[4:]]]
    assert all(b[0] in states and b[1] not in states for b in batches)
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(set(module.index.item_ids) - states)


def test_batch_mix_resumes_mid_epoch(mixed_rollout, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    make = lambda: GroupTrajectoryDataModule(mixed_rollout, EMBEDDED, batch_size=2, seed=2, val_fraction=0.0,
                                             episodes_per_batch=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}", every_n_train_steps=3)
    full = _Recorder.make()
    _trainer(tmp_path, max_epochs=2, callbacks=[checkpoints]).fit(full, datamodule=make())
    assert len(full.seen) == 16
    resumed = _Recorder.make()
    _trainer(tmp_path, max_epochs=2).fit(resumed, datamodule=make(), ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert resumed.seen == full.seen[3:]


@pytest.mark.parametrize("kwargs, expected", [
    ({"batch_size": 2, "episodes_per_batch": 2}, "data.episodes_per_batch: expected 1 to batch_size − 1 (1)"),
    ({"batch_size": 2, "episodes_per_batch": 0}, "data.episodes_per_batch: expected 1 to batch_size − 1 (1)"),
    ({"batch_size": 6, "episodes_per_batch": 5}, "data.episodes_per_batch: 5 episode items per batch, but the "
                                                 "training items hold 4 with episodes"),
])
def test_batch_mix_errors_name_the_field(mixed_rollout, kwargs, expected):
    with pytest.raises(TriAlignError) as error:
        GroupTrajectoryDataModule(mixed_rollout, EMBEDDED, val_fraction=0.0, **kwargs).setup("fit")
    assert expected in str(error.value)


def test_batch_mix_needs_states(rollout_dir):
    with pytest.raises(TriAlignError, match="data.episodes_per_batch: the training items hold 0 cross-group"):
        GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, episodes_per_batch=1).setup("fit")


def test_workers_yield_the_same_batches(rollout_dir):
    serial = GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=1)
    parallel = GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=1, num_workers=2)
    expected = _item_batches(serial.make_dataloader("train"), 2)
    assert _item_batches(parallel.make_dataloader("train"), 2) == expected


# ------------------------------------------------------------------------------------------ task items in validation
PERSONAS = ["neutral", "teenager", "phd_researcher"]
AS_ROLLOUT = {"groups": "default", "expression": "explicit", "system_prompt": "same_answer"}


@pytest.fixture(scope="module")
def persona_rollout(tmp_path_factory):
    """A rollout with real persona ids whose second item is TruthfulQA MC1's item 0001 (so validation must skip it)."""
    rows, names = synthetic_rows(items=4, groups=PERSONAS, samples=1, turns=1, seed=4)
    rows[1]["item_id"] = "truthfulqa_mc1/0001"
    return str(write_rollout_rows(tmp_path_factory.mktemp("personas"), rows, names, shards=1,
                                  manifest={"config": AS_ROLLOUT}))


def test_validation_probes_task_items_asked_as_the_rollout_asked(persona_rollout, embedded_tokenizer, tiny_model):
    from trialign.groups import load_groups, select_groups
    from trialign.probe import AnswerProbe
    from trialign.prompts import SAME_ANSWER_SYSTEM_PROMPT, build_messages
    from trialign.tasks import load_task

    module = GroupTrajectoryDataModule(persona_rollout, EMBEDDED, batch_size=2, val_fraction=0.25,
                                       val_task="truthfulqa_mc1", val_limit=3, val_offset=0)
    batches = list(module.make_dataloader("val"))
    _, rollout_val = module.split()
    assert [b["item_ids"] for b in batches] == [rollout_val, ["truthfulqa_mc1/0000", "truthfulqa_mc1/0002"],
                                                ["truthfulqa_mc1/0003"]]
    assert len(module.make_dataloader("val")) == 3
    assert "input_ids" in batches[0] and "input_ids" not in batches[1]  # task rows are probe-only
    items = {item.id: item for item in load_task("truthfulqa_mc1", limit=4)}
    groups = select_groups(load_groups("default"), PERSONAS)
    probe = AnswerProbe(tiny_model, embedded_tokenizer)
    batch = batches[1]
    for m, (b, g, o) in enumerate(batch["probe_index"].tolist()):
        item = items[batch["item_ids"][b]]
        messages = [{"role": "system", "content": SAME_ANSWER_SYSTEM_PROMPT},
                    *build_messages(item, groups[g], expression="explicit", template="final_answer")]
        # The manifest records no probe template: a dataset from before templates, asked with the old one.
        context = render_context(embedded_tokenizer, messages, None, "Final answer:")
        context_ids, continuation_ids = probe._encode_pairs([context], [list(item.options)])
        real = batch["probe_attention_mask"][m].bool()
        continuation = batch["probe_continuation_mask"][m].bool()
        assert batch["probe_input_ids"][m][real & ~continuation].tolist() == context_ids[0]
        assert batch["probe_input_ids"][m][continuation].tolist() == continuation_ids[0][o]
    assert batch["gold_index"].tolist() == [items[i].gold for i in batch["item_ids"]]
    assert batch["correct_options"][0].nonzero().flatten().tolist() == \
        list(items["truthfulqa_mc1/0000"].correct_options)
    assert bool(batch["has_options"].all())
    # Two ranks: disjoint task items, all of them; each loader's length is what it yields.
    per_rank = []
    for rank in (0, 1):
        loader = module.make_dataloader("val", rank=rank, world_size=2)
        rank_batches = list(loader)
        assert len(rank_batches) == len(loader)
        per_rank.append([i for b in rank_batches for i in b["item_ids"] if i not in rollout_val])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == ["truthfulqa_mc1/0000", "truthfulqa_mc1/0002", "truthfulqa_mc1/0003"]


@pytest.mark.parametrize("kwargs, manifest, expected", [
    ({"val_task": "truthfulqa_mc1", "val_limit": 0}, AS_ROLLOUT, "data.val_limit: expected a positive number"),
    ({"val_task": "truthfulqa_mc1", "val_offset": -1}, AS_ROLLOUT, "data.val_offset: expected 0 or more"),
    ({"val_task": "no_such_task"}, AS_ROLLOUT, "data.val_task: task: unknown task 'no_such_task'"),
    ({"val_task": "truthfulqa_mc1", "val_offset": 10_000}, AS_ROLLOUT,
     "data.val_task: task truthfulqa_mc1 has no items"),
    ({"val_task": "truthfulqa_mc1"}, {"samples": 1}, "does not record how the rollout asked its items"),
    ({"val_task": "truthfulqa_mc1"}, {**AS_ROLLOUT, "groups": "heldout"}, "data.val_task: the rollout's groups"),
])
def test_task_validation_errors_name_the_field(tmp_path, kwargs, manifest, expected):
    rows, names = synthetic_rows(items=2, groups=PERSONAS, samples=1, turns=1)
    data = str(write_rollout_rows(tmp_path, rows, names, shards=1, manifest={"config": manifest}))
    with pytest.raises(TriAlignError) as info:
        GroupTrajectoryDataModule(data, EMBEDDED, val_fraction=0.5, **kwargs).setup("fit")
    assert expected in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ data errors
def _write(path, rows, groups, **kwargs):
    return str(write_rollout_rows(path, rows, groups, **kwargs))


def _error(data_dir, **kwargs) -> str:
    with pytest.raises(TriAlignError) as info:
        scan_rollout(data_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_no_parquet_files(tmp_path):
    assert "folder not found" in _error(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".partial.parquet").write_text("")
    message = _error(str(tmp_path / "empty"))
    assert "no Parquet files" in message and "empty" in message


def test_empty_dataset(tmp_path):
    assert "hold no rows (empty dataset)" in _error(_write(tmp_path, [], ["reference"], shards=1))


def test_missing_columns_are_all_named(tmp_path):
    rows, groups = synthetic_rows(items=2)
    for row in rows:
        del row["gold_text"]
        for group in row["groups"]:
            for episode in group["episodes"]:
                for turn in episode["turns"]:
                    del turn["ret"]
    message = _error(_write(tmp_path, rows, groups, shards=1, typed=False))
    assert "shard-00000.parquet: missing columns gold_text, groups.episodes.turns.ret" in message


def test_wrong_column_type(tmp_path):
    rows, groups = synthetic_rows(items=2)
    for row in rows:
        row["gold_index"] = str(row["gold_index"])
    message = _error(_write(tmp_path, rows, groups, shards=1, typed=False))
    assert "wrong column types: gold_index has type string, expected int32" in message


def test_groups_unknown_to_the_config_or_missing_from_the_data(tmp_path):
    rows, groups = synthetic_rows(items=2, groups=3)
    data_dir = _write(tmp_path, rows, groups)
    message = _error(data_dir, groups=["reference", "group1"])
    assert "data.groups" in message and "has group(s) group2 that the config does not list" in message
    message = _error(data_dir, groups=["reference", "group1", "group2", "elderly"])
    assert "group(s) elderly are configured but not in the data" in message
    assert scan_rollout(data_dir, groups=["group2", "group1", "reference"]).group_names == groups


def test_inconsistent_group_sets_across_rows(tmp_path):
    rows, groups = synthetic_rows(items=3, groups=3)
    rows[2]["groups"] = rows[2]["groups"][:2]
    message = _error(_write(tmp_path / "a", rows, groups))
    assert "item 'synthetic/0002': groups ['reference', 'group1'] differ from" in message
    assert "missing: ['group2']" in message
    message = _error(_write(tmp_path / "b", rows, None))  # no manifest: compared with the first row
    assert "the first row's groups" in message


def test_samples_must_match_across_groups(tmp_path):
    rows, groups = synthetic_rows(items=2, groups=3, samples=2)
    rows[1]["groups"][2]["episodes"] = rows[1]["groups"][2]["episodes"][:1]
    message = _error(_write(tmp_path, rows, groups))
    assert "item 'synthetic/0001': group 'group2' has 1 episodes but the dataset has K=2" in message


def test_other_row_errors(tmp_path):
    rows, groups = synthetic_rows(items=2)
    rows[1]["item_id"] = rows[0]["item_id"]
    assert "duplicate item_id" in _error(_write(tmp_path / "dup", rows, groups, shards=1))
    rows, groups = synthetic_rows(items=2)
    rows[0]["gold_index"] = 9
    assert "gold_index in [0," in _error(_write(tmp_path / "gold", rows, groups))
    rows, groups = synthetic_rows(items=2)
    rows[0]["groups"][1]["episodes"][0]["turns"] = []
    assert "an episode has no turns" in _error(_write(tmp_path / "turns", rows, groups))
    rows, groups = synthetic_rows(items=2)
    path = _write(tmp_path / "manifest", rows, groups)
    manifest = json.loads((tmp_path / "manifest" / "manifest.json").read_text())
    (tmp_path / "manifest" / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    # A dataset from before cross-group states (schema 1) is refused in one line that says what to do.
    assert "manifest.json: schema_version 1, expected 2 (the dataset was written by another version of trialign: " \
           "re-run the rollout with --overwrite)" in _error(path)
    rows, groups = synthetic_rows(items=3, states=1)
    rows[0]["kind"] = "trajectory"
    assert "kind 'trajectory', expected one of episodes, state" in _error(_write(tmp_path / "kind", rows, groups))
    rows, groups = synthetic_rows(items=3, states=1)
    rows[2]["groups"][0]["episodes"] = rows[0]["groups"][0]["episodes"]
    assert "a 'state' row holds episodes; expected none" in _error(_write(tmp_path / "state", rows, groups))


def test_module_argument_errors(rollout_dir):
    with pytest.raises(TriAlignError, match="data.batch_size"):
        GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=0)
    with pytest.raises(TriAlignError, match="data.val_fraction"):
        GroupTrajectoryDataModule(rollout_dir, EMBEDDED, val_fraction=1.0)


def test_nonfinite_rows_are_skipped_with_a_count(tmp_path, caplog):
    rows, groups = synthetic_rows(items=8, groups=2, samples=2, turns=2)
    rows[3]["groups"][1]["episodes"][1]["turns"][1]["reward"] = float("nan")
    rows[5]["groups"][0]["episodes"][0]["turns"][0]["ret"] = float("inf")
    data_dir = _write(tmp_path, rows, groups)
    with caplog.at_level(logging.WARNING, logger="trialign.datamodules"):
        module = GroupTrajectoryDataModule(data_dir, EMBEDDED, batch_size=3, val_fraction=0.25)
        assert module.skipped_item_ids == ["synthetic/0003", "synthetic/0005"]
    assert "skipped 2 of 8 items with a NaN/Inf reward/ret/behavior_logprob" in caplog.text
    train, val = module.split()
    assert len(train) + len(val) == 6 and not {"synthetic/0003", "synthetic/0005"} & set(train + val)
    served = [i for split in ("train", "val") for b in module.make_dataloader(split) for i in b["item_ids"]]
    assert sorted(served) == sorted(train + val)
    for split in ("train", "val"):
        for b in module.make_dataloader(split):
            assert bool(torch.isfinite(b["rewards"]).all() and torch.isfinite(b["returns"]).all())


# ------------------------------------------------------------------------------------------------ Lightning resume
class _Recorder:
    """A tiny LightningModule (built lazily: lightning imports are slow) that records the items it trains on."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[str]] = []

            def training_step(self, batch, batch_idx):
                self.seen.append(batch["item_ids"])
                return (self.weight * batch["rewards"].sum()).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


def _trainer(tmp_path, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("every, stop_step", [("train_steps", 3), ("train_steps", 5), ("epochs", 5)],
                         ids=["mid-epoch", "last-batch", "epoch-end"])
def test_resuming_from_a_checkpoint_continues_the_batch_sequence(rollout_dir, tmp_path, every, stop_step):
    from lightning.pytorch.callbacks import ModelCheckpoint

    make = lambda: GroupTrajectoryDataModule(rollout_dir, EMBEDDED, batch_size=2, seed=2)
    interval = {f"every_n_{every}": stop_step if every == "train_steps" else 1}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}", **interval)
    full = _Recorder.make()
    _trainer(tmp_path, max_epochs=2, callbacks=[checkpoints]).fit(full, datamodule=make())
    assert len(full.seen) == 10 and full.seen[:5] != full.seen[5:]
    resumed = _Recorder.make()
    _trainer(tmp_path, max_epochs=2).fit(resumed, datamodule=make(),
                                         ckpt_path=str(tmp_path / "ckpt" / f"step={stop_step}.ckpt"))
    assert resumed.seen == full.seen[stop_step:]
