"""The trunk cache: a replayed probe equals the full forward, runs only the adapted layers, and never hits a stale
entry (changed weights, changed inputs)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_model
from tests.test_probe import OPTIONS, direct_loglik
from trialign.probe import AnswerProbe, render_context
from trialign.trunk_cache import TrunkCache, lowest_adapted_layer, trunk_fingerprint


def with_adapter(model, seed: int, layer: int = 2):
    """`model` with a random LoRA adapter on decoder layer `layer` only."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=rf".*\.layers\.{layer}\.(self_attn|mlp)\.\w+_proj")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return peft_model.eval()


@pytest.fixture()
def base(embedded_tokenizer):
    return make_tiny_model(len(embedded_tokenizer), layers=4)


@pytest.fixture()
def contexts(embedded_tokenizer):
    questions = ["Is water wet?", "Why is the sky blue? " * 6, "Which planet is largest?"]
    return [render_context(embedded_tokenizer, [{"role": "user", "content": "I farm in Iowa. " + q}])
            for q in questions]


def layer_calls(model, index: int) -> list[int]:
    """A list that grows by one on every forward of decoder layer `index`."""
    calls: list[int] = []
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    decoder.layers[index].register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def scores(model, tokenizer, contexts, cache=None, options=OPTIONS, batch_size=2, precision="float32"):
    """Every option's log-likelihood, flattened over the contexts."""
    probe = AnswerProbe(model, tokenizer, batch_size=batch_size, trunk_cache=cache, precision=precision)
    return [value for s in probe.score_options(contexts, options) for value in s.logliks]


def test_lowest_adapted_layer_and_fingerprints(base):
    assert lowest_adapted_layer(base) is None
    adapted = with_adapter(base, seed=0, layer=2)
    assert lowest_adapted_layer(adapted) == 2
    # Below the adapters the peft model computes what the base computes: the same fingerprint.
    assert trunk_fingerprint(adapted, 2) == trunk_fingerprint(base, 2)
    assert trunk_fingerprint(base, 1) != trunk_fingerprint(base, 2)


def test_a_second_adapter_replays_the_trunk_and_equals_its_full_forward(base, embedded_tokenizer, contexts):
    cache = TrunkCache()
    first, second = with_adapter(base, seed=0), with_adapter(base, seed=1)
    recorded = scores(first, embedded_tokenizer, contexts, cache)
    assert cache.nbytes > 0 and cache.hits == 0
    np.testing.assert_allclose(recorded, scores(first, embedded_tokenizer, contexts), atol=1e-5, rtol=0)
    bottom, top = layer_calls(second, 0), layer_calls(second, 3)
    replayed = scores(second, embedded_tokenizer, contexts, cache)
    assert cache.hits == 1 and not bottom and top  # only the layers from the adapted one ran
    bottom.clear()
    full = scores(second, embedded_tokenizer, contexts)
    assert bottom  # (the hook counts: the full forward runs layer 0)
    np.testing.assert_allclose(replayed, full, atol=1e-5, rtol=0)
    assert not np.allclose(replayed, recorded, atol=1e-3)  # the adapters differ, and so do the scores
    expected = [direct_loglik(second, embedded_tokenizer, c, o)[0] for c, opts in zip(contexts, OPTIONS) for o in opts]
    np.testing.assert_allclose(replayed, expected, atol=1e-4, rtol=0)


def test_the_base_model_replays_an_adapters_trunk(base, embedded_tokenizer, contexts):
    cache = TrunkCache()
    scores(with_adapter(base, seed=0), embedded_tokenizer, contexts, cache)
    bottom = layer_calls(base, 0)
    replayed = scores(base, embedded_tokenizer, contexts, cache)
    assert cache.hits == 1 and not bottom
    np.testing.assert_allclose(replayed, scores(base, embedded_tokenizer, contexts), atol=1e-5, rtol=0)


def test_a_bf16_probe_replays_its_own_trunk_and_never_a_float32_one(base, embedded_tokenizer, contexts):
    cache = TrunkCache()
    first, second = with_adapter(base, seed=0), with_adapter(base, seed=1)
    scores(first, embedded_tokenizer, contexts, cache)  # a float32 trunk
    half = lambda model, cache: scores(model, embedded_tokenizer, contexts, cache, precision="bfloat16")  # noqa: E731
    half(first, cache)
    assert cache.hits == 0 and len(cache._entries) == 2  # the bf16 copy's trunk is another entry
    replayed = half(second, cache)
    assert cache.hits == 1
    np.testing.assert_allclose(replayed, half(second, None), atol=1e-4, rtol=0)
    full = scores(second, embedded_tokenizer, contexts)
    assert 0 < np.abs(np.subtract(replayed, full)).max() < 0.25  # bf16, near float32


def test_replay_is_exact_in_float64(base, embedded_tokenizer, contexts):
    base = base.double()
    cache = TrunkCache()
    scores(with_adapter(base, seed=0), embedded_tokenizer, contexts, cache)
    second = with_adapter(base, seed=1)
    replayed = scores(second, embedded_tokenizer, contexts, cache)
    assert cache.hits == 1
    expected = [direct_loglik(second, embedded_tokenizer, c, o)[0] for c, opts in zip(contexts, OPTIONS) for o in opts]
    np.testing.assert_allclose(replayed, expected, atol=1e-9, rtol=0)


def test_changed_trunk_weights_or_inputs_miss(base, embedded_tokenizer, contexts):
    cache = TrunkCache()
    scores(with_adapter(base, seed=0), embedded_tokenizer, contexts, cache)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    other = with_adapter(changed, seed=1)
    bottom = layer_calls(other, 0)
    result = scores(other, embedded_tokenizer, contexts, cache)
    assert cache.hits == 0 and bottom  # a full forward, recorded under the new trunk's key
    np.testing.assert_allclose(result, scores(other, embedded_tokenizer, contexts), atol=1e-5, rtol=0)
    options = [list(row) for row in OPTIONS]
    options[2] = ["Saturn"]
    scores(with_adapter(base, seed=1), embedded_tokenizer, contexts, cache, options=options)
    assert cache.hits == 0
    scores(with_adapter(base, seed=1), embedded_tokenizer, contexts, cache, batch_size=3)  # batching is in the key
    assert cache.hits == 0


def test_the_cache_keeps_to_its_size_bound():
    cache = TrunkCache(max_bytes=1000)
    cache.put(("a", 1, "x"), [torch.zeros(100)])  # 400 bytes
    cache.put(("b", 1, "x"), [torch.zeros(100)])
    assert cache.nbytes == 800
    assert cache.get(("a", 1, "x")) is not None  # "a" is now the most recently used
    cache.put(("c", 1, "x"), [torch.zeros(100)])
    assert cache.get(("b", 1, "x")) is None and cache.get(("a", 1, "x")) is not None and cache.nbytes == 800
    cache.put(("d", 1, "x"), [torch.zeros(1000)])  # larger than the bound: not kept
    assert cache.get(("d", 1, "x")) is None and cache.nbytes == 800
    with pytest.raises(ValueError, match="max_bytes"):
        TrunkCache(max_bytes=-1)
