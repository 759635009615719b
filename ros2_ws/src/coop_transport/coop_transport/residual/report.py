"""The paper's tables from run directories: Table 1 (architectures), Table 2 (recipe ablation on V4), plots,
paired tests across seeds (V5 - V4, V6 - V4, V6 - V5), the issue's targets checked against Table 1, and each
evaluation in which the critics choose (gate, best-of-K) paired with its plain evaluation reset seed by reset seed.

Inputs are the ``result.json`` files ``training/residual.py`` writes (one per seed: the best checkpoint's success
at n episodes on reset seeds 1..n) and the ``ablation.json`` files of ``--mode ablation``. ``write_report`` writes
``report.md``, ``report.json``, ``table1.png`` (success per architecture, per-seed dots) and ``curves.png``
(success against training chunks) into one directory.

Statistics: a method with several seeds is reported as the mean ± standard error over seeds (per-seed range
beside it); a single run (B1, B2, one seed) as its success with the Wilson 95% interval. The paired tests pair two
architectures by seed: paired t-test (two- and one-sided) and the exact sign-flip permutation test (with 4 seeds
its smallest two-sided p is 2/16 = 0.125). The critics' choice is paired with the plain evaluation of the same
checkpoints episode by episode (won, lost, exact McNemar p), which one seed can already test.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from coop_transport.residual.architectures import ARCHS
from coop_transport.utils.stats import discordant_pairs, mcnemar_exact, wilson_interval

RESULT_JSON = "result.json"
ABLATION_JSON = "ablation.json"
PAPER = {"B1": 30.0, "B2": 32.0, "V3": 27.5, "V4": 38.2, "V5": 41.2, "V6": 41.0}
PAPER_REFERENCE_ROW = ("robomimic BC (cited by the paper, not run here)", 62.0)
PAIRED_COMPARISONS = (("V4", "V5"), ("V4", "V6"), ("V5", "V6"))
"""(a, b) pairs tested as b - a by seed: the paper's "V5 and V6 beat V4" and "V5 = V6" claims"""


def paired_comparisons(methods) -> list[tuple[str, str]]:
    """The paper's pairs among the plain methods and among those of each critic selection (gate margin, best-of-K),
    and each selected method against its own plain evaluation (the same checkpoints, the same reset seeds: the
    selection's effect)."""
    methods = list(methods)
    suffixes = sorted({gate_suffix(m) for m in methods})
    pairs = [(a + s, b + s) for s in suffixes for a, b in PAIRED_COMPARISONS]
    pairs += [(base_arch(m), m) for m in methods if m != base_arch(m)]
    return [(a, b) for a, b in pairs if a in methods and b in methods]


# ------------------------------------------------------------------------------------------------------ loading
RUN_CONTROL_FIELDS = frozenset({"out", "seed", "seeds", "data", "envs", "ray_address", "device", "threads",
                                "save_every", "log_every", "resume", "stop_after_s", "mode", "progress",
                                "inference_batch"})
"""ResidualConfig fields that say where and how a run was executed, not what was trained or measured: runs of one
architecture may differ in these and still be averaged together."""


def run_settings(result: dict) -> dict:
    """The settings of a result that make runs comparable: its config without the run-control fields, with the
    defaults of fields that an older result.json does not have."""
    import dataclasses

    from coop_transport.residual.config import ResidualConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ResidualConfig)
                if f.default is not dataclasses.MISSING}
    config = {**defaults, **result.get("config", {})}
    return {k: v for k, v in config.items() if k not in RUN_CONTROL_FIELDS}


def method_name(result: dict) -> str:
    """A result's row in the tables: its architecture, or for an evaluation in which the critics choose a method
    of its own beside the plain one: "<arch> gate <M>" with the critic gate (``--mode eval --gate-margin M``),
    "<arch> best-of-<K>" with their choice among K π0 draws (``--candidates K``), or both."""
    config = result.get("config", {})
    margin, candidates = config.get("gate_margin"), config.get("candidates", 1)
    return (result["arch"] + (f" best-of-{candidates}" if candidates > 1 else "")
            + (f" gate {margin:g}" if margin is not None else ""))


def base_arch(method: str) -> str:
    return method.split()[0]


def gate_suffix(method: str) -> str:
    """What a method's name adds to its architecture: "", " gate M", " best-of-K" or " best-of-K gate M"."""
    return method[len(base_arch(method)):]


def method_order(methods) -> list[str]:
    """Methods in the paper's order of architectures, each ungated one before its gated variants."""
    return sorted(methods, key=lambda m: (list(ARCHS).index(base_arch(m)), m != base_arch(m), m))


def find_results(paths: list[Path]) -> dict[str, list[dict]]:
    """method (``method_name``) -> result dicts (sorted by seed) under the given run directories (searched
    recursively), in ``method_order``.

    Seeds of one method are averaged and paired with other methods by seed, so they must be runs of one setting:
    runs of a method that differ in a setting (``run_settings``), or that repeat a seed, are refused with the
    differing fields and directories (report such variants from separate directories)."""
    found: dict[str, list[dict]] = {}
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.rglob(RESULT_JSON))
        for f in files:
            r = json.loads(f.read_text())
            r["_dir"] = str(f.parent)
            found.setdefault(method_name(r), []).append(r)
    out = {m: found[m] for m in method_order(found)}
    for arch, rs in out.items():
        rs.sort(key=lambda r: r["seed"])
        settings = [run_settings(r) for r in rs]
        differing = sorted({k for s in settings for k in s if any(t.get(k) != s.get(k) for t in settings)})
        if differing:
            detail = "; ".join(f"{k}: " + ", ".join(f"{s.get(k)!r} ({r['_dir']})" for s, r in zip(settings, rs))
                               for k in differing)
            raise ValueError(f"the {arch} runs differ in {', '.join(differing)}, so their seeds cannot be averaged "
                             f"into one row: {detail}. Report each setting from its own directories.")
        seen: dict[int, str] = {}
        for r in rs:
            if r["seed"] in seen:
                raise ValueError(f"{arch} seed {r['seed']} appears twice ({seen[r['seed']]} and {r['_dir']}): "
                                 "one result per seed")
            seen[r["seed"]] = r["_dir"]
    return out


def episode_outcomes(result: dict) -> dict[str, bool] | None:
    """reset seed (as a string, JSON's key) -> success of the evaluation behind ``result`` (as ``find_results``
    loads it), or None where nothing records it. Results record it themselves (``outcome_by_reset_seed``); for those
    written before they did, it is read from their evaluation's summary.json in the layout training/residual.py
    writes (a trained seed's best checkpoint under eval/<checkpoint>, B1 / B2 under eval/final, an evaluation in
    which the critics choose under its run's eval/best_<selection>), and only if that summary counts the same
    successes and episodes."""
    from coop_transport.evaluation import outcome_by_reset_seed

    if result.get("outcome_by_reset_seed") is not None:
        return result["outcome_by_reset_seed"]
    where = Path(result.get("_dir", ""))
    if "evaluated_checkpoint" in result:  # <run>/<selection>/result.json
        summary_file = where.parent / "eval" / f"best_{where.name}" / "summary.json"
    elif result.get("best_checkpoint"):
        summary_file = where / "eval" / Path(result["best_checkpoint"]).name / "summary.json"
    else:
        summary_file = where / "eval" / "final" / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    if ("per_seed" not in summary
            or (summary.get("successes"), summary.get("episodes")) != (result.get("successes"), result.get("episodes"))):
        return None
    return outcome_by_reset_seed(summary)


def selection_pairs(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Each method in which the critics choose (gate, best-of-K) against its own plain evaluation, episode by
    episode: the same checkpoints on the same reset seeds, with π0's first draw on the same noise, so a reset seed
    whose outcome differs is one the choice won or lost. Per training seed and pooled over seeds: won, lost, and
    the exact McNemar p (two-sided) of the pooled counts. Seeds without recorded outcomes on either side are left
    out."""
    pairs = {}
    for method, rows in results.items():
        plain = {r["seed"]: r for r in results.get(base_arch(method), [])}
        if method == base_arch(method) or not plain:
            continue
        per_seed = []
        for r in rows:
            chosen = episode_outcomes(r)
            own = episode_outcomes(plain[r["seed"]]) if r["seed"] in plain else None
            if chosen is None or own is None:
                continue
            per_seed.append({"seed": r["seed"], **discordant_pairs(chosen, own)})
        if per_seed:
            won, lost = sum(p["won"] for p in per_seed), sum(p["lost"] for p in per_seed)
            pairs[method] = {"against": base_arch(method), "per_seed": per_seed, "won": won, "lost": lost,
                             "p_mcnemar": mcnemar_exact(won, lost)}
    return pairs


def selection_pairs_markdown(pairs: dict[str, dict]) -> str:
    lines = ["| Method | Against | Seeds | Won / lost per seed | Won | Lost | McNemar p (two-sided, exact) |",
             "|---|---|---|---|---|---|---|"]
    for method, p in pairs.items():
        per_seed = ", ".join(f"{s['won']}/{s['lost']}" for s in p["per_seed"])
        lines.append(f"| {method} | {p['against']} | {len(p['per_seed'])} | {per_seed} | {p['won']} | {p['lost']} | "
                     f"{p['p_mcnemar']:.3f} |")
    return "\n".join(lines) + "\n"


def find_ablations(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        for f in sorted(Path(path).rglob(ABLATION_JSON)):
            out.append(json.loads(f.read_text()))
    return out


# --------------------------------------------------------------------------------------------------- statistics
def method_summary(results: list[dict]) -> dict:
    rates = np.array([r["success_rate"] for r in results], dtype=np.float64)
    row = {"seeds": len(results), "mean": float(rates.mean()), "per_seed": rates.tolist()}
    if len(results) > 1:
        row["se"] = float(rates.std(ddof=1) / math.sqrt(len(rates)))
    else:
        r = results[0]
        row["wilson95"] = list(wilson_interval(r["successes"], r["episodes"]))
        row["episodes"] = r["episodes"]
    return row


def _t_sf(t: float, dof: int) -> float:
    """P(T > t) of Student's t (scipy when present, else numerical integration of the density)."""
    try:
        from scipy import stats

        return float(stats.t.sf(t, dof))
    except ImportError:  # pragma: no cover - scipy is normally present
        x = np.linspace(abs(t), abs(t) + 200.0, 400_001)
        c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
        tail = float(np.trapz(c * (1 + x * x / dof) ** (-(dof + 1) / 2), x))
        return tail if t >= 0 else 1.0 - tail


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """b - a paired by seed: mean difference and its standard error, paired t (two- and one-sided for b > a), exact
    sign-flip p."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([b[s] - a[s] for s in seeds])
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    n = len(d)
    if sd == 0:
        t, p_two, p_one = (math.inf if mean > 0 else -math.inf if mean < 0 else 0.0), float(mean == 0), float(mean <= 0)
    else:
        t = mean / (sd / math.sqrt(n))
        p_one = _t_sf(t, n - 1)
        p_two = 2 * min(p_one, 1 - p_one)
    flips = [np.mean(np.array(signs) * np.abs(d)) for signs in itertools.product([-1, 1], repeat=n)]
    p_perm = float(np.mean([abs(f) >= abs(mean) - 1e-12 for f in flips]))
    return {"seeds": seeds, "differences": d.tolist(), "mean_difference": mean, "se": sd / math.sqrt(n), "t": t,
            "p_two_sided": p_two, "p_one_sided": p_one, "p_sign_flip_two_sided": p_perm,
            "same_direction": bool(np.all(d > 0) or np.all(d < 0))}


TARGETS = {"V4 over B1": 0.08, "V5 absolute": 0.75}
"""The issue's targets: V4 >= B1 + 8 points, V5 >= V4, V5 = V6 within their intervals, V5 >= 75% (n = 100, 4 seeds)"""
TARGET_SEEDS = 4
Z95 = 1.959964


def _t95(dof: float | None) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom (None: the normal's)."""
    if dof is None:
        return Z95
    low, high = 0.0, 1e4
    for _ in range(200):  # bisection on the tail probability
        mid = (low + high) / 2
        low, high = (mid, high) if _t_sf(mid, dof) > 0.025 else (low, mid)
    return (low + high) / 2


def _estimate(row: dict) -> tuple[float, float, int | None]:
    """(mean, standard error, degrees of freedom) of a Table 1 row: across seeds when there are several (seeds - 1
    degrees of freedom), else the binomial error of the one evaluation, which is all the uncertainty a single run
    shows (None: normal)."""
    if "se" in row:
        return row["mean"], row["se"], row["seeds"] - 1
    n = row.get("episodes", 100)
    shrunk = (row["mean"] * n + 1) / (n + 2)  # Agresti-Caffo: 0 or n successes still carry uncertainty
    return row["mean"], math.sqrt(shrunk * (1 - shrunk) / n), None


def _combined(*parts: tuple[float, float, int | None]) -> tuple[float, float | None]:
    """SE and Welch-Satterthwaite degrees of freedom of a sum or difference of independent estimates (mean, SE,
    dof); a binomial part counts as infinitely many degrees of freedom (None when all parts are binomial)."""
    variance = sum(se * se for _, se, _ in parts)
    if all(dof is None for _, _, dof in parts):
        return math.sqrt(variance), None
    spread = sum(se ** 4 / dof for _, se, dof in parts if dof is not None)
    return math.sqrt(variance), (variance * variance / spread if spread > 0 else None)


def _check(target: str, measured: str, value: float, se: float, dof: float | None, need: float,
           difference: bool) -> dict:
    half = _t95(dof) * se
    low, high = value - half, value + half
    if not difference:  # a success rate
        low, high = max(low, 0.0), min(high, 1.0)
    return {"target": target, "measured": measured, "interval": [low, high], "dof": dof,
            "difference": difference, "meets": value >= need, "interval_meets": low >= need}


def target_checks(rows: dict, paired: dict) -> list[dict]:
    """The issue's four targets against Table 1, each with its measured figure, a 95% interval (mean ± t·SE: SEs
    across seeds with Student's t, a single run's binomial SE with the normal quantile, a difference's with
    Welch-Satterthwaite degrees of freedom) and two verdicts: whether the point estimate meets the target, and
    whether the whole interval does. A target whose methods were not run is left out. ``paired`` holds
    ``paired_test`` results; V5 - V4 uses its seed pairing when there is one."""
    checks = []
    for suffix in sorted({gate_suffix(m) for m in rows if base_arch(m) in ("V4", "V5", "V6")}):
        checks += _target_checks(rows, paired, suffix)
    return checks


def _target_checks(rows: dict, paired: dict, suffix: str) -> list[dict]:
    """The targets for V4, V5, V6 with the method suffix ``suffix`` ("" or " gate M"; B1 has no critics)."""
    checks = []
    est = {base_arch(m): _estimate(row) for m, row in rows.items()
           if gate_suffix(m) == suffix or m == "B1"}
    if "B1" in est and "V4" in est:
        d = est["V4"][0] - est["B1"][0]
        se, dof = _combined(est["V4"], est["B1"])
        need = TARGETS["V4 over B1"]
        checks.append(_check(f"V4{suffix} ≥ B1 + {100 * need:.0f} points", f"V4{suffix} − B1 = {100 * d:+.1f} pp",
                             d, se, dof, need, True))
    if "V4" in est and "V5" in est:
        test = paired.get(f"V5{suffix}-V4{suffix}")  # present when the two share at least two seeds
        if test:
            d, se, dof = test["mean_difference"], test["se"], len(test["seeds"]) - 1
            how = f"paired over {len(test['seeds'])} seeds, one-sided p = {test['p_one_sided']:.3f}"
        else:
            d = est["V5"][0] - est["V4"][0]
            (se, dof), how = _combined(est["V5"], est["V4"]), "unpaired"
        checks.append(_check(f"V5{suffix} ≥ V4{suffix}", f"V5{suffix} − V4{suffix} = {100 * d:+.1f} pp ({how})", d,
                             se, dof, 0.0, True))
    if "V5" in est and "V6" in est:
        (m5, s5, f5), (m6, s6, f6) = est["V5"], est["V6"]
        h5, h6 = _t95(f5) * s5, _t95(f6) * s6
        overlap = max(m5 - h5, m6 - h6) <= min(m5 + h5, m6 + h6)
        checks.append({"target": f"V5{suffix} ≈ V6{suffix} within their intervals", "measured":
                       f"V5{suffix} {100 * m5:.1f}%, V6{suffix} {100 * m6:.1f}%", "interval": None, "meets": overlap,
                       "interval_meets": None})
    if "V5" in est:
        need = TARGETS["V5 absolute"]
        checks.append(_check(f"V5{suffix} ≥ {100 * need:.0f}%", f"V5{suffix} = {100 * est['V5'][0]:.1f}%",
                             *est["V5"], need, False))
    return checks


def targets_markdown(rows: dict, checks: list[dict]) -> str:
    if not checks:
        return ""

    def verdict(v):
        return "—" if v is None else "yes" if v else "**no**"

    lines = ["| Target | Measured | 95% interval | Point estimate meets it | Whole interval meets it |",
             "|---|---|---|---|---|"]
    for c in checks:
        sign = "+" if c.get("difference") else ""
        interval = "—" if c["interval"] is None else \
            f"[{100 * c['interval'][0]:{sign}.1f}, {100 * c['interval'][1]:{sign}.1f}]"
        lines.append(f"| {c['target']} | {c['measured']} | {interval} | {verdict(c['meets'])} | "
                     f"{verdict(c['interval_meets'])} |")
    coverage = ", ".join(f"{m} {rows[m]['seeds']}" for m in rows if base_arch(m) in ("V4", "V5", "V6"))
    lines += ["", f"Intervals: mean ± t·SE (SE across seeds with Student's t at seeds − 1 degrees of freedom, or a "
                  f"single evaluation's binomial SE with the normal quantile; for a difference, Welch-Satterthwaite "
                  f"degrees of freedom). The targets are stated for {TARGET_SEEDS} seeds at "
                  f"n = 100; seeds here: {coverage or 'none of V4–V6'}."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------- tables
def table1_markdown(results: dict[str, list[dict]]) -> tuple[str, dict]:
    lines = ["| Method | Success | Std err / 95% CI | Seeds | Per-seed | Paper |", "|---|---|---|---|---|---|"]
    rows = {}
    for arch in results:  # method_order
        spec = ARCHS[base_arch(arch)]
        s = method_summary(results[arch])
        rows[arch] = s
        spread = (f"±{100 * s['se']:.1f}%" if "se" in s else
                  f"[{100 * s['wilson95'][0]:.1f}, {100 * s['wilson95'][1]:.1f}]")
        seeds = str(s["seeds"]) if s["seeds"] > 1 or spec.trains else "—"
        per_seed = ", ".join(f"{100 * v:.0f}" for v in s["per_seed"])
        gate = gate_suffix(arch)
        label = f"{base_arch(arch)} {spec.description}" + (f", critic{gate}" if gate else "")
        name = f"**{label}**" if spec.vla_variant == "per-arm" and spec.trains else label
        paper = f"{PAPER[arch]:.1f}%" if arch in PAPER else "—"
        lines.append(f"| {name} | {100 * s['mean']:.1f}% | {spread} | {seeds} | {per_seed} | {paper} |")
    name, rate = PAPER_REFERENCE_ROW
    lines.append(f"| {name} | — | — | — | — | {rate:.1f}% |")
    return "\n".join(lines) + "\n", rows


def _seed_mean_shares(results: dict[str, list[dict]], key: str, columns, shares) -> tuple[str, dict]:
    """Per method, the mean over its seeds of ``shares(result)`` (column -> share of evaluation episodes), as a
    markdown table in ``columns``' order and as a dict; methods with a seed whose result lacks ``key`` are left
    out rather than averaged over fewer seeds."""
    rows = {arch: {c: float(np.mean([shares(r)[c] for r in rs])) for c in columns}
            for arch, rs in results.items() if all(r.get(key) for r in rs)}
    if not rows:
        return "", {}
    lines = ["| Method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {arch} | " + " | ".join(f"{100 * rows[arch][c]:.0f}%" for c in columns) + " |"
              for arch in results if arch in rows]
    return "\n".join(lines) + "\n", rows


def funnel_markdown(results: dict[str, list[dict]]) -> tuple[str, dict]:
    """Share of evaluation episodes reaching each task milestone, per method, averaged over its seeds (best
    checkpoints): where in the task each architecture gains or loses. Methods with a seed evaluated before the
    residual evaluation recorded milestones are left out."""
    from coop_transport.sim.labels import MILESTONES

    return _seed_mean_shares(results, "milestone_rates", MILESTONES, lambda r: r["milestone_rates"])


def handover_markdown(results: dict[str, list[dict]]) -> tuple[str, dict]:
    """How robot0's hold of the lifted payload ended (``sim.labels.HANDOVER_OUTCOMES``), as a share of evaluation
    episodes per method, averaged over its seeds (best checkpoints): whether a method loses the hand-over to an
    early release or to a drop. Methods with a seed evaluated before the evaluation recorded it are left out."""
    from coop_transport.sim.labels import HANDOVER_OUTCOMES

    def shares(r: dict) -> dict[str, float]:
        n = sum(r["handover_outcomes"].values())
        return {o: r["handover_outcomes"].get(o, 0) / n for o in HANDOVER_OUTCOMES}

    return _seed_mean_shares(results, "handover_outcomes", list(HANDOVER_OUTCOMES), shares)


def table2_markdown(ablations: list[dict]) -> tuple[str, dict]:
    """Rows of the ladder averaged over V4 seeds; Δ cumulative against the first row, Δ marginal against the
    previous applicable row."""
    v4 = [a for a in ablations if a.get("arch") == "V4"] or ablations
    if not v4:
        return "", {}
    names = [r["name"] for r in v4[0]["rows"]]
    means = {}
    for name in names:
        values = [r["success_rate"] for a in v4 for r in a["rows"] if r["name"] == name and r["success_rate"]
                  is not None]
        means[name] = float(np.mean(values)) if values else None
    lines = ["| Configuration | Success | Δ cumulative | Δ marginal | Seeds |", "|---|---|---|---|---|"]
    base, previous = means[names[0]], None
    for name in names:
        m = means[name]
        if m is None:
            lines.append(f"| {name} | n/a (the residual acts on {v4[0].get('chunk', 10)}-step chunks) | — | — | — |")
            continue
        cum = "—" if previous is None else f"{100 * (m - base):+.2f} pp"
        mar = "—" if previous is None else f"{100 * (m - previous):+.2f} pp"
        lines.append(f"| {name} | {100 * m:.2f}% | {cum} | {mar} | {len(v4)} |")
        previous = m
    return "\n".join(lines) + "\n", means


# --------------------------------------------------------------------------------------------------------- plots
def plot_table1(rows: dict, results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(archs))
    means = [100 * rows[a]["mean"] for a in archs]
    errs = [100 * rows[a].get("se", 0.0) for a in archs]
    ax.bar(x, means, yerr=errs, capsize=4,
           color=["#999" if not ARCHS[base_arch(a)].trains else "#4a7" if a in PAPER else "#47a" for a in archs])
    for i, a in enumerate(archs):
        ax.scatter([i] * len(results[a]), [100 * r["success_rate"] for r in results[a]], color="k", s=10, zorder=3)
        if a in PAPER:
            ax.scatter([i], [PAPER[a]], marker="_", color="r", s=300, zorder=4,
                       label="paper" if i == 0 else None)
    ax.set_xticks(x, archs, rotation=30 if any(a not in PAPER for a in archs) else 0)
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for arch, rs in results.items():
        for i, r in enumerate(rs):
            if r.get("evals"):
                ax.plot([e["chunks"] for e in r["evals"]], [100 * e["success_rate"] for e in r["evals"]], "o-",
                        alpha=0.7, color=f"C{list(results).index(arch)}", label=arch if i == 0 else None)
    ax.set_xlabel("training chunks")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(paths: list[Path], out: Path) -> dict:
    """Table 1 + Table 2 + paired test as report.md / report.json, and the plots, under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = find_results(paths)
    if not results:
        raise FileNotFoundError(f"no {RESULT_JSON} under {[str(p) for p in paths]}")
    t1, rows = table1_markdown(results)
    t2, ladder = table2_markdown(find_ablations(paths))
    paired = {}
    for a, b in paired_comparisons(results):
        test = paired_test({r["seed"]: r["success_rate"] for r in results[a]},
                           {r["seed"]: r["success_rate"] for r in results[b]})
        if test:
            paired[f"{b}-{a}"] = {**test, "a": a, "b": b}
    md = ["# Cooperative residual RL on TwoArmTransport", "",
          "## Table 1: closed-loop success (best checkpoint per seed, reset seeds 1..n)", "", t1]
    funnel, funnel_rows = funnel_markdown(results)
    if funnel:
        md += ["## Stage funnel (share of evaluation episodes reaching each milestone, mean over seeds)", "", funnel]
    handover, handover_rows = handover_markdown(results)
    if handover:
        md += ["## How robot0's hold of the lifted payload ended (share of evaluation episodes, mean over seeds)", "",
               "handed_over: robot1 held it; slipped: a drop with robot0's gripper closed; opened_partner_away / "
               "_open / _missed: robot0 opened while robot1's hand was away from the handle / at it, open / "
               "closed beside it; held_to_end: still holding at the episode's end.", "", handover]
    if t2:
        md += ["## Table 2: inference-recipe ablation on V4", "", t2]
    checks = target_checks(rows, paired)
    if checks:
        md += ["## The issue's targets", "", targets_markdown(rows, checks)]
    if paired:
        md += ["## Paired tests across seeds", "",
               "The paper: V5 and V6 each beat V4 in the same direction across seeds (p < 0.1 paired), and V5 and V6 "
               "are indistinguishable.", "",
               "| Comparison | Mean difference | Seeds | Paired t | p two-sided | p one-sided | Sign-flip p | "
               "Same direction |", "|---|---|---|---|---|---|---|---|"]
        for name, t in paired.items():
            a, b = t["a"], t["b"]
            md.append(f"| {b} - {a} | {100 * t['mean_difference']:+.2f} pp | {len(t['seeds'])} | {t['t']:.3f} | "
                      f"{t['p_two_sided']:.3f} | {t['p_one_sided']:.3f} ({b} > {a}) | "
                      f"{t['p_sign_flip_two_sided']:.3f} | {'yes' if t['same_direction'] else 'no'} |")
        md.append("")
    choice = selection_pairs(results)
    if choice:
        md += ["## The critics' choice against the plain evaluation, paired by reset seed", "",
               "Won: reset seeds the method succeeded on and its plain evaluation failed; lost: the reverse (the same "
               "checkpoints, π0's first draw on the same noise).", "", selection_pairs_markdown(choice)]
    probes = [json.loads(f.read_text()) for p in paths for f in sorted(Path(p).rglob("probes.json"))]
    if probes:
        md += ["## Communication probes", "", probes_markdown(probes)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    payload = {"table1": rows, "funnel": funnel_rows, "handover": handover_rows, "table2": ladder, "paired": paired,
               "paired_v4_v5": paired.get("V5-V4"), "selection_vs_plain": choice, "targets": checks,
               "probes": probes}
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    plot_table1(rows, results, out / "table1.png")
    plot_curves(results, out / "curves.png")
    return payload


def probes_markdown(probes: list[dict]) -> str:
    lines = ["| Arch | Seed | Probe | Success | Against the unchanged message: won / lost, McNemar p |",
             "|---|---|---|---|---|"]
    for p in probes:
        for name, r in p["interventions"].items():
            paired = r.get("against_none")  # probes.json files before the pairing lack it
            versus = f"{paired['won']} / {paired['lost']}, p = {paired['p_mcnemar']:.3f}" if paired else "—"
            lines.append(f"| {p['arch']} | {p['seed']} | {name} | {100 * r['success_rate']:.1f}% | {versus} |")
    lines += ["", "Linear probe: test accuracy (chance as the test set's majority class / uniform over the classes, "
              "the paper's 20%, 50%, 50%).", "",
              "| Arch | Seed | Phase acc (chance) | Gripper acc (chance) | Ready acc (chance) | Pose R² |",
              "|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        uniform = f" / {100 * r['uniform_chance']:.0f}%" if "uniform_chance" in r else ""
        return f"{100 * r['accuracy']:.0f}% ({100 * r['chance']:.0f}%{uniform})"

    for p in probes:
        lp = p["linear_probe"]
        lines.append(f"| {p['arch']} | {p['seed']} | {cell(lp['phase'])} | {cell(lp['gripper'])} | "
                     f"{cell(lp['ready'])} | {lp['pose']['r2']:.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ Table 2 evaluation
def run_ablation(config, seed: int, pool=None, started: float | None = None) -> dict:
    """Evaluate a run's best checkpoint under every row of ``recipe.ABLATION_LADDER`` -> <run>/ablation.json.

    The ladder's chunk-10 rows run at the residual's trained chunk; a row with another chunk length (chunk 25) does
    not apply to a residual policy, whose deltas are C steps long (n/a, the paper's "where applicable").

    Resumable row by row: a rerun reads back each row whose summary matches this checkpoint, its weights and the
    episode count, and continues a row that ``config.stop_after_s`` (counted from ``started``) or a kill cut off;
    it then returns ``{"out_of_time": True, ...}`` and writes no ablation.json."""
    from coop_transport.recipe import ABLATION_LADDER
    from coop_transport.residual.checkpoint import load_policy, resolve_policy_dir
    from coop_transport.residual.rollout import make_pool
    from coop_transport.residual.train import (call_deadline, continues_cut_off, evaluate_system, finished_summary,
                                               sim_config_for)

    deadline = call_deadline(config, time.perf_counter() if started is None else started)
    run = config.run_dir(seed)
    base = load_policy(run, config.device)
    checkpoint, weights = str(resolve_policy_dir(run)), base.weights_digest()
    own = pool is None
    rows = []
    try:
        base_chunk = next(iter(ABLATION_LADDER.values())).execute_steps  # the ladder's training chunk (10)
        for i, (name, recipe) in enumerate(ABLATION_LADDER.items()):
            if base.spec.residual and recipe.execute_steps == base_chunk:
                recipe = recipe.with_(execute_steps=base.chunk)  # "chunk 10" rows: the residual's trained chunk
            if base.spec.residual and recipe.execute_steps != base.chunk:
                rows.append({"name": name, "recipe": recipe.__dict__, "success_rate": None})
                continue
            out = run / "ablation" / f"row_{i}"
            args = {"checkpoint": checkpoint, "recipe": recipe.__dict__, "weights": weights}
            summary = finished_summary(out, args, config.eval_episodes)
            if summary is None:
                if pool is None:
                    pool = make_pool(config.envs, sim_config_for(config, base.vla.image_size, False), config.gamma,
                                     config.ray_address)
                summary = evaluate_system(base.with_recipe(recipe), pool, config.eval_episodes, out, name, args,
                                          progress=config.progress, resume=continues_cut_off(config, out),
                                          deadline=deadline)
            if summary is None:
                print(f"stopping the ablation of {run} in '{name}' (--stop-after-s {config.stop_after_s:g}); the same "
                      "command continues it")
                return {"arch": base.spec.name, "seed": seed, "out_of_time": True, "done": [r["name"] for r in rows]}
            rows.append({"name": name, "recipe": recipe.__dict__, "success_rate": summary["success_rate"],
                         "successes": summary["successes"], "episodes": summary["episodes"]})
    finally:
        if own and pool is not None:
            pool.close()
    payload = {"arch": base.spec.name, "seed": seed, "chunk": base.chunk, "rows": rows}
    (run / ABLATION_JSON).write_text(json.dumps(payload, indent=2))
    return payload

