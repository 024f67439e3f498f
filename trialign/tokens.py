"""Token rules that rollout, training and evaluation must apply identically.

* `padding_id`: the id padded positions hold — the tokenizer's pad token, else its EOS, else 0. Padded positions are
  always masked out (attention mask, loss masks), so the value only has to be a valid id; one rule keeps the tensors
  of the sampler, the probe, the cached probe and the collator the same.
* `end_of_turn_id`: the token the chat template closes an assistant message with (``<|im_end|>`` for ChatML),
  read off the template itself.
* `stop_token_ids`: the tokens that end a generated message — the end-of-turn token, EOS, the model's configured
  EOS ids and the end-of-turn markers of the common chat formats — for the rollout's sampler, `generate_texts`
  (evaluation's generate mode) and the probe's short answers alike.
"""

from __future__ import annotations

from trialign.errors import TriAlignError

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
"""End-of-turn markers of ChatML, Llama 3, Phi and Gemma templates (those a tokenizer does not know are skipped)."""


def padding_id(tokenizer) -> int:
    """The id of padded positions: pad token, else EOS, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant message with (``<|im_end|>`` for ChatML)."""
    marker = "\x00MARK\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = rendered.split(marker, 1)[1] if marker in rendered else ""
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    if tail_ids:
        return int(tail_ids[0])
    if tokenizer.eos_token_id is None:
        raise TriAlignError(f"tokenizer {tokenizer.name_or_path!r}: no end-of-turn or EOS token to end a message")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Tokens that end a generated message: the end-of-turn token, EOS, the model's configured EOS ids and the known
    end-of-turn markers the tokenizer has (sorted)."""
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(int(i) for i in ids if i is not None)
