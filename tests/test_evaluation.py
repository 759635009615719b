"""The evaluation harness with the scripted expert: summaries, per-seed outcomes, videos, bad controller names."""

import json

import imageio.v2 as imageio
import pytest

from coop_transport.evaluation import ControllerSpec, EvalConfig, build_controller, evaluate


def test_evaluate_writes_summaries_and_videos(tmp_path):
    spec = ControllerSpec("expert", {"cameras": True, "image_size": 32})
    summary = evaluate(spec, EvalConfig(episodes=2, first_seed=5, workers=1, videos=1, horizon=4, video_size=64),
                       tmp_path, progress=False)
    assert [r["seed"] for r in summary["per_seed"]] == [5, 6]
    assert summary["successes"] == 0 and summary["wilson95"][0] == 0.0  # 4 steps cannot solve the task
    assert json.loads((tmp_path / "summary.json").read_text())["episodes"] == 2
    assert "| 5 | no | 4 | — | not_lifted |" in (tmp_path / "summary.md").read_text()  # no milestone in 4 steps
    assert summary["per_seed"][0]["milestones"] == [] and summary["mean_milestones"] == 0
    assert summary["per_seed"][0]["handover"] == {"outcome": "not_lifted"}
    video = imageio.get_reader(tmp_path / "videos" / "seed_0005.mp4")
    frame = video.get_data(0)
    assert frame.shape == (64, 64 + 32, 3)  # front view beside the two 32 px wrist views stacked
    assert video.count_frames() == 5  # the reset frame and one per step
    assert not (tmp_path / "videos" / "seed_0006.mp4").exists()


def test_unknown_controller_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown controller kind 'expret'"):
        build_controller(ControllerSpec("expret"))


def test_missing_video_encoder_skips_videos_instead_of_losing_the_evaluation(tmp_path, monkeypatch, capsys):
    import coop_transport.utils.video as video

    monkeypatch.setattr(video, "mp4_writer_available", lambda: "no ffmpeg for imageio (test)")
    spec = ControllerSpec("expert")
    summary = evaluate(spec, EvalConfig(episodes=1, first_seed=5, workers=1, videos=1, horizon=3), tmp_path,
                       progress=False)
    assert summary["episodes"] == 1 and (tmp_path / "summary.json").exists()
    assert not (tmp_path / "videos").exists()
    assert "evaluating without videos" in capsys.readouterr().out


def test_stage_funnel_records_every_milestone_of_a_solved_episode(tmp_path):
    from coop_transport.sim.labels import MILESTONES

    summary = evaluate(ControllerSpec("expert"), EvalConfig(episodes=1, first_seed=1, workers=1, horizon=500),
                       tmp_path, progress=False)
    assert summary["successes"] == 1
    assert summary["per_seed"][0]["milestones"] == list(MILESTONES)  # in task order
    assert summary["milestone_rates"] == {m: 1.0 for m in MILESTONES} and summary["mean_milestones"] == len(MILESTONES)
    assert summary["per_seed"][0]["handover"]["outcome"] == "handed_over"  # robot1 held it when robot0 let go
    assert summary["handover_outcomes"]["handed_over"] == 1 and sum(summary["handover_outcomes"].values()) == 1
    text = (tmp_path / "summary.md").read_text()
    assert "| 1 | yes |" in text and text.rstrip().endswith("| payload_in_target_bin | handed_over |")
    assert "| handed_over | 1 |" in text


def test_a_killed_evaluation_resumes_with_the_seeds_left(tmp_path, monkeypatch):
    import coop_transport.evaluation as evaluation

    spec, config = ControllerSpec("expert"), EvalConfig(episodes=3, first_seed=5, workers=1, horizon=3)
    first = evaluate(spec, config, tmp_path, progress=False)
    log = tmp_path / evaluation.EPISODE_LOG
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    # As if killed during the third episode's line: two whole lines and a torn one, no summary.
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    (tmp_path / "summary.json").unlink()
    ran = []
    run = evaluation._worker_run
    monkeypatch.setattr(evaluation, "_worker_run", lambda job: ran.append(job[0]) or run(job))
    resumed = evaluate(spec, config, tmp_path, progress=False, resume=True)
    assert ran == [7]  # only the seed that had not finished
    assert [r["seed"] for r in resumed["per_seed"]] == [5, 6, 7] and resumed["resumed_episodes"] == 2
    assert resumed["per_seed"][:2] == first["per_seed"][:2]  # the logged results, not new ones
    assert "| resumed | 2 of the 3 episodes came from an earlier call; counted over the other 1 alone: wall time |" \
        in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["episodes"] == 3
    # A log of another evaluation (another horizon) is refused, not mixed in.
    with pytest.raises(ValueError, match="another evaluation"):
        evaluate(spec, EvalConfig(episodes=3, first_seed=5, workers=1, horizon=4), tmp_path, progress=False,
                 resume=True)
    # Without resume a rerun is a new measurement: every seed runs again.
    ran.clear()
    evaluate(spec, config, tmp_path, progress=False)
    assert ran == [5, 6, 7] and len((tmp_path / evaluation.EPISODE_LOG).read_text().splitlines()) == 3


def test_rollout_command_fixes_the_noise_on_request_and_refuses_it_for_the_expert(tmp_path, capsys):
    """training/rollout.py (the README's main job) with --noise-seed: a short episode of the shipped default and
    its video; the option is refused where there is no flow noise."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import rollout

    result = rollout.main(rollout.Config(horizon=3, noise_seed=0, video=tmp_path / "pi0.mp4"))
    assert result["length"] == 3 and (tmp_path / "pi0.mp4").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "FAILURE after 3 steps" in printed and "hand-over: not_lifted" in printed  # what ended the episode
    with pytest.raises(ValueError, match="noise-seed"):
        rollout.main(rollout.Config(controller="expert", noise_seed=0, video=tmp_path / "expert.mp4"))
