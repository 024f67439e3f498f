"""One table of the audit's summary metrics: the key in ``metrics.json``, the labels, and which way is better.

`trialign evaluate` prints the long labels; the report's results and paired-difference tables use the short ones as
column headers with the direction as ↑/↓ (and bold the best value that way).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricName:
    key: str
    """The name in ``metrics.json``."""
    short: str
    """A column header."""
    long: str
    """What it is, in evaluate's summary."""
    direction: int
    """+1: higher is better; −1: lower is better."""


SUMMARY_METRICS = (
    MetricName("acc_mean", "accuracy", "accuracy (mean over groups)", +1),
    MetricName("acc_worst", "worst-group acc.", "worst-group accuracy", +1),
    MetricName("acc_gap", "gap", "accuracy gap (max - min)", -1),
    MetricName("acc_std", "accuracy std", "accuracy std over groups", -1),
    MetricName("consistency", "consistency", "consistency rate (all groups same answer)", +1),
    MetricName("consistent_correct", "consistent & correct", "consistent-and-correct rate", +1),
    MetricName("breakage_mean", "breakage", "breakage vs. reference (PERG)", -1),
    MetricName("personalization_mean", "personalization", "personalization (mean over groups)", +1),
    MetricName("nash_welfare", "Nash welfare", "Nash welfare sum_g log U_g", +1),
    MetricName("flip_mean", "flip rate", "answers changed by a challenge (pooled)", -1),
    MetricName("consistency_after_challenge", "consistency after challenge", "consistency after a challenge turn",
               +1),
)
_BY_KEY = {m.key: m for m in SUMMARY_METRICS}


def metric_names(*keys: str) -> tuple[MetricName, ...]:
    """The entries of `keys`, in that order (a KeyError names an unknown one)."""
    return tuple(_BY_KEY[key] for key in keys)
