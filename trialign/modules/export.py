"""Trained adapters on disk: the folder `TriAlignModule` exports and `trialign evaluate --adapter` reads.

The folder holds the adapters (peft `save_pretrained`, safetensors; loadable with `PeftModel.from_pretrained`) and
``value_heads.safetensors`` (the per-group value heads, with the group ids in its metadata). It is written
atomically: into a temporary folder beside the target that then replaces the old one, so a reader never sees half
of an export and a killed export leaves the previous one whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from torch import Tensor

from trialign.errors import TriAlignError
from trialign.modules.heads import GroupValueHeads

HEADS_FILE = "value_heads.safetensors"


def check_trainable_keys(saved: Iterable[str], expected: set[str], path: str | None = None) -> None:
    """A `TriAlignModule` checkpoint must hold every trainable key (`expected`); the frozen base weights are left out
    of it by design, so a missing trainable key is the one error `strict_loading = False` would hide."""
    missing = sorted(expected - set(saved))
    if missing:
        raise TriAlignError(f"checkpoint{f' {path}' if path else ''}: missing trainable weights {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}; expected one written with this model config "
                            "(model source, LoRA settings, groups, per_group_adapters)")


def split_module_state(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A `TriAlignModule` state dict (e.g. a checkpoint's) as (the policy model's keys, the value heads' keys), each
    without its prefix."""
    adapter_state = {k[len("policy.model."):]: v for k, v in state_dict.items() if k.startswith("policy.model.")}
    head_state = {k[len("value_heads."):]: v for k, v in state_dict.items() if k.startswith("value_heads.")}
    return adapter_state, head_state


def write_adapter_folder(target: Path, policy, head_state: dict[str, Tensor], group_names: list[str],
                         adapter_state: dict[str, Tensor] | None = None) -> Path:
    """Write `policy`'s adapters (from `adapter_state` when given, else the live ones) and the value heads'
    `head_state` to `target`, atomically; returns `target`."""
    from safetensors.torch import save_file

    if target.exists() and not target.is_dir():
        raise TriAlignError(f"model.adapter_dir '{target}': expected a folder for the exported adapters, but it is "
                            "a file (it is not replaced)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        policy.save_adapters(tmp, adapter_state)
        heads = {k: v.detach().to("cpu").contiguous() for k, v in head_state.items()}
        save_file(heads, str(tmp / HEADS_FILE), metadata={"group_names": json.dumps(group_names)})
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_value_heads(path: str | os.PathLike) -> GroupValueHeads:
    """Value heads exported by `TriAlignModule.export_adapters` (`value_heads.safetensors`)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / HEADS_FILE
    if not path.is_file():
        raise TriAlignError(f"value heads {path}: file not found")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if "group_names" not in metadata:
        raise TriAlignError(f"value heads {path}: expected 'group_names' in the safetensors metadata")
    group_names = json.loads(metadata["group_names"])
    hidden_size = tensors[f"heads.{group_names[0]}.linear.weight"].shape[1]
    heads = GroupValueHeads(group_names, hidden_size)
    heads.load_state_dict(tensors)
    return heads
