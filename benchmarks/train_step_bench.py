"""Training-step time of a network profile on a CUDA device: fp32 against bf16 autocast, interleaved.

One synthetic batch (random images, a few lesion blocks as targets) at the profile's grid; every round times
``--steps`` optimizer steps of each variant in turn (after ``--warmup`` steps each), per training phase, so the
two precisions share the machine's state. Writes JSON; ``--write`` renders it as the marked section
``<!-- training:step:begin/end -->`` of a markdown file (BENCHMARKS.md):

    python benchmarks/train_step_bench.py --json-out step.json                 # on the GPU machine
    .venv/bin/python benchmarks/train_step_bench.py --render step.json --write BENCHMARKS.md

No patient data: the batch is random.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

MARK_BEGIN, MARK_END = "<!-- training:step:begin -->", "<!-- training:step:end -->"


def synthetic_batch(grid_dhw: tuple[int, int, int], batch: int, device: Any) -> dict[str, Any]:
    """A training batch ``[B, S, D, H, W]`` of random images with one cubic lesion per study (category 4)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    d, h, w = grid_dhw
    images = torch.randn((batch, 3, d, h, w), generator=gen)
    lesion_index = torch.zeros((batch, d, h, w), dtype=torch.int64)
    lesion_index[:, d // 3 : d // 3 + 4, h // 2 : h // 2 + h // 10, w // 2 : w // 2 + w // 10] = 1
    out = {
        "images": images,
        "availability": torch.ones((batch, 3)),
        "target": (lesion_index > 0).float()[:, None],
        "pirads_target": torch.where(lesion_index > 0, 4, 1),
        "lesion_index": lesion_index,
        "significant": torch.ones(batch),
        "pirads_class": torch.full((batch,), 3, dtype=torch.int64),
    }
    return {k: v.to(device) for k, v in out.items()}


def measure(
    profile: str, grid: str, batch: int, steps: int, warmup: int, rounds: int, device_name: str = "cuda"
) -> dict[str, Any]:
    import torch

    from contract import NAMED_GRIDS
    from networks.models import PROFILES, build_networks_from_profile
    from training.train import LocalizationLoss, _forward, trainable_parameters

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    nets = build_networks_from_profile(PROFILES[profile], NAMED_GRIDS[grid])
    for module in nets.modules().values():
        module.to(device)
    nets.train()
    data = synthetic_batch(NAMED_GRIDS[grid].size_dhw, batch, device)
    loss_fn = LocalizationLoss().to(device)
    variants = {"fp32": None, "bf16 autocast": torch.bfloat16}
    results: dict[str, dict[str, list[float]]] = {}
    peak: dict[str, dict[str, float]] = {}
    for phase in ("localization", "classification", "joint"):
        params = trainable_parameters(nets, phase)
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(dtype: Any, phase: str = phase, optimizer: Any = optimizer) -> float:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = _forward(nets, data, phase, loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        for name, dtype in variants.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                step(dtype)
            sync()
            peak.setdefault(phase, {})[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        for _ in range(rounds):
            for name, dtype in variants.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(dtype)
                sync()
                per_step_ms = (time.perf_counter() - t0) / steps * 1000
                results.setdefault(phase, {}).setdefault(name, []).append(per_step_ms)
    return {
        "profile": profile,
        "grid": grid,
        "grid_dhw": list(NAMED_GRIDS[grid].size_dhw),
        "batch": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/train_step_bench.py", *sys.argv[1:]]),
        "ms_per_step": results,
        "peak_memory_gib": peak,
    }


def render(result: dict[str, Any]) -> str:
    """The markdown section (markers included)."""
    lines = [
        MARK_BEGIN,
        f"## Training step on a GPU: the {result['profile']} profile at the {result['grid']} grid (generated)",
        "",
        "Generated by `benchmarks/train_step_bench.py` on the device machine; a random batch (no patient data).",
        "",
        f"- Machine: {result['device']}, torch {result['torch']}; {result['date_utc']}.",
        f"- Command: `{result['command']}`.",
        f"- Batch {result['batch']} at {'x'.join(map(str, result['grid_dhw']))} voxels; {result['rounds']} rounds of"
        f" {result['steps_per_round']} optimizer steps per variant, the variants interleaved round by round.",
        "",
        "| phase | variant | median ms / step | min–max over rounds | peak GPU memory (GiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for phase, variants in result["ms_per_step"].items():
        for name, values in variants.items():
            lines.append(
                f"| {phase} | {name} | {statistics.median(values):.1f} | {min(values):.1f}–{max(values):.1f}"
                f" | {result['peak_memory_gib'][phase][name]:.1f} |"
            )
    lines.append(MARK_END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--grid", default="realistic")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a dry run)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="render this JSON instead of measuring")
    parser.add_argument("--write", type=Path, default=None, help="replace the marked section of this file")
    args = parser.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
    else:
        result = measure(args.profile, args.grid, args.batch, args.steps, args.warmup, args.rounds, args.device)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result, indent=2))
    section = render(result)
    print(section)
    if args.write is not None:
        from serving.perf import update_benchmarks_md  # here, not on the GPU machine (no serving stack there)

        update_benchmarks_md(args.write, section, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
