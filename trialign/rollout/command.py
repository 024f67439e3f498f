"""`python -m trialign rollout`: generate the offline multi-group trajectory dataset, resumably and in parallel.

The items of the task are cut into file shards of `items_per_shard` items, in the task's stable order. Each shard
is generated from its own seed (derived from the config's seed and the shard index) and written atomically, so:

* a killed run, rerun with the same command, skips the shards already on disk and re-creates the rest exactly;
* ``--num-shards N --shard-index I`` (or the RANK / WORLD_SIZE of a ``torchrun`` launch) makes process I write
  the file shards I, I+N, I+2N, ... into the same folder: N processes build the same dataset as one;
* an existing dataset made with other content settings (`RolloutConfig.content`) or other model weights is refused
  with a one-line error naming what differs; ``--overwrite`` replaces it.

Every check on the input (settings, task, groups, output folder) happens before the model is loaded.

Determinism: on CPU the same command and seed write byte-identical Parquet shards (the manifest differs only in its
launch id and timestamps), which is what makes a killed run's rerun equal an uninterrupted one. On a GPU, sampling
runs on logits whose float sums depend on kernel choice and batch shape (cuBLAS, flash attention, vLLM's batching),
so a different token can be drawn where two are nearly tied: GPU runs are reproducible in distribution, not in bytes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from trialign.config_io import build_dataclass, collect_settings, settings_parser
from trialign.groups import reference_group
from trialign.errors import TriAlignError, require
from trialign.prompts import probe_template, resolve_system_prompt
from trialign.rollout.config import RUN_FIELDS, RolloutConfig, config_differences
from trialign.rollout.schema import features
from trialign.rollout.manifest import DATA_FILES, RolloutManifest, ShardEntry
from trialign.rollout.storage import DatasetFolder, shard_name

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    return settings_parser(
        RolloutConfig, "python -m trialign rollout",
        "Generate the offline multi-group trajectory dataset: for every item and social group, K sampled "
        "episodes of T assistant turns with a simulated user, scored per turn (truth, personalization, "
        "reward, return, behavior log-probability). Settings come from --config and are overridden by "
        "flags or --set key=value. Rerunning the same command resumes an interrupted run.",
        "YAML file of settings (see configs/rollout/)")


def parse_config(argv: Sequence[str]) -> RolloutConfig:
    """The settings from ``--config`` YAML, then flags, then ``--set`` overrides; then torchrun's rank."""
    values, source = collect_settings(_parser().parse_args(list(argv)), "rollout")
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world is not None and rank is not None and int(world) > 1:
        explicit = "num_shards" in values or "shard_index" in values
        require(not explicit or (values.get("num_shards"), values.get("shard_index")) == (int(world), int(rank)),
                f"num_shards/shard_index: set to {values.get('num_shards')}/{values.get('shard_index')} but torchrun "
                f"launched WORLD_SIZE={world} RANK={rank}; drop the flags under torchrun")
        values["num_shards"], values["shard_index"] = int(world), int(rank)
    return build_dataclass(RolloutConfig, values, source)


def _launch_id(config: RolloutConfig) -> str:
    """Processes of one launch share this id (torchrun's run id), so `--overwrite` replaces a dataset only once."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        return f"torchrun:{run_id}"
    require(not (config.overwrite and config.num_shards > 1),
            "--overwrite with --num-shards: separate processes cannot agree which one replaces the dataset; "
            "delete the output folder first, or launch the shards with torchrun")
    return f"process:{uuid.uuid4().hex}"


def _new_manifest(config: RolloutConfig, launch_id: str, items, state_items, groups, num_files: int
                  ) -> RolloutManifest:
    episodes = len(items) * len(groups) * config.samples
    return RolloutManifest(
        config=config.content(), model_source=config.model, seed=config.seed, task=config.task,
        group_ids=[g.id for g in groups], reference_group=getattr(reference_group(groups), "id", None),
        counts={"items": len(items), "states": len(state_items), "groups": len(groups), "samples": config.samples,
                "turns": config.turns, "episodes": episodes, "assistant_turns": episodes * config.turns},
        num_files=num_files, launch_id=launch_id)


def _prepare_folder(folder: DatasetFolder, config: RolloutConfig, items, state_items, groups, num_files: int
                    ) -> None:
    """Refuse a different existing dataset, replace it on --overwrite, or start a new one; no model is loaded yet."""
    launch_id = _launch_id(config)
    folder.ensure_writable()
    with folder.locked():
        manifest = folder.read_manifest()
        same_launch = manifest is not None and manifest.launch_id == launch_id
        if config.overwrite and not same_launch:
            folder.remove_dataset()
            manifest = None
        if manifest is None:
            strays = folder.shard_files()
            require(not strays, f"output {folder.path}: holds shard files but no manifest.json; pass --overwrite to "
                                f"replace them or choose another output folder")
            folder.write_manifest(_new_manifest(config, launch_id, items, state_items, groups, num_files))
            return
        differences = config_differences(manifest.config, config.content())
        require(not differences, f"output {folder.path}: holds a dataset made with different settings "
                                 f"({'; '.join(differences)}); pass --overwrite to replace it or choose another output")


def _record_shards(folder: DatasetFolder, fingerprint: str | None, new: dict[int, list[str]] | None = None):
    """Add shard entries (index -> item ids) to the manifest, plus any complete shard files it does not list."""

    def change(manifest: RolloutManifest | None) -> RolloutManifest:
        require(manifest is not None, f"output {folder.path}: manifest.json disappeared during the run")
        stored = manifest.weights_fingerprint
        if fingerprint is not None:
            require(stored in (None, fingerprint),
                    f"output {folder.path}: the dataset was made with other weights of model "
                    f"'{manifest.model_source}' (weights_fingerprint {str(stored)[:12]}... in the dataset, "
                    f"{fingerprint[:12]}... now); pass --overwrite to replace it")
            manifest.weights_fingerprint = fingerprint
        total = manifest.num_files
        entries = {s.index: s for s in manifest.shards}
        for index, ids in (new or {}).items():
            entries[index] = ShardEntry(index, shard_name(index, total), len(ids), ids)
        for index, (name_total, path) in folder.shard_files().items():
            if name_total == total and index not in entries:
                import pyarrow.parquet as pq

                ids = pq.read_table(path, columns=["item_id"]).column("item_id").to_pylist()
                entries[index] = ShardEntry(index, path.name, len(ids), ids)
        manifest.shards = [entries[i] for i in sorted(entries)]
        manifest.complete = len(entries) == total
        return manifest

    return folder.update_manifest(change)


def _device(config: RolloutConfig) -> str:
    import torch

    if config.device != "auto":
        require(config.device == "cpu" or torch.cuda.is_available(), f"device: '{config.device}' but CUDA is not "
                                                                      "available on this machine")
        return config.device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _make_sampler(config: RolloutConfig, model, tokenizer):
    from trialign.rollout.sampler import HFSampler, VLLMSampler

    if config.backend == "hf":
        return HFSampler(model, tokenizer, autocast=config.autocast)
    from trialign.backbone import default_cache_dir, resolve_model_source

    location = resolve_model_source(config.model, config.cache_dir).location
    if config.backend == "ct2":
        from trialign.rollout.ct2 import CT2Sampler

        return CT2Sampler(location, tokenizer, cache_dir=config.cache_dir or default_cache_dir(),
                          compute_type=config.ct2_compute_type, threads=config.threads or 0)
    return VLLMSampler(location, tokenizer, dtype=config.dtype, seed=config.seed,
                       trust_remote_code=config.trust_remote_code,
                       gpu_memory_utilization=config.vllm_gpu_memory_utilization)


def rollout(config: RolloutConfig) -> RolloutManifest:
    """Generate (or resume) the dataset described by `config`; returns the manifest."""
    from trialign.groups import load_groups, select_groups
    from trialign.rollout.sampler import require_vllm
    from trialign.tasks import load_task

    if config.backend == "vllm":
        require_vllm()
    if config.backend == "ct2":
        from trialign.rollout.ct2 import require_ct2

        require_ct2()
    wanted = None if config.limit is None else config.limit + config.states_limit
    items = load_task(config.task, limit=wanted, seed=config.seed, source=config.task_source,
                      path=config.task_path)
    require(len(items) > 0, f"task {config.task}: no items loaded")
    require(wanted is None or config.states_limit == 0 or len(items) == wanted,
            f"states_limit: task {config.task} has {len(items)} items, fewer than limit + states_limit = {wanted}")
    # States are the items after the episodes' in the task's order: no item is both (ids are unique, checked next).
    items, state_items = (items, []) if config.limit is None else (items[:config.limit], items[config.limit:])
    seen: set[str] = set()
    duplicates = sorted({i.id for i in [*items, *state_items] if i.id in seen or seen.add(i.id)})
    require(not duplicates, f"task {config.task}: item ids must be unique, repeated: {', '.join(duplicates[:5])}")
    groups = load_groups(config.groups)
    if config.group_ids:
        try:
            groups = select_groups(groups, config.group_ids)
        except TriAlignError as err:
            raise TriAlignError(f"group_ids: {err}") from None
    chunks = [("episodes", items[i:i + config.items_per_shard]) for i in range(0, len(items), config.items_per_shard)]
    chunks += [("state", state_items[i:i + config.states_per_shard])
               for i in range(0, len(state_items), config.states_per_shard)]
    from trialign.backbone import resolve_model_source

    # Before the folder gets a manifest: the model is part of its settings, so a mistyped source recorded there
    # would make the corrected rerun look like a different dataset.
    resolve_model_source(config.model, config.cache_dir)
    folder = DatasetFolder(config.output)
    _prepare_folder(folder, config, items, state_items, groups, len(chunks))

    mine = [i for i in range(len(chunks)) if i % config.num_shards == config.shard_index]
    done = set(folder.shard_files())
    todo = [i for i in mine if i not in done]
    if not todo:
        manifest = _record_shards(folder, None)
        _report(config, manifest, folder, 0, 0, 0.0)
        return manifest
    import torch

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _generate(config, folder, items, groups, chunks, mine, todo)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, when called in-process


def _generate(config, folder, items, groups, chunks, mine, todo) -> RolloutManifest:
    from tqdm.auto import tqdm

    from trialign.backbone import load_model_and_tokenizer, weights_fingerprint
    from trialign.probe import AnswerProbe
    from trialign.rollout.episodes import EpisodeSettings, derive_seed, run_chunk, state_chunk
    from trialign.rollout.simulator import UserSimulator

    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype, cache_dir=config.cache_dir,
                                                trust_remote_code=config.trust_remote_code)
    model.to(_device(config))
    manifest = _record_shards(folder, weights_fingerprint(model))
    sampler = _make_sampler(config, model, tokenizer)
    probe = AnswerProbe(model, tokenizer, batch_size=config.probe_batch_size,
                        normalization=config.probe_normalization)
    simulator = UserSimulator(config.user_mix, seed=config.seed)
    settings = EpisodeSettings(
        samples=config.samples, turns=config.turns, temperature=config.temperature,
        max_new_tokens=config.max_new_tokens, alpha=config.alpha, gamma=config.gamma, expression=config.expression,
        system_prompt=resolve_system_prompt(config.system_prompt), show_preferences=config.show_preferences,
        template=probe_template(config.probe_template),
    )
    log.info("rollout: %d items x %d groups x %d samples x %d turns and %d states; this process writes %d of %d "
             "shards (%d left)", sum(len(c) for k, c in chunks if k == "episodes"), len(groups), config.samples,
             config.turns, sum(len(c) for k, c in chunks if k == "state"), len(mine), len(chunks), len(todo))
    total_items = sum(len(chunks[i][1]) for i in mine)
    tokens, started = 0, time.perf_counter()
    with tqdm(total=total_items, initial=total_items - sum(len(chunks[i][1]) for i in todo), unit="item",
              desc="rollout", disable=not config.progress, dynamic_ncols=True) as bar:
        for index in todo:
            kind, chunk = chunks[index]
            if kind == "state":
                rows = state_chunk(chunk, groups, settings, tokenizer=tokenizer, probe=probe)
            else:
                rows, stats = run_chunk(chunk, groups, settings, model=model, tokenizer=tokenizer,
                                        sampler=sampler, probe=probe, simulator=simulator,
                                        seed=derive_seed(config.seed, "shard", index),
                                        score_batch_size=config.probe_batch_size)
                tokens += stats.sampled_tokens
            folder.write_shard(index, len(chunks), rows, features())
            manifest = _record_shards(folder, None, {index: [row["item_id"] for row in rows]})
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    _report(config, manifest, folder, len(todo), tokens, time.perf_counter() - started)
    return manifest


def _report(config: RolloutConfig, manifest: RolloutManifest, folder: DatasetFolder, written: int, tokens: int,
            seconds: float) -> None:
    size = sum(p.stat().st_size for _, p in folder.shard_files().values())
    state = "complete" if manifest.complete else f"{len(manifest.shards)} of {manifest.num_files} shards"
    speed = f", {tokens / seconds:.0f} generated tokens/s" if seconds > 0 and tokens else ""
    print(f"rollout {folder.path}: wrote {written} shard(s) in {seconds:.0f} s{speed}; dataset {state} "
          f"({manifest.counts['items']} items x {manifest.counts['groups']} groups x "
          f"{config.samples} samples x {config.turns} turns, {manifest.counts.get('states', 0)} cross-group states, "
          f"{size / 1e6:.2f} MB). Load it with "
          f"datasets.load_dataset('parquet', data_files='{Path(folder.path) / DATA_FILES}')", file=sys.stdout)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``python -m trialign rollout`` (see ``--help``)."""
    rollout(parse_config(argv))
    return 0


__all__ = ["main", "parse_config", "rollout", "RUN_FIELDS"]
