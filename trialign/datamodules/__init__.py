"""Lightning data modules: the offline rollout dataset as training batches."""

from trialign.datamodules.collate import TrajectoryCollator
from trialign.datamodules.trajectories import GroupTrajectoryDataModule, RolloutIndex, scan_rollout, split_items

__all__ = ["GroupTrajectoryDataModule", "RolloutIndex", "TrajectoryCollator", "scan_rollout", "split_items"]
