"""Probe-only rows of benchmark items asked as a rollout asked its own (validation on task items).

The rollout's manifest records how it asked its items (groups file, persona expression, system prompt, preference
lines, probe template); these rows ask further items of a task the same way, through the same `build_messages`, so
validation reads answers exactly as the rollout did.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence


from trialign.errors import TriAlignError
from trialign.rollout.manifest import MANIFEST as MANIFEST_NAME, read_manifest
from trialign.rollout.schema import answer_columns

log = logging.getLogger(__name__)


def task_probe_rows(data_dir: str | Path, group_names: Sequence[str], exclude: Sequence[str], task: str,
                    limit: int, offset: int = 0) -> list[dict[str, Any]]:
    """Probe-only rows (`trialign.datamodules.collate`) of `limit` items of `task` after its first `offset`, leaving
    out items in `exclude` (the rollout's), each asked under every group of `group_names` as the rollout at
    `data_dir` asked its own: its manifest's groups file, persona expression, system prompt and preference lines."""
    from trialign.groups import load_groups, select_groups
    from trialign.prompts import build_messages, resolve_system_prompt
    from trialign.tasks import load_task

    manifest = read_manifest(data_dir)
    settings = manifest.config if manifest else None
    needed = ("groups", "expression", "system_prompt")
    if not isinstance(settings, dict) or any(key not in settings for key in needed):
        raise TriAlignError(f"data.val_task: {Path(data_dir) / MANIFEST_NAME} does not record how the rollout asked "
                            f"its items (config.{', config.'.join(needed)}), so task items cannot be asked alike")
    try:
        groups = select_groups(load_groups(settings["groups"]), list(group_names))
    except TriAlignError as err:
        raise TriAlignError(f"data.val_task: the rollout's groups ({settings['groups']}): {err}") from None
    system = resolve_system_prompt(settings["system_prompt"]) or ""
    skip = set(exclude)
    try:
        items = load_task(task)
    except TriAlignError as err:
        raise TriAlignError(f"data.val_task: {err}") from None
    rows: list[dict[str, Any]] = []
    for item in items[offset:]:
        if len(rows) == limit:
            break
        if item.id in skip:
            continue
        row_groups = []
        for group in groups:
            messages = build_messages(item, group, expression=settings["expression"], system_prompt=system,
                                      show_preferences=settings.get("show_preferences", True),
                                      template=manifest.template)
            first = messages[0]
            row_groups.append({"group": group.id, "system": first["content"] if first["role"] == "system" else "",
                               "user": messages[-1]["content"]})
        rows.append({"item_id": item.id, "probe_only": True, **answer_columns(item), "groups": row_groups})
    if not rows:
        raise TriAlignError(f"data.val_task: task {task} has no items after the first {offset} that the rollout "
                            "did not use")
    if len(rows) < limit:
        log.warning("data: val_task %s has %d items left to validate on, fewer than val_limit=%d", task, len(rows),
                    limit)
    return rows
