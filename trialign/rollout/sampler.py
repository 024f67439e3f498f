"""Sampling assistant messages from the behavior policy mu, and log mu of each action at temperature 1.

An *action* a_t is the assistant message as the chat template writes it into the conversation: its text, up to
and including the end-of-turn token, tokenized on its own (`trialign.tokens.action_text`, which the training
collator `trialign.datamodules.collate` uses too). Training recomputes log pi(a_t | s_t) on exactly these tokens,
so the stored log mu equals log pi of the untrained policy and the importance ratio pi/mu starts at 1.

log mu is taken at temperature 1 (the model's own distribution) whatever the sampling temperature: temperature
only diversifies the data. It comes from `generate`'s raw logits (``output_logits=True``) when the sampled tokens
are the action's tokens; a message cut at `max_new_tokens` gets the log-probability of its end-of-turn token from
one more decode step on `generate`'s KV cache. Otherwise — a text that re-tokenizes differently, sampling under
bf16 autocast, or the vLLM backend — a forward pass of the model in its own dtype scores the action
(`score_actions`).

Batched generation: every prompt of a call is left-padded into one `generate` call with a KV cache, each row
stopping at an end-of-turn/EOS token or `max_new_tokens`. ``min_new_tokens=1`` keeps messages non-empty (it masks
the end tokens at the first step only, a negligible departure from mu).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from trialign.errors import require_module
from trialign.tokens import (common_prefix_length, end_of_turn_id, left_pad, padding_id, positions_from_mask,
                             select_cache_rows, stop_token_ids, token_logprobs)



@dataclass
class Sample:
    """One sampled message, as the sampler produced it."""

    tokens: list[int]
    """Sampled tokens before the stop token (if any)."""
    stop: int | None
    """The stop token that ended the message, or None when it was cut at `max_new_tokens`."""
    logprob: float | None
    """log mu at temperature 1 of `tokens` + [stop], or of `tokens` + [end-of-turn] for a cut message (one more
    decode step); None when the sampler did not compute it."""

    @property
    def num_sampled(self) -> int:
        """Tokens the sampler generated, the stop token included."""
        return len(self.tokens) + (self.stop is not None)


@dataclass
class GenerationCache:
    """The KV cache `generate` leaves behind, so that the answer probe can continue the conversations instead of
    running them again (`trialign.rollout.cached_probe`)."""

    key_values: Any
    """A transformers cache over every position of `mask`."""
    mask: torch.Tensor
    """[B, P] 1 at the positions that hold a row's tokens (prompt and everything sampled), 0 at padding."""
    tokens: list[list[int]] = field(default_factory=list)
    """Per row, the tokens at its positions with mask 1, in order (after a stop token come padding tokens that
    were fed too; a user of the cache keeps only the prefix it needs)."""


@dataclass
class Generation:
    """What one batched sampling call returns."""

    samples: list[Sample]
    """One message per prompt, in order."""
    cache: GenerationCache | None = None
    """The KV cache of prompts + messages, when the backend exposes it (transformers, without autocast)."""


@torch.inference_mode()
def score_actions(
    model, tokenizer, prompts: Sequence[Sequence[int]], actions: Sequence[Sequence[int]], *, batch_size: int = 16
) -> list[float]:
    """log p(action | prompt) at temperature 1, summed over the action's tokens, by a forward pass of `model`
    (left-padded batches of similar length; only the action positions' logits are computed)."""
    if len(prompts) != len(actions):
        raise ValueError(f"score_actions: {len(prompts)} prompts but {len(actions)} actions")
    device = next(model.parameters()).device
    pad = padding_id(tokenizer)
    totals = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(actions[i])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([list(prompts[i]) + list(actions[i]) for i in chunk], pad, device)
        keep = max(len(actions[i]) for i in chunk) + 1
        positions = positions_from_mask(mask)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        # Logit j of the kept window predicts token (width - keep + 1 + j); actions end the left-padded rows.
        targets = ids[:, -keep + 1:]
        per_token = token_logprobs(logits[:, :-1].flatten(0, 1), targets.flatten()).view(targets.shape)
        for row, index in enumerate(chunk):
            totals[index] = float(per_token[row, -len(actions[index]):].sum())
    return totals


@torch.inference_mode()
def score_actions_on_cache(model, cache: GenerationCache, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                           actions: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 16) -> list[float]:
    """`score_actions` for rows of a sampling call, continuing its cache: row `rows[i]` of `cache` holds
    `prompts[i]` (then the sampled tokens, masked out here), so only the action's tokens run. The cache is left as
    it was (each batch of rows works on a copy)."""
    device = cache.mask.device
    totals = []
    for start in range(0, len(rows), batch_size):
        part = range(start, min(start + batch_size, len(rows)))
        pick = torch.tensor([rows[i] for i in part], device=device)
        kept = torch.tensor([len(prompts[i]) for i in part], device=device)
        if any(cache.tokens[rows[i]][:len(prompts[i])] != list(prompts[i]) for i in part):
            raise ValueError("score_actions_on_cache: a prompt is not the start of its cache row")
        past = select_cache_rows(cache.key_values, pick)
        # The cache holds no logits: the prompt's last token is fed again (its cached copy masked out), so that its
        # logits predict the action's first token; then the action but its last token.
        mask = cache.mask.index_select(0, pick)
        mask = mask * (mask.cumsum(-1) <= (kept - 1)[:, None])
        feeds = [[prompts[i][-1]] + list(actions[i][:-1]) for i in part]
        width = max(len(f) for f in feeds)
        ids = torch.full((len(feeds), width), pad_id, dtype=torch.long, device=device)
        feed_mask = torch.zeros((len(feeds), width), dtype=torch.long, device=device)
        targets = torch.full((len(feeds), width), pad_id, dtype=torch.long, device=device)
        for row, (feed, i) in enumerate(zip(feeds, part)):
            ids[row, :len(feed)] = torch.tensor(feed, device=device)
            feed_mask[row, :len(feed)] = 1
            targets[row, :len(feed)] = torch.tensor(list(actions[i]), device=device)
        steps = torch.arange(width, device=device)
        logits = model(input_ids=ids, attention_mask=torch.cat([mask, feed_mask], 1), cache=past,
                       position_ids=(kept - 1)[:, None] + steps[None, :], use_cache=True).logits
        values = token_logprobs(logits.flatten(0, 1), targets.flatten()).view(targets.shape) * feed_mask
        totals.extend(values.sum(-1).tolist())
    return totals


class HFSampler:
    """Samples with transformers `generate`: one call for all prompts given, left padding, KV cache."""

    def __init__(self, model, tokenizer, *, autocast: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.autocast = autocast
        self.end_id = end_of_turn_id(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = padding_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def sample(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, seed: int,
        cache: GenerationCache | None = None,
    ) -> Generation:
        """One message per prompt (token ids of the rendered state); log mu at temperature 1 unless autocast.

        With `cache` (the previous turn's, row i = prompt i), each prompt's longest prefix already in the cache is
        not run again. Without it, identical prompts (the K samples of one item and group) share one prefill."""
        from transformers import GenerationConfig

        if cache is not None and not self.autocast:
            ids, mask, past = self._continue(prompts, cache)
        else:
            ids, mask, past = self._prefill_unique(prompts)
        config = GenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            min_new_tokens=1, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, output_logits=True,
            return_dict_in_generate=True,
        )
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model.generate(input_ids=ids, attention_mask=mask, cache=past,
                                          generation_config=config)
        width = ids.shape[1]
        new_tokens = out.sequences[:, width:].tolist()
        stops = [next((i for i, t in enumerate(tokens) if t in self.stop_ids), None) for tokens in new_tokens]
        if self.autocast:  # bf16 logits are too coarse for log mu: the caller rescores in the model's dtype
            return Generation([Sample(tokens[:stop], tokens[stop] if stop is not None else None, None)
                               for tokens, stop in zip(new_tokens, stops)])
        # Raw (unprocessed) logits of each step: log mu at temperature 1 of the sampled token.
        step_logprobs = torch.stack(
            [token_logprobs(step, out.sequences[:, width + s]) for s, step in enumerate(out.logits)], dim=1
        ).tolist()
        end_logprobs, next_cache = self._last_step(out, mask)
        samples = []
        for row, (tokens, stop) in enumerate(zip(new_tokens, stops)):
            if stop is None:
                samples.append(Sample(tokens, None, sum(step_logprobs[row]) + end_logprobs[row]))
            else:
                samples.append(Sample(tokens[:stop], tokens[stop], sum(step_logprobs[row][:stop + 1])))
        next_cache.tokens = [list(prompt) + tokens for prompt, tokens in zip(prompts, new_tokens)]
        return Generation(samples, next_cache)

    def _prefill_unique(self, prompts: Sequence[Sequence[int]]):
        """(input ids, attention mask, cache) for `generate`: each distinct prompt but its last token runs once and
        its cache is copied to the rows that repeat it; None for the cache when no prompt repeats."""
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        if len(unique) == len(prompts) or min(len(p) for p in unique) < 2:
            ids, mask = left_pad(prompts, self.pad_id, self.device)
            return ids, mask, None
        from transformers import DynamicCache

        position = {prompt: i for i, prompt in enumerate(unique)}
        rows = torch.tensor([position[tuple(p)] for p in prompts], device=self.device)
        ids, mask = left_pad(unique, self.pad_id, self.device)
        past = DynamicCache(config=self.model.config)
        # Left padding puts every prompt's last token in the last column: the cache covers all columns but it.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cache=past, use_cache=True,
                       position_ids=positions_from_mask(mask)[:, :-1], logits_to_keep=1)
        past.batch_select_indices(rows)
        return ids.index_select(0, rows), mask.index_select(0, rows), past

    def _continue(self, prompts: Sequence[Sequence[int]], cache: GenerationCache):
        """(input ids, attention mask, cache) for `generate`, continuing the previous turn's cache: each row keeps
        the longest cached prefix of its prompt (later cached positions are masked) and feeds the rest, left-padded
        after the cached columns (`generate` derives positions from the mask, so the holes are harmless)."""
        kept = [min(common_prefix_length(p, cache.tokens[b]), len(p) - 1) for b, p in enumerate(prompts)]
        old = cache.mask * (cache.mask.cumsum(-1) <= torch.tensor(kept, device=cache.mask.device)[:, None])
        new_ids, new_mask = left_pad([list(p)[k:] for p, k in zip(prompts, kept)], self.pad_id, self.device)
        filler = torch.full((len(prompts), old.shape[1]), self.pad_id, dtype=torch.long, device=self.device)
        return torch.cat([filler, new_ids], 1), torch.cat([old, new_mask], 1), cache.key_values

    def _last_step(self, out, prompt_mask: torch.Tensor) -> tuple[list[float], GenerationCache]:
        """One more decode step on `generate`'s KV cache (which holds every position but the last sampled token):
        log mu(end-of-turn | prompt + message) for messages cut at `max_new_tokens`, and a cache of every
        position for the probe."""
        steps = out.sequences.shape[1] - prompt_mask.shape[1]
        mask = torch.cat([prompt_mask, torch.ones_like(prompt_mask[:, :1]).expand(-1, steps)], dim=1)
        # The whole batch takes the step (rows that stopped earlier feed padding, masked out by later users).
        logits = self.model(
            input_ids=out.sequences[:, -1:], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
            cache=out.cache, use_cache=True,
        ).logits[:, -1]
        end = torch.full((logits.shape[0],), self.end_id, dtype=torch.long, device=logits.device)
        return token_logprobs(logits, end).tolist(), GenerationCache(out.cache, mask)


def require_vllm() -> None:
    """A one-line error when the optional vLLM backend is not installed."""
    require_module("vllm", "backend 'vllm'",
                   "install it with `pip install trialign[vllm]` on a CUDA machine, or use backend 'hf'")


class VLLMSampler:
    """Samples with vLLM (GPU). log mu comes from the transformers model's forward pass (`score_actions`), as for
    the HF backend under autocast, so both backends store the same quantity."""

    def __init__(self, location: str, tokenizer, *, dtype: str = "auto", seed: int = 0,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.5):
        require_vllm()
        from vllm import LLM

        from trialign.backbone import parse_dtype

        self.stop_ids = stop_token_ids(tokenizer)
        vllm_dtype = "auto" if dtype == "auto" else str(parse_dtype(dtype)).removeprefix("torch.")
        # The transformers model (probe, log mu) shares the GPU: vLLM gets only part of its memory.
        self.llm = LLM(model=location, tokenizer=location, dtype=vllm_dtype, seed=seed,
                       trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization)

    def sample(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, seed: int,
        cache: GenerationCache | None = None,
    ) -> Generation:
        """One message per prompt; `cache` is unused (vLLM keeps its own prefix cache)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                min_tokens=1, seed=seed, stop_token_ids=self.stop_ids)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        samples = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            stop = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            samples.append(Sample(tokens[:stop] if stop is not None else tokens,
                                  tokens[stop] if stop is not None else None, None))
        return Generation(samples)
