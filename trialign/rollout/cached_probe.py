"""The answer probe of `trialign.probe`, continued from the sampler's KV cache instead of run from scratch.

The probe context of a turn is the conversation so far + the new message + the template's answer prefix
(`render_context`);
`generate` has just run the model over the conversation and the message. Re-running that context would double the
rollout's cost on CPU, so for option items this module reuses the sampler's cache (`GenerationCache`):

1. the context is tokenized as the probe tokenizes it; the longest prefix it shares with a row's cached tokens is
   kept (positions after it are masked out, so a stop token or padding fed by `generate` is not attended to);
2. the rest of the context (the newline and answer prefix) runs on top of the cache for all rows in one forward;
3. every option continues that cache as in `AnswerProbe`: lm-eval's continuation tokens (`encode(context + " " +
   option)` after the context's tokens), the first token scored from the context's last logit, the others side by
   side after the context in one sequence per row, each option seeing only the context and its own tokens (a
   block-causal 4D attention mask), so a row's cache is used once for all its options instead of once per option.

The answer, `option_logprobs` and `gold_logprob` are those of `AnswerProbe.answer` on the same contexts, up to
float rounding (tested). Free-form items, and rows without a cache (vLLM, autocast), go through `AnswerProbe` itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from trialign.probe import AnswerProbe, OptionScores, ProbeResult
from trialign.rollout.sampler import GenerationCache
from trialign.tasks.item import Item
from trialign.tokens import (common_prefix_length, encode_continuations, padding_id, right_pad, select_cache_rows,
                             token_logprobs)


@torch.inference_mode()
def score_options_on_cache(model, tokenizer, cache: GenerationCache, rows: Sequence[int], contexts: Sequence[str],
                           options: Sequence[Sequence[str]], *, option_tokens: int = 512) -> list[OptionScores]:
    """Log-likelihood of each option after its context, for cache rows `rows` (see the module docstring).
    `cache` is left as it was (each chunk of rows works on its own copy), so the next turn can continue it."""
    device = cache.mask.device
    pad = padding_id(tokenizer)
    context_ids, continuations = encode_continuations(tokenizer, contexts, options)
    totals: dict[tuple[int, int], float] = {}
    for chunk in _row_chunks(continuations, option_tokens):
        pick = torch.tensor([rows[b] for b in chunk], device=device)
        past = select_cache_rows(cache.key_values, pick)
        kept = [min(common_prefix_length(context_ids[b], cache.tokens[rows[b]]), len(context_ids[b]) - 1)
                for b in chunk]
        # Keep each row's first `kept` cached positions; later ones (the message's stop token, padding) are masked.
        mask = cache.mask.index_select(0, pick)
        mask = mask * (mask.cumsum(-1) <= torch.tensor(kept, device=device)[:, None])
        ends = [context_ids[b][n:] for b, n in zip(chunk, kept)]
        end_ids, end_mask = right_pad(ends, pad, device)
        steps = torch.arange(end_ids.shape[1], device=device)
        logits = model(input_ids=end_ids, attention_mask=torch.cat([mask, end_mask], 1), cache=past,
                       position_ids=torch.tensor(kept, device=device)[:, None] + steps[None, :], use_cache=True).logits
        last = logits[torch.arange(len(chunk), device=device), torch.tensor([len(e) - 1 for e in ends], device=device)]
        pairs = [(row, o) for row, b in enumerate(chunk) for o in range(len(continuations[b]))]
        first = torch.tensor([continuations[chunk[row]][o][0] for row, o in pairs], device=device)
        which = torch.tensor([row for row, _ in pairs], device=device)
        for (row, o), value in zip(pairs, token_logprobs(last[which], first).tolist()):
            totals[(chunk[row], o)] = value
        if any(len(c) > 1 for b in chunk for c in continuations[b]):
            _score_option_blocks(model, past, torch.cat([mask, end_mask], 1),
                                 [len(context_ids[b]) for b in chunk], [continuations[b] for b in chunk],
                                 chunk, totals, pad)
    return [OptionScores(logliks=[totals[(b, o)] for o in range(len(conts))], num_tokens=[len(c) for c in conts],
                         num_chars=[len(option) for option in opts])
            for b, (conts, opts) in enumerate(zip(continuations, options))]


def _row_chunks(continuations: list[list[list[int]]], budget: int) -> list[list[int]]:
    """All rows, in chunks of about `budget` option tokens (after each option's first) per forward."""
    chunks: list[list[int]] = [[]]
    size = 0
    for b, conts in enumerate(continuations):
        tokens = max(sum(len(c) - 1 for c in conts), 1)
        if chunks[-1] and size + tokens > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(b)
        size += tokens
    return [c for c in chunks if c]


def _score_option_blocks(model, past, mask: torch.Tensor, context_lengths: list[int],
                         continuations: list[list[list[int]]], names: list[int],
                         totals: dict[tuple[int, int], float], pad: int) -> None:
    """Add to `totals[(names[row], option)]` the log-probabilities of every option token after the first; row `row`
    of `past` / `mask` is the context of `continuations[row]`. `past` is extended in place."""
    device = mask.device
    sequences, targets, owners, offsets = [], [], [], []
    for conts in continuations:
        seq, tgt, own, off = [], [], [], []
        for o, tokens in enumerate(conts):
            seq += tokens[:-1]
            tgt += tokens[1:]
            own += [o] * (len(tokens) - 1)
            off += list(range(len(tokens) - 1))
        sequences.append(seq or [pad])  # a row whose options are all one token still needs a (masked) query
        targets.append(tgt or [pad])
        owners.append(own)
        offsets.append(off or [0])
    ids, _ = right_pad(sequences, pad, device)
    target_ids, _ = right_pad(targets, pad, device)
    owner, _ = right_pad(owners, -1, device)
    offset, _ = right_pad(offsets, 0, device)
    width = ids.shape[1]
    # Keys: the cached context (as its 2D mask says), then the option tokens of the same option up to the query.
    same_option = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([mask.bool()[:, None, :].expand(-1, width, -1), same_option & causal], dim=2)
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    positions = torch.tensor(context_lengths, device=device)[:, None] + offset
    logits = model(input_ids=ids, attention_mask=additive[:, None], cache=past, use_cache=True,
                   position_ids=positions).logits
    values = token_logprobs(logits, target_ids).tolist()
    for row, name in enumerate(names):
        for q, o in enumerate(owners[row]):
            totals[(name, o)] += values[row][q]


def probe_answers(probe: AnswerProbe, items: Sequence[Item], contexts: Sequence[str],
                  cache: GenerationCache | None) -> list[ProbeResult]:
    """`probe.answer(items, contexts)`, continuing `cache` (row i = context i) for option items when there is one."""
    results: list[ProbeResult | None] = [None] * len(items)
    cached = [i for i, item in enumerate(items) if item.has_options] if cache is not None else []
    if cached:
        scores = score_options_on_cache(probe.model, probe.tokenizer, cache, cached, [contexts[i] for i in cached],
                                        [list(items[i].options) for i in cached])
        for index, score in zip(cached, scores):
            item = items[index]
            choice = score.acc_norm_choice if probe.normalization == "chars" else score.acc_choice
            gold = int(item.gold)
            results[index] = ProbeResult(answer=str(choice), correct=item.is_correct(choice),
                                         option_logprobs=list(score.logliks),
                                         gold_logprob=score.logliks[gold] / score.num_tokens[gold])
    rest = [i for i in range(len(items)) if results[i] is None]
    if rest:
        for index, result in zip(rest, probe.answer([items[i] for i in rest], [contexts[i] for i in rest])):
            results[index] = result
    return [r for r in results if r is not None]
