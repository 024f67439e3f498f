"""TriAlignModule on a tiny random model: forwards against direct computations, which weights train, the loss as
the sum of its logged parts, validation metrics, adapter export, the divergence guard, and exact resumption."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from data_factory import NO_TASK_VALIDATION, synthetic_rows
from test_trunk_cache import layer_calls
from trialign.backbone import LoraSettings, load_model
from trialign.datamodules.collate import TrajectoryCollator
from trialign.errors import TriAlignError
from trialign.modules.aggregators import GroupRobust, NashSocialWelfare
from trialign.modules.objectives import AdvantageWeighted, PairwiseDPO
from trialign.modules.penalties import CombinedPenalty, NoPenalty
from trialign.modules.truth import truth_loss
from trialign.modules.export import load_value_heads
from trialign.modules.trialign_module import TriAlignModule
from trialign.modules.values import MonteCarlo

SMALL_LORA = LoraSettings(r=4, alpha=8)


def make_batches(tokenizer, count=1, items=2, groups=3, seed=0, free_form=0):
    """`count` collated batches of `items` synthetic items each, and the group names."""
    rows, names = synthetic_rows(items=items * count, groups=groups, samples=2, turns=2, seed=seed,
                                 free_form=free_form)
    collator = TrajectoryCollator(tokenizer, names, max_length=256)
    return [collator(rows[i * items:(i + 1) * items]) for i in range(count)], names


def make_module(model_dir, names, objective=None, aggregator=None, per_group=False, kl_coef=0.05, lora=SMALL_LORA,
                **kwargs):
    module = TriAlignModule(names, MonteCarlo(), objective or AdvantageWeighted(),
                            aggregator or NashSocialWelfare(), CombinedPenalty(), model=model_dir, lora=lora,
                            per_group_adapters=per_group, kl_coef=kl_coef, **kwargs)
    module.configure_model()
    return module


def perturb_adapters(module, seed=0):
    """LoRA B matrices start at zero (the policy equals the reference); give them random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def train_steps(module, batches, steps=3):
    optimizer = module.configure_optimizers()
    module.train()
    for step in range(steps):
        loss, _ = module.compute_loss(batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def direct_token_logprobs(model, input_ids, attention_mask):
    """log π of every token given the ones before it, from the full logits of one plain forward: [N, L]
    (position 0 is 0)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logprobs[:, :1]), logprobs], dim=1)


# --- forwards against direct computations ---------------------------------------------------------------------------

def test_action_logprobs_values_and_reference_equal_direct_forwards(tiny_model_dir, embedded_tokenizer):
    (batch,), names = make_batches(embedded_tokenizer)
    module = make_module(tiny_model_dir, names)
    perturb_adapters(module)
    module.eval()
    with torch.no_grad():
        out = module._episode_forward(batch)
        reference = module._episode_forward(batch, reference=True)
        token = direct_token_logprobs(module.policy.model, batch["input_ids"], batch["attention_mask"])
        hidden = module.policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_hidden_states=True).hidden_states[-1]
        base = load_model(tiny_model_dir)
        base_token = direct_token_logprobs(base, batch["input_ids"], batch["attention_mask"])
    action_turn, turn_mask = batch["action_turn"], batch["turn_mask"]
    expected = torch.zeros(turn_mask.shape, dtype=torch.float64)
    expected_ref = torch.zeros_like(expected)
    for t in range(turn_mask.shape[1]):
        expected[:, t] = (token * (action_turn == t + 1)).sum(-1)
        expected_ref[:, t] = (base_token * (action_turn == t + 1)).sum(-1)
    np.testing.assert_allclose(out["logp"].double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reference["logp"].double().numpy(), expected_ref.numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["logp"], reference["logp"], atol=1e-2)  # the adapters matter
    assert torch.equal(out["counts"], batch["num_tokens"])
    for n in range(turn_mask.shape[0]):
        group = names[int(batch["group_index"][n])]
        for t in range(turn_mask.shape[1]):
            if turn_mask[n, t]:
                value = module.value_heads[group](hidden[n, batch["state_end"][n, t]])
                assert out["values"][n, t].item() == pytest.approx(value.item(), abs=1e-5)


@pytest.mark.parametrize("per_group", [False, True])
def test_reference_from_the_shared_trunk_equals_a_full_reference_forward(tiny_model_dir, embedded_tokenizer,
                                                                         per_group):
    (batch,), names = make_batches(embedded_tokenizer)
    top_layer_only = LoraSettings(r=4, alpha=8, target_modules=r".*\.layers\.1\.(self_attn|mlp)\.\w+_proj")
    module = make_module(tiny_model_dir, names, per_group=per_group, lora=top_layer_only)
    assert module.policy.trunk_depth == 1
    perturb_adapters(module)
    with torch.no_grad():
        policy = module._episode_forward(batch, keep_trunk=True)
        from_trunk = module._episode_forward(batch, reference=True, trunk=policy["trunk"])
        full = module._episode_forward(batch, reference=True)
    assert policy["trunk"].shape == (*batch["input_ids"].shape, 64)
    torch.testing.assert_close(from_trunk["token_logprobs"], full["token_logprobs"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy["token_logprobs"], full["token_logprobs"], atol=1e-3)
    assert len(module.policy._decoder().layers) == 2  # the decoder got its layers back


@pytest.mark.parametrize("share_prefix, per_group", [(True, False), (False, False), (True, True)])
def test_probe_logprobs_equal_direct_forwards(tiny_model_dir, embedded_tokenizer, share_prefix, per_group):
    (batch,), names = make_batches(embedded_tokenizer, free_form=1)
    module = make_module(tiny_model_dir, names, per_group=per_group, probe_share_prefix=share_prefix)
    perturb_adapters(module)
    module.eval()
    with torch.no_grad():
        probe = module.probe_logprobs(batch)
        token = {}
        for g, name in enumerate(names if per_group else [None]):
            if per_group:
                module.policy.use_adapter(name)
            token[g] = direct_token_logprobs(module.policy.model, batch["probe_input_ids"],
                                             batch["probe_attention_mask"])
    continuation = batch["probe_continuation_mask"].bool()
    for m, (b, g, o) in enumerate(batch["probe_index"].tolist()):
        expected = token[g if per_group else 0][m][continuation[m]].sum().item()
        assert probe["option_logprobs"][b, g, o].item() == pytest.approx(expected, abs=1e-4)
        if o == max(int(batch["gold_index"][b]), 0):
            per_token = expected / int(continuation[m].sum())
            assert probe["gold_logprob"][b, g].item() == pytest.approx(per_token, abs=1e-4)
    assert probe["group_mask"].all()
    assert not bool(batch["has_options"][-1])  # the free-form item is probed on its gold text


def test_trunk_memo_replays_a_later_epoch_through_the_adapted_layers_only(tiny_model_dir, embedded_tokenizer):
    """Epoch 1 records every probe row; epoch 2 composes its batches differently (other padding) and replays them:
    layer 0 never runs, the reference's output (the context KL's) is replayed without running layer 1 either, and
    the option log-likelihoods, the loss and the adapters' gradients equal the full forward's (up to rounding)."""
    rows, names = synthetic_rows(items=4, groups=3, samples=2, turns=2, seed=3, states=2)
    collator = TrajectoryCollator(embedded_tokenizer, names, max_length=256)
    top_layer_only = LoraSettings(r=4, alpha=8, target_modules=r".*\.layers\.1\.(self_attn|mlp)\.\w+_proj")
    module = make_module(tiny_model_dir, names, lora=top_layer_only, trunk_memo_gib=0.01, context_kl_coef=1.0,
                         truth_coef=0.3)
    memo = module.policy.trunk_memo
    perturb_adapters(module)
    module.eval()
    for batch in (collator(rows[0:2]), collator(rows[2:4])):
        module.compute_loss(batch)
    assert memo.replayed == 0 and memo.recorded >= 2
    assert memo.reference_frozen and memo.reference_replayed == 0
    calls, top_calls = layer_calls(module.policy.model, 0), layer_calls(module.policy.model, 1)
    second_epoch = [collator([rows[3], rows[0]]), collator([rows[1], rows[2]])]
    lora = [p for name, p in module.policy.model.named_parameters() if "lora_" in name]

    def run(batch):
        module.zero_grad()
        loss, _ = module.compute_loss(batch)
        loss.backward()
        probe = module.probe_logprobs(batch)["option_logprobs"].detach()
        return loss.detach(), probe, [p.grad.clone() for p in lora]

    replayed = [run(batch) for batch in second_epoch]
    assert memo.replayed >= 2 * 2 and calls == []  # (loss and probe of both batches)
    assert memo.reference_replayed >= 2  # the context KL's reference forward of each batch (and the episodes' KL)
    top_replayed = len(top_calls)
    module.policy.trunk_memo = None
    full = [run(batch) for batch in second_epoch]
    assert len(calls) > 0
    assert top_replayed < len(top_calls) - top_replayed  # the reference's pass through layer 1 is gone
    for (loss, probe, grads), (loss_full, probe_full, grads_full) in zip(replayed, full):
        torch.testing.assert_close(loss, loss_full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probe, probe_full, rtol=1e-5, atol=1e-5)
        for grad, grad_full in zip(grads, grads_full):
            torch.testing.assert_close(grad, grad_full, rtol=1e-4, atol=1e-6)
    module.policy.trunk_memo = memo
    unseen, _ = synthetic_rows(items=1, groups=3, samples=2, turns=2, seed=9, states=1)
    before = memo.recorded
    with torch.no_grad():
        module.probe_logprobs(collator([unseen[0], rows[1]]))  # one unseen item: the batch runs in full
    assert memo.recorded == before + 2  # its contexts and its options


def test_trunk_memo_refuses_a_trainable_trunk(tiny_model_dir, embedded_tokenizer):
    (_,), names = make_batches(embedded_tokenizer)
    top_layer_only = LoraSettings(r=4, alpha=8, target_modules=r".*\.layers\.1\.(self_attn|mlp)\.\w+_proj")
    module = make_module(tiny_model_dir, names, lora=top_layer_only)
    module.policy._decoder().layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(TriAlignError, match=r"trunk_memo: the trunk must be frozen, but \S+layers\.0\.mlp\.up_proj"
                                            r"\.weight is trainable"):
        module.policy.enable_trunk_memo(1 << 20)
    with pytest.raises(TriAlignError, match=r"trunk_memo_gib: expected 0 \(off\) or more GiB, got -1"):
        make_module(tiny_model_dir, names, trunk_memo_gib=-1)


def test_reference_anchor_is_the_reference_groups_probe_with_adapters_disabled(tiny_model_dir, embedded_tokenizer):
    from trialign.modules.penalties import AnchoredToReference

    (batch,), names = make_batches(embedded_tokenizer)
    module = TriAlignModule(names, MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(),
                            CombinedPenalty(options=AnchoredToReference(anchor="reference_model")),
                            model=tiny_model_dir, lora=SMALL_LORA, reference_group=names[1], penalty_coef=1.0)
    module.configure_model()
    perturb_adapters(module)
    module.eval()
    anchor = module.reference_anchor(batch)
    with torch.no_grad():
        policy = module.probe_logprobs(batch)["option_logprobs"][:, 1]
        with module.policy.reference():
            reference = module.probe_logprobs(batch)["option_logprobs"][:, 1]
    valid = batch["option_mask"].bool()
    torch.testing.assert_close(anchor[valid], reference[valid], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(anchor[valid], policy[valid], atol=1e-2)  # the adapters matter, the anchor ignores them
    module.train()
    total, parts = module.compute_loss(batch)
    assert parts["penalty"].item() > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.trainable_parameters())
    assert make_module(tiny_model_dir, names).reference_anchor(batch) is None  # JSD needs no anchor


# --- which weights train ----------------------------------------------------------------------------------------------

def test_training_changes_adapters_and_heads_not_base_weights(tiny_model_dir, embedded_tokenizer):
    batches, names = make_batches(embedded_tokenizer, count=2)
    module = make_module(tiny_model_dir, names)
    before = snapshot(module)
    train_steps(module, batches)
    after = snapshot(module)
    lora = [n for n in before if "lora_" in n]
    heads = [n for n in before if n.startswith("value_heads.")]
    base = [n for n in before if n not in lora and n not in heads]
    assert lora and heads and base
    assert all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in heads)
    assert all(torch.equal(before[n], after[n]) for n in base)


def keep_groups(batch, keep):
    """The batch restricted to the episodes and probe rows of the groups in `keep` (indices)."""
    out = dict(batch)
    rows = torch.isin(batch["group_index"], torch.tensor(keep))
    for key in ("input_ids", "attention_mask", "action_turn", "state_end", "turn_mask", "group_index", "item_index",
                "sample_index", "rewards", "returns", "truth", "pers", "behavior_logprob", "num_tokens"):
        out[key] = batch[key][rows]
    probe_rows = torch.isin(batch["probe_index"][:, 1], torch.tensor(keep))
    for key in ("probe_input_ids", "probe_attention_mask", "probe_continuation_mask", "probe_index"):
        out[key] = batch[key][probe_rows]
    return out


def test_per_group_adapters_train_only_the_batch_groups(tiny_model_dir, embedded_tokenizer):
    batches, names = make_batches(embedded_tokenizer, count=2)
    module = make_module(tiny_model_dir, names, per_group=True)
    trained, untouched = names[:2], names[2]
    before = snapshot(module)
    train_steps(module, [keep_groups(b, [0, 1]) for b in batches])
    after = snapshot(module)
    for group in names:
        adapter = [n for n in before if f".{group}." in n and "lora_" in n]
        head = [n for n in before if n.startswith(f"value_heads.heads.{group}.")]
        assert adapter and head
        changed = [not torch.equal(before[n], after[n]) for n in adapter + head]
        assert all(changed) if group in trained else not any(changed), group
    # Control: the untouched group's adapter and head do train when its rows are in the batch, so "unchanged" above
    # is the batch's doing and not an adapter that never trains.
    train_steps(module, batches[:1])
    again = snapshot(module)
    own = [n for n in before
           if (f".{untouched}." in n and "lora_" in n) or n.startswith(f"value_heads.heads.{untouched}.")]
    assert all(not torch.equal(after[n], again[n]) for n in own)
    base = [n for n in before if "lora_" not in n and not n.startswith("value_heads.")]
    assert all(torch.equal(before[n], after[n]) for n in base)


def test_no_reference_forward_without_kl_or_reference_objective(tiny_model_dir, embedded_tokenizer, monkeypatch):
    (batch,), names = make_batches(embedded_tokenizer)
    module = make_module(tiny_model_dir, names, kl_coef=0.0)

    def refuse():
        raise AssertionError("reference forward")

    monkeypatch.setattr(module.policy, "reference", refuse)
    loss, parts = module.compute_loss(batch)
    assert torch.isfinite(loss) and parts["kl"].item() == 0.0
    dpo = make_module(tiny_model_dir, names, objective=PairwiseDPO(), kl_coef=0.0)
    monkeypatch.setattr(dpo.policy, "reference", refuse)
    with pytest.raises(AssertionError, match="reference forward"):
        dpo.compute_loss(batch)


# --- the loss and its logged parts ------------------------------------------------------------------------------------

def quiet_trainer(tmp_path, **kwargs):
    return Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, **kwargs)


@pytest.mark.parametrize("objective, aggregator", [(AdvantageWeighted(), NashSocialWelfare()),
                                                   (PairwiseDPO(), GroupRobust(step_size=0.5))])
def test_logged_loss_is_the_weighted_sum_of_its_logged_parts(tmp_path, tiny_model_dir, embedded_tokenizer, objective,
                                                             aggregator):
    batches, names = make_batches(embedded_tokenizer, count=2)
    module = make_module(tiny_model_dir, names, objective=objective, aggregator=aggregator, value_coef=0.7,
                         penalty_coef=2.0, kl_coef=0.3)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    weights = np.array([logged[f"train/weight/{g}"] for g in names])
    losses = np.array([logged[f"train/loss/{g}"] for g in names])
    np.testing.assert_allclose(losses, [logged[f"train/policy_loss/{g}"] + 0.7 * logged[f"train/value_loss/{g}"]
                                        for g in names], rtol=1e-5)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    expected = weights @ losses + 2.0 * logged["train/penalty"] + 0.3 * logged["train/kl"]
    assert logged["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["train/penalty"] > 0 and logged["train/kl"] > 0  # the adapters moved in step 1
    assert all(logged[f"train/utility/{g}"] > 0 for g in names)


def test_non_finite_term_stops_training_naming_step_and_term(tiny_model_dir, embedded_tokenizer):
    (batch,), names = make_batches(embedded_tokenizer)
    module = make_module(tiny_model_dir, names)
    broken = copy.copy(batch)
    broken["returns"] = batch["returns"].clone()
    broken["returns"][batch["group_index"] == 1, 0] = float("nan")
    from types import SimpleNamespace

    from trialign.modules.divergence import DivergenceGuard, loss_problem

    total, parts = module.compute_loss(broken)
    assert loss_problem(parts, names).startswith(f"value_loss for group(s) ['{names[1]}'] is not finite")
    assert loss_problem(module.compute_loss(batch)[1], names) is None
    assert any(isinstance(c, DivergenceGuard) for c in module.configure_callbacks())  # every trainer gets the guard
    module.last_loss_parts = parts
    trainer = SimpleNamespace(world_size=1, checkpoint_callback=None)
    with pytest.raises(TriAlignError, match=rf"training step 0: value_loss for group\(s\) \['{names[1]}'\]"):
        DivergenceGuard().on_before_backward(trainer, module, total)


# --- validation -------------------------------------------------------------------------------------------------

def test_validation_metrics_match_a_direct_computation(tmp_path, tiny_model_dir, embedded_tokenizer):
    batches, names = make_batches(embedded_tokenizer, count=3, items=2, seed=3)
    module = make_module(tiny_model_dir, names, reference_group="reference")
    perturb_adapters(module, seed=1)
    (results,) = quiet_trainer(tmp_path).validate(module, dataloaders=DataLoader(batches, batch_size=None),
                                                  verbose=False)
    answers, correct, penalties, sizes = [], [], [], []
    with torch.no_grad():
        for batch in batches:
            probe = module.probe_logprobs(batch)
            penalties.append(float(module.penalty(probe["option_logprobs"], batch["option_mask"], probe["gold_logprob"],
                                                  probe["group_mask"], batch["has_options"])))
            sizes.append(len(batch["item_ids"]))
            token = direct_token_logprobs(module.policy.model.eval(), batch["probe_input_ids"],
                                          batch["probe_attention_mask"])
            scores = np.full((len(batch["item_ids"]), len(names), batch["option_mask"].shape[1]), -np.inf)
            for m, (b, g, o) in enumerate(batch["probe_index"].tolist()):
                scores[b, g, o] = token[m][batch["probe_continuation_mask"][m].bool()].sum().item()
            chosen = scores.argmax(-1)
            answers.append(chosen)
            correct.append(np.take_along_axis(batch["correct_options"].numpy(), chosen, axis=1))
    answers, correct = np.concatenate(answers), np.concatenate(correct)
    accuracy = correct.mean(0)
    consistent = (answers == answers[:, :1]).all(1)
    assert results["val/consistency"] == pytest.approx(consistent.mean())
    assert results["val/consistent_correct"] == pytest.approx((consistent & correct.all(1)).mean())
    for g, name in enumerate(names):
        assert results[f"val/acc/{name}"] == pytest.approx(accuracy[g])
    assert results["val/acc_worst"] == pytest.approx(accuracy.min())
    assert results["val/acc_gap"] == pytest.approx(accuracy.max() - accuracy.min())
    reference_correct = correct[:, 0]
    for g, name in enumerate(names[1:], start=1):
        broken = (reference_correct & ~correct[:, g]).sum() / max(reference_correct.sum(), 1)
        assert results[f"val/breakage/{name}"] == pytest.approx(broken)
    # The penalty is the mean over items (batches weighted by their size), as one sum across DDP ranks gives it.
    assert results["val/penalty"] == pytest.approx(np.average(penalties, weights=sizes), rel=1e-5)
    assert 0 < consistent.mean() < 1 or 0 < accuracy.mean() < 1  # the data is not degenerate


# --- export ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_group", [False, True])
def test_exported_adapters_load_with_peft_and_give_the_same_logits(tmp_path, tiny_model_dir, embedded_tokenizer,
                                                                   per_group):
    from peft import PeftModel
    from safetensors import safe_open

    batches, names = make_batches(embedded_tokenizer)
    module = make_module(tiny_model_dir, names, per_group=per_group)
    train_steps(module, batches, steps=2)
    folder = module.export_adapters(tmp_path / "adapter")
    module.eval()
    ids, mask = batches[0]["input_ids"][:2], batches[0]["attention_mask"][:2]
    for adapter in (names if per_group else ["default"]):
        path = folder / adapter if per_group else folder
        loaded = PeftModel.from_pretrained(load_model(tiny_model_dir), str(path)).eval()
        if per_group:
            module.policy.use_adapter(adapter)
        with torch.no_grad():
            expected = module.policy.model(input_ids=ids, attention_mask=mask).logits
            got = loaded(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    heads = load_value_heads(folder)
    assert heads.group_names == names
    for key, tensor in module.value_heads.state_dict().items():
        torch.testing.assert_close(heads.state_dict()[key], tensor)
    assert not list(tmp_path.glob(".adapter*"))  # no temporary folder left behind
    # A checkpoint exports from its state dict (the gathered one under FSDP): the same files.
    from_state = module.export_adapters(tmp_path / "from_state", state_dict=module.state_dict())
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as a, safe_open(str(from_state / path.relative_to(folder)), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=0, atol=0)


# --- resumption through the CLI ---------------------------------------------------------------------------------------

def test_resume_from_last_checkpoint_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from data_factory import write_synthetic_rollout
    from trialign.lightning_cli import main

    data = write_synthetic_rollout(tmp_path / "data", items=8, groups=["neutral", "teen", "retiree"], seed=1)

    def fit(root, steps, *extra):
        argv = ["fit", "--config", "configs/trialign.yaml", *NO_TASK_VALIDATION, "--model.model", tiny_model_dir,
                "--model.lora.target_modules", "all-linear", "--model.aggregator",
                "configs/components/aggregator/group_robust.yaml", "--data.data_dir", str(data),
                "--trainer.default_root_dir", str(tmp_path / root), "--trainer.max_steps", str(steps),
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--validate_before_fit", "false", "--validate_after_fit", "false", *extra]
        assert main(argv) == 0

    # 6 training items, one per step: the resumed part crosses an epoch boundary.
    fit("straight", 8)
    fit("resumed", 2)
    fit("resumed", 8, "--ckpt_path", "last")
    straight = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 8
    state = straight["state_dict"]
    assert set(state) == set(resumed["state_dict"])
    assert {"utility.average", "aggregator.group_log_weights"} <= set(state)
    assert not any(key.endswith("q_proj.base_layer.weight") for key in state)  # frozen weights are not saved
    for key, tensor in state.items():
        torch.testing.assert_close(resumed["state_dict"][key], tensor, rtol=0, atol=0, msg=key)
    assert (tmp_path / "resumed/adapter/adapter_model.safetensors").is_file()


# --- divergence guard and determinism through the CLI --------------------------------------------------------------

class PoisonedPenalty(CombinedPenalty):
    """The default penalty until its training call number `at` (0-based), then a non-finite one.

    mode "value": the penalty itself is NaN (a component that divides by zero, say). mode "gradient": the penalty
    stays finite but its gradient is NaN: it adds 0·sqrt(g − g) with g the gold log-probabilities, whose value is 0
    and whose derivative 0·(1/(2·sqrt(0))) = 0·inf is NaN (the classic sqrt-at-0 of a norm or std component).
    NaN cannot come from the data here: the data module skips rows with a NaN reward, return or log-probability.
    When it first misbehaves it records the bytes of every file under `watch` (the run folder) in `snapshots`."""

    snapshots: dict[str, dict[str, bytes]] = {}

    def __init__(self, at: int, mode: str = "value", watch: str = ""):
        super().__init__()
        self.at, self.mode, self.watch, self.calls = at, mode, watch, 0

    def forward(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options):
        penalty = super().forward(option_logprobs, option_mask, gold_logprob, group_mask, has_options)
        if not torch.is_grad_enabled():  # validation
            return penalty
        self.calls += 1
        if self.calls - 1 < self.at:
            return penalty
        if self.watch and self.watch not in self.snapshots:
            root = Path(self.watch)
            self.snapshots[self.watch] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                                          if p.is_file() and "lightning_logs" not in p.parts}
        if self.mode == "value":
            return penalty * float("nan")
        zero = gold_logprob - gold_logprob.detach()
        return penalty + 0.0 * torch.sqrt(zero).sum()


def cli_fit(tmp_path, model_dir, root, steps, *extra):
    """`trialign fit` in this process on a small synthetic rollout (written once per test folder)."""
    from data_factory import write_synthetic_rollout
    from trialign.cli import main

    data = tmp_path / "data"
    if not data.exists():
        write_synthetic_rollout(data, items=6, groups=["neutral", "teen", "retiree"], seed=1)
    return main(["fit", "--config", "configs/trialign.yaml", *NO_TASK_VALIDATION, "--model.model", model_dir,
                 "--model.lora.target_modules", "all-linear", "--data.data_dir", str(data),
                 "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.logger", "false", "--validate_before_fit", "false", "--validate_after_fit", "false",
                 *extra])


@pytest.mark.parametrize("mode, term", [("value", r"penalty is not finite \(nan\)"),
                                        ("gradient", r"the gradient of policy\.model\.\S+\.lora_[AB]\.\S+ is not "
                                                     r"finite \(the loss was finite\)")])
def test_non_finite_loss_or_gradient_stops_fit_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, capsys,
                                                                                mode, term):
    root = tmp_path / "run"
    penalty = json.dumps({"class_path": f"{PoisonedPenalty.__module__}.PoisonedPenalty",
                          "init_args": {"at": 2, "mode": mode, "watch": str(root)}})
    assert cli_fit(tmp_path, tiny_model_dir, root, 4, "--model.penalty", penalty) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    last = root / "checkpoints" / "last.ckpt"
    assert re.fullmatch(rf"trialign fit: error: training step 2: {term}; training stopped before the optimizer step, "
                        rf"the last checkpoint {re.escape(str(last))} is from before it; .+", line), line
    # Nothing written since the failing step began: the checkpoint and the exported adapters are those of step 2.
    before = PoisonedPenalty.snapshots[str(root)]
    assert {"checkpoints/last.ckpt", "adapter/adapter_model.safetensors", "adapter/value_heads.safetensors"} <= \
        set(before)
    after = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and "lightning_logs" not in p.parts}
    assert after == before
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_same_seed_and_config_train_identical_adapters(tmp_path, tiny_model_dir):
    """Determinism on CPU: two runs of one config give bit-identical adapters, heads and checkpoint weights (on GPUs
    only up to floating-point noise: see trialign/lightning_cli.py, "Determinism")."""
    for name in ("a", "b"):
        assert cli_fit(tmp_path, tiny_model_dir, tmp_path / name, 2, "--trainer.deterministic", "true") == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a/adapter").rglob("*.safetensors"))
    assert len(files) == 2
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    a, b = (torch.load(tmp_path / name / "checkpoints/last.ckpt", weights_only=True)["state_dict"] for name in "ab")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not any(key.endswith("lm_head.weight") for key in a)  # the tied, frozen output head is not saved


# --- cross-group states -------------------------------------------------------------------------------------------

def state_batches(tokenizer, items=4, states=2, groups=3):
    """One collated batch mixing `items - states` episode items and `states` state rows, and one of states only."""
    rows, names = synthetic_rows(items=items, groups=groups, samples=2, turns=2, seed=3, states=states)
    collator = TrajectoryCollator(tokenizer, names, max_length=256)
    return collator(rows), collator(rows[items - states:]), names


def test_a_states_only_batch_trains_the_penalty_and_truth_terms(tiny_model_dir, embedded_tokenizer):
    mixed, states, names = state_batches(embedded_tokenizer)
    assert "input_ids" not in states and not bool(states["has_episodes"].any())
    module = make_module(tiny_model_dir, names, truth_coef=1.0)
    perturb_adapters(module)
    loss, parts = module.compute_loss(states)
    assert parts["policy_loss"].abs().sum() == 0 and parts["value_loss"].abs().sum() == 0
    assert bool((parts["truth_loss"] > 0).all()) and parts["present"].all()
    # The truth term is the gold option's NLL in the probe distribution, per group, as `truth_loss` computes it.
    probe = module.probe_logprobs(states)
    expected, _ = truth_loss(probe["option_logprobs"], states["option_mask"], states["correct_options"],
                             probe["group_mask"], states["has_options"])
    assert parts["truth_loss"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    before = snapshot(module)
    train_steps(module, [states], steps=1)
    after = snapshot(module)
    lora = [n for n in before if "lora_" in n]
    assert any(not torch.equal(before[n], after[n]) for n in lora)
    heads = [n for n in before if n.startswith("value_heads.")]
    assert all(torch.equal(before[n], after[n]) for n in heads)  # no episode: the critics have nothing to learn


def test_the_truth_term_on_the_reference_group_only(tiny_model_dir, embedded_tokenizer):
    _, states, names = state_batches(embedded_tokenizer)
    reference = names[0]
    module = make_module(tiny_model_dir, names, truth_coef=1.0, truth_groups="reference", reference_group=reference)
    perturb_adapters(module)
    _, parts = module.compute_loss(states)
    probe = module.probe_logprobs(states)
    expected, _ = truth_loss(probe["option_logprobs"], states["option_mask"], states["correct_options"],
                             probe["group_mask"], states["has_options"])
    assert parts["truth_loss"][0].item() == pytest.approx(expected[0].item(), rel=1e-5) and expected[0] > 0
    assert parts["truth_loss"][1:].abs().sum() == 0 and parts["present"].tolist() == [True] + [False] * (len(names) - 1)
    assert parts["weight"].tolist() == pytest.approx([1.0] + [0.0] * (len(names) - 1))
    assert parts["penalty"] > 0  # the penalty still compares every group


def test_without_a_penalty_a_reference_truth_term_probes_the_reference_group_only(tiny_model_dir, embedded_tokenizer,
                                                                                    monkeypatch):
    _, states, names = state_batches(embedded_tokenizer)
    module = TriAlignModule(names, MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), NoPenalty(),
                            model=tiny_model_dir, lora=SMALL_LORA, penalty_coef=0.0, truth_coef=1.0,
                            truth_groups="reference", reference_group=names[1])
    module.configure_model()
    probed = []
    original = module.policy.probe_logprobs
    monkeypatch.setattr(module.policy, "probe_logprobs",
                        lambda *a, **k: probed.append(k.get("groups")) or original(*a, **k))
    _, parts = module.compute_loss(states)
    assert probed == [[1]] and parts["present"].tolist() == [False, True, False]
    assert parts["truth_loss"][1] > 0 and parts["penalty"] == 0


@pytest.mark.parametrize("kwargs, message", [({"truth_groups": "some"}, "model.truth_groups: expected one of"),
                                             ({"truth_groups": "reference"}, "needs model.reference_group")])
def test_truth_groups_errors_name_the_field(tiny_model_dir, kwargs, message):
    with pytest.raises(TriAlignError, match=message):
        TriAlignModule(["a", "b"], MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), NoPenalty(),
                       model=tiny_model_dir, lora=SMALL_LORA, **kwargs)


def reference_context_kl(module, batch, stride):
    """The language anchor from full logits: every probed (item, group) context once, KL(π_ref ‖ π) at every
    `stride`-th position but the last, from the whole model with and without its adapters."""
    model = module.policy.model
    ids = batch["probe_input_ids"]
    mask = batch["probe_attention_mask"].bool() & ~batch["probe_continuation_mask"].bool()
    seen, values = set(), []
    for row in range(ids.shape[0]):
        key = tuple(batch["probe_index"][row, :2].tolist())
        if key in seen:
            continue
        seen.add(key)
        context = ids[row, mask[row]][None]
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=context).logits[0].float(), -1)
            with module.policy.reference():
                log_q = torch.log_softmax(model(input_ids=context).logits[0].float(), -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        values.extend(kl[:-1][::stride].tolist())
    return float(np.mean(values))


@pytest.mark.parametrize("share_prefix, lora", [(True, "top"), (False, "top"), (True, "all")])
def test_the_language_anchor_is_the_context_kl_to_the_reference(tiny_model_dir, embedded_tokenizer, share_prefix,
                                                                lora):
    _, states, names = state_batches(embedded_tokenizer)
    settings = (LoraSettings(r=4, alpha=8, target_modules=r".*\.layers\.1\.(self_attn|mlp)\.\w+_proj")
                if lora == "top" else SMALL_LORA)
    module = make_module(tiny_model_dir, names, lora=settings, context_kl_coef=1.0, context_kl_stride=3,
                         probe_share_prefix=share_prefix)
    assert module.policy.trunk_depth == (1 if lora == "top" else 0)
    _, parts = module.compute_loss(states)
    assert abs(parts["context_kl"].item()) < 1e-6  # adapters start as the identity: no drift yet
    perturb_adapters(module)
    _, parts = module.compute_loss(states)
    assert parts["context_kl"].item() == pytest.approx(reference_context_kl(module, states, 3), rel=1e-4)
    module.zero_grad()
    parts["context_kl"].backward()
    grads = [p.grad for n, p in module.policy.model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_context_kl_stride_must_be_a_positive_integer(tiny_model_dir):
    with pytest.raises(TriAlignError, match="model.context_kl_stride: expected an integer >= 1, got 0"):
        TriAlignModule(["a", "b"], MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), NoPenalty(),
                       model=tiny_model_dir, lora=SMALL_LORA, context_kl_stride=0)


def test_a_mixed_batch_runs_episode_terms_on_episode_rows_only(tiny_model_dir, embedded_tokenizer):
    mixed, _, names = state_batches(embedded_tokenizer)
    assert mixed["has_episodes"].tolist() == [True, True, False, False]
    assert set(mixed["item_index"].tolist()) == {0, 1}  # episodes of the two episode rows
    assert set(mixed["probe_index"][:, 0].tolist()) == {0, 1, 2, 3}  # every row is probed
    module = make_module(tiny_model_dir, names, truth_coef=1.0)
    loss, parts = module.compute_loss(mixed)
    assert torch.isfinite(loss) and parts["present"].all() and bool((parts["value_loss"] > 0).any())


def test_no_term_reaching_the_weights_still_gives_a_zero_loss_with_a_gradient(tiny_model_dir, embedded_tokenizer):
    _, states, names = state_batches(embedded_tokenizer)
    module = TriAlignModule(names, MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), NoPenalty(),
                            model=tiny_model_dir, lora=SMALL_LORA)
    module.configure_model()
    loss, parts = module.compute_loss(states)
    assert loss.item() == 0.0 and loss.requires_grad and not parts["present"].any()
    loss.backward()


@pytest.mark.parametrize("native", [True, False])
def test_autocast_null_trains_in_bf16_exactly_where_bf16_is_native(tmp_path, tiny_model_dir, embedded_tokenizer,
                                                                   monkeypatch, native):
    import trialign.modules.trialign_module as module_file

    monkeypatch.setattr(module_file, "native_bf16", lambda device="cpu": native)  # stand-in for this CPU's answer
    batches, names = make_batches(embedded_tokenizer, count=1)
    module = make_module(tiny_model_dir, names, autocast=None)
    seen = []  # the dtype the decoder's linear layers compute in, step by step
    hook = module.policy._decoder().layers[0].mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append(out.dtype))
    before = snapshot(module)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, DataLoader(batches, batch_size=None))
    hook.remove()
    assert module.autocast is native and seen and set(seen) == {torch.bfloat16 if native else torch.float32}
    after = snapshot(module)
    assert all(after[n].dtype == torch.float32 for n in after)  # the weights stay fp32: autocast, not bf16 weights
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
