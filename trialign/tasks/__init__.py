"""Benchmark tasks: every benchmark loads into the same `Item` type through `load_task`.

Tasks (see `TASK_NAMES`): TruthfulQA MC1 / MC2 / generation, GSM8K, AIME 2024 / 2025, BBQ (all six shipped
categories, or one), and ``local`` for the user's own multiple-choice file. Files:

* ``item.py``        the `Item` type and its answer checks
* ``registry.py``    task names and `load_task`
* ``datafiles.py``   the shipped benchmark copies and their sha256 check
* ``hub.py``         loading the same tasks from the Hugging Face hub
* ``truthfulqa.py``, ``gsm8k.py``, ``aime.py``, ``bbq.py``, ``local.py``  one benchmark each
"""

from __future__ import annotations

from trialign.tasks.item import Item
from trialign.tasks.registry import TASK_NAMES, load_task

__all__ = ["Item", "TASK_NAMES", "load_task"]
