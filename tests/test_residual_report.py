"""Table 1, Table 2 and the paired V4-V5 test from synthetic result files. CPU, no simulation."""

import json
import math

import pytest

from coop_transport.residual.report import paired_test, write_report
from coop_transport.utils.stats import mcnemar_exact


def result(arch: str, seed: int, rate: float, trains: bool = True) -> dict:
    n = 100
    return {"arch": arch, "seed": seed, "trains": trains, "success_rate": rate, "successes": round(rate * n),
            "episodes": n, "wilson95": [0.0, 1.0], "best_checkpoint": "checkpoints/chunk_003000" if trains else None,
            "evals": [{"chunks": 1000, "success_rate": rate - 0.05}, {"chunks": 3000, "success_rate": rate}]
            if trains else []}


def test_paired_test_hand_values():
    v4 = {0: 0.36, 1: 0.38, 2: 0.42, 3: 0.37}
    v5 = {0: 0.40, 1: 0.41, 2: 0.43, 3: 0.41}
    out = paired_test(v4, v5)
    d = [0.04, 0.03, 0.01, 0.04]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    assert out["mean_difference"] == pytest.approx(mean)
    assert out["t"] == pytest.approx(mean / (sd / 2))
    assert 0.0 < out["p_one_sided"] < 0.05 and out["p_two_sided"] == pytest.approx(2 * out["p_one_sided"])
    assert out["p_sign_flip_two_sided"] == pytest.approx(2 / 16)  # all positive: the two extreme sign patterns
    assert out["same_direction"]
    assert paired_test({0: 0.3}, {0: 0.4}) is None


def test_report_tables_and_plots(tmp_path):
    rates = {"V3": [0.27, 0.28, 0.27, 0.28], "V4": [0.36, 0.38, 0.42, 0.37], "V5": [0.40, 0.41, 0.43, 0.41],
             "V6": [0.41, 0.40, 0.42, 0.41]}
    for arch, rs in rates.items():
        for seed, r in enumerate(rs):
            d = tmp_path / arch / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(result(arch, seed, r)))
    for arch, r in (("B1", 0.30), ("B2", 0.32)):
        d = tmp_path / arch / "seed_0"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(result(arch, 0, r, trains=False)))
    ladder = ["baseline (chunk 10, N=1, no clip)", "+ mean-of-N=4", "+ ±2σ clipping", "+ chunk 25"]
    for seed in range(2):
        rows = [{"name": n, "success_rate": r} for n, r in zip(ladder, [0.25, 0.32, 0.355, None])]
        (tmp_path / "V4" / f"seed_{seed}" / "ablation.json").write_text(json.dumps({"arch": "V4", "seed": seed,
                                                                                  "chunk": 10, "rows": rows}))
    payload = write_report([tmp_path], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    for arch in ("B1", "B2", "V3", "V4", "V5", "V6"):
        assert f"| {arch} " in md or f"| **{arch} " in md
    assert payload["table1"]["V4"]["mean"] == pytest.approx(0.3825) and payload["table1"]["V4"]["seeds"] == 4
    assert "se" in payload["table1"]["V5"] and "wilson95" in payload["table1"]["B1"]
    assert "+ mean-of-N=4 | 32.00% | +7.00 pp | +7.00 pp" in md and "n/a" in md
    assert payload["paired_v4_v5"]["mean_difference"] == pytest.approx(0.03)
    assert set(payload["paired"]) == {"V5-V4", "V6-V4", "V6-V5"}
    assert payload["paired"]["V6-V4"]["mean_difference"] == pytest.approx(0.0275)
    assert payload["paired"]["V6-V5"]["mean_difference"] == pytest.approx(-0.0025)
    assert "| V6 - V4 | +2.75 pp | 4 |" in md and "robomimic BC (cited" in md
    assert (tmp_path / "report" / "table1.png").stat().st_size > 0 and (tmp_path / "report" / "curves.png").is_file()


def test_funnel_table_averages_seeds_and_leaves_out_runs_without_milestones(tmp_path):
    from coop_transport.sim.labels import MILESTONES

    def rates(first_half: float, second_half: float) -> dict:
        return {m: first_half if i < 4 else second_half for i, m in enumerate(MILESTONES)}

    for arch, seed, funnel in (("V4", 0, rates(1.0, 0.10)), ("V4", 1, rates(0.8, 0.20)), ("V5", 0, rates(0.9, 0.3)),
                               ("V5", 1, None)):
        d = tmp_path / arch / f"seed_{seed}"
        d.mkdir(parents=True)
        r = result(arch, seed, 0.15)
        if funnel is not None:
            r["milestone_rates"] = funnel
        (d / "result.json").write_text(json.dumps(r))
    payload = write_report([tmp_path], tmp_path / "report")
    assert set(payload["funnel"]) == {"V4"}  # one V5 seed has no funnel: V5 is left out, not half-averaged
    assert payload["funnel"]["V4"][MILESTONES[0]] == pytest.approx(0.9)
    assert payload["funnel"]["V4"][MILESTONES[-1]] == pytest.approx(0.15)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Stage funnel" in md and "| V4 | 90% | 90% | 90% | 90% | 15% | 15% | 15% | 15% |" in md


def test_runs_of_one_architecture_with_different_settings_are_not_averaged(tmp_path):
    from coop_transport.residual.report import find_results

    def write(name: str, seed: int, rate: float, **config) -> None:
        d = tmp_path / name / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({**result("V4", seed, rate), "config": {"arch": "V4", **config}}))

    # where and how a run executed (envs, device, deadline) does not matter; an older result.json without a newer
    # field counts as that field's default
    write("a", 0, 0.12, envs=7, device="cuda", stop_after_s=540.0, advantage_norm=False)
    write("a", 1, 0.12, envs=14, device="cpu")
    assert [r["seed"] for r in find_results([tmp_path / "a"])["V4"]] == [0, 1]

    write("b", 2, 0.08, advantage_norm=True, beta=1.0)  # a variant of V4 next to the paper's setting
    with pytest.raises(ValueError, match=r"V4 runs differ in advantage_norm, beta") as err:
        find_results([tmp_path])
    assert str(tmp_path / "b" / "seed_2") in str(err.value)
    assert len(find_results([tmp_path / "b"])["V4"]) == 1  # alone, the variant reports

    write("c", 0, 0.11)  # seed 0 of the same setting twice
    with pytest.raises(ValueError, match="V4 seed 0 appears twice"):
        find_results([tmp_path / "a", tmp_path / "c"])


def test_targets_are_checked_with_hand_computed_intervals(tmp_path):
    from scipy import stats

    from coop_transport.residual.report import _t95

    for dof in (1, 3, 7.5, 40):
        assert _t95(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=1e-6)
    assert _t95(None) == pytest.approx(stats.norm.ppf(0.975), rel=1e-6)

    rates = {"V4": [0.36, 0.38, 0.42, 0.37], "V5": [0.40, 0.41, 0.43, 0.41], "V6": [0.41, 0.40, 0.42, 0.41]}
    for arch, rs in rates.items():
        for seed, r in enumerate(rs):
            d = tmp_path / arch / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(result(arch, seed, r)))
    (tmp_path / "B1" / "seed_0").mkdir(parents=True)
    (tmp_path / "B1" / "seed_0" / "result.json").write_text(json.dumps(result("B1", 0, 0.30, trains=False)))
    payload = write_report([tmp_path], tmp_path / "report")
    checks = {c["target"]: c for c in payload["targets"]}
    assert list(checks) == ["V4 ≥ B1 + 8 points", "V5 ≥ V4", "V5 ≈ V6 within their intervals", "V5 ≥ 75%"]

    # V4 - B1: 4 seeds' SE (3 dof) against B1's binomial SE (Agresti-Caffo), Welch-Satterthwaite dof
    se_v4 = stats.tstd(rates["V4"]) / 2
    p_b1 = (30 + 1) / 102
    se_b1 = math.sqrt(p_b1 * (1 - p_b1) / 100)
    se = math.sqrt(se_v4 ** 2 + se_b1 ** 2)
    dof = se ** 4 / (se_v4 ** 4 / 3)
    half = stats.t.ppf(0.975, dof) * se
    c = checks["V4 ≥ B1 + 8 points"]
    assert c["dof"] == pytest.approx(dof) and c["interval"] == pytest.approx([0.0825 - half, 0.0825 + half])
    assert c["meets"] and not c["interval_meets"]  # +8.25 points, but B1's one evaluation leaves ±9.4

    # V5 - V4 paired by seed: differences 0.04, 0.03, 0.01, 0.04 -> SE 0.0141 / 2, 3 dof
    c = checks["V5 ≥ V4"]
    half = stats.t.ppf(0.975, 3) * stats.tstd([0.04, 0.03, 0.01, 0.04]) / 2
    assert c["interval"] == pytest.approx([0.03 - half, 0.03 + half]) and c["meets"] and c["interval_meets"]
    assert "paired over 4 seeds" in c["measured"]
    assert checks["V5 ≈ V6 within their intervals"]["meets"]
    c = checks["V5 ≥ 75%"]
    half = stats.t.ppf(0.975, 3) * stats.tstd(rates["V5"]) / 2
    assert c["interval"] == pytest.approx([0.4125 - half, 0.4125 + half]) and not c["meets"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| V4 ≥ B1 + 8 points | V4 − B1 = +8.2 pp |" in md and "seeds here: V4 4, V5 4, V6 4" in md


def test_targets_of_methods_not_run_are_left_out(tmp_path):
    for arch, seed, rate, trains in (("B1", 0, 0.44, False), ("V4", 0, 0.36, True)):
        d = tmp_path / arch / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(result(arch, seed, rate, trains)))
    checks = write_report([tmp_path], tmp_path / "report")["targets"]
    assert [c["target"] for c in checks] == ["V4 ≥ B1 + 8 points"]
    # two single evaluations: binomial SEs, the normal quantile, and the verdict on the point estimate
    assert checks[0]["dof"] is None and not checks[0]["meets"]
    se = math.hypot(math.sqrt(45 / 102 * 57 / 102 / 100), math.sqrt(37 / 102 * 65 / 102 / 100))
    assert checks[0]["interval"] == pytest.approx([-0.08 - 1.959964 * se, -0.08 + 1.959964 * se])


def test_handover_table_gives_shares_of_episodes_averaged_over_seeds(tmp_path):
    from coop_transport.sim.labels import HANDOVER_OUTCOMES

    counts = {  # per seed: episodes per outcome (a seed of 100 and one of 50 episodes: shares, not counts, average)
        ("V4", 0): {"handed_over": 40, "opened_partner_open": 30, "slipped": 10, "not_lifted": 20},
        ("V4", 1): {"handed_over": 30, "opened_partner_open": 10, "slipped": 5, "not_lifted": 5},
        ("V5", 0): {"handed_over": 50, "held_to_end": 50},
        ("V5", 1): None,  # evaluated before the monitor existed: V5 is left out
    }
    for (arch, seed), outcome_counts in counts.items():
        d = tmp_path / arch / f"seed_{seed}"
        d.mkdir(parents=True)
        r = result(arch, seed, 0.15)
        if outcome_counts is not None:
            r["handover_outcomes"] = {o: outcome_counts.get(o, 0) for o in HANDOVER_OUTCOMES}
        (d / "result.json").write_text(json.dumps(r))
    payload = write_report([tmp_path], tmp_path / "report")
    assert set(payload["handover"]) == {"V4"}
    v4 = payload["handover"]["V4"]
    assert v4["handed_over"] == pytest.approx((0.40 + 0.60) / 2)
    assert v4["opened_partner_open"] == pytest.approx((0.30 + 0.20) / 2)
    assert v4["slipped"] == pytest.approx(0.10) and v4["not_lifted"] == pytest.approx(0.15)
    assert sum(v4.values()) == pytest.approx(1.0)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## How robot0's hold of the lifted payload ended" in md
    assert "| V4 | 15% | 50% | 10% | 0% | 25% | 0% | 0% |" in md  # in HANDOVER_OUTCOMES' order


def test_gated_evaluations_are_methods_of_their_own_paired_with_the_ungated_ones(tmp_path):
    """Results of --mode eval --gate-margin M (result.json under <seed>/gate_M) are rows "V4 gate M" beside V4,
    paired by seed with the ungated evaluation and with each other, with the targets checked for them too."""
    rates = {"V4": [0.50, 0.54, 0.48, 0.52], "V5": [0.46, 0.50, 0.49, 0.55]}
    gated = {"V4": [0.60, 0.62, 0.55, 0.63], "V5": [0.58, 0.66, 0.55, 0.61]}
    for arch in rates:
        for seed in range(4):
            d = tmp_path / arch / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(result(arch, seed, rates[arch][seed])))
            (d / "gate_0").mkdir()
            (d / "gate_0" / "result.json").write_text(json.dumps(
                {**result(arch, seed, gated[arch][seed]), "gated": True, "config": {"arch": arch, "gate_margin": 0.0}}))
    (tmp_path / "B1" / "seed_0").mkdir(parents=True)
    (tmp_path / "B1" / "seed_0" / "result.json").write_text(json.dumps(result("B1", 0, 0.50, trains=False)))
    payload = write_report([tmp_path], tmp_path / "report")
    assert list(payload["table1"]) == ["B1", "V4", "V4 gate 0", "V5", "V5 gate 0"]
    assert payload["table1"]["V4 gate 0"]["mean"] == pytest.approx(0.60)
    assert set(payload["paired"]) == {"V5-V4", "V5 gate 0-V4 gate 0", "V4 gate 0-V4", "V5 gate 0-V5"}
    gain = payload["paired"]["V4 gate 0-V4"]
    assert gain["differences"] == pytest.approx([0.10, 0.08, 0.07, 0.11]) and gain["same_direction"]
    targets = [c["target"] for c in payload["targets"]]
    assert targets == ["V4 ≥ B1 + 8 points", "V5 ≥ V4", "V5 ≥ 75%",
                       "V4 gate 0 ≥ B1 + 8 points", "V5 gate 0 ≥ V4 gate 0", "V5 gate 0 ≥ 75%"]
    check = {c["target"]: c for c in payload["targets"]}["V4 gate 0 ≥ B1 + 8 points"]
    assert check["measured"] == "V4 gate 0 − B1 = +10.0 pp" and check["meets"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| V4 gate 0 - V4 | +9.00 pp | 4 |" in md and "| **V4 Per-arm residual RL, no message, critic gate 0** | 60.0% |" in md


def test_mcnemar_exact_hand_values():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # all 5 discordant pairs one way: 2 * 0.5^5
    assert mcnemar_exact(5, 1) == pytest.approx(2 * (1 + 6) / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_critics_choice_is_paired_with_its_plain_evaluation_by_reset_seed(tmp_path):
    """A best-of-K (or gated) method against its own plain evaluation, reset seed by reset seed, pooled over
    training seeds with the exact McNemar p; outcomes come from the result itself or, for results written before
    they recorded them, from their evaluation's summary.json (only when it counts the same successes)."""
    def outcomes(wins: set[int]) -> dict[str, bool]:
        return {str(k): k in wins for k in range(1, 11)}

    plain_wins = {0: {1, 2, 3, 4}, 1: {1, 2, 3, 4, 5}}
    chosen_wins = {0: {1, 2, 3, 4, 5, 6, 7}, 1: {2, 3, 4, 5, 6, 7, 8, 9}}  # seed 0: won 5-7; seed 1: won 6-9, lost 1
    for seed in range(2):
        d = tmp_path / "V4" / f"seed_{seed}"
        (d / "best_of_4").mkdir(parents=True)
        plain = {**result("V4", seed, len(plain_wins[seed]) / 10), "episodes": 10, "successes": len(plain_wins[seed])}
        chosen = {**result("V4", seed, len(chosen_wins[seed]) / 10), "episodes": 10,
                  "successes": len(chosen_wins[seed]), "evaluated_checkpoint": "checkpoints/chunk_003000",
                  "outcome_by_reset_seed": outcomes(chosen_wins[seed]), "config": {"arch": "V4", "candidates": 4}}
        if seed == 0:
            plain["outcome_by_reset_seed"] = outcomes(plain_wins[0])
        else:  # an older result: its outcomes only in eval/<best checkpoint>/summary.json
            (d / "eval" / "chunk_003000").mkdir(parents=True)
            per_seed = [{"seed": k, "success": k in plain_wins[1]} for k in range(1, 11)]
            (d / "eval" / "chunk_003000" / "summary.json").write_text(json.dumps(
                {"successes": 5, "episodes": 10, "per_seed": per_seed}))
        (d / "result.json").write_text(json.dumps(plain))
        (d / "best_of_4" / "result.json").write_text(json.dumps(chosen))
    payload = write_report([tmp_path], tmp_path / "report")
    pairs = payload["selection_vs_plain"]["V4 best-of-4"]
    assert pairs["against"] == "V4" and [(s["won"], s["lost"]) for s in pairs["per_seed"]] == [(3, 0), (4, 1)]
    assert (pairs["won"], pairs["lost"]) == (7, 1)
    assert pairs["p_mcnemar"] == pytest.approx(2 * (1 + 8) / 2 ** 8)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| V4 best-of-4 | V4 | 2 | 3/0, 4/1 | 7 | 1 | 0.070 |" in md

    # a summary that does not count the result's successes is not the result's evaluation: seed 1 is left out
    (tmp_path / "V4" / "seed_1" / "eval" / "chunk_003000" / "summary.json").write_text(json.dumps(
        {"successes": 6, "episodes": 10, "per_seed": []}))
    pairs = write_report([tmp_path], tmp_path / "report")["selection_vs_plain"]["V4 best-of-4"]
    assert [s["seed"] for s in pairs["per_seed"]] == [0] and (pairs["won"], pairs["lost"]) == (3, 0)


def test_a_probe_is_paired_with_the_unchanged_message_by_reset_seed(tmp_path):
    from coop_transport.residual.probes import against_none

    none = {"outcome_by_reset_seed": {"1": True, "2": True, "3": False, "4": False, "5": True}}
    zeros = {"outcome_by_reset_seed": {"1": True, "2": False, "3": True, "4": True, "5": False}}
    assert against_none(zeros, none) == {"episodes": 5, "won": 2, "lost": 2, "p_mcnemar": 1.0}
    assert against_none(none, zeros) == {"episodes": 5, "won": 2, "lost": 2, "p_mcnemar": 1.0}
    never = {"outcome_by_reset_seed": {k: False for k in none["outcome_by_reset_seed"]}}
    assert against_none(never, none) == {"episodes": 5, "won": 0, "lost": 3, "p_mcnemar": 0.25}
    probes = {"arch": "V5", "seed": 0, "interventions": {
        "none": {"success_rate": 0.6}, "zeros": {"success_rate": 0.0, "against_none": against_none(never, none)}},
        "linear_probe": {k: {"accuracy": 0.5, "chance": 0.5} for k in ("phase", "gripper", "ready")} | {
            "pose": {"r2": 0.1}}}
    d = tmp_path / "V5" / "seed_0"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result("V5", 0, 0.6)))
    (d / "probes.json").write_text(json.dumps(probes))
    write_report([tmp_path], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| V5 | 0 | zeros | 0.0% | 0 / 3, p = 0.250 |" in md and "| V5 | 0 | none | 60.0% | — |" in md
