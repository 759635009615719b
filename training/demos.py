"""Scripted TwoArmTransport demonstrations in robomimic's HDF5 layout: generate, render images later, inspect.

Usage:
    python training/demos.py --episodes 200 --out data/transport_scripted.hdf5           # low-dim + states, fast
    python training/demos.py --episodes 20 --out data/img.hdf5 --images --image-size 96  # images at generation
    python training/demos.py render --in data/transport_scripted.hdf5 --image-size 224   # images from saved states
    python training/demos.py info --in data/transport_scripted.hdf5                      # layout, seeds, stats

Rerunning an interrupted generation resumes from ``<out>.partial/``; see ``coop_transport.data.generate``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from coop_transport.data.generate import GenerateConfig, generate
from coop_transport.data.render_states import RenderConfig, render_file


@dataclass(frozen=True)
class InfoConfig:
    """Validate a demonstration file and print its layout, seeds and normalisation statistics."""

    in_: Annotated[Path, tyro.conf.arg(name="in")] = Path("data/transport_scripted.hdf5")
    """Demonstration file (ours or robomimic's TwoArmTransport)."""
    stats_out: Path | None = None
    """Also write the per-arm and joint statistics of the train split to this JSON file."""


def info(config: InfoConfig) -> dict:
    from coop_transport.data.dataset import load_demonstrations

    with load_demonstrations(config.in_) as demos:
        lengths = list(demos.summary.lengths.values())
        stats = {v: {k: s.to_dict() for k, s in demos.norm_stats(v).items()} for v in ("arm", "joint")}
        report = {
            "file": str(config.in_), "source": demos.source, "demos": len(demos), "steps": sum(lengths),
            "length_min_mean_max": [min(lengths), sum(lengths) / len(lengths), max(lengths)],
            "masks": {k: len(v) for k, v in demos.masks.items()}, "cameras": list(demos.cameras),
            "action_frame_on_disk": demos.action_frame, "flip_images": demos.flip_images,
            "env_version": demos.env_version, "seeds": demos.meta.get("seeds"),
            "expert_success_rate": demos.meta.get("expert_success_rate"),
            "learner_success_rate": demos.meta.get("learner_success_rate"),  # DAgger files (--learner)
        }
    print(json.dumps(report, indent=1))
    for variant, s in stats.items():
        for key, v in s.items():
            print(f"{variant:5s} {key:8s} mean {[round(x, 3) for x in v['mean']]}\n"
                  f"{'':14s} std  {[round(x, 3) for x in v['std']]}")
    if config.stats_out is not None:
        config.stats_out.write_text(json.dumps(stats, indent=1))
    return {**report, "stats": stats}


def main(config: GenerateConfig | RenderConfig | InfoConfig):
    if isinstance(config, GenerateConfig):
        out = generate(config)
        print(f"wrote {out}")
        return out
    if isinstance(config, RenderConfig):
        out = render_file(config)
        print(f"wrote images into {out}")
        return out
    return info(config)


def cli(argv: list[str] | None = None) -> GenerateConfig | RenderConfig | InfoConfig:
    """Generation takes its flags directly; ``render`` and ``info`` are subcommands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["render"]:
        return tyro.cli(RenderConfig, args=argv[1:], prog="demos.py render")
    if argv[:1] == ["info"]:
        return tyro.cli(InfoConfig, args=argv[1:], prog="demos.py info")
    return tyro.cli(GenerateConfig, args=argv, prog="demos.py")


if __name__ == "__main__":
    from coop_transport.data.generate import GenerationError
    from coop_transport.data.hdf5_format import DatasetError

    try:
        main(cli())
    except (FileExistsError, GenerationError, DatasetError) as e:  # expected failures: a message, not a traceback
        sys.exit(f"demos.py: {e}")
