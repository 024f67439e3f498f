"""TriAlign: truth-invariant personalized alignment.

Each social group is an agent; agents share one backbone and are trained offline with a Nash-social-welfare
aggregation of their losses and an explicit cross-group inconsistency penalty. The method as formalized here,
where it departs from the paper, and which module owns what: docs/DESIGN.md.
"""

__version__ = "0.1.0"
