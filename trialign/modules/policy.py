"""The trained policy: a causal LM from a model source with LoRA adapters, read out the way the objective needs.

DESIGN.md: all agents share one backbone; the policy is its LoRA adapter (one shared adapter by default, or one per
group), and the reference policy is the same backbone with the adapters disabled (`trialign.backbone`).

What the training step needs from a forward pass is (a) the last hidden state at a few positions (the ends of the
states s_t, for the value heads) and (b) log-probabilities of a few tokens (the action tokens, the answer probe's
continuation tokens) — never the full [N, L, V] logits, which for a 49k vocabulary would dwarf the model's own
activations. So `hidden_states` runs the decoder without its output head, and `token_logprobs` applies the head only
to the selected positions, in chunks recomputed during the backward pass (`torch.utils.checkpoint`), so that at most
one chunk of vocabulary-sized logits is alive at a time.

Nothing is loaded at construction: `build` loads the weights (the LightningModule calls it from `configure_model`,
so that sharded strategies can wrap the model as it is created and parsing a config stays cheap).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trialign.backbone import DEFAULT_MODEL, LoraSettings, attach_lora, load_model, reference_policy
from trialign.errors import TriAlignError
from trialign.tokens import positions_from_mask, select_cache_rows, token_logprobs
from trialign.trunk_cache import TrunkMemo, layer_inputs, lowest_adapted_layer, top_layers_only
from transformers import DynamicCache

SHARED_ADAPTER = "default"
"""Name of the single shared adapter; peft saves the adapter named "default" at the top of the output folder, so
`PeftModel.from_pretrained(model, folder)` loads it without naming it."""


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    return token_logprobs(F.linear(hidden, weight, bias), targets)


def _chunk_kl(hidden: torch.Tensor, reference_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
    log_p = torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)
    with torch.no_grad():
        log_q = torch.log_softmax(F.linear(reference_hidden, weight, bias).float(), dim=-1)
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def _right_padded(attention_mask: torch.Tensor, lengths: torch.Tensor) -> bool:
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(torch.equal(attention_mask.bool(), steps[None, :] < lengths[:, None]))


def _below(name: str, depth: int) -> bool:
    """Whether parameter `name` belongs to the trunk: the embedding or a decoder layer below `depth`."""
    layer = re.search(r"\.layers\.(\d+)\.", name)
    return int(layer[1]) < depth if layer else "embed_tokens" in name


class Policy(nn.Module):
    """A causal LM with LoRA adapters: hidden states and selected-token log-probabilities.

    Args:
        source: model source (embedded alias, local HF directory, GGUF file or hub id).
        lora: LoRA hyper-parameters.
        adapter_names: one adapter per name; `[SHARED_ADAPTER]` for one shared policy, group names for per-group
            adapters.
        dtype: weight dtype of the backbone ("float32", "bfloat16", ...).
        gradient_checkpointing: recompute the decoder's activations in the backward pass (much less memory).
        logprob_chunk: number of positions whose vocabulary logits are materialized at once.
    """

    def __init__(self, source: str = DEFAULT_MODEL, lora: LoraSettings | None = None,
                 adapter_names: Sequence[str] = (SHARED_ADAPTER,), dtype: str = "float32",
                 gradient_checkpointing: bool = False, logprob_chunk: int = 1024):
        super().__init__()
        if not adapter_names:
            raise TriAlignError("adapter_names: expected at least one adapter name")
        if logprob_chunk < 1:
            raise TriAlignError(f"logprob_chunk: expected a positive integer, got {logprob_chunk}")
        self.source = source
        self.lora = lora or LoraSettings()
        self.adapter_names = list(adapter_names)
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.logprob_chunk = logprob_chunk
        self.model: nn.Module | None = None
        self.trunk_depth = 0
        self.trunk_memo: TrunkMemo | None = None
        """`enable_trunk_memo`: the trunk's output on the probe rows seen so far (None: off)."""

    @property
    def built(self) -> bool:
        return self.model is not None

    def build(self) -> None:
        """Load the backbone and attach the adapters (once; later calls do nothing)."""
        if self.model is not None:
            return
        base = load_model(self.source, dtype=self.dtype_name)
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        if self.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        self.model = attach_lora(base, self.lora, self.adapter_names)
        self.model.train()
        self._all_adapters_trainable()
        self.trunk_depth = lowest_adapted_layer(self.model) or 0
        """Decoder layers below the lowest adapted one; they compute the same with adapters on or off."""

    def _decoder(self) -> nn.Module:
        return self._require_built().get_base_model().get_decoder()

    def _require_built(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("Policy.build() must run before the policy is used (LightningModule.configure_model)")
        return self.model

    @property
    def hidden_size(self) -> int:
        return int(self._require_built().config.hidden_size)

    def _all_adapters_trainable(self) -> None:
        # peft's set_adapter freezes the inactive adapters. Keep them all trainable instead: an adapter that is not
        # used in a step simply gets no gradient, and DDP (which registers the parameters requiring grad when it
        # wraps the model) must know about every adapter to keep ranks in sync.
        for name, parameter in self._require_built().named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)

    def use_adapter(self, name: str) -> None:
        """Make adapter `name` the one the next forward passes use."""
        model = self._require_built()
        if name not in self.adapter_names:
            raise TriAlignError(f"adapter '{name}': expected one of {self.adapter_names}")
        if model.active_adapter != name:
            model.set_adapter(name)
            self._all_adapters_trainable()

    def reference(self):
        """Context manager: inside it, forwards compute the reference policy (adapters disabled)."""
        return reference_policy(self._require_built())

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self._require_built().named_parameters() if "lora_" in n]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state [N, L, H] (after the final norm) of the active adapter's policy."""
        return self.hidden_states_and_trunk(input_ids, attention_mask, keep_trunk=False)[0]

    def _decode(self, keep_trunk: bool, **inputs) -> tuple[Any, torch.Tensor | None]:
        """The decoder's output on `inputs` and, when `keep_trunk` and the lowest layers carry no adapter, the
        (detached) input of the first adapted layer — what the reference forward can start from (None otherwise)."""
        decoder = self._decoder()
        if not (keep_trunk and self.trunk_depth > 0):
            return decoder(**inputs), None
        with layer_inputs(decoder, self.trunk_depth) as recorded:
            out = decoder(**inputs)
        return out, recorded[0]

    def hidden_states_and_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_trunk: bool = True
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden state [N, L, H] and, when `keep_trunk` and the lowest layers carry no adapter, the (detached)
        input of the first adapted layer [N, L, H] — what the reference forward can start from (None otherwise).
        With the trunk memo (`enable_trunk_memo`) and right-padded rows, rows seen before run the adapted layers
        only."""
        inputs = {"attention_mask": attention_mask, "position_ids": positions_from_mask(attention_mask),
                  "use_cache": False}
        lengths = attention_mask.sum(-1)
        memo = self.trunk_memo if self.trunk_memo is not None and _right_padded(attention_mask, lengths) else None
        if memo is None:
            out, trunk = self._decode(keep_trunk, input_ids=input_ids, **inputs)
            return out.last_hidden_state, trunk
        keys = memo.keys("sequence", [row[: int(n)].tolist() for row, n in zip(input_ids, lengths)])
        trunk = memo.fetch(keys, input_ids.shape[1])
        if trunk is not None:
            memo.replayed += 1
            with top_layers_only(self.model, self.trunk_depth):
                out = self._decoder()(inputs_embeds=trunk, **inputs)
            return out.last_hidden_state, trunk if keep_trunk else None
        out, trunk = self._decode(True, input_ids=input_ids, **inputs)
        memo.record(keys, trunk, lengths.tolist())
        return out.last_hidden_state, trunk if keep_trunk else None

    def reference_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                trunk: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state [N, L, H] of the reference policy (adapters disabled).

        With `trunk` (from `hidden_states_and_trunk` on the same inputs) only the layers from the first adapted one
        run: below it the policy and the reference compute the same thing. With LoRA on the top 8 of 30 layers this
        makes the reference forward about a quarter of a full one. With the trunk memo (`enable_trunk_memo`) the
        reference's output is kept too (it does not train): rows seen before run no layer at all."""
        lengths = attention_mask.sum(-1)
        memo = self.trunk_memo
        if memo is None or not memo.reference_frozen or not _right_padded(attention_mask, lengths):
            return self._reference_forward(input_ids, attention_mask, trunk)
        keys = memo.reference_keys([row[: int(n)].tolist() for row, n in zip(input_ids, lengths)])
        found = memo.fetch(keys, input_ids.shape[1])
        if found is not None:
            memo.reference_replayed += 1
            return found
        hidden = self._reference_forward(input_ids, attention_mask, trunk).detach()
        memo.record(keys, hidden, lengths.tolist(), count=False)
        return hidden

    def _reference_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           trunk: torch.Tensor | None) -> torch.Tensor:
        with self.reference():
            if trunk is None or self.trunk_depth == 0:
                return self.hidden_states(input_ids, attention_mask)
            # The decoder runs the layers it holds on `inputs_embeds`: hand it the upper layers and their input.
            with top_layers_only(self.model, self.trunk_depth):
                out = self._decoder()(inputs_embeds=trunk, attention_mask=attention_mask,
                                      position_ids=positions_from_mask(attention_mask), use_cache=False)
            return out.last_hidden_state

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log π(target | hidden) for M selected positions: hidden [M, H], targets [M] → [M] (float32)."""
        return self._over_head_chunks(_chunk_logprobs, hidden, targets)

    def next_token_kl(self, hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
        """KL(π_ref ‖ π) of the next-token distributions over the full vocabulary at M positions: hidden [M, H] of
        the policy, reference_hidden [M, H] of the reference (detached) → [M] (float32)."""
        return self._over_head_chunks(_chunk_kl, hidden, reference_hidden.detach())

    def _over_head_chunks(self, function, hidden: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """`function(hidden, other, weight, bias)` of the output head over chunks of `logprob_chunk` positions (at most
        one chunk of vocabulary-sized logits alive), recomputed in the backward pass where `hidden` has a gradient;
        the chunks' results concatenated, [M]."""
        head = self._require_built().get_base_model().get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        pieces = []
        for start in range(0, hidden.shape[0], self.logprob_chunk):
            h = hidden[start:start + self.logprob_chunk]
            o = other[start:start + self.logprob_chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(function, h, o, weight, bias, use_reentrant=False))
            else:
                pieces.append(function(h, o, weight, bias))
        if not pieces:
            return hidden.new_zeros(0, dtype=torch.float32)
        return torch.cat(pieces)

    def continuation_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              continuation_mask: torch.Tensor, context_key: torch.Tensor | None = None,
                              keep_contexts: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Summed log-probabilities [R] (float32) and counts [R] of each row's continuation tokens, and with
        `keep_contexts` the contexts the rows were read from (else None): their last hidden states "hidden" [C, W, H]
        (with gradient), "trunk" (`hidden_states_and_trunk`; None without one), "input_ids" and "attention_mask"
        [C, W] (1 on context tokens only). One context per key; without `context_key`, each row's own.

        Rows are right-padded ``context + continuation`` sequences (`continuation_mask` marks the continuation,
        non-empty in every row). Without `context_key` every row runs in full. With it, rows of equal key must share
        their context tokens: each context runs once, and the rows' continuations run on a copy of its KV cache (the
        answer probe scores G·O options of only G distinct contexts per item, and contexts are most of the tokens).
        The KV path needs caching, which gradient checkpointing turns off in training mode, so it is refused then.
        """
        continuation = continuation_mask.bool()
        num_rows = input_ids.shape[0]
        context = None
        if context_key is None:
            hidden, trunk = self.hidden_states_and_trunk(input_ids, attention_mask, keep_trunk=keep_contexts)
            rows, positions = continuation[:, 1:].nonzero(as_tuple=True)
            logprobs = self.token_logprobs(hidden[rows, positions], input_ids[rows, positions + 1])
            if keep_contexts:
                context = {"hidden": hidden, "trunk": trunk, "input_ids": input_ids,
                           "attention_mask": (attention_mask.bool() & ~continuation).long()}
        else:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                raise RuntimeError("continuation_logprobs: a shared context needs the KV cache, which gradient "
                                   "checkpointing disables in training mode")
            rows, logprobs, context = self._shared_context_logprobs(input_ids, continuation, context_key,
                                                                    keep_contexts)
        sums = torch.zeros(num_rows, dtype=torch.float32, device=input_ids.device).index_add(0, rows, logprobs)
        return sums, torch.bincount(rows, minlength=num_rows), context

    def enable_trunk_memo(self, max_bytes: int) -> None:
        """Keep the trunk's output on the probe contexts and options of training (`trialign.trunk_cache.TrunkMemo`):
        a later epoch runs the same states through the adapted layers only. 0 turns it off. Refused while a layer
        below the lowest adapted one has a trainable parameter (its output would change with training)."""
        if max_bytes <= 0:
            self.trunk_memo = None
            return
        if self.gradient_checkpointing:
            raise TriAlignError("trunk_memo: not with gradient_checkpointing (a checkpointed layer recomputes "
                                "outside the replay); set trunk_memo_gib: 0")
        model = self._require_built()
        trainable = [name for name, p in model.named_parameters() if p.requires_grad and _below(name, self.trunk_depth)]
        if trainable:
            raise TriAlignError(f"trunk_memo: the trunk must be frozen, but {trainable[0]} is trainable")
        self.trunk_memo = TrunkMemo(model, self.trunk_depth, max_bytes) if self.trunk_depth > 0 else None

    def _shared_context_logprobs(self, input_ids: torch.Tensor, continuation: torch.Tensor, context_key: torch.Tensor,
                                 keep_contexts: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        model = self._require_built()
        decoder = model.get_base_model().get_decoder()
        device = input_ids.device
        first = continuation.int().argmax(-1)  # first continuation position = context length
        lengths = continuation.sum(-1)
        _, context_of_row = torch.unique(context_key, return_inverse=True)
        num_contexts = int(context_of_row.max()) + 1
        representative = torch.zeros(num_contexts, dtype=torch.long, device=device)
        representative = representative.scatter(0, context_of_row, torch.arange(len(first), device=device))
        context_length = first[representative]
        width = int(context_length.max())
        steps = torch.arange(width, device=device)
        context_mask = (steps[None, :] < context_length[:, None]).long()
        context_ids = input_ids[representative, :width]
        option_width = int(lengths.max())
        offsets = torch.arange(option_width, device=device)
        option_mask = offsets[None, :] < lengths[:, None]
        where = (first[:, None] + offsets[None, :]).clamp(max=input_ids.shape[1] - 1)
        option_ids = torch.where(option_mask, input_ids.gather(1, where), torch.zeros_like(where))
        memo = self.trunk_memo
        replay = None
        if memo is not None:  # the context's token ids key its row; an option's, its context's and its own
            contexts = [context_ids[c, : int(n)].tolist() for c, n in enumerate(context_length)]
            context_keys = memo.keys("context", contexts)
            option_keys = memo.keys("option", [(contexts[int(c)], option_ids[r, : int(n) - 1].tolist())
                                               for r, (c, n) in enumerate(zip(context_of_row, lengths))])
            options = memo.fetch(option_keys, option_width - 1) if option_width > 1 else None
            found = memo.fetch(context_keys, width), options
            replay = found if found[0] is not None and (option_width == 1 or options is not None) else None
        with contextlib.ExitStack() as stack:
            if replay is not None:  # every row's trunk is known: run the adapted layers only
                memo.replayed += 1
                top = stack.enter_context(top_layers_only(model, self.trunk_depth))
                context_inputs = {"inputs_embeds": replay[0], "cache": DynamicCache(config=top.cache_config)}
                option_inputs = {"inputs_embeds": replay[1]}
            else:
                recorded = stack.enter_context(layer_inputs(decoder, self.trunk_depth)) if memo else None
                context_inputs, option_inputs = {"input_ids": context_ids}, {"input_ids": option_ids[:, :-1]}
            out, trunk = self._decode(keep_contexts and replay is None, attention_mask=context_mask,
                                      position_ids=positions_from_mask(context_mask), use_cache=True, **context_inputs)
            if replay is not None:
                trunk = replay[0]
            # Option token j is predicted by the context's last state (j = 0) or by option token j - 1.
            last = out.last_hidden_state[torch.arange(num_contexts, device=device), context_length - 1]
            predictors = [last[context_of_row][:, None, :]]
            if option_width > 1:
                cache = select_cache_rows(out.cache, context_of_row)
                tail = decoder(attention_mask=torch.cat([context_mask[context_of_row], option_mask[:, :-1].long()], 1),
                               position_ids=first[:, None] + offsets[None, :-1], cache=cache, use_cache=True,
                               **option_inputs)
                predictors.append(tail.last_hidden_state)
        if memo is not None and replay is None:
            memo.record(context_keys, recorded[0], context_length.tolist())
            if option_width > 1:
                memo.record(option_keys, recorded[1], (lengths - 1).tolist())
        context = None
        if keep_contexts:
            context = {"hidden": out.last_hidden_state, "trunk": trunk, "input_ids": context_ids,
                       "attention_mask": context_mask}
        predicted_by = torch.cat(predictors, dim=1)
        rows, steps_in = option_mask.nonzero(as_tuple=True)
        return rows, self.token_logprobs(predicted_by[rows, steps_in], option_ids[rows, steps_in]), context

    def save_adapters(self, directory, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapters with `save_pretrained` (safetensors): the shared adapter at the top of `directory`,
        per-group adapters in `directory/<group>/`. `state_dict` (keys of the peft model) replaces the live
        weights, e.g. a gathered full state dict under FSDP."""
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        self._require_built().save_pretrained(str(directory), safe_serialization=True, **kwargs)

    def probe_logprobs(self, batch: dict[str, Any], group_names: Sequence[str], share_prefix: bool = True,
                       groups: Sequence[int] | None = None, keep_contexts: bool = False) -> dict[str, Any]:
        """The answer probe of a collated batch (`trialign.datamodules.collate`) under every group's persona.

        With one adapter per group (`adapter_names` = the groups), each group's rows run through its own adapter.
        `share_prefix`: all options of one (item, group) run on its context's KV cache (not possible in training mode
        with gradient checkpointing). `groups`: probe only these group indices (the others stay absent).

        Returns option_logprobs [B, G, O] (summed continuation log-probabilities; 0 where absent), option_tokens
        [B, G, O], group_mask [B, G] (the (item, group) pairs probed) and gold_logprob [B, G] (per token); with
        `keep_contexts` also "contexts", one `continuation_logprobs` context per adapter run."""
        input_ids, attention_mask = batch["probe_input_ids"], batch["probe_attention_mask"]
        index = batch["probe_index"].long()
        continuation = batch["probe_continuation_mask"]
        if groups is not None:
            keep = torch.isin(index[:, 1], torch.tensor(list(groups), device=index.device))
            input_ids, attention_mask, continuation, index = (input_ids[keep], attention_mask[keep],
                                                              continuation[keep], index[keep])
        num_items, num_options = batch["option_mask"].shape
        num_groups = len(group_names)
        context_key = index[:, 0] * num_groups + index[:, 1] if share_prefix else None
        per_row = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        tokens = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        per_group = self.adapter_names != [SHARED_ADAPTER]  # one adapter per group, named by the group ids
        adapters = torch.unique(index[:, 1]).tolist() if per_group else [None]
        contexts = []
        for group in adapters:
            rows = (torch.arange(input_ids.shape[0], device=input_ids.device) if group is None
                    else (index[:, 1] == group).nonzero().squeeze(1))
            if group is not None:
                self.use_adapter(group_names[group])
            sums, counts, context = self.continuation_logprobs(
                input_ids[rows], attention_mask[rows], continuation[rows],
                None if context_key is None else context_key[rows], keep_contexts=keep_contexts)
            if context is not None:
                contexts.append(context)
            per_row = per_row.index_copy(0, rows, sums)
            tokens = tokens.index_copy(0, rows, counts)
        where = (index[:, 0], index[:, 1], index[:, 2])
        option_logprobs = per_row.new_zeros(num_items, num_groups, num_options).index_put(where, per_row)
        option_tokens = tokens.new_zeros(num_items, num_groups, num_options).index_put(where, tokens)
        group_mask = torch.zeros(num_items, num_groups, dtype=torch.bool, device=input_ids.device)
        group_mask = group_mask.index_put((index[:, 0], index[:, 1]), torch.ones_like(index[:, 0], dtype=torch.bool))
        gold = batch["gold_index"].long().clamp(min=0)  # free-form items: their one "option" is the gold text
        take = gold[:, None, None].expand(num_items, num_groups, 1)
        gold_sum = option_logprobs.gather(2, take).squeeze(2)
        gold_tokens = option_tokens.gather(2, take).squeeze(2).clamp(min=1)
        out = {"option_logprobs": option_logprobs, "option_tokens": option_tokens, "group_mask": group_mask,
               "gold_logprob": gold_sum / gold_tokens.to(gold_sum.dtype)}
        if keep_contexts:
            out["contexts"] = contexts
        return out
