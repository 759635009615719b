"""openpi's websocket policy protocol as coop_transport speaks it: wire format, observation keys, request checks.

The exchange (openpi's ``WebsocketPolicyServer`` and ``openpi_client.WebsocketClientPolicy``):

1. the client opens ``ws://host:port`` (with the header ``Authorization: Api-Key <key>`` when the server has a key);
2. the server sends one binary message, the **metadata** map (``metadata()`` below);
3. the client sends binary messages, each an **observation** map; the server answers each, in order, with a binary
   **action** map, or with a *text* message naming what was wrong (openpi's clients raise ``RuntimeError`` with it).
   A malformed request gets such an error and the connection stays open for the next request.

Wire format: msgpack, with numpy arrays as maps ``{b"__ndarray__": True, b"data": <bytes>, b"dtype": <dtype.str>,
b"shape": [...]}`` and numpy scalars as ``{b"__npgeneric__": True, b"data": <value>, b"dtype": <dtype.str>}``, the
layout of ``openpi_client.msgpack_numpy``. Decoding here is strict: only bool/int/uint/float dtypes, shapes that match
the data length, nothing that could build Python objects.

Observation keys (one scheme per policy variant; the metadata lists them with shapes and dtypes):

    per-arm policy                                       joint policy
    observation/wrist_image      (S, S, 3) uint8         observation/robot0_wrist_image  (S, S, 3) uint8
    observation/agentview_image  (S, S, 3) uint8         observation/robot1_wrist_image  (S, S, 3) uint8
    observation/state            (18,) float32/64        observation/agentview_image     (S, S, 3) uint8
    arm                          "robot0" | "robot1"     observation/state               (36,) float32/64

``observation/state`` is the raw (unnormalized) proprioception of ``coop_transport.sim.env.arm_observation``
(per-arm) or ``adapters.joint_proprio`` (joint); images are upright RGB. Optional keys, both variants:

    num_samples  int in [1, max_num_samples]   draw N chunks in one batched pass; absent: one chunk
    noise        (N, H, P) float32             the flow noise (standard normal; P = action_pad_dim), for parity
    noise_seed   int >= 0                      noise = numpy.random.default_rng(noise_seed).standard_normal((N, H, P))

Residual-RL policies (per-arm V4, V5, V6; ``ResidualRunner``) read the same per-arm keys plus, for V5 and V6, the
optional ``observation/partner_message`` ((16,) for V5, (C, 7) for V6; absent = the partner's message is missing or
stale, the zero message); they apply the recipe themselves, so ``num_samples`` and ``noise`` are not accepted
(``noise_seed`` seeds their π0 noise). Their response is ``actions``, the (C, 7) executed chunk (π0 reference plus
the bounded residual), and ``message``, what this arm sends its partner (V5 (16,), V6 (C, 7); absent for V4).

Response: ``actions``, the chunk in environment units, (H, D) float32 without ``num_samples`` (openpi's convention)
and (N, H, D) with it (the client applies the recipe: mean-of-N, first C actions, ±kσ clipping with the metadata's
``action_mean`` / ``action_std``), and ``server_timing`` (ms): ``infer_ms`` (the batched model call this request was
part of), ``queue_ms`` (waiting for the model), ``decode_ms`` (decoding and checking the request), ``batch_size``
(requests in that model call) and ``prev_total_ms`` (the previous request's time in the server, as openpi reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import numpy as np

PROTOCOL = "openpi-websocket"
API_KEY_ENV = "COOP_TRANSPORT_API_KEY"  # the API key for server and clients, kept out of command lines
PROTOCOL_VERSION = 1
STATE_KEY = "observation/state"
# Policies that see earlier states (adapters.StateHistory): the arm's (or both arms') proprioception at the latest
# control steps, newest first, (L, state_dim) with the current state as row 0; L up to the policy's span + 1.
STATE_HISTORY_KEY = "observation/state_history"
ARM_KEY = "arm"
OPTIONAL_KEYS = ("num_samples", "noise", "noise_seed")
PARTNER_MESSAGE_KEY = "observation/partner_message"  # residual V5 / V6 policies: the partner arm's latest message
ALLOWED_DTYPE_KINDS = "biuf"  # bool, int, uint, float: nothing that builds Python objects
MAX_DIMS = 8


class RequestError(ValueError):
    """A request the server refuses; the message names the key and the problem (sent back as a text message)."""


def image_key(slot: str) -> str:
    """Wire key of a model camera slot: ``wrist`` -> ``observation/wrist_image``."""
    return f"observation/{slot}_image"


# ------------------------------------------------------------------------------------------------ wire format
def _encode_numpy(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_DTYPE_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in ALLOWED_DTYPE_KINDS:
            raise TypeError(f"scalars of dtype {obj.dtype} cannot be sent")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_numpy(obj: dict):
    if b"__ndarray__" in obj:
        dtype, shape, data = _array_fields(obj)
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise RequestError(f"array of shape {tuple(shape)} and dtype {dtype} needs {expected} bytes of data, "
                               f"got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as err:
            raise RequestError(f"numpy scalar of dtype {dtype}: {err}") from None
    return obj


def _dtype(text) -> np.dtype:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        raise RequestError(f"unknown array dtype {text!r}") from None
    if dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise RequestError(f"array dtype {dtype} is not allowed (only bool, integer and float arrays)")
    return dtype


def _array_fields(obj: dict) -> tuple[np.dtype, list[int], bytes]:
    dtype = _dtype(obj.get(b"dtype"))
    shape, data = obj.get(b"shape"), obj.get(b"data")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"array shape must be a list of at most {MAX_DIMS} non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise RequestError(f"array data must be bytes, got {type(data).__name__}")
    return dtype, list(shape), data


def packb(obj) -> bytes:
    """msgpack bytes in openpi's numpy layout."""
    return msgpack.packb(obj, default=_encode_numpy, use_bin_type=True)


def unpackb(data: bytes):
    """Strict decoding of ``packb``'s (and openpi_client's) messages; malformed input raises RequestError."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_numpy, raw=False, strict_map_key=True)
    except RequestError:
        raise
    except Exception as err:  # msgpack's own errors: truncated data, bad map keys, extension types, ...
        raise RequestError(f"not a valid msgpack message: {err}") from None


# ------------------------------------------------------------------------------------------- request checks
@dataclass(frozen=True)
class ObservationSchema:
    """What a served policy reads and returns; built from the policy, checks every request."""

    variant: str
    slots: tuple[str, ...]
    image_size: int
    state_dim: int
    horizon: int
    action_dim: int
    action_pad_dim: int
    prompt_keys: tuple[str, ...]  # per-arm: the arms; joint: ("joint",)
    max_num_samples: int = 16
    partner_message_shape: tuple[int, ...] | None = None  # residual V5 (16,) / V6 (C, 7); None: no message input
    flow_noise: bool = True  # False (residual policies): the policy draws its own noise; only noise_seed applies
    state_history_steps: int = 0  # > 0: the policy sees earlier states; STATE_HISTORY_KEY is required, at most this long

    @property
    def optional_keys(self) -> tuple[str, ...]:
        keys = OPTIONAL_KEYS if self.flow_noise else ("noise_seed",)
        return keys + ((PARTNER_MESSAGE_KEY,) if self.partner_message_shape else ())

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(image_key(s) for s in self.slots)

    @property
    def per_arm(self) -> bool:
        return self.variant == "per-arm"

    @property
    def required_keys(self) -> tuple[str, ...]:
        history = (STATE_HISTORY_KEY,) if self.state_history_steps else ()
        return self.image_keys + (STATE_KEY,) + history + ((ARM_KEY,) if self.per_arm else ())

    def describe(self) -> dict:
        """The key scheme, for the metadata: {key: {shape, dtype}} and the optional keys."""
        s = self.image_size
        keys = {k: {"shape": [s, s, 3], "dtype": "uint8"} for k in self.image_keys}
        keys[STATE_KEY] = {"shape": [self.state_dim], "dtype": "float32 or float64"}
        if self.state_history_steps:
            keys[STATE_HISTORY_KEY] = {"shape": [f"1..{self.state_history_steps}", self.state_dim],
                                       "dtype": "float32 or float64",
                                       "meaning": "the latest control steps' states, newest (the current) first"}
        if self.per_arm:
            keys[ARM_KEY] = {"values": list(self.prompt_keys), "dtype": "str"}
        optional = {"num_samples": {"range": [1, self.max_num_samples], "dtype": "int"},
                    "noise": {"shape": ["num_samples", self.horizon, self.action_pad_dim], "dtype": "float32"},
                    "noise_seed": {"range": [0, 2 ** 63 - 1], "dtype": "int"}}
        if self.partner_message_shape:
            optional[PARTNER_MESSAGE_KEY] = {"shape": list(self.partner_message_shape), "dtype": "float32 or float64",
                                             "absent": "no message (the partner's is missing or stale)"}
        optional = {k: v for k, v in optional.items() if k in self.optional_keys}
        return {"observation_keys": keys, "optional_keys": optional}


@dataclass
class Request:
    """A checked observation: ready for the model."""

    images: dict[str, np.ndarray]  # model slot -> (S, S, 3) uint8
    state: np.ndarray  # (state_dim,) float32, raw
    prompt_key: str  # arm name or "joint"
    num_samples: int
    chunk_only: bool  # no num_samples in the request: answer (H, D), openpi's single chunk
    noise: np.ndarray | None  # (N, H, P) float32, or None: the server draws it
    noise_seed: int | None
    partner_message: np.ndarray | None = None  # residual V5 / V6: float32 in the schema's shape
    state_history: np.ndarray | None = None  # (L, state_dim) float32, newest first (policies with a state history)

    def observation(self) -> dict:
        """The state part as an observation dict (``proprio`` and, when sent, ``proprio_history``)."""
        obs = {"proprio": self.state}
        if self.state_history is not None:
            obs["proprio_history"] = self.state_history
        return obs


def _int(value, key: str, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RequestError(f"{key} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise RequestError(f"{key} must be in [{low}, {high}], got {int(value)}")
    return int(value)


def _array(obs: dict, key: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> np.ndarray:
    value = obs[key]
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{key} must be a numpy array of shape {shape} and dtype {' or '.join(dtypes)}, "
                           f"got {type(value).__name__}")
    if value.dtype.name not in dtypes:
        raise RequestError(f"{key} has dtype {value.dtype.name}, expected {' or '.join(dtypes)}")
    if value.shape != shape:
        raise RequestError(f"{key} has shape {value.shape}, expected {shape}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise RequestError(f"{key} contains NaN or inf")
    return value


def parse_request(obs, schema: ObservationSchema) -> Request:
    """Check a decoded observation map against the schema; RequestError names the first problem found."""
    if not isinstance(obs, dict):
        raise RequestError(f"a request must be a map of observation keys, got {type(obs).__name__}")
    bad_keys = [k for k in obs if not isinstance(k, str)]
    if bad_keys:
        raise RequestError(f"keys must be strings, got {bad_keys[:5]!r}")
    unknown = sorted(set(obs) - set(schema.required_keys) - set(schema.optional_keys))
    if unknown:
        raise RequestError(f"unknown keys {unknown}; a {schema.variant} policy reads {list(schema.required_keys)} "
                           f"and optionally {list(schema.optional_keys)}")
    missing = [k for k in schema.required_keys if k not in obs]
    if missing:
        raise RequestError(f"missing keys {missing}; a {schema.variant} policy reads {list(schema.required_keys)}")

    s = schema.image_size
    images = {slot: _array(obs, key, (s, s, 3), ("uint8",)) for slot, key in zip(schema.slots, schema.image_keys)}
    state = _array(obs, STATE_KEY, (schema.state_dim,), ("float32", "float64")).astype(np.float32)
    history = None
    if schema.state_history_steps:
        value = obs[STATE_HISTORY_KEY]
        rows = value.shape[0] if isinstance(value, np.ndarray) and value.ndim == 2 else 0
        if not 1 <= rows <= schema.state_history_steps:
            raise RequestError(f"{STATE_HISTORY_KEY} must be (L, {schema.state_dim}) with 1 <= L <= "
                               f"{schema.state_history_steps}, got {getattr(value, 'shape', type(value).__name__)}")
        history = _array(obs, STATE_HISTORY_KEY, (rows, schema.state_dim), ("float32", "float64")).astype(np.float32)
        if not np.allclose(history[0], state, atol=1e-5):
            raise RequestError(f"{STATE_HISTORY_KEY}'s first row must be the current {STATE_KEY}")
    if schema.per_arm:
        arm = obs[ARM_KEY]
        if not isinstance(arm, str) or arm not in schema.prompt_keys:
            raise RequestError(f"{ARM_KEY} must be one of {list(schema.prompt_keys)}, got {arm!r}")
        prompt_key = arm
    else:
        prompt_key = schema.prompt_keys[0]

    chunk_only = "num_samples" not in obs
    n = 1 if chunk_only else _int(obs["num_samples"], "num_samples", 1, schema.max_num_samples)
    noise = seed = None
    if "noise" in obs and "noise_seed" in obs:
        raise RequestError("give either noise or noise_seed, not both")
    if "noise" in obs:
        noise = _array(obs, "noise", (n, schema.horizon, schema.action_pad_dim), ("float32",))
    if "noise_seed" in obs:
        seed = _int(obs["noise_seed"], "noise_seed", 0, 2 ** 63 - 1)
    message = None
    if PARTNER_MESSAGE_KEY in obs:
        message = _array(obs, PARTNER_MESSAGE_KEY, tuple(schema.partner_message_shape),
                         ("float32", "float64")).astype(np.float32)
    return Request(images, state, prompt_key, n, chunk_only, noise, seed, message, history)


def seeded_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The flow noise a ``noise_seed`` stands for (clients can draw the same locally)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
