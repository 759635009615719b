"""The policy server: a loaded π0 policy behind openpi's websocket protocol (``protocol.py``), many clients at once.

One asyncio event loop owns the connections: it decodes and checks each request (a malformed one is answered with
a text error on that connection only) and queues it. One inference thread runs the model: it takes everything
queued when it becomes free (up to ``max_batch`` requests) and runs it as one batched forward pass per sample
count N. While other connections are open it waits up to ``batch_wait_ms`` for their requests to join: clients in
a closed loop would otherwise alternate, one request per model call, and never share one (bench/serve_latency.py
measures both); a lone client never waits.

    runner = PolicyRunner(Pi0Policy.load())
    PolicyServer(runner, ServerConfig(port=8000)).run()          # blocks; python -m coop_transport.serve does this
    server = PolicyServer(runner, ServerConfig(port=0)).start()  # in a thread; server.port is the bound port
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import websockets
from websockets.asyncio.server import serve

from coop_transport.adapters import policy_state
from coop_transport.serving.protocol import (PROTOCOL, PROTOCOL_VERSION, ObservationSchema, Request, RequestError,
                                             packb, parse_request, seeded_noise, unpackb)

log = logging.getLogger("coop_transport.serve")


def _history_steps(history) -> int:
    """Rows of ``observation/state_history`` a policy reads: its span + 1; 0 for a policy without a history."""
    return history.span + 1 if history is not None and history.frames > 1 else 0


# ------------------------------------------------------------------------------------------------- the model
class PolicyRunner:
    """A per-arm or joint π0 policy (``Pi0Policy`` or an export backend's ``BackendPolicy``): checked requests in,
    (N, H, D) chunks in environment units out, several requests per model call."""

    def __init__(self, policy, max_num_samples: int = 16, seed: int | None = None, description: str = ""):
        self.policy = policy
        spec = policy.spec
        pad = policy.config.action_pad_dim if hasattr(policy, "config") else policy.meta.action_pad_dim
        prompt_keys = tuple(policy.prompts) if policy.variant == "per-arm" else ("joint",)
        history = getattr(policy, "state_history", None)
        self.schema = ObservationSchema(policy.variant, tuple(spec.slots), int(policy.image_size), spec.state_dim,
                                        int(policy.horizon), spec.action_dim, int(pad), prompt_keys,
                                        max_num_samples, state_history_steps=_history_steps(history))
        self.description = description
        self._rng = np.random.default_rng(seed)  # noise of requests that bring neither noise nor noise_seed

    def metadata(self) -> dict:
        """What a client needs to build observations and apply the recipe; sent on every connection."""
        backend = getattr(getattr(self.policy, "backend", None), "name", "torch")
        return {"server": "coop_transport", "protocol": PROTOCOL, "protocol_version": PROTOCOL_VERSION,
                "policy": self.description, "variant": self.schema.variant, "backend": backend,
                "image_size": self.schema.image_size, "state_dim": self.schema.state_dim,
                "horizon": self.schema.horizon, "action_dim": self.schema.action_dim,
                "action_pad_dim": self.schema.action_pad_dim,
                "arms": list(self.schema.prompt_keys) if self.schema.per_arm else [],
                "action_mean": [float(x) for x in self.policy.action_mean],
                "action_std": [float(x) for x in self.policy.action_std],
                **{key: [float(x) for x in value] for key in ("action_min", "action_max")
                   if (value := getattr(self.policy, key, None)) is not None},
                "max_num_samples": self.schema.max_num_samples,
                "state_history_steps": self.schema.state_history_steps, **self.schema.describe()}

    def _noise(self, r: Request) -> np.ndarray:
        shape = (r.num_samples, self.schema.horizon, self.schema.action_pad_dim)
        if r.noise is not None:
            return r.noise
        if r.noise_seed is not None:
            return seeded_noise(r.noise_seed, shape)
        return self._rng.standard_normal(shape).astype(np.float32)

    def run(self, requests: list[Request]) -> list[np.ndarray | Exception]:
        """One result per request: (N, H, D) float32, or the exception its model call raised. Requests with the
        same N share one forward pass (the model batches B observations x N samples)."""
        results: list = [None] * len(requests)
        by_n: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_n.setdefault(r.num_samples, []).append(i)
        for n, idx in by_n.items():
            try:
                chunks = self._sample([requests[i] for i in idx], n)
                for i, chunk in zip(idx, chunks):
                    results[i] = chunk
            except Exception as err:  # reported to these requests' clients; the server goes on
                log.exception("model call failed")
                for i in idx:
                    results[i] = err
        return results

    def _sample(self, group: list[Request], n: int) -> np.ndarray:
        images = [r.images for r in group]
        # The policy's own state vector: the current state, with its earlier ones where the policy sees them.
        states = [policy_state(r.observation(), self.policy.state_history) for r in group]
        prompts = [self.policy.prompts[r.prompt_key] for r in group]
        noise = np.concatenate([self._noise(r) for r in group])  # row b * N + k: sample k of observation b
        if hasattr(self.policy, "make_batch"):  # Pi0Policy (PyTorch)
            import torch

            batch = self.policy.make_batch(images, states, prompts)
            actions = self.policy.sample_batch(batch, n, noise=torch.from_numpy(noise).to(self.policy.device))
        else:  # BackendPolicy (ONNX Runtime, TensorRT, ...)
            actions = self.policy.sample_batch(self.policy.make_inputs(images, states, prompts), n, noise)
        return np.asarray(actions, dtype=np.float32)  # (B, N, H, D)


class ResidualRunner:
    """A per-arm residual-RL policy (V4, V5, V6: π0 reference under the recipe plus each arm's bounded residual and,
    for V5 / V6, its message head): checked requests in, {"actions": (C, 7), "message": ...} out. Each request is
    one agent step of its arm (``ResidualSystem.agent_plan``), run in arrival order; the partner's message is the
    request's ``observation/partner_message``."""

    def __init__(self, system, seed: int | None = None, description: str = ""):
        import torch

        from coop_transport.constants import ARMS, ARM_ACTION_DIM, PROPRIO_DIM

        if system.spec.vla_variant != "per-arm":
            raise ValueError(f"{system.spec.name} is centralized (one agent for both arms): serve its per-arm "
                             "architectures (V4, V5, V6) or its π0 checkpoint")
        self.system = system
        chunk = system.recipe.execute_steps
        # What the agents read from their partner (ResidualSystem.agent_plan flattens it): V6 a reference chunk,
        # V5 a learned vector, V4 nothing.
        dim = system.agents[ARMS[0]].received_dim if system.agents is not None else 0
        received = None if not dim else (chunk, ARM_ACTION_DIM) if system.spec.message == "chunk" else (dim,)
        self.schema = ObservationSchema("per-arm", ("wrist", "agentview"), int(system.vla.image_size), PROPRIO_DIM,
                                        chunk, ARM_ACTION_DIM, ARM_ACTION_DIM, tuple(ARMS), 1,
                                        partner_message_shape=received, flow_noise=False,
                                        state_history_steps=_history_steps(system.vla.state_history))
        self.description = description
        self._rng = np.random.default_rng(seed)
        self._generator = torch.Generator()

    def metadata(self) -> dict:
        s = self.schema
        return {"server": "coop_transport", "protocol": PROTOCOL, "protocol_version": PROTOCOL_VERSION,
                "policy": self.description, "variant": "per-arm", "architecture": self.system.spec.name,
                "backend": "torch", "image_size": s.image_size, "state_dim": s.state_dim, "horizon": s.horizon,
                "chunk": s.horizon, "action_dim": s.action_dim, "arms": list(s.prompt_keys),
                "sends_message": self.system.spec.message in ("learned", "chunk"),
                "recipe": {"execute_steps": self.system.recipe.execute_steps,
                           "num_samples": self.system.recipe.num_samples,
                           "clip_sigma": self.system.recipe.clip_sigma},
                "state_history_steps": s.state_history_steps, **s.describe()}

    def run(self, requests: list[Request]) -> list[dict | Exception]:
        results = []
        for r in requests:
            try:
                seed = r.noise_seed if r.noise_seed is not None else int(self._rng.integers(2 ** 62))
                self._generator.manual_seed(seed % (2 ** 63))
                arm_obs = {"wrist_image": r.images["wrist"], "agentview_image": r.images["agentview"],
                           **r.observation()}
                actions, sent = self.system.agent_plan(r.prompt_key, arm_obs, self._generator, r.partner_message)
                out = {"actions": np.asarray(actions, dtype=np.float32)}
                if sent is not None:
                    out["message"] = np.asarray(sent, dtype=np.float32)
                results.append(out)
            except Exception as err:  # this request's client hears why; the others go on
                log.exception("residual policy call failed")
                results.append(err)
        return results


# ------------------------------------------------------------------------------------------------ the server
@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Interface to listen on; 127.0.0.1 keeps the server local (0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port; 0 picks a free one (see PolicyServer.port)."""
    api_key: str | None = None
    """When set, connections must send the header 'Authorization: Api-Key <key>' (openpi_client's api_key)."""
    max_message_bytes: int = 4 * 2 ** 20
    """Largest request accepted; a larger one closes its connection with code 1009 (message too big)."""
    max_batch: int = 8
    """Most requests run in one model call."""
    batch_wait_ms: float = 2.0
    """With other connections open, wait up to this long for their requests to join a model call (0: never)."""

    def __post_init__(self):
        if self.max_message_bytes < 1024 or self.max_batch < 1:
            raise ValueError(f"max_message_bytes must be >= 1024 and max_batch >= 1, got {self.max_message_bytes}, "
                             f"{self.max_batch}")


@dataclass
class _Job:
    request: Request
    future: asyncio.Future
    queued: float  # perf_counter


@dataclass
class ServerStats:
    connections: int = 0
    requests: int = 0
    bad_requests: int = 0
    failed_requests: int = 0
    model_calls: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests per model call -> count


class PolicyServer:
    def __init__(self, runner: PolicyRunner, config: ServerConfig = ServerConfig()):
        self.runner = runner
        self.config = config
        self.port: int | None = None
        self.stats = ServerStats()
        self._open_connections = 0
        self._metadata = packb(runner.metadata())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------- lifecycle
    def run(self, on_ready=None, handle_signals: bool = True) -> None:
        """Serve until SIGINT/SIGTERM (or ``stop()``); ``on_ready(server)`` is called once it listens."""
        asyncio.run(self._serve(on_ready, handle_signals))

    def start(self, timeout: float = 30.0) -> "PolicyServer":
        """Serve from a background thread; returns once listening."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self.run, kwargs={"on_ready": lambda _: ready.set(),
                                                                 "handle_signals": False},
                                        name="policy-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"policy server did not start listening within {timeout} s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    async def _serve(self, on_ready, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        queue: asyncio.Queue[_Job] = asyncio.Queue()
        with ThreadPoolExecutor(1, thread_name_prefix="inference") as pool:
            batcher = asyncio.create_task(self._batch_loop(queue, pool))
            async with serve(lambda ws: self._handle(ws, queue), self.config.host, self.config.port,
                             compression=None, max_size=self.config.max_message_bytes,
                             process_request=self._check_http) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                log.info("serving %s on ws://%s:%d", self.runner.description, self.config.host, self.port)
                if on_ready:
                    on_ready(self)
                await self._stop.wait()
            batcher.cancel()

    def _check_http(self, connection, request):
        """GET /healthz answers 200; with an API key, a handshake without the right one is refused (401)."""
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.config.api_key:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Api-Key {self.config.api_key}".encode()):
                log.warning("refused a connection without the right API key")
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send 'Authorization: Api-Key <key>'\n")
        return None

    # --------------------------------------------------------------------------------------- connections
    async def _handle(self, ws, queue: asyncio.Queue) -> None:
        self.stats.connections += 1
        self._open_connections += 1
        peer = ws.remote_address
        log.info("connection from %s", peer)
        try:
            await ws.send(self._metadata)
            prev_total_ms = None
            while True:
                message = await ws.recv()
                start = time.perf_counter()
                reply = await self._answer(message, queue, prev_total_ms)
                await ws.send(reply)
                prev_total_ms = (time.perf_counter() - start) * 1e3
        except websockets.ConnectionClosed as closed:
            log.info("connection from %s closed (%s)", peer, closed)
        finally:
            self._open_connections -= 1

    async def _answer(self, message, queue: asyncio.Queue, prev_total_ms: float | None) -> bytes | str:
        """The reply to one message: packed actions, or a text error naming the problem."""
        start = time.perf_counter()
        self.stats.requests += 1
        try:
            if isinstance(message, str):
                raise RequestError("expected a binary msgpack message (openpi_client.msgpack_numpy), got text")
            request = parse_request(unpackb(message), self.runner.schema)
        except RequestError as err:
            self.stats.bad_requests += 1
            return f"bad request: {err}"
        queued = time.perf_counter()
        job = _Job(request, self._loop.create_future(), queued)
        queue.put_nowait(job)
        try:
            actions, timing = await job.future
        except Exception as err:  # the model call failed: this request's client hears why; others go on
            self.stats.failed_requests += 1
            return f"inference failed: {type(err).__name__}: {err}"
        timing["decode_ms"] = (queued - start) * 1e3
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        if isinstance(actions, dict):  # a residual policy: its executed chunk and the message it sends
            return packb({**actions, "server_timing": timing})
        return packb({"actions": actions[0] if request.chunk_only else actions, "server_timing": timing})

    async def _batch_loop(self, queue: asyncio.Queue, pool: ThreadPoolExecutor) -> None:
        """Take everything queued (up to max_batch) whenever the model is free, waiting up to batch_wait_ms for
        requests of other open connections."""
        wait = self.config.batch_wait_ms / 1e3
        while True:
            jobs = [await queue.get()]
            deadline = self._loop.time() + wait
            while len(jobs) < self.config.max_batch:
                if not queue.empty():
                    jobs.append(queue.get_nowait())
                    continue
                remaining = deadline - self._loop.time()
                if self._open_connections <= len(jobs) or remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            start = time.perf_counter()
            try:
                results = await self._loop.run_in_executor(pool, self.runner.run, [j.request for j in jobs])
            except Exception as err:
                results = [err] * len(jobs)
            infer_ms = (time.perf_counter() - start) * 1e3
            self.stats.model_calls += 1
            self.stats.batch_sizes[len(jobs)] = self.stats.batch_sizes.get(len(jobs), 0) + 1
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result((result, {"infer_ms": infer_ms, "queue_ms": (start - job.queued) * 1e3,
                                                    "batch_size": len(jobs)}))


# ------------------------------------------------------------------------------------------- child process
class ServerProcess:
    """``python -m coop_transport.serve ...`` in a child process of its own (tests, benches): ``start()`` returns
    once it listens, with its port; ``kill()`` is a crash (SIGKILL), ``stop()`` a clean shutdown (SIGTERM)."""

    def __init__(self, args: tuple[str, ...] = (), port: int = 0, log_path=None, env: dict | None = None,
                 command: tuple[str, ...] | None = None):
        self.args, self.port, self.log_path, self.env = tuple(args), port, log_path, env
        self.command = command  # default: this interpreter's -m coop_transport.serve; anything printing the same line
        self.proc = None

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        import os
        import subprocess
        import sys

        err = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        command = self.command or (sys.executable, "-m", "coop_transport.serve")
        self.proc = subprocess.Popen([*command, "--port", str(self.port), *self.args], stdout=subprocess.PIPE,
                                     stderr=err, text=True,
                                     env=self.env or dict(os.environ), start_new_session=True)
        ready = threading.Event()
        line: list[str] = []

        def read():  # the first stdout line is "listening on ws://HOST:PORT"
            text = self.proc.stdout.readline()
            line.append(text)
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not line[0].startswith("listening on ws://"):
            self.kill()
            raise RuntimeError(f"policy server did not start (exit code {self.proc.poll()}, said {line!r}); "
                               f"log: {self.log_path}")
        self.port = int(line[0].rsplit(":", 1)[1])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGTERM, timeout)

    def _signal(self, sig, timeout: float = 10.0) -> None:
        import os
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
