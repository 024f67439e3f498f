"""Which groups a training step probes (`trialign.modules.probe_groups`) and the module's use of it."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from test_module import SMALL_LORA, perturb_adapters, state_batches
from trialign.errors import TriAlignError
from trialign.modules.aggregators import NashSocialWelfare
from trialign.modules.objectives import AdvantageWeighted
from trialign.modules.penalties import JensenShannon
from trialign.modules.probe_groups import step_groups
from trialign.modules.trialign_module import TriAlignModule
from trialign.modules.values import MonteCarlo


def test_all_groups_when_k_is_none_or_covers_every_other_group():
    assert step_groups(9, 0, None, step=3) is None
    assert step_groups(9, 0, 8, step=3) is None and step_groups(9, 0, 20, step=3) is None


def test_the_reference_and_k_distinct_others_the_same_at_the_same_step():
    for step in range(50):
        groups = step_groups(9, 4, 3, step=step, seed=7)
        assert len(groups) == 4 == len(set(groups)) and 4 in groups and groups == sorted(groups)
        assert groups == step_groups(9, 4, 3, step=step, seed=7)  # a resumed run draws the same
    assert len({tuple(step_groups(9, 4, 3, step=s)) for s in range(50)}) > 10  # and steps differ


def test_every_other_group_is_drawn_equally_often():
    steps = 4000
    counts = Counter(g for s in range(steps) for g in step_groups(9, 0, 2, step=s))
    assert counts[0] == steps
    for group in range(1, 9):  # expected 2/8 of the steps; binomial sd ~ 27
        assert abs(counts[group] - steps * 2 / 8) < 150


def module_with(tiny_model_dir, names, **kwargs):
    module = TriAlignModule(names, MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), JensenShannon(),
                            model=tiny_model_dir, lora=SMALL_LORA, truth_coef=1.0, reference_group=names[0], **kwargs)
    module.configure_model()
    perturb_adapters(module)
    return module


def test_a_training_step_probes_only_the_drawn_groups(tiny_model_dir, embedded_tokenizer, monkeypatch):
    _, states, names = state_batches(embedded_tokenizer, groups=4)
    module = module_with(tiny_model_dir, names, probe_groups=1)
    probed = []
    original = module.policy.probe_logprobs
    monkeypatch.setattr(module.policy, "probe_logprobs",
                        lambda *a, **k: probed.append(k.get("groups")) or original(*a, **k))
    _, parts = module.compute_loss(states)
    drawn = step_groups(len(names), 0, 1, step=0)
    assert probed == [drawn] and len(drawn) == 2 and drawn[0] == 0
    assert parts["present"].tolist() == [g in drawn for g in range(len(names))]
    # The penalty is the JSD of the two drawn groups alone.
    probe = original(states, names, groups=drawn)
    expected = JensenShannon()(probe["option_logprobs"][:, drawn], states["option_mask"],
                               probe["gold_logprob"][:, drawn], probe["group_mask"][:, drawn], states["has_options"])
    assert parts["penalty"].item() == pytest.approx(expected.item(), rel=1e-5) and expected > 0
    full = module_with(tiny_model_dir, names)
    assert full.compute_loss(states)[1]["present"].all()


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_probe_groups_errors_name_the_field(tiny_model_dir, value):
    with pytest.raises(TriAlignError, match="model.probe_groups: expected null or an integer >= 1"):
        TriAlignModule(["a", "b"], MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), JensenShannon(),
                       model=tiny_model_dir, lora=SMALL_LORA, reference_group="a", probe_groups=value)
    with pytest.raises(TriAlignError, match="model.probe_groups"):
        TriAlignModule(["a", "b"], MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(), JensenShannon(),
                       model=tiny_model_dir, lora=SMALL_LORA, probe_groups=1)


def test_the_draw_is_independent_of_torch_global_seed():
    torch.manual_seed(0)
    first = step_groups(9, 0, 3, step=5)
    torch.manual_seed(123)
    assert step_groups(9, 0, 3, step=5) == first
