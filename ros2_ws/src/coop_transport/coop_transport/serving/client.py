"""A served policy with Pi0Policy's inference surface, for the ROS policy node and the evaluator in remote mode.

    policy = RemotePolicy("127.0.0.1:8000")                        # waits up to connect_wait s for the server
    chunks = policy.sample_arm(arm_obs, "robot0", num_samples=4)    # (4, H, 7), as Pi0Policy.sample_arm
    actor = ChunkedActor.for_arm(policy, "robot0", RecipeConfig())  # the recipe runs here, on the client

Unlike openpi's ``WebsocketClientPolicy`` (which waits forever), every request has a deadline: no answer within
``timeout`` s, a refused connection or a dropped one raise ``PolicyUnavailable`` (and the connection is dropped, so
a late answer can never be taken for the next one); the next call reconnects, at most once per
``retry_interval`` s. An error the server answered (a refused request) raises ``PolicyServerError``.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import websockets
from websockets.sync.client import connect

from coop_transport.adapters import arm_images, joint_images, joint_proprio
from coop_transport.serving.protocol import (API_KEY_ENV, ARM_KEY, STATE_HISTORY_KEY, STATE_KEY, image_key, packb,
                                             unpackb)

# Metadata that must not change when the client reconnects (a restarted server with another policy is refused).
_FIXED_METADATA = ("variant", "image_size", "horizon", "action_dim", "action_pad_dim", "action_mean", "action_std",
                   "state_history_steps")


class PolicyUnavailable(ConnectionError):
    """The server cannot be reached, the connection dropped, or it did not answer in time."""


class PolicyServerError(RuntimeError):
    """The server answered with an error (a refused request or a failed model call)."""


def parse_address(address: str) -> str:
    """``host:port``, ``[v6]:port`` or ``ws://host:port`` -> the websocket URI; ValueError otherwise."""
    text = address.strip()
    uri = text if text.startswith(("ws://", "wss://")) else f"ws://{text}"
    hostport = uri.split("://", 1)[1].split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"policy server address must look like host:port, got {address!r}")
    return uri


class RemotePolicy:
    """Chunks from a policy server; ``sample_arm`` / ``sample_joint`` / ``action_mean`` / ``image_size`` /
    ``noise_source`` as Pi0Policy, so ChunkedActor, ArmPolicy and the evaluator's controllers take it unchanged.
    Thread-safe (one request at a time)."""

    def __init__(self, address: str, timeout: float = 2.0, connect_wait: float = 30.0, api_key: str | None = None,
                 retry_interval: float = 0.5):
        self.uri = parse_address(address)
        self.timeout, self.retry_interval = float(timeout), float(retry_interval)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.noise_source = None  # callable(shape) -> noise; set: the client draws the flow noise (parity)
        self.counters = {"requests": 0, "connects": 0, "timeouts": 0, "disconnects": 0, "server_errors": 0}
        self.last_server_timing: dict = {}
        self._ws = None
        self._next_try = 0.0
        self._lock = threading.Lock()
        deadline = time.monotonic() + connect_wait
        while True:  # the server may still be loading its model
            try:
                with self._lock:
                    self._connect()
                break
            except PolicyUnavailable:
                if time.monotonic() >= deadline:
                    raise PolicyUnavailable(f"no policy server at {self.uri} within {connect_wait} s") from None
                time.sleep(min(self.retry_interval, max(0.0, deadline - time.monotonic())))
        m = self.metadata
        if m.get("architecture"):
            raise ValueError(f"{self.uri} serves a residual-RL policy ({m['architecture']}), which plans whole "
                             "executed chunks and exchanges messages: query it with openpi_client (keys in its "
                             "metadata); the remote mode of the policy node runs served π0 policies")
        self.variant = m["variant"]
        self.image_size = int(m["image_size"])
        self.horizon = int(m["horizon"])
        self.action_pad_dim = int(m["action_pad_dim"])
        self.action_mean = np.asarray(m["action_mean"], dtype=np.float32)
        self.action_std = np.asarray(m["action_std"], dtype=np.float32)
        # The demonstrated range (recipe.clip_beyond_demonstrated); absent from older servers' metadata.
        self.action_min, self.action_max = (np.asarray(m[k], dtype=np.float32) if k in m else None
                                            for k in ("action_min", "action_max"))
        self.prompts = {arm: arm for arm in m.get("arms", [])} or {"joint": "joint"}
        # > 0: the served policy sees earlier states; each request carries this many of the latest ones.
        self.state_history_steps = int(m.get("state_history_steps", 0))

    @property
    def name(self) -> str:
        return f"remote {self.uri}"

    # ---------------------------------------------------------------------------------------- connection
    def _connect(self) -> None:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        self._next_try = time.monotonic() + self.retry_interval
        try:
            ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                         open_timeout=self.timeout, close_timeout=0.2)
            metadata = unpackb(ws.recv(timeout=self.timeout))
        except websockets.InvalidStatus as err:  # e.g. 401: a wrong API key is not a passing outage
            raise PolicyServerError(f"{self.uri} refused the connection: {err}") from None
        except (OSError, TimeoutError, websockets.WebSocketException) as err:
            raise PolicyUnavailable(f"cannot reach the policy server at {self.uri}: {err}") from None
        previous = getattr(self, "metadata", None)
        if previous is not None:
            changed = [k for k in _FIXED_METADATA if previous.get(k) != metadata.get(k)]
            if changed:
                ws.close()
                raise PolicyServerError(f"the server at {self.uri} now serves another policy ({changed} differ)")
        self.metadata = metadata
        self._ws = ws
        self.counters["connects"] += 1

    def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    def infer(self, obs: dict) -> dict:
        """One request: the observation map (protocol keys) -> the response map."""
        with self._lock:
            if self._ws is None:
                wait = self._next_try - time.monotonic()
                if wait > 0:
                    raise PolicyUnavailable(f"policy server {self.uri} unavailable; retrying in {wait:.1f} s")
                self._connect()
            self.counters["requests"] += 1
            try:
                self._ws.send(packb(obs))
                reply = self._ws.recv(timeout=self.timeout)
            except TimeoutError:
                self.counters["timeouts"] += 1
                self._drop()  # its late answer must never be read as the next one's
                raise PolicyUnavailable(f"no answer from {self.uri} within {self.timeout} s") from None
            except (OSError, websockets.ConnectionClosed) as err:
                self.counters["disconnects"] += 1
                self._drop()
                self._next_try = time.monotonic()  # reconnect at once on the next call
                raise PolicyUnavailable(f"lost the connection to {self.uri}: {err}") from None
        if isinstance(reply, str):
            self.counters["server_errors"] += 1
            raise PolicyServerError(f"{self.uri}: {reply}")
        response = unpackb(reply)
        self.last_server_timing = dict(response.get("server_timing", {}))
        return response

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ---------------------------------------------------------------------------------- Pi0Policy surface
    def _sample(self, request: dict, num_samples: int, noise) -> np.ndarray:
        request["num_samples"] = int(num_samples)
        if noise is None and self.noise_source is not None:
            noise = self.noise_source((num_samples, self.horizon, self.action_pad_dim))
        if noise is not None:
            if not isinstance(noise, np.ndarray):
                noise = noise.detach().cpu().numpy()  # a torch tensor, as Pi0Policy takes
            request["noise"] = np.ascontiguousarray(noise, dtype=np.float32)
        actions = np.asarray(self.infer(request)["actions"], dtype=np.float32)
        if actions.ndim != 3 or actions.shape[0] != num_samples or not np.all(np.isfinite(actions)):
            raise PolicyServerError(f"{self.uri} answered actions of shape {actions.shape} (or non-finite); "
                                    f"expected ({num_samples}, {self.horizon}, D)")
        return actions

    def sample_arm(self, arm_obs: dict, arm: str, num_samples: int = 1, noise=None,
                   return_prefix: bool = False) -> np.ndarray:
        """(N, H, 7) chunks for one arm from its ``arm_observation``."""
        if return_prefix:
            raise ValueError("a served policy returns actions only (no prefix cache for the RL encoder)")
        if self.variant != "per-arm":
            raise ValueError(f"sample_arm needs a per-arm policy, the server has {self.variant!r}")
        request = {image_key(slot): image for slot, image in arm_images(arm_obs).items()}
        self._add_state(request, arm_obs["proprio"], arm_obs)
        request[ARM_KEY] = arm
        return self._sample(request, num_samples, noise)

    def sample_arms(self, arm_obs: dict[str, dict], num_samples: int = 1) -> dict[str, np.ndarray]:
        return {arm: self.sample_arm(obs, arm, num_samples) for arm, obs in arm_obs.items()}

    def sample_joint(self, obs: dict, num_samples: int = 1, noise=None) -> np.ndarray:
        """(N, H, 14) chunks from a full simulation observation."""
        if self.variant != "joint":
            raise ValueError(f"sample_joint needs a joint policy, the server has {self.variant!r}")
        request = {image_key(slot): image for slot, image in joint_images(obs).items()}
        self._add_state(request, joint_proprio(obs), obs)
        return self._sample(request, num_samples, noise)

    def _add_state(self, request: dict, state: np.ndarray, obs: dict) -> None:
        request[STATE_KEY] = np.asarray(state, dtype=np.float32)
        if self.state_history_steps:
            if "proprio_history" not in obs:
                raise ValueError(f"{self.uri} serves a policy that sees earlier states, but the observation has no "
                                 "proprio_history (the latest control steps' states, newest first)")
            history = np.asarray(obs["proprio_history"], dtype=np.float32)[: self.state_history_steps]
            request[STATE_HISTORY_KEY] = np.ascontiguousarray(history)
