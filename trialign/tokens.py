"""Token rules that rollout, training and evaluation must apply identically.

* `padding_id`: the id padded positions hold — the tokenizer's pad token, else its EOS, else 0. Padded positions are
  always masked out (attention mask, loss masks), so the value only has to be a valid id; one rule keeps the tensors
  of the sampler, the probe, the cached probe and the collator the same.
* `end_of_turn_id`: the token the chat template closes an assistant message with (``<|im_end|>`` for ChatML),
  read off the template itself.
* `stop_token_ids`: the tokens that end a generated message — the end-of-turn token, EOS, the model's configured
  EOS ids and the end-of-turn markers of the common chat formats — for the rollout's sampler, `generate_texts`
  (evaluation's generate mode) and the probe's short answers alike.
* `special_token_texts` / `action_text`: which text makes up an action a_t — the assistant segment of the chat
  template's render after the state, up to and including its last special token (the end-of-turn token); the text
  after it (a newline) belongs to the next state. The rollout's log μ and training's log π are of these tokens, so
  the rollout and the collator cut with this one function; a template that does not render the conversation so
  far as a prefix of its continuation is refused (both used to disagree there: one fell back, one raised).
* `left_pad` / `right_pad` / `positions_from_mask` / `common_prefix_length`: how token rows become a batch
  (ids padded with `padding_id`, a 0/1 mask) and the position ids real tokens get whichever side the padding is on.
* `select_cache_rows`: a KV cache holding chosen rows of another (repeats allowed), the source left as it was, so
  that every option, action or next turn continues its context's cache the same way.
* `encode_continuations`: how an option is tokenized after its context (lm-evaluation-harness's `_encode_pair`),
  for the probe, the rollout's cached probe and the training collator: the importance of one rule here is that the
  option log-likelihoods of rollout, training and evaluation are of the same tokens.
* `token_logprobs`: log softmax(logits)[target], for every stage that scores tokens (sampler, probes, policy), as
  the target's logit minus the logsumexp, in at least float32: half-precision logits are upcast (a log-softmax over
  a 49k vocabulary in bf16 keeps about 3 significant digits), float64 ones stay float64 (so the probe is exact in
  float64 tests). Training used a fused `cross_entropy` before, about 20% faster on the output head's chunk, but in
  float32 it is less precise: on the embedded model its option log-likelihoods were 1.3e-4 nats from a float64
  reference where gather minus logsumexp stays within 1e-4; the probe's decisions and the rollout's log μ come first.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from trialign.errors import TriAlignError

TARGET_DELIMITER = " "
"""What joins a context and an option (lm-evaluation-harness's target delimiter)."""

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


def special_token_texts(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text, longest first (so a token that contains another is found first)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((s for s in specials if s), key=len, reverse=True)


def action_text(tokenizer, messages: Sequence[dict[str, str]], prompt: str, text: str,
                specials: Sequence[str] | None = None, where: str = "") -> str:
    """The template text of assistant message `text` after `messages` (whose render with the generation prompt is
    `prompt`), up to and including its last special token: the action a_t as rollout and training tokenize it.

    `specials`: `special_token_texts(tokenizer)` (computed here when None; callers that cut many actions pass it).
    A template whose render of the conversation does not start with `prompt` is a `TriAlignError` naming `where`."""
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": text}], tokenize=False,
                                         add_generation_prompt=False)
    if not full.startswith(prompt):
        raise TriAlignError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its chat template does not render the "
            f"conversation{where} as a prefix of its continuation; episodes cannot be cut into states and actions")
    segment = full[len(prompt):]
    end = max((segment.rfind(token) + len(token) for token in
               (special_token_texts(tokenizer) if specials is None else specials) if token in segment), default=0)
    return segment[:end] if end > 0 else segment


def encode_continuations(tokenizer, contexts: Sequence[str], options: Sequence[Sequence[str]]
                         ) -> tuple[list[list[int]], list[list[list[int]]]]:
    """lm-eval's `_encode_pair` for each context and its options: the context's trailing whitespace joins the
    continuation `TARGET_DELIMITER + option`, whose tokens are those of context + continuation after the right-stripped
    context's own tokens. Returns (context ids, per context its options' continuation ids); a repeated text is
    tokenized once. An option may come out empty (it adds no token); callers decide whether that is an error."""
    texts = [c.rstrip() for c in contexts]
    texts += [c + TARGET_DELIMITER + o for c, opts in zip(contexts, options) for o in opts]
    unique = list(dict.fromkeys(texts))
    encoded = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}
    context_ids = [list(encoded[c.rstrip()]) for c in contexts]
    continuations = [[list(encoded[c + TARGET_DELIMITER + o])[len(ids):] for o in opts]
                     for c, ids, opts in zip(contexts, context_ids, options)]
    return context_ids, continuations


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target]: logits [..., V], targets [...] → [...], in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to one width: ``(ids, mask)`` as long tensors on `device` (an empty row is all
    padding)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right to one width (at least 1): ``(ids, mask)`` as long tensors on `device`."""
    width = max(1, max(len(seq) for seq in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens from 0, whichever side the padding is on."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two rows share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A transformers KV cache holding `rows` of `cache` (repeats allowed); `cache` itself is left untouched for the
    next caller. The layers keep their own types (full or sliding-window)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected
