"""The paper's Table 1 (architectures) and Table 2 (recipe ablation on V4), plots, the paired V4-V5 test and the
issue's targets (V4 >= B1 + 8 points, V5 >= V4, V5 = V6, V5 >= 75%) checked with 95% intervals.

Usage:
    python training/report.py runs/residual/B1 runs/residual/B2 runs/residual/V3 runs/residual/V4 \
        runs/residual/V5 runs/residual/V6 --out runs/residual/report
    python training/report.py runs/residual                 # every result.json below, the same

Reads every result.json (written by training/residual.py per seed), ablation.json (--mode ablation) and
probes.json (--mode probes) below the given directories; writes report.md, report.json, table1.png, curves.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tyro

from coop_transport.residual.report import write_report


@dataclass(frozen=True)
class ReportConfig:
    """Tables and plots from residual-RL run directories."""

    runs: tuple[Path, ...] = field(default_factory=tuple)
    """Run directories (searched recursively for result.json, ablation.json, probes.json)."""
    out: Path = Path("runs/residual/report")
    """Where report.md, report.json, table1.png and curves.png go."""


def main(config: ReportConfig) -> dict:
    if not config.runs:
        raise SystemExit("name at least one run directory")
    try:
        payload = write_report(list(config.runs), config.out)
    except ValueError as e:  # runs that cannot share a table (see find_results): say why, no traceback
        raise SystemExit(f"report.py: {e}") from None
    print((config.out / "report.md").read_text())
    return payload


def cli(argv: list[str] | None = None) -> ReportConfig:
    return tyro.cli(ReportConfig, args=argv)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    # Positional run directories (training/report.py RUNS...) are the --runs list.
    if args and not args[0].startswith("-"):
        split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
        args = ["--runs", *args[:split], *args[split:]]
    main(cli(args))
