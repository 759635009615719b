"""Demonstration files: generation (parallel, resumable, atomic), robomimic layout, reader, statistics, rendering.

Episodes are kept short (``--horizon``, ``--no-successful-only``) so that the whole module runs in about a minute on a
2-core machine; the expert is the real scripted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from coop_transport.constants import ARMS, PROPRIO_DIM, image_key
from coop_transport.data import hdf5_format as fmt
from coop_transport.data.dataset import ChunkDataset, DatasetError, NormStats, load_demonstrations, stats_from_dict
from coop_transport.data.generate import GenerateConfig, GenerationError, generate, paths, shard_path
from coop_transport.data.render_states import DEFAULT_CAMERAS, RenderConfig, render_file
from coop_transport.sim.frames import arm_proprio, base_to_world_delta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import demos as demos_cli  # noqa: E402

HORIZON = 12  # steps per test episode
IMAGE_SIZE = 32
FAST = dict(horizon=HORIZON, successful_only=False, progress=False)


@pytest.fixture(scope="module")
def lowdim_file(tmp_path_factory) -> Path:
    """Two episodes through the command line's ``main``, with two worker processes, no images."""
    out = tmp_path_factory.mktemp("lowdim") / "demos.hdf5"
    config = demos_cli.cli(["--out", str(out), "--episodes", "2", "--workers", "2", "--horizon", str(HORIZON),
                            "--no-successful-only", "--no-progress"])
    assert demos_cli.main(config) == out
    assert not paths(out)[0].exists() and not paths(out)[1].exists()  # shards and temporary file cleaned up
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """The same two episodes with three cameras rendered at generation time (one in-process worker)."""
    out = tmp_path_factory.mktemp("images") / "demos.hdf5"
    return generate(GenerateConfig(out=out, episodes=2, workers=1, images=True, image_size=IMAGE_SIZE, **FAST))


@pytest.fixture(scope="module")
def replay_sim():
    from coop_transport.sim import SimConfig, TransportSim

    s = TransportSim(SimConfig(horizon=HORIZON))
    yield s
    s.close()


# -------------------------------------------------------------------------------------------------- layout
def test_robomimic_layout(lowdim_file):
    with h5py.File(lowdim_file, "r") as f:
        assert set(f.keys()) == {"data", "mask"}
        data = f["data"]
        assert fmt.sorted_demo_names(data.keys()) == ["demo_0", "demo_1"]
        env_meta = json.loads(data.attrs["env_args"])
        assert env_meta["env_name"] == "TwoArmTransport" and env_meta["type"] == 1
        assert env_meta["env_version"].startswith("1.5")
        kwargs = env_meta["env_kwargs"]
        assert kwargs["robots"] == ["Panda", "Panda"] and kwargs["env_configuration"] == "opposed"
        assert kwargs["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
        meta = json.loads(data.attrs["coop_transport"])
        assert meta["action_frame"] == "base" and meta["image_convention"] == "opencv"
        total = 0
        for i, name in enumerate(["demo_0", "demo_1"]):
            g = data[name]
            T = int(g.attrs["num_samples"])
            total += T
            assert T == HORIZON
            assert g.attrs["seed"] == fmt.demo_seed(i) == 1000 + i and g.attrs["seed"] not in fmt.EVAL_SEEDS
            assert "<mujoco" in g.attrs["model_file"]
            assert g["actions"].shape == (T, 14) and g["actions"].dtype == np.float64
            assert g["states"].shape == (T, 115) and g["states"].dtype == np.float64
            assert g["rewards"].shape == (T,) and g["dones"].shape == (T,)
            assert g["dones"][-1] == 1 and not g["dones"][:-1].any()  # horizon reached
            assert np.abs(g["actions"][()]).max() <= 1.0
            for key, dim in [("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2),
                             ("robot0_joint_pos", 7), ("robot1_joint_pos", 7), ("object", 41)]:
                assert g["obs"][key].shape == (T, dim), key
                assert g["next_obs"][key].shape == (T, dim), key
            np.testing.assert_array_equal(g["next_obs/robot0_eef_pos"][:-1], g["obs/robot0_eef_pos"][1:])
            assert g.attrs["final_state"].shape == (115,)
            assert not any(k.endswith("_image") for k in g["obs"])
            layout = json.loads(data.attrs["coop_transport"])["object_layout"]
            assert layout[0] == ["payload_pos", 0, 3] and layout[-1][2] == 41
            for k in ("robot0_phase", "robot1_phase", "robot0_gripper_closed", "robot1_ready"):
                assert g["labels"][k].shape == (T,)
            assert g["labels/robot0_pose"].shape == (T, 6)
            assert set(np.unique(g["labels/robot0_phase"][()])) <= set(range(5))
        assert data.attrs["total"] == total
        train = [n.decode() for n in f["mask/train"][()]]
        valid = [n.decode() for n in f["mask/valid"][()]]
        assert f["mask/train"].dtype.kind == "S"
        assert sorted(train + valid) == ["demo_0", "demo_1"] and len(valid) == 1


def test_split_is_seeded_and_90_10():
    names = [fmt.demo_name(i) for i in range(200)]
    train, valid = fmt.train_valid_split(names)
    assert len(train) == 180 and len(valid) == 20 and not set(train) & set(valid)
    assert fmt.train_valid_split(names) == (train, valid)
    assert fmt.demo_seed(199) == 1199 and fmt.demo_seed(0, attempt=1) == 101000


# -------------------------------------------------------------------------------------------------- reader
def test_reader_trajectories_and_stats(lowdim_file):
    with load_demonstrations(lowdim_file) as demos, h5py.File(lowdim_file, "r") as f:
        assert demos.source == "coop_transport" and demos.action_frame == "base" and not demos.flip_images
        arms = demos.arm_trajectories()
        assert len(arms) == 4 and [a.arm for a in arms] == ["robot0", "robot1"] * 2
        joint = demos.joint_trajectories()
        assert len(joint) == 2
        g = f["data/demo_1"]
        a1 = arms[3]
        assert a1.demo == "demo_1" and a1.actions.shape == (HORIZON, 7) and a1.proprio.shape == (HORIZON, PROPRIO_DIM)
        np.testing.assert_allclose(a1.actions, g["actions"][:, 7:], atol=1e-7)
        expected = arm_proprio("robot1", g["obs/robot1_eef_pos"][()], g["obs/robot1_eef_quat"][()],
                               g["obs/robot1_gripper_qpos"][()], g["obs/robot1_joint_pos"][()])
        np.testing.assert_array_equal(a1.proprio, expected)
        assert a1.wrist_image is None and a1.agentview_image is None
        assert set(a1.labels) == {"phase", "gripper_closed", "ready", "pose"}
        np.testing.assert_array_equal(a1.labels["phase"], g["labels/robot1_phase"][()])
        j1 = joint[1]
        assert j1.actions.shape == (HORIZON, 14) and j1.proprio.shape == (HORIZON, 2 * PROPRIO_DIM)
        np.testing.assert_array_equal(j1.proprio[:, PROPRIO_DIM:], a1.proprio)

        # Statistics over the train split, per arm (both arms pooled) and joint, against numpy.
        train = demos.demo_names("train")
        assert len(train) == 1
        arm_stats = demos.norm_stats("arm")
        rows = np.concatenate([a.actions for a in arms if a.demo in train])
        assert rows.shape == (2 * HORIZON, 7) and arm_stats["actions"].count == 2 * HORIZON
        np.testing.assert_allclose(arm_stats["actions"].mean, rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arm_stats["actions"].std, rows.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arm_stats["actions"].q01, np.quantile(rows, 0.01, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arm_stats["actions"].q99, np.quantile(rows, 0.99, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arm_stats["actions"].max, rows.max(0))
        assert arm_stats["proprio"].mean.shape == (PROPRIO_DIM,)
        joint_stats = demos.norm_stats("joint")
        assert joint_stats["actions"].mean.shape == (14,) and joint_stats["proprio"].mean.shape == (36,)
        restored = stats_from_dict(json.loads(json.dumps({k: v.to_dict() for k, v in joint_stats.items()})))
        np.testing.assert_array_equal(restored["proprio"].q99, joint_stats["proprio"].q99)
        s = arm_stats["actions"]
        x = rows[:5]
        np.testing.assert_allclose(s.unnormalize(s.normalize(x)), x, atol=1e-5)
        np.testing.assert_allclose(s.unnormalize(s.normalize(x, "meanstd"), "meanstd"), x, atol=1e-5)


def test_expert_labels_are_the_noise_free_actions(lowdim_file, tmp_path):
    """``expert_actions`` are the expert's actions without its exploration noise: they differ from the executed
    ``actions`` by the noise on the six pose components only (std ``ExpertConfig.noise``, gripper identical), the
    reader serves either, and a file without them (robomimic's) refuses ``expert`` and falls back under ``auto``."""
    from coop_transport.sim.expert import ExpertConfig

    with h5py.File(lowdim_file, "r") as f:
        g = f["data/demo_0"]
        executed, expert = g["actions"][()], g["expert_actions"][()]
    assert expert.shape == executed.shape
    noise = (executed - expert).reshape(-1, 2, 7)
    np.testing.assert_array_equal(noise[:, :, 6], 0.0)  # the gripper command carries no noise
    unclipped = np.abs(executed.reshape(-1, 2, 7)[:, :, :6]) < 1.0
    spread = noise[:, :, :6][unclipped].std()
    assert 0.5 * ExpertConfig().noise < spread < 1.5 * ExpertConfig().noise, spread

    with load_demonstrations(lowdim_file, action_labels="expert") as demos:
        assert demos.action_labels == "expert"
        np.testing.assert_allclose(demos.arm_trajectories()[1].actions, expert[:, 7:], atol=1e-7)
    with load_demonstrations(lowdim_file, action_labels="auto") as demos:
        assert demos.action_labels == "expert"
    with load_demonstrations(lowdim_file) as demos:  # the default: what ran (RL transitions, replay)
        assert demos.action_labels == "executed"
        np.testing.assert_allclose(demos.arm_trajectories()[1].actions, executed[:, 7:], atol=1e-7)

    stripped = _copy(lowdim_file, tmp_path / "no_labels.hdf5")
    with h5py.File(stripped, "a") as f:
        for name in f["data"]:
            del f["data"][name]["expert_actions"]
    with pytest.raises(DatasetError, match="expert_actions"):
        load_demonstrations(stripped, action_labels="expert")
    with load_demonstrations(stripped, action_labels="auto") as demos:
        assert demos.action_labels == "executed"
    broken = _copy(lowdim_file, tmp_path / "nan_labels.hdf5")
    with h5py.File(broken, "a") as f:
        f["data/demo_1/expert_actions"][3, 2] = np.nan
    with pytest.raises(DatasetError, match="expert_actions contains NaN"):
        load_demonstrations(broken)


def test_chunk_dataset_pads_with_last_action(lowdim_file):
    with load_demonstrations(lowdim_file) as demos:
        arms = demos.arm_trajectories()
        ds = ChunkDataset(arms, horizon=5)
        assert len(ds) == 4 * HORIZON
        item = ds[HORIZON - 2]  # trajectory 0, two steps before its end
        assert item["actions"].shape == (5, 7) and item["proprio"].shape == (PROPRIO_DIM,)
        np.testing.assert_array_equal(item["action_is_pad"], [False, False, True, True, True])
        np.testing.assert_array_equal(item["actions"][:2], arms[0].actions[-2:])
        np.testing.assert_array_equal(item["actions"][2:], np.repeat(arms[0].actions[-1:], 3, 0))
        assert int(item["traj"]) == 0 and int(item["t"]) == HORIZON - 2 and "labels/phase" in item


def test_replay_reproduces_states(lowdim_file, replay_sim):
    """Stored actions replayed from the stored initial state reproduce every stored state bit for bit (robomimic's
    ``reset_to`` + step), and replayed from the seeded reset, every stored observation (``object`` is robosuite's
    ``object-state``)."""
    with h5py.File(lowdim_file, "r") as f:
        for name in ("demo_0", "demo_1"):
            g = f["data"][name]
            states, actions = g["states"][()], g["actions"][()]
            after = np.concatenate([states[1:], g.attrs["final_state"][None]])
            sim = replay_sim
            sim.reset(int(g.attrs["seed"]))
            sim.set_state(states[0])
            replayed = []
            for a in actions:
                sim.step(a)
                replayed.append(sim.get_state())
            np.testing.assert_array_equal(np.stack(replayed), after)

            sim.reset(int(g.attrs["seed"]))
            np.testing.assert_array_equal(sim.get_state(), states[0])  # the seeded reset gives the stored scene
            for t, a in enumerate(actions):
                obs, *_ = sim.step(a)
                np.testing.assert_array_equal(sim.get_state(), after[t])
                np.testing.assert_array_equal(sim.rs_env._get_observations()["object-state"], g["next_obs/object"][t])
                np.testing.assert_array_equal(obs["robot1_joint_pos"], g["next_obs/robot1_joint_pos"][t])


# ------------------------------------------------------------------------------------------ broken files
def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def test_corrupt_and_foreign_files_raise_clear_errors(lowdim_file, tmp_path):
    raw = lowdim_file.read_bytes()
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="truncated"):
        load_demonstrations(truncated)

    noise = tmp_path / "noise.hdf5"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DatasetError, match="not an HDF5 file"):
        load_demonstrations(noise)

    with pytest.raises(DatasetError, match="no such file"):
        load_demonstrations(tmp_path / "missing.hdf5")

    no_data = tmp_path / "no_data.hdf5"
    with h5py.File(no_data, "w") as f:
        f.create_group("episodes")
    with pytest.raises(DatasetError, match="no 'data' group"):
        load_demonstrations(no_data)

    foreign = _copy(lowdim_file, tmp_path / "foreign.hdf5")
    with h5py.File(foreign, "r+") as f:
        meta = json.loads(f["data"].attrs["env_args"])
        meta["env_name"] = "Lift"
        f["data"].attrs["env_args"] = json.dumps(meta)
    with pytest.raises(DatasetError, match="foreign file: env_name is 'Lift'"):
        load_demonstrations(foreign)

    nan = _copy(lowdim_file, tmp_path / "nan.hdf5")
    with h5py.File(nan, "r+") as f:
        f["data/demo_1/actions"][4, 2] = np.nan
    with pytest.raises(DatasetError, match=r"demo_1/actions contains NaN.*step 4, dimension 2"):
        load_demonstrations(nan)

    short = _copy(lowdim_file, tmp_path / "short.hdf5")
    with h5py.File(short, "r+") as f:
        obs = f["data/demo_0/obs"]
        value = obs["robot0_eef_pos"][:-1]
        del obs["robot0_eef_pos"]
        obs["robot0_eef_pos"] = value
    with pytest.raises(DatasetError, match="obs/robot0_eef_pos has 11 steps, actions have 12"):
        load_demonstrations(short)

    no_actions = _copy(lowdim_file, tmp_path / "no_actions.hdf5")
    with h5py.File(no_actions, "r+") as f:
        del f["data/demo_0/actions"]
    with pytest.raises(DatasetError, match="demo_0 has no 'actions'"):
        load_demonstrations(no_actions)


def test_robomimic_convention_conversion(image_file, tmp_path):
    """A robomimic-style file (robosuite 1.2: world-frame actions, upside-down images) reads like ours."""
    with load_demonstrations(image_file) as ours:
        ref = ours.joint_trajectories(images="memory")
    theirs = _copy(image_file, tmp_path / "robomimic_style.hdf5")
    with h5py.File(theirs, "r+") as f:
        data = f["data"]
        del data.attrs["coop_transport"]
        meta = json.loads(data.attrs["env_args"])
        meta["env_version"] = "1.2.0"
        data.attrs["env_args"] = json.dumps(meta)
        for name in fmt.sorted_demo_names(data.keys()):
            g = data[name]
            a = g["actions"][()]
            for i, arm in enumerate(ARMS):
                for sl in (slice(7 * i, 7 * i + 3), slice(7 * i + 3, 7 * i + 6)):
                    a[:, sl] = base_to_world_delta(arm, a[:, sl])
            g["actions"][...] = a
            for key in [k for k in g["obs"] if k.endswith("_image")]:
                g["obs"][key][...] = g["obs"][key][()][:, ::-1]
    with load_demonstrations(theirs) as rm:
        assert rm.source == "robomimic" and rm.action_frame == "world" and rm.flip_images
        conv = rm.joint_trajectories()
        for r, c in zip(ref, conv):
            np.testing.assert_allclose(c.actions, r.actions, atol=1e-6)
            for key, frames in r.images.items():
                np.testing.assert_array_equal(c.images[key][:], frames)
                np.testing.assert_array_equal(c.images[key][3], frames[3])
    with load_demonstrations(theirs, action_frame="base", flip_images=False) as raw:
        assert raw.action_frame == "base" and not raw.flip_images


# --------------------------------------------------------------------------------------------------- images
def test_images_at_generation_and_from_states_are_identical(lowdim_file, image_file, tmp_path):
    with h5py.File(image_file, "r") as f:
        g = f["data/demo_0"]
        for camera in DEFAULT_CAMERAS:
            ds = g["obs"][image_key(camera)]
            assert ds.shape == (HORIZON, IMAGE_SIZE, IMAGE_SIZE, 3) and ds.dtype == np.uint8
            assert ds.chunks == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and ds.compression == "gzip"
            assert ds[0].std() > 1.0  # not a blank frame
        assert json.loads(f["data"].attrs["env_args"])["env_kwargs"]["camera_names"] == list(DEFAULT_CAMERAS)

    rendered = render_file(RenderConfig(in_=lowdim_file, out=tmp_path / "rendered.hdf5", image_size=IMAGE_SIZE,
                                        progress=False))
    assert not (tmp_path / "rendered.hdf5.tmp").exists()
    with h5py.File(rendered, "r") as r, h5py.File(image_file, "r") as g:
        for name in ("demo_0", "demo_1"):
            # Separate generation runs (two worker processes vs in-process) recorded the same physics ...
            np.testing.assert_array_equal(r[f"data/{name}/states"][()], g[f"data/{name}/states"][()])
            for camera in DEFAULT_CAMERAS:  # ... and images rendered later from the states match exactly.
                key = f"data/{name}/obs/{image_key(camera)}"
                np.testing.assert_array_equal(r[key][()], g[key][()])
        meta = json.loads(r["data"].attrs["coop_transport"])
        assert meta["images"] and meta["image_size"] == IMAGE_SIZE and "rendered_from_states" in meta
    with pytest.raises(FileExistsError, match="already holds"):
        render_file(RenderConfig(in_=rendered, image_size=IMAGE_SIZE, progress=False))

    with load_demonstrations(rendered) as demos:
        arms = demos.arm_trajectories()
        assert arms[1].wrist_image.shape == (HORIZON, IMAGE_SIZE, IMAGE_SIZE, 3)
        item = ChunkDataset(arms, horizon=4)[1]
        assert item["wrist_image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and item["agentview_image"].dtype == np.uint8


# ------------------------------------------------------------------------------------ resume and atomicity
def test_resume_reuses_shards_and_refuses_other_settings(tmp_path):
    out = tmp_path / "resume.hdf5"
    partial = paths(out)[0]
    generate(GenerateConfig(out=out, episodes=1, workers=1, keep_shards=True, **FAST))
    out.unlink()  # as if the run had been interrupted before the merge: one finished shard, no output file
    (partial / "demo_000001.hdf5.tmp").write_bytes(b"half-written shard of a killed worker")
    shard0 = shard_path(partial, 0)
    before = shard0.stat()

    with pytest.raises(GenerationError, match="other settings.*horizon: shard 12 vs now 11"):
        generate(GenerateConfig(out=out, episodes=2, workers=1, **{**FAST, "horizon": HORIZON - 1}))
    assert not out.exists()

    generate(GenerateConfig(out=out, episodes=2, workers=1, keep_shards=True, **FAST))
    after = shard0.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not regenerated
    assert not (partial / "demo_000001.hdf5.tmp").exists()
    with load_demonstrations(out) as demos:
        assert demos.demos == ("demo_0", "demo_1")

    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(GenerateConfig(out=out, episodes=2, workers=1, **FAST))


def test_expert_failures_are_retried_then_reported(tmp_path):
    out = tmp_path / "fail.hdf5"
    config = GenerateConfig(out=out, episodes=1, workers=1, horizon=3, max_attempts=2, progress=False)
    with pytest.raises(GenerationError, match=r"failed on all 2 seeds of demos \[0\]"):
        generate(config)
    assert not out.exists()


def test_the_first_demonstrations_hand_over_rule_can_be_regenerated(tmp_path):
    """--expert-handover planned regenerates the shipped default's demonstrations; it is part of the fingerprint."""
    import json

    import h5py

    out = tmp_path / "planned.hdf5"
    generate(GenerateConfig(out=out, episodes=1, workers=1, expert_handover="planned", keep_shards=True, **FAST))
    with h5py.File(out, "r") as f:
        assert json.loads(f["data"].attrs["coop_transport"])["fingerprint"]["expert_config"]["handover"] == "planned"
    out.unlink()
    with pytest.raises(GenerationError, match="other settings.*expert_config"):
        generate(GenerateConfig(out=out, episodes=1, workers=1, **FAST))  # the shard was made with the other rule
    with pytest.raises(ValueError, match="expert_handover"):
        GenerateConfig(expert_handover="planned", runner="my_module:run")
    with pytest.raises(ValueError, match="expert_handover_hold_steps"):
        GenerateConfig(expert_handover_hold_steps=15, runner="my_module:run")


def test_config_validation_names_bad_values():
    with pytest.raises(ValueError, match="episodes=0"):
        GenerateConfig(episodes=0)
    with pytest.raises(ValueError, match="image_size must be within"):
        RenderConfig(image_size=4)


def test_killed_run_leaves_no_output_and_resumes(tmp_path):
    """SIGTERM during generation (the command line in a subprocess) leaves no output; rerunning resumes."""
    out = tmp_path / "killed.hdf5"
    partial = paths(out)[0]
    cmd = [sys.executable, str(ROOT / "training" / "demos.py"), "--out", str(out), "--episodes", "3", "--workers",
           "1", "--horizon", "25", "--no-successful-only", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(partial.glob("demo_*.hdf5")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and not out.exists()
    done = sorted(p.name for p in partial.glob("demo_*.hdf5"))
    assert 1 <= len(done) < 3
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    with load_demonstrations(out) as demos:
        assert len(demos) == 3 and demos.summary.total == 3 * 25
    assert not partial.exists()


def test_lock_refuses_a_concurrent_run(tmp_path):
    out = tmp_path / "locked.hdf5"
    partial = paths(out)[0]
    partial.mkdir()
    (partial / "LOCK").write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(GenerationError, match="another generator"):
        generate(GenerateConfig(out=out, episodes=1, workers=1, **FAST))
    (partial / "LOCK").write_text("999999999")  # stale lock of a killed run: taken over
    generate(GenerateConfig(out=out, episodes=1, workers=1, **FAST))
    assert out.exists()


def test_norm_stats_validation():
    with pytest.raises(ValueError, match="lack"):
        NormStats.from_dict({"mean": [0.0]})
    with pytest.raises(ValueError, match="non-empty"):
        NormStats.compute(np.zeros((0, 3)))
