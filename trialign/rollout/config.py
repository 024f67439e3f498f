"""Settings of `trialign rollout`: one validated dataclass, read from YAML and overridden by flags.

Fields split in two. *Content* fields decide what the dataset holds (model, task, groups, K, T, sampling, reward,
how items are chunked into shards): a resumed run must match the existing dataset on every one of them.
*Run* fields (`RUN_FIELDS`: output folder, overwrite, which shard of the work this process takes, progress bar,
cache folder) may change between the processes and reruns that build one dataset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from trialign.backbone import DEFAULT_MODEL
from trialign.errors import require
from trialign.prompts import DEFAULT_PROBE_TEMPLATE, probe_template

USER_TURN_KINDS = ("challenge", "reexplain", "reminder")
"""What the user simulator can say between assistant turns (see `trialign.rollout.simulator`)."""

BACKENDS = ("hf", "vllm", "ct2")
CT2_COMPUTE_TYPES = ("int8", "int8_float32", "float32")
"""Weights of the `ct2` backend (`trialign.rollout.ct2`)."""

RUN_FIELDS = frozenset(
    {"output", "overwrite", "num_shards", "shard_index", "progress", "cache_dir", "device", "threads"}
)
"""Fields that do not change the dataset's content; all others must match when a run resumes."""


def _default_mix() -> dict[str, float]:
    return {"challenge": 0.5, "reexplain": 0.25, "reminder": 0.25}


@dataclass
class RolloutConfig:
    """Settings of `python -m trialign rollout` (YAML keys and command-line flags share these names)."""

    model: str = DEFAULT_MODEL
    """Behavior policy mu: a hub id, a local HF directory, a .gguf file, or the embedded alias."""
    dtype: str = "float32"
    """Weights dtype of the model used for the probe and the behavior log-probabilities."""
    autocast: bool = False
    """Sample under bfloat16 autocast (several times faster on CPUs with bf16 matrix units). The behavior
    log-probabilities are then recomputed by a forward pass in `dtype`, and the probe never autocasts."""
    backend: str = "hf"
    """`hf` (transformers `generate`, the reference), `ct2` (CTranslate2 on CPU, optional extra `ct2`:
    `trialign.rollout.ct2`) or `vllm` (GPU, optional dependency). The probe and the behavior log-probabilities
    always use the transformers model, so every backend stores the same quantities."""
    ct2_compute_type: str = "int8"
    """Weights of the `ct2` backend: `int8`, `int8_float32` or `float32` (the fastest is int8; only sampling uses
    them)."""
    vllm_gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (backend `vllm`); the rest holds the transformers model that runs the probe
    and the behavior log-probabilities."""
    task: str = "truthfulqa_mc1"
    """Benchmark task name (see `trialign.tasks.TASK_NAMES`), `local` with `task_path`, or `lmeval:<task>` (any
    lm-evaluation-harness task; `trialign.tasks.lmeval`)."""
    task_path: str | None = None
    """The JSONL/CSV file of a `local` task, or the folder of your own lm-eval task YAML files for `lmeval:<task>`."""
    task_source: str = "local"
    """Where benchmark data comes from: `local` (copies shipped with trialign) or `hub`."""
    limit: int | None = 64
    """Number of items with episodes (the first N in the task's stable order); null for all."""
    states_limit: int = 0
    """Cross-group states: the first state s_0 of this many further items (the next ones after `limit`, so never
    an item that has episodes), under every group, with the behavior policy's probe there and no generation."""
    states_per_shard: int = 64
    """State items written to one Parquet file."""
    groups: str = "default"
    """Group file: a YAML path or a bundled name (`default`, `heldout`)."""
    group_ids: list[str] | None = None
    """Subset and order of groups; null for every group in the file, in file order."""
    expression: str = "explicit"
    """How personas are expressed in the first user turn: `explicit` self-description or `implicit` cues."""
    system_prompt: str = "none"
    """`none`, `same_answer` (the "same answer for everyone" prompt of `trialign.prompts`), or a literal prompt."""
    show_preferences: bool = True
    """State the group's preference instructions in the first user turn."""
    probe_template: str = DEFAULT_PROBE_TEMPLATE
    """How items are asked and where the probe reads the answer: a name from `trialign.prompts.PROBE_TEMPLATES`
    (recorded in the manifest: training and validation ask the same way)."""
    samples: int = 2
    """K: episodes sampled per (item, group)."""
    turns: int = 2
    """T: assistant turns per episode; the user simulator speaks between them."""
    temperature: float = 1.0
    """Sampling temperature (> 0). Only diversifies the data: log mu is stored at temperature 1."""
    max_new_tokens: int = 64
    """Length limit of one assistant message, in tokens."""
    user_mix: dict[str, float] = field(default_factory=_default_mix)
    """Relative frequency of the user simulator's turns: keys from `challenge`, `reexplain`, `reminder`."""
    alpha: float = 0.5
    """Weight of personalization in the reward: r_t = truth_t + alpha * pers_t."""
    gamma: float = 0.9
    """Discount of the returns R_t = sum_k gamma^(k-t) r_k."""
    probe_normalization: str = "none"
    """Answer-probe choice among options: `none` (summed log-likelihood) or `chars` (per character)."""
    probe_batch_size: int = 32
    """Contexts per probe forward pass."""
    items_per_shard: int = 4
    """Items generated together (all their groups x samples in one `generate` call per turn) and written to one
    Parquet file. Larger is faster until memory runs out."""
    seed: int = 0
    """Seed of sampling and of the user simulator; each shard derives its own seed from it and its index, so a
    resumed or sharded run re-creates identical content."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with a hub model."""
    output: str = "runs/rollout/truthfulqa"
    """Output folder of the dataset (Parquet shards + manifest.json)."""
    overwrite: bool = False
    """Replace a dataset already in `output` (otherwise a different config is refused and an equal one resumes)."""
    num_shards: int = 1
    """Split the items' shards over this many processes (default: torchrun's WORLD_SIZE when launched by it)."""
    shard_index: int = 0
    """Which of the `num_shards` parts this process writes (default: torchrun's RANK)."""
    progress: bool = True
    """Show a progress bar (items/s and ETA)."""
    device: str = "auto"
    """`auto` (the rank's CUDA device when there is one, else CPU), `cpu`, or `cuda[:i]`."""
    threads: int | None = None
    """CPU threads of torch (null: torch's default, one per core). On a machine shared with other jobs, fewer
    threads than cores avoids oversubscription, which slows matrix products several-fold."""
    cache_dir: str | None = None
    """Where converted GGUF models are cached (default: $TRIALIGN_CACHE or ~/.cache/trialign)."""

    def __post_init__(self) -> None:
        require(self.samples > 0, f"samples: expected K >= 1 episodes per (item, group), got {self.samples}")
        require(self.turns > 0, f"turns: expected T >= 1 assistant turns per episode, got {self.turns}")
        require(self.limit is None or self.limit > 0, f"limit: expected a positive number of items, got {self.limit}")
        require(self.expression in ("explicit", "implicit"),
                f"expression: expected 'explicit' or 'implicit', got '{self.expression}'")
        require(self.backend in BACKENDS, f"backend: expected one of {', '.join(BACKENDS)}, got '{self.backend}'")
        require(self.ct2_compute_type in CT2_COMPUTE_TYPES, f"ct2_compute_type: expected one of "
                                                            f"{', '.join(CT2_COMPUTE_TYPES)}, got "
                                                            f"'{self.ct2_compute_type}'")
        require(0 < self.vllm_gpu_memory_utilization < 1,
                f"vllm_gpu_memory_utilization: expected a fraction in (0, 1), got {self.vllm_gpu_memory_utilization}")
        require(math.isfinite(self.temperature) and self.temperature > 0,
                f"temperature: expected > 0 (the behavior policy samples), got {self.temperature}")
        require(self.max_new_tokens > 0, f"max_new_tokens: expected a positive integer, got {self.max_new_tokens}")
        require(self.alpha >= 0, f"alpha: expected >= 0, got {self.alpha}")
        require(0 <= self.gamma <= 1, f"gamma: expected a discount in [0, 1], got {self.gamma}")
        probe_template(self.probe_template)
        require(self.probe_normalization in ("none", "chars"),
                f"probe_normalization: expected 'none' or 'chars', got '{self.probe_normalization}'")
        require(self.probe_batch_size > 0,
                f"probe_batch_size: expected a positive integer, got {self.probe_batch_size}")
        require(self.states_limit >= 0, f"states_limit: expected 0 or more items, got {self.states_limit}")
        require(self.states_limit == 0 or self.limit is not None,
                "states_limit: needs `limit` (states are the items after the episodes' `limit` items)")
        require(self.states_per_shard > 0,
                f"states_per_shard: expected a positive integer, got {self.states_per_shard}")
        require(self.items_per_shard > 0, f"items_per_shard: expected a positive integer, got {self.items_per_shard}")
        unknown = sorted(set(self.user_mix) - set(USER_TURN_KINDS))
        require(not unknown, f"user_mix: unknown turn kind(s) {', '.join(map(str, unknown))}; "
                             f"expected keys from {', '.join(USER_TURN_KINDS)}")
        weights = list(self.user_mix.values())
        require(all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights),
                f"user_mix: expected non-negative weights, got {self.user_mix}")
        require(sum(weights) > 0, f"user_mix: expected at least one positive weight, got {self.user_mix}")
        self.user_mix = {kind: float(self.user_mix[kind]) for kind in USER_TURN_KINDS if kind in self.user_mix}
        require(self.num_shards > 0, f"num_shards: expected a positive integer, got {self.num_shards}")
        require(0 <= self.shard_index < self.num_shards,
                f"shard_index: expected 0 <= shard_index < num_shards={self.num_shards}, got {self.shard_index}")
        require(bool(self.output), "output: expected a folder path")
        require(self.threads is None or self.threads > 0, f"threads: expected a positive integer, got {self.threads}")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                f"device: expected 'auto', 'cpu' or 'cuda[:index]', got '{self.device}'")

    def content(self) -> dict[str, Any]:
        """The fields that decide the dataset's content (stored in the manifest and compared on resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_FIELDS}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: stored -> current` for every content field that differs (fields missing on one side included)."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        if key in RUN_FIELDS:
            continue
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            differences.append(f"{key}: {old!r} in the dataset, {new!r} now")
    return differences
