"""Shared fixtures. The simulation is expensive to build (about 2 s), so tests share one per module."""

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def sim():
    from coop_transport.sim import SimConfig, TransportSim

    with TransportSim(SimConfig()) as s:
        yield s


@pytest.fixture(scope="module")
def camera_sim():
    from coop_transport.sim import SimConfig, TransportSim

    with TransportSim(SimConfig(wrist_cameras=True, agentview=True, image_size=64)) as s:
        yield s


@pytest.fixture
def torch_one_thread_seeded():
    """torch on one thread with seed 0 for the test, restored afterwards. One thread: the project's 2-core machines
    are shared, and two threads there run slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
