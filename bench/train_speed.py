"""π0 training throughput (samples/s) and peak GPU memory, per model configuration and mode, as a markdown table.

Usage:
    python bench/train_speed.py                                  # small (per-arm, joint) eager + compile, pi0-3b LoRA
    python bench/train_speed.py --configs small --batch-sizes 64,128,256 --modes eager
    python bench/train_speed.py --json runs/bench/train_speed.json

Each row builds the model as training does (build_model: LoRA and frozen base for pi0-3b, EMA where the config
keeps one, the training loop's AdamW (imitation.make_optimizer), bf16 autocast) and times ``--steps`` optimizer steps of ``imitation.make_train_step``
on a synthetic batch already on the device (the training loop's StepTable is device-resident too, so this is the
loop's cost minus one gather), after ``--warmup`` untimed steps (torch.compile compiles in those). Peak memory is
torch.cuda.max_memory_allocated over the timed steps. pi0-3b runs at random init: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from coop_transport.adapters import variant_spec
from coop_transport.imitation import ImitationConfig, make_optimizer, make_train_step
from coop_transport.policy.config import get_config
from coop_transport.policy.ema import EMA
from coop_transport.policy.model import build_model


def synthetic_batch(config, batch_size: int, device: torch.device) -> dict:
    size = config.vision.image_size
    g = torch.Generator().manual_seed(0)
    return {
        "images": {c: torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=g).to(device)
                   for c in config.cameras},
        "state": torch.randn(batch_size, config.state_dim, generator=g).to(device),
        "actions": torch.randn(batch_size, config.action_horizon, config.action_dim, generator=g).to(device),
        "action_pad_mask": torch.ones(batch_size, config.action_horizon, dtype=torch.bool, device=device),
        "prompt_tokens": torch.randint(3, 200, (batch_size, config.max_token_len), generator=g).to(device),
        "prompt_mask": torch.ones(batch_size, config.max_token_len, dtype=torch.bool, device=device),
    }


def time_training(name: str, variant: str, batch_size: int, mode: str, steps: int, warmup: int,
                  device: torch.device) -> dict:
    spec = variant_spec(variant)
    horizon = 50 if name == "pi0-3b" else 32
    config = get_config(name, setting=spec.model_setting, action_horizon=horizon)
    model = build_model(config, device=device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=ImitationConfig.weight_decay)
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    step = make_train_step(model, optimizer, ema, grad_clip=1.0, compile=mode == "compile")
    batch = synthetic_batch(config, batch_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compile_start = time.perf_counter()
    for _ in range(warmup):
        step(batch)
    sync()
    warmup_s = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = step(batch)
    sync()
    elapsed = time.perf_counter() - start
    row = {
        "config": name, "variant": variant, "mode": mode, "batch": batch_size,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_M": sum(p.numel() for p in trainable) / 1e6,
        "ms_per_step": 1e3 * elapsed / steps, "samples_per_s": steps * batch_size / elapsed,
        "warmup_s": warmup_s, "loss": float(loss),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del model, optimizer, ema, step, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,pi0-3b")
    parser.add_argument("--variants", default="per-arm,joint")
    parser.add_argument("--modes", default="eager,compile", help="eager and/or compile (torch.compile of the loss)")
    parser.add_argument("--batch-sizes", default=None, help="default: 128 for small, 32 for pi0-3b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows = []
    for name in args.configs.split(","):
        sizes = args.batch_sizes or ("32" if name == "pi0-3b" else "128")
        variants = args.variants.split(",") if name != "pi0-3b" else args.variants.split(",")[:1]
        for variant in variants:
            for mode in args.modes.split(","):
                for batch_size in (int(b) for b in sizes.split(",")):
                    try:
                        row = time_training(name, variant, batch_size, mode, args.steps, args.warmup, device)
                    except torch.OutOfMemoryError as error:
                        row = {"config": name, "variant": variant, "mode": mode, "batch": batch_size,
                               "error": f"out of memory: {str(error).splitlines()[0]}"}
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ntraining throughput on {device_name}, torch {torch.__version__}\n")
    print("| config | variant | mode | batch | params (M) | trainable (M) | ms/step | samples/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['variant']} | {r['mode']} | {r['batch']} | {r['error']} |||||")
            continue
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['config']} | {r['variant']} | {r['mode']} | {r['batch']} | {r['parameters_M']:.1f} | "
              f"{r['trainable_M']:.1f} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.0f} | {peak} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
