"""The probe continued from the sampler's KV cache reads exactly what `AnswerProbe.answer` reads from scratch."""

from __future__ import annotations

import pytest
import torch

from trialign.groups import load_groups
from trialign.probe import AnswerProbe, render_context
from trialign.prompts import build_messages
from trialign.rollout.cached_probe import probe_answers, score_options_on_cache
from trialign.rollout.sampler import HFSampler
from trialign.tokens import end_of_turn_id
from trialign.tasks import load_task


@pytest.fixture()
def conversations(tiny_model, embedded_tokenizer):
    tokenizer = embedded_tokenizer
    end = end_of_turn_id(tokenizer)
    head = tiny_model.get_input_embeddings().weight.detach().clone()
    head[end] = 2.0  # some messages stop by themselves, others are cut: both cache layouts
    tiny_model.lm_head.weight = torch.nn.Parameter(head)
    items = load_task("truthfulqa_mc1", limit=2) + load_task("bbq", limit=2) + load_task("gsm8k", limit=1)
    groups = load_groups("default")[:3]
    pairs = [(item, group) for item in items for group in groups]
    messages = [build_messages(item, group) for item, group in pairs]
    prompts = [list(tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]) for m in messages]
    generation = HFSampler(tiny_model, tokenizer).sample(prompts, max_new_tokens=6, temperature=1.0, seed=1)
    texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in generation.samples]
    texts[0] = texts[0] + "  \n"  # trailing whitespace: the probe's tokens part from the cached ones earlier
    contexts = [render_context(tokenizer, m, response=text) for m, text in zip(messages, texts)]
    assert {s.stop is None for s in generation.samples} == {True, False}
    return [item for item, _ in pairs], contexts, generation


def test_cached_probe_equals_the_probe(tiny_model, embedded_tokenizer, conversations):
    items, contexts, generation = conversations
    probe = AnswerProbe(tiny_model, embedded_tokenizer, batch_size=4)
    expected = probe.answer(items, contexts)
    before = [k.clone() for k, *_ in generation.cache.key_values]
    got = probe_answers(probe, items, contexts, generation.cache)
    after = [k for k, *_ in generation.cache.key_values]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # left for the next turn to continue
    assert [r.answer for r in got] == [r.answer for r in expected]
    assert [r.correct for r in got] == [r.correct for r in expected]
    for a, b in zip(got, expected):
        assert a.option_logprobs == pytest.approx(b.option_logprobs, abs=1e-4)
        assert a.gold_logprob == pytest.approx(b.gold_logprob, abs=1e-4)


@pytest.mark.parametrize("subset, option_tokens", [(True, 20), (True, 10**6), (False, 10**6)])
def test_cached_scores_for_rows_and_chunks(tiny_model, embedded_tokenizer, conversations, subset, option_tokens):
    """A subset of the cache's rows or all of them; options in many small forwards or one."""
    items, contexts, generation = conversations
    rows = [i for i, item in enumerate(items) if item.has_options]
    if subset:
        rows = rows[1::2]
    else:  # the cache's own rows, all of them: drop the free-form item's row from the cache first
        keep = torch.tensor(rows)
        cache = generation.cache
        cache.key_values.batch_select_indices(keep)
        cache.mask = cache.mask.index_select(0, keep)
        cache.tokens = [cache.tokens[i] for i in rows]
    options = [list(items[i].options) for i in rows]
    got = score_options_on_cache(tiny_model, embedded_tokenizer, generation.cache,
                                 rows if subset else list(range(len(rows))), [contexts[i] for i in rows], options,
                                 option_tokens=option_tokens)
    expected = AnswerProbe(tiny_model, embedded_tokenizer).score_options([contexts[i] for i in rows], options)
    for a, b in zip(got, expected):
        assert a.logliks == pytest.approx(b.logliks, abs=1e-4)
        assert a.num_tokens == b.num_tokens and a.num_chars == b.num_chars
