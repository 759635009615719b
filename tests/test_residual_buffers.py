"""Replay buffers: FIFO order, RLPD mixing ratios, checkpoint round trip, demonstration chunk planning. CPU."""

import pytest
import torch

from coop_transport.residual.buffers import ReplayBuffer, RLPDSampler, transition_fields
from coop_transport.residual.demos import plan_demo_chunks

FIELDS = transition_fields(agents=2, latent=4, proprio=3, chunk=2, action=7)


def transitions(n: int, marker: float) -> dict:
    out = {k: torch.zeros((n, *shape), dtype=dtype) for k, (shape, dtype) in FIELDS.items()}
    out["reward"] = marker + torch.arange(n, dtype=torch.float32)  # identifies each transition
    return out


def test_online_buffer_is_fifo():
    buf = ReplayBuffer(FIELDS, capacity=5)
    buf.add(transitions(3, 0.0))
    buf.add(transitions(4, 10.0))  # overwrites the two oldest
    assert len(buf) == 5 and buf.added == 7 and buf.ptr == 2
    assert sorted(buf.data["reward"].tolist()) == [2.0, 10.0, 11.0, 12.0, 13.0]
    buf.add(transitions(12, 100.0))  # more than the capacity: only the newest five survive
    assert sorted(buf.data["reward"].tolist()) == [107.0, 108.0, 109.0, 110.0, 111.0]
    with pytest.raises(ValueError, match="shape"):
        buf.add({**transitions(2, 0.0), "latent": torch.zeros(2, 3, 4)})


@pytest.mark.parametrize("fraction", [0.5, 0.25, 1.0, 0.0])
def test_rlpd_batches_mix_demo_and_online_at_the_ratio(fraction):
    demo = ReplayBuffer(FIELDS, 100)
    demo.add(transitions(100, 0.0))  # rewards 0..99
    online = ReplayBuffer(FIELDS, 10_000)
    online.add(transitions(50, 1000.0))  # rewards 1000..1049
    sampler = RLPDSampler(demo, online, batch_size=256, demo_fraction=fraction)
    g = torch.Generator().manual_seed(0)
    seen_demo, seen_online = set(), set()
    for _ in range(40):
        batch = sampler.sample(g)
        from_demo = batch["reward"] < 1000
        assert len(batch["reward"]) == 256
        assert int(from_demo.sum()) == round(256 * fraction)  # exactly, in every batch
        assert torch.equal(from_demo, batch["from_demo"])
        seen_demo |= set(batch["reward"][from_demo].tolist())
        seen_online |= set(batch["reward"][~from_demo].tolist())
    if fraction > 0:
        assert len(seen_demo) == 100  # uniform over the whole buffer
    if fraction < 1:
        assert len(seen_online) == 50


def test_rlpd_falls_back_to_the_filled_buffer():
    demo = ReplayBuffer(FIELDS, 10)
    demo.add(transitions(10, 0.0))
    online = ReplayBuffer(FIELDS, 10)
    sampler = RLPDSampler(demo, online, batch_size=16)
    assert sampler.split() == (16, 0)
    online.add(transitions(1, 1000.0))
    assert sampler.split() == (8, 8)


def test_buffer_checkpoint_round_trip():
    buf = ReplayBuffer(FIELDS, 8)
    data = transitions(11, 0.0)
    data["latent"] = torch.randn(11, 2, 4)
    buf.add(data)
    copy = ReplayBuffer(FIELDS, 8)
    copy.load_state(buf.state_tensors("online"), "online", buf.state_meta())
    assert (copy.ptr, copy.size, copy.added) == (buf.ptr, buf.size, buf.added)
    for k in FIELDS:
        assert torch.equal(copy.data[k], buf.data[k]), k
    assert buf.data["latent"].dtype == torch.float16 and buf.get(torch.arange(2))["latent"].dtype == torch.float32


def test_demo_chunk_plan():
    # 25 steps, chunks of 10: starts 0, 10, 20; the last runs 5 steps and ends the (successful) demo
    assert plan_demo_chunks(25, 10, 10, success=True) == [(0, 10, False), (10, 10, False), (20, 5, True)]
    # unsuccessful: the chunk that reaches the end has no next observation and is dropped
    assert plan_demo_chunks(25, 10, 10, success=False) == [(0, 10, False), (10, 10, False)]
    assert plan_demo_chunks(20, 10, 10, success=True) == [(0, 10, False), (10, 10, True)]
    assert plan_demo_chunks(20, 10, 5, success=True) == [(0, 10, False), (5, 10, False), (10, 10, True),
                                                         (15, 5, True)]


def test_collector_stacks_restored_and_fresh_transitions_on_one_device():
    """After a resume, a transition restored from the training state (every field moved to the learner's device)
    finishes in the same chunk as fresh ones (network outputs on that device, reward and labels on the CPU). A CUDA
    run failed there ("Expected all tensors to be on the same device"); the meta device stands in for CUDA."""
    from types import SimpleNamespace

    from coop_transport.residual.rollout import Collector

    class ReplayOnlyPool:  # load_state replays the running episodes; nothing else of a pool is needed here
        num_envs = 2

        def replay(self, episodes):
            return {e: {"obs": None, "labels": None} for e in episodes}

    device = torch.device("meta")
    system = SimpleNamespace(device=device)

    def transition(on):  # the fields of Collector.step's pending transition, network outputs on `on`
        return {"latent": torch.zeros(4, device=on), "proprio": torch.zeros(3, device=on),
                "ref": torch.zeros(2, 7, device=on), "action": torch.zeros(2, 7, device=on),
                "reward": torch.tensor(0.5), "discount": torch.tensor(0.9), "done": torch.tensor(0.0),
                "phase": torch.tensor([1, 2])}

    saved = Collector(system, ReplayOnlyPool(), seed=0, gamma=0.99)
    saved.slots[0].seed, saved.slots[0].pending = 7, transition("cpu")
    meta, tensors = saved.state()
    resumed = Collector(system, ReplayOnlyPool(), seed=0, gamma=0.99)
    resumed.load_state(meta, tensors, device)
    restored = resumed.slots[0].pending
    assert restored["reward"].device == device  # the state put every field on the learner's device

    nexts = [{k: torch.zeros_like(v) for k, v in transition(device).items() if k in ("latent", "proprio", "ref")}
             for _ in range(2)]
    out = resumed._finish([restored, transition(device)], nexts)
    assert {t.device for t in out.values()} == {device}
    assert out["reward"].shape == (2,) and out["next_ref"].shape == (2, 2, 7) and out["phase"].shape == (2, 2)
