"""TriAlign: truth-invariant personalized alignment.

Each social group is an agent; agents share one backbone and are trained offline with a Nash-social-welfare
aggregation of their losses and an explicit cross-group inconsistency penalty. See DESIGN in the README.
"""

__version__ = "0.1.0"
