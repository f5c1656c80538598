#!/usr/bin/env python3
"""``mpmri-warmup [--url URL] [--model M] [--batch-sizes 1,4,8] [-- tritonserver FLAGS...]``: warm a Triton up.

Sends one inference request per batch size to the model (inputs of ones, shapes from the model's config),
so that onnxruntime's TensorRT execution provider builds its engines on *this* GPU for every batch shape
and writes them to its engine cache (``trt_engine_cache_path`` in ``config.pbtxt``). Plans are tied to
the GPU architecture and TensorRT version, so they are built where they run.

With a command after ``--``, the script starts that server first (the chart's ``tensorrt-warmup`` init
container runs the same ``tritonserver`` flags as the serving container, on the same GPU and engine-cache
volume), waits for readiness, warms up and stops it; the serving container then starts on warm engines.
Without one, it warms up a running server. Stdlib only: runs in NVIDIA's image and in the CPU image.

Exit status: 0 done, 1 failure (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DTYPES = {"TYPE_FP32": ("FP32", 4, struct.pack("<f", 1.0))}


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback URL)
        return json.loads(response.read())


def wait_ready(url: str, deadline: float, server: subprocess.Popen[bytes] | None) -> None:
    """Poll ``/v2/health/ready`` until it answers 200 or ``deadline`` (monotonic) passes."""
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"tritonserver exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5):  # noqa: S310
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1.0)
    raise RuntimeError(f"{url} not ready before the timeout")


def infer_once(url: str, model: str, config: dict[str, Any], batch: int, timeout_s: float) -> float:
    """One request of ``batch`` studies (inputs of ones, binary tensors); returns its latency in seconds."""
    header: dict[str, Any] = {
        "inputs": [],
        "outputs": [{"name": o["name"], "parameters": {"binary_data": True}} for o in config.get("output", [])],
    }
    payload = b""
    batched = int(config.get("max_batch_size", 0)) > 0
    for spec in config["input"]:
        if spec["data_type"] not in DTYPES:
            raise RuntimeError(f"input {spec['name']}: data type {spec['data_type']} not supported by the warm-up")
        datatype, _size, one = DTYPES[spec["data_type"]]
        shape = ([batch] if batched else []) + [int(d) for d in spec["dims"]]
        count = 1
        for dim in shape:
            count *= dim
        data = one * count
        header["inputs"].append(
            {"name": spec["name"], "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(data)}}
        )
        payload += data
    body = json.dumps(header).encode()
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=body + payload,
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(body))},
        method="POST",
    )
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        response.read()
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        command = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Triton HTTP endpoint")
    parser.add_argument("--model", default="mpmri_ensemble")
    parser.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="whole warm-up, server start included")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout_s
    url = args.url.rstrip("/")

    server = subprocess.Popen(command) if command else None  # noqa: S603 (the pod's own server command)
    try:
        wait_ready(url, deadline, server)
        config = _get_json(f"{url}/v2/models/{args.model}/config", 30)
        max_batch = int(config.get("max_batch_size", 0)) or 1
        for batch in (int(b) for b in args.batch_sizes.split(",") if b):
            if batch > max_batch:
                print(f"skip batch {batch}: above max_batch_size {max_batch}", file=sys.stderr)
                continue
            remaining = max(1.0, deadline - time.monotonic())
            first = infer_once(url, args.model, config, batch, remaining)
            again = infer_once(url, args.model, config, batch, remaining)
            print(f"{args.model} batch {batch}: first request {first:.2f} s, second {again:.3f} s", flush=True)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        print(f"warm-up failed: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
