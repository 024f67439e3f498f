"""The offline environment of TriAlign: `python -m trialign rollout` builds the multi-group trajectory dataset.

Files:

* ``schema.py``     the row layout (one row per item, every group's K episodes of T turns nested)
* ``config.py``     `RolloutConfig`, the validated settings
* ``simulator.py``  the user simulator between assistant turns (challenge / re-explain / preference reminder)
* ``sampler.py``    batched sampling from the behavior policy and log mu of each action (transformers or vLLM)
* ``episodes.py``   one chunk of items -> rows: sampling, answer probe, personalization, rewards, returns
* ``storage.py``    Parquet shards written atomically and the manifest merged under a lock
* ``command.py``    the command: resume, sharding across processes, progress bar

Load a dataset with ``datasets.load_dataset("parquet", data_files="<output>/shard-*.parquet")``.
"""

from __future__ import annotations

from trialign.rollout.config import RolloutConfig
from trialign.rollout.schema import SCHEMA_VERSION, features

__all__ = ["RolloutConfig", "SCHEMA_VERSION", "features"]
