"""Reading a benchmark split from the Hugging Face hub (``source="hub"``), with failures as one-line user errors.

The shipped copies are the default; the hub is for users with network access who want the same task from the usual
hub datasets. Each benchmark module converts the hub rows into the record shape of its shipped file, so hub and
local loading build identical items. Hub datasets used (all plain data files, no loading scripts):

=================  ==============================  ===============================  ==========
task               hub dataset                     config(s)                        split
=================  ==============================  ===============================  ==========
truthfulqa_mc1/2   ``truthfulqa/truthful_qa``      ``multiple_choice``              validation
truthfulqa_gen     ``truthfulqa/truthful_qa``      ``generation``                   validation
gsm8k              ``openai/gsm8k``                ``main``                         test
aime2024           ``HuggingFaceH4/aime_2024``     (default)                        train
aime2025           ``opencompass/AIME2025``        ``AIME2025-I``, ``AIME2025-II``  test
bbq*               ``oskarvanderwal/bbq``          one per category (``Age``, ...)  test
=================  ==============================  ===============================  ==========
"""

from __future__ import annotations

from typing import Any

from trialign.errors import TriAlignError


def load_hub_rows(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """All rows of one split of a hub dataset, as plain dicts; any failure becomes a `TriAlignError` naming it."""
    where = f"hub dataset {dataset!r}" + (f" (config {config!r}, split {split!r})" if config else f" (split {split!r})")
    try:
        from datasets import load_dataset
    except ImportError:
        raise TriAlignError(f"source=hub needs the 'datasets' package to load {where}: pip install datasets") from None
    try:
        rows = load_dataset(dataset, config, split=split)
    except Exception as exc:  # network, auth, missing config: all are "this hub dataset could not be loaded"
        reason = " ".join(str(exc).split())[:300]
        raise TriAlignError(
            f"source=hub: could not load {where}: {type(exc).__name__}: {reason} "
            "(check network access and HF_HUB_OFFLINE, or use source='local' for the shipped copy)"
        ) from None
    return [dict(row) for row in rows]
