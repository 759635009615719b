"""Remote inference cost: openpi's websocket protocol over loopback against in-process inference; prints markdown.

Usage:
    python bench/serve_latency.py                       # the shipped per-arm default, 1 inference thread
    python bench/serve_latency.py --reps 100 --clients 1 2 8 --threads 1

Measured, each in its own table:
1. **Latency**, the shipped default (96 px, wrist + agentview, 18-D state) at N = 1 and N = 4: in-process
   ``Pi0Policy.sample_arm`` against a round trip through ``python -m coop_transport.serve`` (a child process) with
   openpi's own client (``openpi_client.WebsocketClientPolicy``); median and p99 of each, the server's own model time
   (``server_timing.infer_ms``), the overhead (round trip minus that model time, per request) and request/response
   bytes. In-process and remote calls alternate in rounds of 5, so a changing machine load hits both alike.
2. **Protocol overhead at 224 px**: the same round trip with two 224×224 images against a server whose model is
   replaced by a zero-time stand-in (``ZeroChunkRunner``, this file: a development stand-in that checks requests
   like the real schema and answers zeros), so the time is codec + websocket + request checks + the hop to the
   inference thread; beside it the codec alone (msgpack packing and strict decoding of request and response,
   in-process, no transport).
3. **Throughput** with 1, 2 and 8 concurrent clients (one thread and one connection each, N = 4 requests in a
   closed loop) against the batching server and against one with batching off (``--max-batch 1``), with the
   mean number of requests per model call.

All processes share this machine's cores: on a 2-core machine the client, the server's event loop and its
inference thread compete, which the load average printed with the tables shows.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro


@dataclass
class Config:
    reps: int = 50
    """Timed calls per latency cell (after warm-up)."""
    warmup: int = 5
    """Untimed calls first."""
    samples: tuple[int, ...] = (1, 4)
    """N values for the latency table."""
    clients: tuple[int, ...] = (1, 2, 8)
    """Concurrent clients for the throughput table."""
    requests_per_client: int = 12
    """Requests each client sends in the throughput table."""
    throughput_samples: int = 4
    """N of the throughput requests (the recipe's mean-of-4)."""
    threads: int = 1
    """Inference threads, in-process and in the server alike."""
    unbatched: bool = True
    """Also measure throughput against a server with batching off (--max-batch 1)."""
    zero_server: bool = False
    """(internal) run the zero-time 224 px stand-in server in this process."""
    port: int = 0
    """(internal) port of the stand-in server."""


# ------------------------------------------------------------------------------------ zero-time stand-in
class ZeroChunkRunner:
    """Development stand-in for the protocol bench only: the per-arm request schema at 224 px, answered with zeros
    at once, so a round trip measures the protocol and not a model."""

    def __init__(self, image_size: int = 224):
        from coop_transport.serving.protocol import ObservationSchema

        self.schema = ObservationSchema("per-arm", ("wrist", "agentview"), image_size, 18, 32, 7, 32,
                                        ("robot0", "robot1"))
        self.description = f"zero-time stand-in ({image_size} px)"

    def metadata(self) -> dict:
        return {"server": "coop_transport", "policy": self.description, **self.schema.describe()}

    def run(self, requests):
        return [np.zeros((r.num_samples, self.schema.horizon, self.schema.action_dim), np.float32) for r in requests]


def serve_zero(port: int) -> None:
    from coop_transport.serving.server import PolicyServer, ServerConfig

    server = PolicyServer(ZeroChunkRunner(), ServerConfig(port=port))
    server.run(on_ready=lambda s: print(f"listening on ws://127.0.0.1:{s.port}", flush=True))


# ------------------------------------------------------------------------------------------------ helpers
def observation(size: int, seed: int = 0, history: int = 0) -> dict:
    """A random request; ``history`` > 0: with that many latest states (a policy with a state history reads them)."""
    rng = np.random.default_rng(seed)
    obs = {"observation/wrist_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
           "observation/agentview_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
           "observation/state": rng.standard_normal(18).astype(np.float32), "arm": "robot0"}
    if history:  # a random walk back from the current state
        steps = 0.01 * rng.standard_normal((history - 1, 18)).astype(np.float32)
        obs["observation/state_history"] = np.concatenate(
            [obs["observation/state"][None], obs["observation/state"] + np.cumsum(steps, 0)])
    return obs


def history_steps(client) -> int:
    """Rows of observation/state_history the server's policy reads (0: none)."""
    return int(client.get_server_metadata().get("state_history_steps", 0))


def arm_obs(obs: dict) -> dict:
    out = {"wrist_image": obs["observation/wrist_image"], "agentview_image": obs["observation/agentview_image"],
           "proprio": obs["observation/state"]}
    if "observation/state_history" in obs:
        out["proprio_history"] = obs["observation/state_history"]
    return out


def med_p99(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), float(np.percentile(values, 99))


def fmt(values: list[float]) -> str:
    m, p = med_p99(values)
    return f"{m:.2f} / {p:.2f}"


def remote_call(client, obs: dict, out: dict) -> None:
    start = time.perf_counter()
    response = client.infer(obs)
    rtt = (time.perf_counter() - start) * 1e3
    out.setdefault("rtt", []).append(rtt)
    out.setdefault("server", []).append(response["server_timing"]["infer_ms"])
    out.setdefault("overhead", []).append(rtt - response["server_timing"]["infer_ms"])
    out["response"] = response


def start_server(args, log: Path, command=None):
    from coop_transport.serving.server import ServerProcess

    return ServerProcess(args, log_path=log, command=command).start()


# ----------------------------------------------------------------------------------------------- sections
def latency_table(cfg: Config, address_port: int) -> list[str]:
    import torch
    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from coop_transport.pi0_policy import Pi0Policy

    torch.set_num_threads(cfg.threads)
    policy = Pi0Policy.load()
    client = WebsocketClientPolicy("127.0.0.1", address_port)
    rows = ["| N | in-process median / p99 (ms) | round trip median / p99 (ms) | server model time median (ms) "
            "| overhead median / p99 (ms) | request / response bytes |", "|---|---|---|---|---|---|"]
    obs = observation(policy.image_size, history=history_steps(client))
    for n in cfg.samples:
        request = {**obs, "num_samples": n}
        local: list[float] = []
        remote: dict = {}
        for _ in range(cfg.warmup):
            policy.sample_arm(arm_obs(obs), "robot0", n)
            client.infer(request)
        while len(local) < cfg.reps:  # rounds of 5 calls each, alternating which goes first
            k = min(5, cfg.reps - len(local))
            order = ("local", "remote") if (len(local) // 5) % 2 == 0 else ("remote", "local")
            for which in order:
                for _ in range(k):
                    if which == "local":
                        start = time.perf_counter()
                        policy.sample_arm(arm_obs(obs), "robot0", n)
                        local.append((time.perf_counter() - start) * 1e3)
                    else:
                        remote_call(client, request, remote)
        req_bytes = len(msgpack_numpy.packb(request))
        resp_bytes = len(msgpack_numpy.packb(remote["response"]))
        rows.append(f"| {n} | {fmt(local)} | {fmt(remote['rtt'])} | {statistics.median(remote['server']):.2f} "
                    f"| {fmt(remote['overhead'])} | {req_bytes:,} / {resp_bytes:,} |")
    return rows


def protocol_table(cfg: Config, log_dir: Path) -> list[str]:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from coop_transport.serving.protocol import packb, parse_request, unpackb

    server = start_server((), log_dir / "zero_server.log",
                          command=(sys.executable, str(Path(__file__).resolve()), "--zero-server"))
    try:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        schema = ZeroChunkRunner().schema
        rows = ["| images | N | round trip median / p99 (ms) | codec only median / p99 (ms) "
                "| request / response bytes |", "|---|---|---|---|---|"]
        for n in cfg.samples:
            request = {**observation(224), "num_samples": n}
            remote: dict = {}
            for _ in range(cfg.warmup):
                client.infer(request)
            for _ in range(cfg.reps):
                remote_call(client, request, remote)
            codec = []
            response = {"actions": np.zeros((n, 32, 7), np.float32),
                        "server_timing": {"infer_ms": 0.0, "queue_ms": 0.0, "decode_ms": 0.0, "batch_size": 1}}
            for _ in range(cfg.reps):
                start = time.perf_counter()
                parse_request(unpackb(packb(request)), schema)
                unpackb(packb(response))
                codec.append((time.perf_counter() - start) * 1e3)
            rows.append(f"| 2 × 224×224×3 uint8 | {n} | {fmt(remote['rtt'])} | {fmt(codec)} "
                        f"| {len(packb(request)):,} / {len(packb(remote['response'])):,} |")
        return rows
    finally:
        server.stop()


def throughput(port: int, clients: int, requests: int, n: int) -> tuple[float, float, list[float]]:
    """(requests/s, mean requests per model call, round trips ms) for ``clients`` concurrent closed-loop clients."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    conns = [WebsocketClientPolicy("127.0.0.1", port) for _ in range(clients)]
    history = history_steps(conns[0])
    for c in conns:
        c.infer({**observation(96, history=history), "num_samples": n})  # warm each connection
    results: list[dict] = [{} for _ in conns]
    barrier = threading.Barrier(clients + 1)

    def loop(i):
        request = {**observation(96, seed=i, history=history), "num_samples": n}
        barrier.wait()
        for _ in range(requests):
            remote_call(conns[i], request, results[i])
            results[i].setdefault("batch", []).append(results[i]["response"]["server_timing"]["batch_size"])

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rtts = [x for r in results for x in r["rtt"]]
    batches = [x for r in results for x in r["batch"]]
    return clients * requests / wall, float(np.mean(batches)), rtts


def main(cfg: Config) -> None:
    if cfg.zero_server:
        serve_zero(cfg.port)
        return
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="serve_latency_"))
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    print(f"# Remote inference over openpi's websocket protocol (loopback) — {cpu}, {os.cpu_count()} cores, "
          f"{cfg.threads} inference thread(s); load {load[0]:.2f} before\n")
    server = start_server(("--threads", str(cfg.threads)), log_dir / "server.log")
    try:
        print("## Latency: shipped per-arm default (96 px), in-process vs served\n")
        print("\n".join(latency_table(cfg, server.port)) + "\n")
        print("## Protocol overhead with two 224×224 images (zero-time model)\n")
        print("\n".join(protocol_table(cfg, log_dir)) + "\n")
        print(f"## Throughput: concurrent clients, N = {cfg.throughput_samples}, {cfg.requests_per_client} requests "
              f"each\n")
        rows = ["| clients | server | requests/s | mean requests per model call | round trip median / p99 (ms) |",
                "|---|---|---|---|---|"]
        for clients in cfg.clients:
            rate, batch, rtts = throughput(server.port, clients, cfg.requests_per_client, cfg.throughput_samples)
            rows.append(f"| {clients} | batching (max 8) | {rate:.1f} | {batch:.2f} | {fmt(rtts)} |")
    finally:
        server.stop()
    if cfg.unbatched:
        server = start_server(("--threads", str(cfg.threads), "--max-batch", "1"), log_dir / "server_unbatched.log")
        try:
            for clients in cfg.clients:
                if clients == 1:
                    continue
                rate, batch, rtts = throughput(server.port, clients, cfg.requests_per_client, cfg.throughput_samples)
                rows.append(f"| {clients} | no batching | {rate:.1f} | {batch:.2f} | {fmt(rtts)} |")
        finally:
            server.stop()
    print("\n".join(rows) + "\n")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; server logs in {log_dir}")


if __name__ == "__main__":
    main(tyro.cli(Config))
