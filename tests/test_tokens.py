"""The token rules every stage shares (`trialign.tokens`)."""

from __future__ import annotations

from types import SimpleNamespace

from trialign.tokens import end_of_turn_id, padding_id, stop_token_ids


def test_padding_id_falls_back_from_pad_to_eos_to_zero():
    assert padding_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert padding_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert padding_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_stop_tokens_hold_the_end_of_turn_eos_and_the_models_configured_eos(embedded_tokenizer):
    im_end = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(embedded_tokenizer) == im_end  # read off the chat template (ChatML)
    plain = stop_token_ids(embedded_tokenizer)
    assert im_end in plain and embedded_tokenizer.eos_token_id in plain and plain == sorted(plain)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 6]))
    assert stop_token_ids(embedded_tokenizer, model) == sorted(set(plain) | {5, 6})


def test_one_rule_for_stops_in_the_sampler_the_probe_and_generation(embedded_tokenizer, tiny_model):
    """Rollout (`HFSampler`), evaluation's generate mode and the probe's short answers stop on the same tokens."""
    import inspect

    import trialign.generation as generation
    from trialign.probe import AnswerProbe
    from trialign.rollout.sampler import HFSampler

    expected = stop_token_ids(embedded_tokenizer, tiny_model)
    assert HFSampler(tiny_model, embedded_tokenizer).stop_ids == expected
    probe_stops = set(AnswerProbe(tiny_model, embedded_tokenizer)._stop_ids().tolist())
    assert set(expected) <= probe_stops  # plus every token holding a newline
    assert "stop_token_ids(tokenizer, model)" in inspect.getsource(generation.generate_texts)


def test_encode_continuations_is_lm_evals_encode_pair(embedded_tokenizer):
    """Trailing context whitespace joins the continuation " " + option; its tokens are those of the whole string after
    the right-stripped context's own, computed here by hand."""
    from trialign.tokens import TARGET_DELIMITER, encode_continuations

    contexts = ["Question: Is water wet?\nAnswer:", "Pick one: \n"]
    options = [["Yes", "No, not really"], ["red"]]
    context_ids, continuations = encode_continuations(embedded_tokenizer, contexts, options)
    encode = lambda text: embedded_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    for context, ids, opts, rows in zip(contexts, context_ids, options, continuations):
        assert ids == encode(context.rstrip())
        for option, row in zip(opts, rows):
            whole = encode(context + TARGET_DELIMITER + option)
            assert row == whole[len(ids):] and row
    assert "\n" in embedded_tokenizer.decode(continuations[1][0])  # the stripped "\n" moved into the continuation


def test_token_logprobs_equal_a_float64_log_softmax():
    import numpy as np
    import torch

    from trialign.tokens import token_logprobs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=generator) * 4
    targets = torch.randint(0, 50, (3, 5), generator=generator)
    x = logits.double().numpy()
    reference = np.take_along_axis(x, targets.numpy()[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    np.testing.assert_allclose(token_logprobs(logits, targets).numpy(), reference, atol=1e-5, rtol=0)
    assert token_logprobs(logits.double(), targets).dtype == torch.float64  # float64 stays float64
    half = token_logprobs(logits.bfloat16(), targets)
    assert half.dtype == torch.float32  # half precision is upcast before the log-softmax


def test_an_action_is_the_assistant_text_through_its_end_of_turn_token(embedded_tokenizer):
    from trialign.tokens import action_text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt = embedded_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    action = action_text(embedded_tokenizer, messages, prompt, "It is 4.")
    assert action == "It is 4.<|im_end|>"  # the newline after <|im_end|> belongs to the next state
    ids = embedded_tokenizer(action, add_special_tokens=False)["input_ids"]
    assert ids[-1] == end_of_turn_id(embedded_tokenizer)


def test_rollout_and_collator_cut_the_same_action(embedded_tokenizer):
    """The rollout's action (whose log mu it stores) is the collator's action piece, token for token."""
    from trialign.datamodules.collate import TrajectoryCollator
    from trialign.tokens import action_text

    turns = [{"user": "Is the sky blue?", "assistant": "Yes, on a clear day."},
             {"user": "Are you sure?", "assistant": "Yes."}]
    pieces = TrajectoryCollator(embedded_tokenizer, ["neutral"], max_length=256).episode_pieces("Be brief.", turns)
    messages = [{"role": "system", "content": "Be brief."}]
    for t, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn["user"]})
        prompt = embedded_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert action_text(embedded_tokenizer, messages, prompt, turn["assistant"]) == pieces[2 * t + 1][0]
        messages.append({"role": "assistant", "content": turn["assistant"]})
    assert [turn for _, turn in pieces] == [0, 1, 0, 2]


def test_a_template_that_rewrites_the_state_is_refused_by_rollout_and_collator(embedded_tokenizer):
    import copy

    import pytest

    from trialign.datamodules.collate import TrajectoryCollator
    from trialign.errors import TriAlignError
    from trialign.tokens import action_text

    tokenizer = copy.deepcopy(embedded_tokenizer)
    # A template that writes the generation prompt differently from the assistant turn it opens.
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}")
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(TriAlignError, match="does not render the conversation at item 7 as a prefix"):
        action_text(tokenizer, messages, prompt, "Hello", where=" at item 7")
    collator = TrajectoryCollator(tokenizer, ["neutral"], max_length=256)
    with pytest.raises(TriAlignError, match="as a prefix of its continuation"):
        collator.episode_pieces("", [{"user": "Hi", "assistant": "Hello"}])
