"""The answer probe: read the answer a message commits to by appending "Final answer:" and scoring the options.

The paper's public summary does not say how an answer is read from a free-text message; DESIGN.md fills that in:
after an assistant message the environment appends ``"Final answer:"``; items with options are answered by the
option with the highest log-likelihood, free-form items by a short greedy decode. Scoring follows
lm-evaluation-harness conventions:

* continuation = target delimiter ``" "`` + option text; trailing whitespace of the context moves into the
  continuation, and ``continuation_enc = encode(context + continuation)[len(encode(context)):]`` (lm-eval's
  ``_encode_pair``); the model scores ``context_enc + continuation_enc``;
* ``acc`` picks the argmax of the summed continuation log-likelihood, ``acc_norm`` the argmax of log-likelihood
  divided by the option's length in characters.

Speed (the probe runs on every turn of every rollout and evaluation, often on CPU): each distinct context runs once,
in batches of contexts that begin alike; a batch's common prefix (chat template, persona) runs once and its KV cache
is repeated, the rest is left-padded after it, and only the last position's logits are computed (the output head
over a 49k vocabulary costs as much as several layers). The first option token is scored from that last logit; the
context cache is then gathered per (context, option) row and the options' remaining tokens run, right-padded and
sorted by length, in chunks of `batch_size` rows. Results equal one unbatched forward per option up to float
rounding (exactly, in float64). ``share_prefix=False`` instead runs each (context, option) pair in full, still
batched, for models whose cache cannot be gathered by batch index.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from trialign.errors import TriAlignError
from trialign.tasks.item import Item
from trialign.tokens import (encode_continuations, left_pad, padding_id, positions_from_mask, right_pad,
                             select_cache_rows, stop_token_ids, token_logprobs)
from trialign.trunk_cache import (TrunkCache, decoder_of, inputs_digest, layer_inputs, lowest_adapted_layer,
                                  top_layers_only, trunk_fingerprint)

_CHAT_ROLES = ("system", "user", "assistant")
_CLUSTER_TOKENS = 32
"""Contexts whose first this many tokens agree are batched together (see `AnswerProbe._context_batches`)."""
_MIN_LENGTH_RATIO = 0.8
"""A context joins a batch only if it has at least this fraction of the batch's longest context's tokens."""
_MIN_SHARED_PREFIX = 16
"""A batch's common prefix runs separately only from this length on (below, the extra forward costs more)."""
PRECISIONS = ("float32", "autocast", "bfloat16")
"""How the probe's option scoring runs (`AnswerProbe`'s `precision`): in the model's own weights, under bfloat16
autocast, or on a bfloat16 copy of the model's weights."""


def render_context(
    tokenizer, messages: list[dict[str, str]], response: str | None = None, answer_prefix: str = "Final answer:"
) -> str:
    """The probe's context: `messages` in the chat template, then an open assistant turn holding `response` (if any),
    a newline and `answer_prefix`. The assistant turn is left open so the model continues it with the answer."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _CHAT_ROLES or "content" not in message:
            raise TriAlignError(
                f"messages[{index}]: expected a dict with 'role' in {list(_CHAT_ROLES)} and 'content', got {message!r}"
            )
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "")
        raise TriAlignError(f"tokenizer {name!r}: has no chat template to render the probe context")
    prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    turn = answer_prefix if response is None else f"{response}\n{answer_prefix}"
    return prompt + turn


@dataclass
class OptionScores:
    """Log-likelihoods of one context's options."""

    logliks: list[float]
    """Sum of the continuation tokens' log-probabilities, per option."""
    num_tokens: list[int]
    """Number of continuation tokens, per option."""
    num_chars: list[int]
    """Length of the option text in characters (without the delimiter), per option; the ``acc_norm`` divisor."""

    @property
    def acc_choice(self) -> int:
        """Option with the highest log-likelihood (lm-eval ``acc``); the first one on ties."""
        return max(range(len(self.logliks)), key=self.logliks.__getitem__)

    @property
    def acc_norm_choice(self) -> int:
        """Option with the highest log-likelihood per character (lm-eval ``acc_norm``); the first one on ties."""
        normalized = self._normalized()
        return max(range(len(normalized)), key=normalized.__getitem__)

    def probs(self, normalized: bool = False) -> list[float]:
        """Softmax over options of the log-likelihoods (per character when `normalized`): the probe's answer
        distribution p_g(option | s_g), compared across groups by the Jensen–Shannon inconsistency penalty."""
        scores = self._normalized() if normalized else self.logliks
        top = max(scores)
        weights = [math.exp(score - top) for score in scores]
        total = sum(weights)
        return [weight / total for weight in weights]

    def margin(self, normalized: bool = False) -> float:
        """How far the chosen option leads the next best: the difference of the two highest log-likelihoods (per
        character when `normalized`), in nats; infinite with one option."""
        scores = sorted(self._normalized() if normalized else self.logliks, reverse=True)
        return scores[0] - scores[1] if len(scores) > 1 else math.inf

    def _normalized(self) -> list[float]:
        return [loglik / chars for loglik, chars in zip(self.logliks, self.num_chars)]


def option_accuracy(scores: Sequence[OptionScores], items: Sequence[Item]) -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` of option `scores` on their `items`: the share whose chosen option
    (`OptionScores.acc_choice` / `acc_norm_choice`) is correct."""
    if len(scores) != len(items) or not items:
        raise TriAlignError(f"option_accuracy: expected one score per item, got {len(scores)} for {len(items)}")
    return {"acc": sum(s.acc_choice in i.correct_options for s, i in zip(scores, items)) / len(items),
            "acc_norm": sum(s.acc_norm_choice in i.correct_options for s, i in zip(scores, items)) / len(items)}


@dataclass
class ProbeResult:
    """What the probe reads from one context."""

    answer: str
    """The chosen option index as text for option items, else the stripped short answer."""
    correct: bool
    """Whether `answer` is correct (`Item.is_correct`)."""
    option_logprobs: list[float]
    """Summed log-likelihood of each option (unnormalized); ``[]`` for free-form items."""
    gold_logprob: float
    """Log-likelihood of the gold continuation per token (the gold option, or the gold text of free-form items)."""


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Dropout off while probing; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _even_chunks(rows: list, size: int) -> list[list]:
    """`rows` cut into as few consecutive chunks of at most `size` as possible, of (nearly) equal length: a small
    last chunk would pay a whole forward pass's fixed cost (reading every weight) for few rows."""
    if not rows:
        return []
    count = -(-len(rows) // size)
    bounds = [round(i * len(rows) / count) for i in range(count + 1)]
    return [rows[bounds[i] : bounds[i + 1]] for i in range(count)]


class AnswerProbe:
    """Scores options and decodes short answers after a probe context (see `render_context`)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 32,
        normalization: str = "none",
        max_new_tokens: int = 24,
        share_prefix: bool = True,
        precision: str = "float32",
        recheck_margin: float = 0.0,
        progress: bool = False,
        trunk_cache: "TrunkCache | None" = None,
    ):
        """`batch_size` bounds the sequences in one forward pass (contexts, or (context, option) rows).
        `normalization` picks the answer: ``"none"`` (lm-eval ``acc``) or ``"chars"`` (``acc_norm``).
        `max_new_tokens` bounds a short answer. `share_prefix` reuses each context's KV cache for its options (see
        the module docstring). `precision` (`PRECISIONS`) runs option scoring in the model's own weights
        (``"float32"``), under bfloat16 autocast (``"autocast"``), or on a bfloat16 copy of the weights made once for
        the probe's life, with any LoRA adapters merged into it (``"bfloat16"``: no per-call weight casts and no
        adapter matmuls, so faster than autocast on a CPU with native bf16);
        short answers are always decoded in the model's own weights. A reduced precision moves option
        log-likelihoods by more than rounding, which flips a decision only where options are close: with
        `recheck_margin` > 0 every context whose two best options are closer than that many nats (in the decision's
        normalization) is scored again in the model's own weights, and those scores replace the reduced ones
        (`rechecked` counts them). `progress` shows a progress bar per call.
        `trunk_cache` (`trialign.trunk_cache`): option scoring records the frozen trunk's output there, or replays a
        recorded one through the adapted layers only (with `share_prefix`)."""
        if normalization not in ("none", "chars"):
            raise TriAlignError(f"probe normalization: expected 'none' or 'chars', got {normalization!r}")
        if batch_size < 1:
            raise TriAlignError(f"probe batch_size: expected a positive integer, got {batch_size}")
        if max_new_tokens < 1:
            raise TriAlignError(f"probe max_new_tokens: expected a positive integer, got {max_new_tokens}")
        if precision not in PRECISIONS:
            raise TriAlignError(f"probe precision: expected one of {list(PRECISIONS)}, got {precision!r}")
        if not (isinstance(recheck_margin, (int, float)) and recheck_margin >= 0):
            raise TriAlignError(f"probe recheck_margin: expected a number of nats >= 0, got {recheck_margin!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.normalization = normalization
        self.max_new_tokens = max_new_tokens
        self.share_prefix = share_prefix
        self.precision = precision
        self.recheck_margin = float(recheck_margin)
        self.rechecked = 0
        """Contexts scored again in the model's own weights (`recheck_margin`), over the probe's life."""
        # What the forwards run on now (`_reduced`): the model's own weights, autocast off, outside it.
        self._active = model
        self.autocast = False
        self._bf16_copy = None
        self.progress = progress
        self.pad_id = padding_id(tokenizer)
        self._stop_token_ids: torch.Tensor | None = None
        self.trunk_cache = trunk_cache
        self._fingerprints: dict[tuple[bool, int], str] = {}
        # The lowest adapted layer of `model` (None without adapters); the model is fixed for the probe's life.
        self._own_depth = lowest_adapted_layer(model) if trunk_cache is not None else None
        self._replay: Iterator[torch.Tensor] | None = None
        self._cache_config = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, **inputs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self._replay is not None:  # the trunk's recorded output, through the top layers only
                inputs.pop("input_ids")
                return self._active(inputs_embeds=next(self._replay), **inputs)
            return self._active(**inputs)

    @contextlib.contextmanager
    def _reduced(self) -> Iterator[None]:
        """The forwards inside run in `precision` (the bfloat16 copy is made on first use); a no-op in float32."""
        if self.precision == "bfloat16" and self._bf16_copy is None:
            fast = copy.deepcopy(self.model)
            if hasattr(fast, "merge_and_unload"):  # a PEFT model: its adapters folded into the copy's weights
                fast = fast.merge_and_unload()
            self._bf16_copy = fast.to(torch.bfloat16).eval()
            # The head sees the last position as a strided slice of the hidden states (`logits_to_keep`); in bf16 on
            # CPU, matmul then copies the head's weight once per row (16 rows: 0.9 GB, about a second) where a
            # contiguous input takes milliseconds. The copy is the probe's own, so the hook stays on it.
            self._bf16_copy.get_output_embeddings().register_forward_pre_hook(
                lambda module, args: tuple(a.contiguous() if torch.is_tensor(a) else a for a in args))
        self._active = self._bf16_copy if self.precision == "bfloat16" else self.model
        self.autocast = self.precision == "autocast"
        try:
            yield
        finally:
            self._active, self.autocast = self.model, False

    def _fingerprint(self, depth: int) -> str:
        key = (self._active is not self.model, depth)
        if key not in self._fingerprints:
            self._fingerprints[key] = trunk_fingerprint(self._active, depth)
        return self._fingerprints[key]

    def _score_with_trunk_cache(self, context_ids, continuation_ids, logliks) -> None:
        """`_score_shared`, replaying a recorded trunk where the cache holds one for these inputs and this model's
        trunk (the deepest usable), else recording this model's (at its lowest adapted layer; a model without
        adapters records nothing)."""
        cache = self.trunk_cache
        digest = inputs_digest(context_ids, continuation_ids, self.batch_size, self.autocast)
        own = self._own_depth
        limit = len(decoder_of(self.model).layers) if own is None else own
        for depth in reversed([d for d in cache.depths() if 0 < d <= limit]):
            recorded = cache.get((self._fingerprint(depth), depth, digest))
            if recorded is None:
                continue
            self._replay = iter(recorded)
            try:
                with top_layers_only(self._active, depth) as top:
                    self._cache_config = top.cache_config
                    self._score_shared(context_ids, continuation_ids, logliks)
                if next(self._replay, None) is not None:
                    raise RuntimeError("trunk cache: the probe ran fewer forward passes than it recorded")
            finally:
                self._replay, self._cache_config = None, None
            return
        if own is None or own == 0:
            self._score_shared(context_ids, continuation_ids, logliks)
            return
        with layer_inputs(decoder_of(self._active), own) as recorded:
            self._score_shared(context_ids, continuation_ids, logliks)
        cache.put((self._fingerprint(own), own, digest), recorded)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def _encode_pairs(
        self, contexts: Sequence[str], options: Sequence[Sequence[str]]
    ) -> tuple[list[list[int]], list[list[list[int]]]]:
        """`trialign.tokens.encode_continuations`, with errors naming an empty context or option."""
        if len(contexts) != len(options):
            raise TriAlignError(f"score_options: got {len(contexts)} contexts but {len(options)} option lists")
        for index, opts in enumerate(options):
            if not opts:
                raise TriAlignError(f"score_options: context {index} has no options to score")
            for number, option in enumerate(opts):
                if not option:
                    raise TriAlignError(f"score_options: option {number} of context {index} is empty")
        context_ids, continuation_ids = encode_continuations(self.tokenizer, contexts, options)
        for index, (ids, rows) in enumerate(zip(context_ids, continuation_ids)):
            if not ids:
                raise TriAlignError(f"score_options: context {index} is empty after tokenization")
            if any(not row for row in rows):
                raise TriAlignError(f"score_options: an option of context {index} adds no tokens to the context")
        return context_ids, continuation_ids

    def score_options(self, contexts: Sequence[str], options: Sequence[Sequence[str]]) -> list[OptionScores]:
        """Log-likelihood of each option after its context, in the order given (in `precision`; near ties
        rechecked, see `recheck_margin`)."""
        context_ids, continuation_ids = self._encode_pairs(contexts, options)
        with self._reduced():
            logliks = self._score_ids(context_ids, continuation_ids)
        scores = [OptionScores(logliks=values, num_tokens=[len(row) for row in rows],
                               num_chars=[len(text) for text in opts])
                  for values, rows, opts in zip(logliks, continuation_ids, options)]
        if self.precision != "float32" and self.recheck_margin > 0:
            close = [c for c, score in enumerate(scores)
                     if score.margin(normalized=self.normalization == "chars") < self.recheck_margin]
            if close:
                again = self._score_ids([context_ids[c] for c in close], [continuation_ids[c] for c in close])
                for c, values in zip(close, again):
                    scores[c].logliks = values
                self.rechecked += len(close)
        return scores

    def _score_ids(self, context_ids: list[list[int]], continuation_ids: list[list[list[int]]]) -> list[list[float]]:
        """Option log-likelihoods of encoded (context, options), with the forwards `_active` now."""
        logliks = [[0.0] * len(rows) for rows in continuation_ids]
        with torch.inference_mode(), _eval_mode(self._active):
            if self.share_prefix and self.trunk_cache is not None:
                self._score_with_trunk_cache(context_ids, continuation_ids, logliks)
            elif self.share_prefix:
                self._score_shared(context_ids, continuation_ids, logliks)
            else:
                self._score_full(context_ids, continuation_ids, logliks)
        return logliks

    def _context_batches(self, context_ids: list[list[int]]) -> list[list[list[int]]]:
        """Batches of distinct contexts; each entry lists the indices of all contexts with those tokens (a repeated
        context runs once).

        Contexts that begin alike (the same first `_CLUSTER_TOKENS` tokens: system prompt and persona, say) form
        clusters; a cluster fills whole batches of its own, longest first, so that each batch shares a long common
        prefix that runs once and holds similar lengths. What is left of each cluster is pooled and batched by
        length. (On 100 TruthfulQA items x 9 groups this runs about 30% fewer token positions than the contexts hold,
        padding included.)
        """
        same: dict[tuple[int, ...], list[int]] = {}
        for index, ids in enumerate(context_ids):
            same.setdefault(tuple(ids), []).append(index)
        clusters: dict[tuple[int, ...], list[list[int]]] = {}
        for group in same.values():
            clusters.setdefault(tuple(context_ids[group[0]][:_CLUSTER_TOKENS]), []).append(group)
        batches: list[list[list[int]]] = []
        pooled: list[list[int]] = []
        for members in clusters.values():
            members.sort(key=lambda group: -len(context_ids[group[0]]))
            whole = len(members) - len(members) % self.batch_size
            batches += self._by_length(members[:whole], context_ids)
            pooled += members[whole:]
        pooled.sort(key=lambda group: -len(context_ids[group[0]]))
        return batches + self._by_length(pooled, context_ids)

    def _by_length(self, groups: list[list[int]], context_ids: list[list[int]]) -> list[list[list[int]]]:
        """Consecutive batches of longest-first `groups`: a batch closes at `batch_size` contexts, or before a context
        shorter than `_MIN_LENGTH_RATIO` of the batch's longest (its padding would cost more than another pass)."""
        batches: list[list[list[int]]] = []
        for group in groups:
            length = len(context_ids[group[0]])
            batch = batches[-1] if batches else None
            if batch and len(batch) < self.batch_size and length >= _MIN_LENGTH_RATIO * len(context_ids[batch[0][0]]):
                batch.append(group)
            else:
                batches.append([group])
        return batches

    def _run_contexts(self, contexts: list[list[int]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward over a batch of contexts: (last position's logits, KV cache, attention mask of the cache).

        The batch's common prefix runs once and its cache is repeated per context; the rest is left-padded after
        it, so padding may sit between prefix and rest, which the mask and position ids account for."""
        shortest = min(len(ids) for ids in contexts)
        prefix = 0
        # Each context keeps at least its last token: its logits predict the first option token.
        while prefix < shortest - 1 and all(ids[prefix] == contexts[0][prefix] for ids in contexts):
            prefix += 1
        if len(contexts) == 1 or prefix < _MIN_SHARED_PREFIX:
            prefix = 0
        rest_ids, rest_mask = left_pad([ids[prefix:] for ids in contexts], self.pad_id, self.device)
        cache = DynamicCache(config=self._cache_config or self.model.config)
        if prefix:
            shared = torch.tensor([contexts[0][:prefix]], device=self.device)
            self._forward(input_ids=shared, cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(contexts))
        mask = torch.cat([torch.ones_like(rest_mask[:, :1]).expand(-1, prefix), rest_mask], dim=1)
        out = self._forward(
            input_ids=rest_ids, attention_mask=mask, position_ids=positions_from_mask(mask)[:, prefix:], cache=cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1, :], out.cache, mask

    def _score_shared(self, context_ids, continuation_ids, logliks) -> None:
        batches = self._context_batches(context_ids)
        for batch in tqdm(batches, desc="probe", unit="batch", disable=not self.progress):
            last_logits, cache, mask = self._run_contexts([context_ids[group[0]] for group in batch])
            # rows: (row of the batch, context index, option index).
            rows = [(b, c, o) for b, group in enumerate(batch) for c in group for o in range(len(continuation_ids[c]))]
            first = torch.tensor([continuation_ids[c][o][0] for _, c, o in rows], device=self.device)
            batch_rows = torch.tensor([b for b, _, _ in rows], device=self.device)
            last_logits = last_logits.to(torch.promote_types(last_logits.dtype, torch.float32))
            normalizer = torch.logsumexp(last_logits, dim=-1)
            first_logprobs = (last_logits[batch_rows, first] - normalizer[batch_rows]).tolist()
            totals = dict(zip([(c, o) for _, c, o in rows], first_logprobs))
            # Options of one token are done; the rest run their tokens but the last on top of the context cache,
            # sorted by length so that a forward pass holds options of similar length.
            longer = sorted((r for r in rows if len(continuation_ids[r[1]][r[2]]) > 1),
                            key=lambda r: len(continuation_ids[r[1]][r[2]]))
            context_lengths = mask.sum(-1)
            for chunk in _even_chunks(longer, self.batch_size):
                select = torch.tensor([b for b, _, _ in chunk], device=self.device)
                tokens = [continuation_ids[c][o] for _, c, o in chunk]
                option_ids, option_mask = right_pad([t[:-1] for t in tokens], self.pad_id, self.device)
                targets, _ = right_pad([t[1:] for t in tokens], self.pad_id, self.device)
                gathered = select_cache_rows(cache, select)
                steps = torch.arange(option_ids.shape[1], device=self.device)
                out = self._forward(
                    input_ids=option_ids,
                    attention_mask=torch.cat([mask.index_select(0, select), option_mask], dim=1),
                    position_ids=context_lengths.index_select(0, select)[:, None] + steps[None, :],
                    cache=gathered,
                    use_cache=True,
                )
                per_token = token_logprobs(out.logits, targets) * option_mask
                for (_, c, o), value in zip(chunk, per_token.sum(-1).tolist()):
                    totals[(c, o)] += value
            for (c, o), value in totals.items():
                logliks[c][o] = value

    def _score_full(self, context_ids, continuation_ids, logliks) -> None:
        """Each (context, option) as one left-padded sequence of context + continuation but its last token; the last
        `len(continuation)` positions predict the continuation, so only those logits are computed."""
        pairs = [(c, o) for c, rows in enumerate(continuation_ids) for o in range(len(rows))]
        pairs.sort(key=lambda p: -(len(context_ids[p[0]]) + len(continuation_ids[p[0]][p[1]])))
        for start in tqdm(range(0, len(pairs), self.batch_size), desc="probe", unit="batch", disable=not self.progress):
            chunk = pairs[start : start + self.batch_size]
            tokens = [continuation_ids[c][o] for c, o in chunk]
            sequences = [context_ids[c] + t[:-1] for (c, _), t in zip(chunk, tokens)]
            ids, mask = left_pad(sequences, self.pad_id, self.device)
            keep = max(len(t) for t in tokens)
            out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                                logits_to_keep=keep)
            # Right-align targets under the kept logits (sequences end together with left padding).
            targets = torch.full((len(chunk), keep), self.pad_id, dtype=torch.long)
            target_mask = torch.zeros((len(chunk), keep))
            for row, t in enumerate(tokens):
                targets[row, keep - len(t) :] = torch.tensor(t)
                target_mask[row, keep - len(t) :] = 1
            per_token = token_logprobs(out.logits, targets.to(self.device)) * target_mask.to(self.device)
            for (c, o), value in zip(chunk, per_token.sum(-1).tolist()):
                logliks[c][o] = value

    def _stop_ids(self) -> torch.Tensor:
        """Token ids that end a short answer: end of sequence / end of turn, and every token containing a newline."""
        if self._stop_token_ids is None:
            stops = set(stop_token_ids(self.tokenizer, self.model))
            pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            stops.update(i for i, piece in enumerate(pieces) if "\n" in piece)
            self._stop_token_ids = torch.tensor(sorted(i for i in stops if i is not None), dtype=torch.long)
        return self._stop_token_ids.to(self.device)

    def decode_short(self, contexts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy short answers, batched with left padding; each stops at end of sequence or a newline. Returns the
        text before the first newline, stripped."""
        steps = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if steps < 1:
            raise TriAlignError(f"decode_short max_new_tokens: expected a positive integer, got {steps}")
        context_ids = self._encode(contexts)
        for index, ids in enumerate(context_ids):
            if not ids:
                raise TriAlignError(f"decode_short: context {index} is empty after tokenization")
        answers = [""] * len(contexts)
        stop_ids = self._stop_ids()
        with torch.inference_mode(), _eval_mode(self.model):
            batches = self._context_batches(context_ids)
            for batch in tqdm(batches, desc="decode", unit="batch", disable=not self.progress):
                logits, cache, mask = self._run_contexts([context_ids[group[0]] for group in batch])
                position = positions_from_mask(mask)[:, -1:]
                generated: list[list[int]] = [[] for _ in batch]
                done = [False] * len(batch)
                for step in range(steps):
                    token = logits.argmax(-1)
                    stopped = torch.isin(token, stop_ids).tolist()
                    for row, value in enumerate(token.tolist()):
                        if not done[row]:
                            generated[row].append(value)
                            done[row] = stopped[row]
                    if all(done) or step == steps - 1:
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    position = position + 1
                    out = self._forward(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                                        cache=cache, use_cache=True, logits_to_keep=1)
                    logits, cache = out.logits[:, -1, :], out.cache
                texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
                for group, text in zip(batch, texts):
                    for index in group:
                        answers[index] = text.split("\n", 1)[0].strip()
        return answers

    def answer(self, items: Sequence[Item], contexts: Sequence[str]) -> list[ProbeResult]:
        """The probe's reading of each (item, context): option items by log-likelihood (per character when
        ``normalization="chars"``), free-form items by a short greedy decode; plus the gold answer's per-token
        log-likelihood for the inconsistency penalty."""
        if len(items) != len(contexts):
            raise TriAlignError(f"probe answer: got {len(items)} items but {len(contexts)} contexts")
        results: list[ProbeResult | None] = [None] * len(items)
        with_options = [i for i, item in enumerate(items) if item.has_options]
        free_form = [i for i, item in enumerate(items) if not item.has_options]
        scores = self.score_options([contexts[i] for i in with_options], [list(items[i].options) for i in with_options])
        for index, score in zip(with_options, scores):
            item = items[index]
            choice = score.acc_norm_choice if self.normalization == "chars" else score.acc_choice
            gold = int(item.gold)
            results[index] = ProbeResult(
                answer=str(choice),
                correct=item.is_correct(choice),
                option_logprobs=list(score.logliks),
                gold_logprob=score.logliks[gold] / score.num_tokens[gold],
            )
        if free_form:
            texts = self.decode_short([contexts[i] for i in free_form])
            golds = [[str(items[i].gold)] for i in free_form]
            gold_scores = self.score_options([contexts[i] for i in free_form], golds)
            for index, text, score in zip(free_form, texts, gold_scores):
                results[index] = ProbeResult(
                    answer=text,
                    correct=items[index].is_correct(text),
                    option_logprobs=[],
                    gold_logprob=score.logliks[0] / score.num_tokens[0],
                )
        return [result for result in results if result is not None]
