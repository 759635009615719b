"""Demonstration data: robomimic-layout HDF5 files, their generation, reading, statistics and image rendering.

- ``hdf5_format``: the layout (names, reset seeds, train/valid split), the writer of one demonstration, the validator.
- ``generate``: parallel, resumable, atomic generation of scripted demonstrations (``GenerateConfig``, ``generate``).
- ``render_states``: images from saved MuJoCo states, at generation time or later (``RenderConfig``, ``render_file``).
- ``dataset``: ``load_demonstrations`` -> ``DemoFile`` -> joint / per-arm trajectories, ``NormStats``,
  ``ChunkDataset`` (observation at t, action chunk t..t+H-1).

Importing this package does not import robosuite; generation and rendering do, in their worker processes.
"""

from coop_transport.data.dataset import (
    ArmTrajectory, ChunkDataset, DemoFile, ImageSequence, JointTrajectory, NormStats, compute_norm_stats,
    load_demonstrations, stats_from_dict, stats_to_dict,
)
from coop_transport.data.hdf5_format import DatasetError, demo_seed

__all__ = [
    "ArmTrajectory", "ChunkDataset", "DatasetError", "DemoFile", "ImageSequence", "JointTrajectory", "NormStats",
    "compute_norm_stats", "demo_seed", "load_demonstrations", "stats_from_dict", "stats_to_dict",
]
