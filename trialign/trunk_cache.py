"""Reuse of the frozen trunk across the answer probes of one process (an experiment's evaluations).

A trained adapter of `configs/trialign.yaml` sits on the top 8 of the model's 30 layers: below its lowest adapted
layer ("the trunk") every method — base, TriAlign, its ablation, each trained baseline — computes exactly what the
base model computes. An experiment probes every method on the same contexts and options (its main split, held-out
personas, the transfer task), so the trunk's output on them is the same for all of them. `TrunkCache` keeps it: the
first method's probe records, for each of its forward passes, the input of the lowest adapted layer; the next
method's probe on the same inputs replays the recorded hidden states through its own top layers only (`AnswerProbe`
with `trunk_cache=`). With the top 8 of 30 layers adapted, a replayed probe runs about a quarter of the layers.

Keys, so that a changed model or input never hits a stale entry: sha256 of the trunk's weights (embedding and every
layer below the depth, bytes and dtypes) and of the model config, the depth, the probe's batch size and autocast
setting, and the token ids of every context and option of the call. A model without adapters (the base model) has no
depth of its own; it replays any entry whose depth its own weights match. The cache is in memory, bounded by
`max_bytes` (least recently used entries go first); an entry larger than the bound is not kept.

Equivalence: a replayed probe runs the same layers on the same hidden states as the full forward, so its
log-likelihoods equal the full path's up to the kernels' rounding (tests compare with a tolerance, never `==`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import nn

DEFAULT_MAX_BYTES = 4 << 30


def decoder_of(model) -> nn.Module:
    """The decoder (embedding, layers, final norm) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def lowest_adapted_layer(model) -> int | None:
    """Index of the lowest decoder layer holding LoRA weights; None for a model without adapters (or layers)."""
    for index, layer in enumerate(getattr(decoder_of(model), "layers", None) or []):
        if any("lora_" in name for name, _ in layer.named_parameters()):
            return index
    return None


@contextlib.contextmanager
def layer_inputs(decoder: nn.Module, index: int) -> Iterator[list[torch.Tensor]]:
    """A list that receives the (detached) input hidden states of decoder layer `index` on every forward pass run
    inside the block: the trunk's output when `index` is the lowest adapted layer."""
    recorded: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        recorded.append((args[0] if args else kwargs["hidden_states"]).detach())

    hook = decoder.layers[index].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield recorded
    finally:
        hook.remove()


def _weights_digest(header: str, decoder, named_tensors) -> str:
    """sha256 of `header`, the decoder's config and the (name, tensor) pairs: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256(header.encode())
    digest.update(decoder.config.to_json_string(use_diff=False).encode())
    for name, tensor in named_tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trunk_fingerprint(model, depth: int) -> str:
    """sha256 of what the layers below `depth` compute from: the config, the embedding and those layers' weights."""
    decoder = decoder_of(model)
    modules = [("embed_tokens", decoder.embed_tokens)] + [(f"layers.{i}", decoder.layers[i]) for i in range(depth)]
    return _weights_digest(f"depth={depth};", decoder, ((f"{prefix}.{name}", tensor) for prefix, module in modules
                                                       for name, tensor in sorted(module.state_dict().items())))


def reference_fingerprint(model) -> str:
    """sha256 of what the reference policy (adapters disabled) computes from: the config and every decoder weight
    but the adapters' (LoRA) ones, which it does not use."""
    decoder = decoder_of(model)
    weights = sorted(decoder.state_dict().items())
    return _weights_digest("reference;", decoder, ((name, t) for name, t in weights if "lora_" not in name))


def inputs_digest(*parts: Any) -> str:
    """sha256 of nested lists of token ids and settings (their repr: ints and strings only)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class TrunkCache:
    """Recorded trunk outputs, by key (see the module docstring), in memory, least recently used first out."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def depths(self) -> list[int]:
        """The depths the entries were recorded at, ascending."""
        return sorted({key[1] for key in self._entries})

    def get(self, key: tuple) -> list[torch.Tensor] | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: tuple, tensors: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.max_bytes:
            return
        self._entries.pop(key, None)
        self._sizes.pop(key, None)
        while self._entries and self.nbytes + size > self.max_bytes:
            oldest, _ = self._entries.popitem(last=False)
            del self._sizes[oldest]
        self._entries[key] = tensors
        self._sizes[key] = size


class top_layers_only:
    """Context manager: the decoder holds only its layers from `depth` up, numbered from 0 for the KV cache (so a
    `DynamicCache` of `cache_config` — the config with that many layers — serves them), and the model's forward takes
    `inputs_embeds` = the trunk's output. Everything is put back on exit. Layers without `self_attn.layer_idx` keep
    no KV-cache number to change."""

    def __init__(self, model, depth: int):
        self.decoder = decoder_of(model)
        self.depth = depth
        self.cache_config = None

    def __enter__(self):
        import copy

        self.layers = self.decoder.layers
        top = list(self.layers)[self.depth:]
        self.attentions = [getattr(layer, "self_attn", None) for layer in top]
        self.numbers = [getattr(attention, "layer_idx", None) for attention in self.attentions]
        for number, attention in enumerate(self.attentions):
            if self.numbers[number] is not None:
                attention.layer_idx = number
        self.decoder.layers = nn.ModuleList(top)
        self.cache_config = copy.copy(self.decoder.config)
        self.cache_config.num_hidden_layers = len(top)
        if getattr(self.cache_config, "layer_types", None):
            self.cache_config.layer_types = list(self.cache_config.layer_types)[self.depth:]
        return self

    def __exit__(self, *exc) -> None:
        for attention, number in zip(self.attentions, self.numbers):
            if number is not None:
                attention.layer_idx = number
        self.decoder.layers = self.layers


class TrunkMemo:
    """The trunk's output on every sequence a training run has run, one entry per row.

    The training-time counterpart of `TrunkCache` (`Policy.enable_trunk_memo`, the module's `trunk_memo_gib`): the
    layers below the lowest adapted one are frozen, so on a cross-group state or an episode seen in an earlier epoch
    they compute what they computed then. Entries are per row, not per batch, because a later epoch composes (and
    pads) its batches differently: a row is keyed by its own token ids (a probe option's by its context's too, whose
    KV cache it reads), with the trunk's fingerprint (`trunk_fingerprint`, taken at the first use: the trunk does not
    train), the depth and the autocast setting, so a changed model, input or precision never hits a stale entry. A
    forward pass replays only when every one of its rows is known (`fetch`), else runs in full and records
    (`record`). Rows are right-padded: a replayed row is padded with zeros, which no real token attends to, so what
    the loss reads is unchanged. Bounded by `max_bytes` (least recently used rows go first)."""

    def __init__(self, model, depth: int, max_bytes: int):
        if depth <= 0:
            raise ValueError(f"TrunkMemo: depth must be positive, got {depth}")
        self.model = model
        self.depth = depth
        self.rows = TrunkCache(max_bytes)
        self._fingerprint: str | None = None
        self.replayed = 0
        """Forward passes that ran the adapted layers only (counted by the caller that replays)."""
        self.recorded = 0
        """Forward passes that ran in full and recorded their rows."""
        self._reference_fingerprint: str | None = None
        self.reference_frozen = not any(p.requires_grad and "lora_" not in name
                                        for name, p in decoder_of(model).named_parameters())
        """Whether the reference (the decoder with adapters disabled) is frozen, so its output can be kept too
        (`reference_keys`): only LoRA weights train in the decoder."""
        self.reference_replayed = 0
        """Reference forward passes served from the memo without running a layer."""

    def keys(self, kind: str, rows: list[Any]) -> list[tuple]:
        """One key per row; `rows` holds each row's token ids (or anything else with a stable repr)."""
        if self._fingerprint is None:
            self._fingerprint = trunk_fingerprint(self.model, self.depth)
        return self._keys(self._fingerprint, self.depth, kind, rows)

    def reference_keys(self, rows: list[Any]) -> list[tuple]:
        """One key per row for the reference's last hidden state (`Policy.reference_hidden_states`): with the
        fingerprint of every weight the reference computes with (`reference_fingerprint`) instead of the trunk's."""
        if self._reference_fingerprint is None:
            self._reference_fingerprint = reference_fingerprint(self.model)
        return self._keys(self._reference_fingerprint, "reference", "reference", rows)

    def _keys(self, fingerprint: str, depth: int | str, kind: str, rows: list[Any]) -> list[tuple]:
        device = next(self.model.parameters()).device.type
        autocast = torch.is_autocast_enabled(device) and str(torch.get_autocast_dtype(device))
        return [(fingerprint, depth, autocast, inputs_digest(kind, row)) for row in rows]

    def fetch(self, keys: list[tuple], width: int) -> torch.Tensor | None:
        """The recorded rows, right-padded with zeros to `width` [R, width, H], when every key is known; else None."""
        found = [self.rows.get(key) for key in keys]
        if not found or any(entry is None for entry in found):
            return None
        out = found[0][0].new_zeros(len(found), width, found[0][0].shape[-1])
        for index, (row,) in enumerate(found):
            out[index, : row.shape[0]] = row
        return out

    def record(self, keys: list[tuple], trunk: torch.Tensor, lengths: list[int], count: bool = True) -> None:
        """Keep row i of `trunk` [R, W, H] (the input of layer `depth` on a full forward, or the reference's output)
        up to `lengths[i]`; `count`: a full forward that `recorded` counts."""
        if len(keys) != trunk.shape[0]:
            raise RuntimeError(f"trunk memo: {len(keys)} keys for {trunk.shape[0]} recorded rows")
        self.recorded += int(count)
        for key, row, length in zip(keys, trunk, lengths):
            self.rows.put(key, [row[:length].clone()])
