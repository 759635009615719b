"""The policy server with the shipped default, driven by openpi's own client (openpi-client from PyPI): a closed-loop
episode whose chunks match in-process inference for the same observations and noise; malformed requests answered
with errors that name the problem while a well-formed client keeps being served; the API key; evaluation through
the server matching in-process evaluation."""

import threading
import time

import numpy as np
import pytest
import torch
import websockets
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from coop_transport.serving.server import ServerProcess

MAX_MESSAGE = 2 ** 20
EPISODE_STEPS = 20
SEED = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc = ServerProcess(("--threads", "1", "--max-message-bytes", str(MAX_MESSAGE)), log_path=log).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def policy():
    from coop_transport.pi0_policy import Pi0Policy

    torch.set_num_threads(1)
    return Pi0Policy.load()


def _observation(arm_obs: dict, arm: str, history_steps: int) -> dict:
    """openpi-style request keys of an ``arm_observation``, with the latest ``history_steps`` states."""
    return {"observation/wrist_image": arm_obs["wrist_image"],
            "observation/agentview_image": arm_obs["agentview_image"], "observation/state": arm_obs["proprio"],
            "observation/state_history": arm_obs["proprio_history"][:history_steps], "arm": arm}


def _good_observation(size: int = 96) -> dict:
    """A request the shipped default accepts: it sees earlier states, so the latest three (a short history, as at an
    episode's start) come with it."""
    rng = np.random.default_rng(0)
    state = rng.standard_normal(18).astype(np.float32)
    return {"observation/wrist_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "observation/agentview_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "observation/state": state, "observation/state_history": np.stack([state, state + 0.01, state + 0.02]),
            "arm": "robot1"}


@pytest.mark.slow
def test_openpi_client_closed_loop_episode_matches_in_process_inference(server, policy):
    from coop_transport.constants import ARMS
    from coop_transport.export.runtime import EpisodeNoise
    from coop_transport.recipe import ChunkedActor, RecipeConfig
    from coop_transport.sim import SimConfig, TransportSim
    from coop_transport.sim.env import join_actions

    client = WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["variant"] == "per-arm" and meta["image_size"] == policy.image_size == 96
    assert meta["horizon"] == policy.horizon and meta["arms"] == list(ARMS)
    assert set(meta["observation_keys"]) == {"observation/wrist_image", "observation/agentview_image",
                                             "observation/state", "observation/state_history", "arm"}
    assert meta["state_history_steps"] == policy.state_history.span + 1 == 16
    np.testing.assert_array_equal(np.float32(meta["action_mean"]), policy.action_mean)

    # openpi's plain request: one (H, D) chunk, with the server's timing
    plain = client.infer(_good_observation())
    assert plain["actions"].shape == (policy.horizon, 7) and plain["actions"].dtype == np.float32
    assert {"infer_ms", "queue_ms", "decode_ms", "batch_size"} <= set(plain["server_timing"])

    recipe = RecipeConfig.per_arm().with_(execute_steps=5)  # 4 plans per arm in 20 steps
    noise = EpisodeNoise(11)
    noise.reset(SEED)
    diffs = []

    def served_sampler(arm):
        def sample(arm_obs, n):
            draw = noise((n, policy.horizon, meta["action_pad_dim"]))
            request = _observation(arm_obs, arm, meta["state_history_steps"])
            served = client.infer({**request, "num_samples": n, "noise": draw})["actions"]
            local = policy.sample_arm(arm_obs, arm, n, noise=torch.from_numpy(draw))
            assert served.shape == local.shape == (n, policy.horizon, 7)
            diffs.append(float(np.abs(served - local).max()))
            return served
        return sample

    actors = {arm: ChunkedActor(served_sampler(arm), recipe, policy.action_mean, policy.action_std) for arm in ARMS}
    with TransportSim(SimConfig(wrist_cameras=True, agentview=True, image_size=96, horizon=EPISODE_STEPS)) as sim:
        sim.reset(SEED)
        steps, done = 0, False
        start = sim.arm_observation("robot0")["proprio"].copy()
        while not done:
            action = join_actions({arm: actor.act(sim.arm_observation(arm)) for arm, actor in actors.items()})
            _, _, done, _ = sim.step(action)
            steps += 1
        moved = np.linalg.norm(sim.arm_observation("robot0")["proprio"][:3] - start[:3])
    assert steps == EPISODE_STEPS and len(diffs) == 2 * EPISODE_STEPS // recipe.execute_steps
    assert max(diffs) < 1e-5, f"served vs in-process chunks differ by up to {max(diffs)}"
    assert moved > 1e-3, "the served policy moved the arm"


def test_malformed_requests_get_named_errors_while_a_good_client_is_served(server):
    good = WebsocketClientPolicy("127.0.0.1", server.port)
    served, failures, stop = [], [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            try:
                served.append(good.infer({**_good_observation(), "num_samples": 2})["actions"].shape)
            except Exception as err:  # any error here fails the test below
                failures.append(repr(err))
                return

    thread = threading.Thread(target=keep_asking, daemon=True)
    thread.start()
    bad = WebsocketClientPolicy("127.0.0.1", server.port)
    obs = _good_observation()
    state_nan = obs["observation/state"].copy()
    state_nan[4] = np.nan
    cases = [
        ({**obs, "gripper_camera": np.zeros(3)}, r"unknown keys \['gripper_camera'\]"),
        ({k: v for k, v in obs.items() if k != "observation/state"}, r"missing keys \['observation/state'\]"),
        ({**obs, "observation/wrist_image": np.zeros((64, 64, 3), np.uint8)},
         r"observation/wrist_image has shape \(64, 64, 3\), expected \(96, 96, 3\)"),
        ({**obs, "observation/agentview_image": obs["observation/agentview_image"].astype(np.float32)},
         "observation/agentview_image has dtype float32, expected uint8"),
        ({**obs, "observation/state": obs["observation/state"].astype(np.int64)},
         "observation/state has dtype int64, expected float32 or float64"),
        ({**obs, "observation/state": state_nan}, "observation/state contains NaN or inf"),
        ({k: v for k, v in obs.items() if k != "observation/state_history"},
         r"missing keys \['observation/state_history'\]"),
        ({**obs, "observation/state_history": obs["observation/state_history"][1:]},
         "observation/state_history's first row must be the current observation/state"),
        ({**obs, "observation/state_history": np.zeros((17, 18), np.float32)},
         r"observation/state_history must be \(L, 18\) with 1 <= L <= 16"),
        ({**obs, "arm": "robot2"}, r"arm must be one of \['robot0', 'robot1'\], got 'robot2'"),
        ({**obs, "num_samples": 1000}, r"num_samples must be in \[1, 16\], got 1000"),
        ({**obs, "num_samples": 2, "noise": np.zeros((1, 32, 32), np.float32)},
         r"noise has shape \(1, 32, 32\), expected \(2, 32, 32\)"),
        ([1, 2, 3], "a request must be a map"),
    ]
    for request, error in cases:
        with pytest.raises(RuntimeError, match=error):
            bad.infer(request)
    assert bad.infer(obs)["actions"].shape == (32, 7), "the connection stays usable after bad requests"

    # Too large: the server closes that connection (1009, message too big) before reading it; others go on.
    oversized = {**obs, "observation/wrist_image": np.zeros((1024, 1024, 3), np.uint8)}  # 3 MB > 1 MB
    with pytest.raises(websockets.ConnectionClosedError, match="1009|too big"):
        bad.infer(oversized)
    before = len(served)
    time.sleep(1.0)
    assert len(served) > before, "the good client is still being served"
    stop.set()
    thread.join(timeout=10)
    assert not failures, failures
    assert served and all(shape == (2, 32, 7) for shape in served)
    assert WebsocketClientPolicy("127.0.0.1", server.port).infer(obs)["actions"].shape == (32, 7)


def test_api_key_and_concurrent_batching(policy):
    """A server with a key refuses clients without it; concurrent clients share model calls."""
    from coop_transport.serving.server import PolicyRunner, PolicyServer, ServerConfig

    server = PolicyServer(PolicyRunner(policy), ServerConfig(port=0, api_key="s3cret")).start()
    try:
        with pytest.raises(websockets.InvalidStatus, match="401"):
            WebsocketClientPolicy("127.0.0.1", server.port)
        with pytest.raises(websockets.InvalidStatus, match="401"):
            WebsocketClientPolicy("127.0.0.1", server.port, api_key="wrong")
        clients = [WebsocketClientPolicy("127.0.0.1", server.port, api_key="s3cret") for _ in range(4)]
        sizes = []

        def ask(client):
            for _ in range(3):
                sizes.append(client.infer(_good_observation())["server_timing"]["batch_size"])

        threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(sizes) == 12 and max(sizes) > 1, f"batch sizes seen: {sizes}"
        assert server.stats.model_calls < 12
    finally:
        server.stop()


@pytest.mark.slow
def test_evaluation_through_the_server_matches_in_process(server, tmp_path):
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate

    config = EvalConfig(episodes=1, first_seed=SEED, workers=1, horizon=30)
    args = {"noise_seed": 5, "recipe": {"execute_steps": 5}}
    served = evaluate(ControllerSpec("pi0", {**args, "policy_server": server.address}), config, tmp_path / "served",
                      progress=False)
    local = evaluate(ControllerSpec("pi0", args), config, tmp_path / "local", progress=False)
    s, l = served["per_seed"][0], local["per_seed"][0]
    assert s["length"] == l["length"] == 30
    assert served["clip_activation_rate"] == local["clip_activation_rate"]
    assert s["stats"]["clip_per_dim"] == l["stats"]["clip_per_dim"]
    assert s["stats"]["chunks"] == l["stats"]["chunks"] == 12
    assert (tmp_path / "served" / "summary.md").exists()


def test_joint_policy_is_served_with_its_own_keys(tmp_path):
    """A joint (14-D, three cameras, 36-D state) policy: openpi's client with the joint keys and RemotePolicy's
    sample_joint (what the evaluator's joint controller calls) both match in-process sampling."""
    from coop_transport.pi0_policy import Pi0Policy
    from coop_transport.policy import build_model, get_config, save_checkpoint
    from coop_transport.serving.client import RemotePolicy
    from coop_transport.serving.server import PolicyRunner, PolicyServer, ServerConfig

    config = get_config("tiny", "joint")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = {"state": {"mean": rng.normal(size=config.state_dim), "std": rng.uniform(0.5, 2, config.state_dim)},
            "actions": {"mean": rng.normal(size=14) * 0.1, "std": rng.uniform(0.1, 1, 14)}}
    path = save_checkpoint(tmp_path / "joint", build_model(config).eval(), config, norm, step=1,
                           extra={"variant": "joint", "prompts": {"joint": "bins"}})
    policy = Pi0Policy.load(path, device="cpu")
    server = PolicyServer(PolicyRunner(policy), ServerConfig(port=0)).start()
    try:
        s, h, p = policy.image_size, policy.horizon, config.action_pad_dim
        images = {f"observation/{slot}_image": rng.integers(0, 255, (s, s, 3), dtype=np.uint8)
                  for slot in ("robot0_wrist", "robot1_wrist", "agentview")}
        state = rng.standard_normal(36).astype(np.float32)
        noise = rng.standard_normal((3, h, p)).astype(np.float32)
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["variant"] == "joint" and meta["action_dim"] == 14 and meta["arms"] == []
        assert set(meta["observation_keys"]) == {*images, "observation/state"}
        served = client.infer({**images, "observation/state": state, "num_samples": 3, "noise": noise})["actions"]
        batch = policy.make_batch([{k.split("/")[1][:-len("_image")]: v for k, v in images.items()}], [state],
                                  [policy.prompts["joint"]])
        local = policy.sample_batch(batch, 3, noise=torch.from_numpy(noise))[0]
        assert served.shape == (3, h, 14) and np.abs(served - local).max() < 1e-5
        with pytest.raises(RuntimeError, match=r"unknown keys \['arm'\]"):
            client.infer({**images, "observation/state": state, "arm": "robot0"})

        # RemotePolicy from a simulation-style observation (robosuite keys), noise drawn on the client
        obs = {"robot0_eye_in_hand_image": images["observation/robot0_wrist_image"],
               "robot1_eye_in_hand_image": images["observation/robot1_wrist_image"],
               "agentview_image": images["observation/agentview_image"]}
        for arm in ("robot0", "robot1"):
            obs.update({f"{arm}_eef_pos": rng.normal(size=3), f"{arm}_eef_quat": np.array([1.0, 0, 0, 0]),
                        f"{arm}_gripper_qpos": np.array([0.02, -0.02]), f"{arm}_joint_pos": rng.normal(size=7)})
        remote = RemotePolicy(f"127.0.0.1:{server.port}")
        np.testing.assert_allclose(remote.sample_joint(obs, 2, noise=noise[:2]),
                                   policy.sample_joint(obs, 2, noise=torch.from_numpy(noise[:2])), atol=1e-5)
        with pytest.raises(ValueError, match="needs a per-arm policy"):
            remote.sample_arm({}, "robot0")
        remote.close()
    finally:
        server.stop()


def test_residual_v5_policy_is_served_with_its_message(tmp_path):
    """A per-arm residual run (V5: learned 16-D messages) served like π0: openpi's client sends the partner's message
    as an observation key and gets the executed chunk and this arm's message, equal to the local agent step with the
    same noise seed; π0-only keys are refused; the node's remote mode refuses residual servers with a reason."""
    from coop_transport.pi0_policy import Pi0Policy
    from coop_transport.policy import build_model, get_config, save_checkpoint
    from coop_transport.residual.checkpoint import load_policy, save_policy
    from coop_transport.residual.config import ResidualConfig
    from coop_transport.residual.system import ResidualSystem, make_agents
    from coop_transport.serving.client import RemotePolicy
    from coop_transport.serving.server import PolicyServer, ResidualRunner, ServerConfig

    config = get_config("tiny")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = {"state": {"mean": rng.normal(size=18), "std": rng.uniform(0.5, 2, 18)},
            "actions": {"mean": rng.normal(size=7) * 0.1, "std": rng.uniform(0.1, 1, 7)}}
    checkpoint = save_checkpoint(tmp_path / "vla", build_model(config).eval(), config, norm, step=1,
                                 extra={"variant": "per-arm", "prompts": {"robot0": "left", "robot1": "right"}})
    vla = Pi0Policy.load(checkpoint, device="cpu")
    rconfig = ResidualConfig(arch="V5", vla=checkpoint, chunk=4, latent_dim=32, encoder_width=16, encoder_heads=2,
                             encoder_layers=1, hidden_dim=32)
    agents = make_agents(rconfig.spec, rconfig, vla)
    for p in agents.parameters():  # off the zero initialization, so that the message changes the actions
        p.data += 0.05 * torch.randn_like(p)
    run = save_policy(tmp_path / "v5", ResidualSystem(rconfig.spec, rconfig, vla, agents, "cpu"), rconfig, 0)

    server = PolicyServer(ResidualRunner(load_policy(run, "cpu")), ServerConfig(port=0)).start()
    try:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["architecture"] == "V5" and meta["chunk"] == 4 and meta["sends_message"]
        assert meta["optional_keys"]["observation/partner_message"]["shape"] == [16]
        s = meta["image_size"]
        obs = {"observation/wrist_image": rng.integers(0, 255, (s, s, 3), dtype=np.uint8),
               "observation/agentview_image": rng.integers(0, 255, (s, s, 3), dtype=np.uint8),
               "observation/state": rng.standard_normal(18).astype(np.float32), "arm": "robot0"}
        received = rng.standard_normal(16).astype(np.float32)
        served = client.infer({**obs, "observation/partner_message": received, "noise_seed": 5})
        assert served["actions"].shape == (4, 7) and served["message"].shape == (16,)

        local = load_policy(run, "cpu")
        arm_obs = {"wrist_image": obs["observation/wrist_image"],
                   "agentview_image": obs["observation/agentview_image"], "proprio": obs["observation/state"]}
        actions, sent = local.agent_plan("robot0", arm_obs, torch.Generator().manual_seed(5), received)
        np.testing.assert_allclose(served["actions"], actions, atol=1e-5)
        np.testing.assert_allclose(served["message"], sent, atol=1e-5)
        silent = client.infer({**obs, "noise_seed": 5})  # no message: the zero message, other actions
        assert np.abs(silent["actions"] - served["actions"]).max() > 1e-6

        with pytest.raises(RuntimeError, match="unknown keys"):
            client.infer({**obs, "num_samples": 4})
        with pytest.raises(RuntimeError, match=r"observation/partner_message has shape \(4,\)"):
            client.infer({**obs, "observation/partner_message": np.zeros(4, np.float32)})
        with pytest.raises(ValueError, match="serves a residual-RL policy"):
            RemotePolicy(f"127.0.0.1:{server.port}", connect_wait=2)
    finally:
        server.stop()
