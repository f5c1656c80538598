"""Turn an ``AnalyzeResponse`` into files: ``result.json``, ``seg.dcm``, ``sr.dcm`` and ``overlay.png``.

The PNG is written with zlib alone (no imaging library), so the client stays small.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mpmri_client.v1 import analysis_pb2 as pb


def grid_volume_array(volume: pb.GridVolume) -> np.ndarray:
    """``GridVolume`` -> float32 ``[D, H, W]``."""
    w, h, d = (int(v) for v in volume.size_ijk)
    return np.frombuffer(volume.float16_dhw, dtype="<f2").reshape(d, h, w).astype(np.float32)


def response_to_dict(response: pb.AnalyzeResponse) -> dict[str, Any]:
    """The findings as JSON-serializable data (the ``result.json`` layout)."""
    return {
        "request_id": response.request_id,
        "study_instance_uid": response.study_instance_uid,
        "cspca_probability": response.cspca_probability,
        "pirads_score": response.pirads_score,
        "pirads_distribution": list(response.pirads_distribution),
        "lesions": [
            {
                "id": lesion.id,
                "center_lps_mm": list(lesion.center_lps_mm),
                "volume_ml": lesion.volume_ml,
                "likelihood": lesion.likelihood,
                "pirads": lesion.pirads,
                "score": lesion.score,
            }
            for lesion in response.lesions
        ],
        "availability": dict(response.availability),
        "series": [
            {
                "sequence": s.sequence,
                "series_instance_uid": s.series_instance_uid,
                "series_description": s.series_description,
                "reason": s.reason,
                **({"b_value_s_per_mm2": s.b_value_s_per_mm2} if s.b_value_s_per_mm2 else {}),
            }
            for s in response.series
        ],
        "warnings": list(response.warnings),
        "model_name": response.model_name,
        "model_version": response.model_version,
        "timings_s": dict(response.timings_s),
        "num_instances": response.num_instances,
        "seg_sop_instance_uid": response.seg.sop_instance_uid or None,
        "sr_sop_instance_uid": response.sr.sop_instance_uid or None,
        "results_stored": response.results_stored,
    }


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Write ``rgb`` (uint8 ``[H, W, 3]``) as a PNG."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )
    return path


def overlay_rgb(t2w: np.ndarray, fused: np.ndarray, scale: int = 4, threshold: float = 0.05) -> np.ndarray:
    """T2W slice with the fused map in red-yellow on the slice of the map's maximum; ``[D, H, W]`` inputs.

    Returns uint8 ``[H * scale, 2 * W * scale, 3]``: T2W alone on the left, the overlay on the right.
    """
    k = int(np.unravel_index(int(np.argmax(fused)), fused.shape)[0])
    gray = np.clip(t2w[k], 0.0, 1.0)
    heat = np.clip(fused[k], 0.0, 1.0)
    base = np.repeat((gray * 255.0)[..., None], 3, axis=2)
    colour = np.stack([np.full_like(heat, 255.0), heat * 255.0, np.zeros_like(heat)], axis=2)
    alpha = np.where(heat >= threshold, 0.35 + 0.5 * heat, 0.0)[..., None]
    over = base * (1.0 - alpha) + colour * alpha
    image = np.concatenate([base, over], axis=1).astype(np.uint8)
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def write_outputs(response: pb.AnalyzeResponse, out_dir: Path) -> dict[str, Path]:
    """Write ``result.json`` and, when present in ``response``, ``seg.dcm``, ``sr.dcm`` and ``overlay.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"result": out_dir / "result.json"}
    written["result"].write_text(json.dumps(response_to_dict(response), indent=2) + "\n")
    if response.seg.data:
        written["seg"] = out_dir / "seg.dcm"
        written["seg"].write_bytes(response.seg.data)
    if response.sr.data:
        written["sr"] = out_dir / "sr.dcm"
        written["sr"].write_bytes(response.sr.data)
    heat = response.cspca_map if response.cspca_map.float16_dhw else response.fused_map
    if heat.float16_dhw and response.t2w_preview.float16_dhw:
        rgb = overlay_rgb(grid_volume_array(response.t2w_preview), grid_volume_array(heat))
        written["overlay"] = write_png(out_dir / "overlay.png", rgb)
    return written
