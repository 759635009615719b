"""Small statistics used in evaluation reports."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default), as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def discordant_pairs(outcomes: dict, others: dict) -> dict:
    """Two evaluations' binary outcomes paired by key (a reset seed): the keys they share, the pairs ``outcomes``
    won (True where ``others`` is False) and lost (the reverse), the counts ``mcnemar_exact`` takes."""
    shared = [k for k in outcomes if k in others]
    return {"episodes": len(shared), "won": sum(outcomes[k] and not others[k] for k in shared),
            "lost": sum(others[k] and not outcomes[k] for k in shared)}


def mcnemar_exact(won: int, lost: int) -> float:
    """Two-sided exact McNemar p of paired binary outcomes with ``won`` and ``lost`` discordant pairs: under no
    difference each discordant pair goes either way with probability 1/2 (a binomial test on won + lost)."""
    if won < 0 or lost < 0:
        raise ValueError(f"counts must be non-negative, got {won} and {lost}")
    n, k = won + lost, min(won, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def format_rate(successes: int, n: int) -> str:
    """'73.0% [63.6, 80.7] (73/100)'."""
    lo, hi = wilson_interval(successes, n)
    return f"{100 * successes / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({successes}/{n})"
