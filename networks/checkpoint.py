"""One checkpoint file = the weights of the three networks + the metadata that export and serving need.

File layout (``torch.save`` of a plain dict, readable with ``torch.load(weights_only=True)``)::

    {
      "format": "mpmri-checkpoint", "format_version": 1,
      "profile": NetworkProfile.to_dict(), "grid": GridSpec.to_dict(),
      "state_dict": {"localization": {...}, "map_fusion": {...}, "classification": {...}},
      "metadata_json": "<JSON text>",            # see default_metadata()
      "training_state": {...} | absent,          # optimizer / epoch state, only in resumable run files
    }

Metadata always holds ``profile``, ``contract`` (:func:`contract.contract_dict`; :func:`load_checkpoint`
refuses a checkpoint whose recorded contract differs from the code's, naming each difference),
``code_version`` (``mpmri.__version__`` + git commit when available) and ``created_utc``; training
adds ``training`` (data seed, case count, epochs...) and evaluation adds ``evaluation`` (metrics).
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from contract import ContractMismatchError, GridSpec, __version__, contract_dict, recorded_contract_differences
from contract.errors import MpmriError
from networks.models import MpmriNetworks, NetworkProfile, build_networks_from_profile

CHECKPOINT_FORMAT = "mpmri-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The shipped default checkpoint (CPU profile), made by the command in docs/networks.md.
DEFAULT_CHECKPOINT: Path = REPO_ROOT / "checkpoints" / "cpu_default.pt"


class CheckpointError(MpmriError):
    """A checkpoint file is missing, unreadable or does not match the contract."""


class CheckpointContractError(CheckpointError, ContractMismatchError):
    """A checkpoint's recorded contract differs from the code's (the message names every difference)."""


def contract_problems(metadata: dict[str, Any], grid: GridSpec) -> list[str]:
    """Every way the contract recorded in ``metadata`` differs from the code's for a model on ``grid``.

    ``grid`` is the grid the weights were built for; the recorded contract's grid must be that grid, and
    everything else must be the code's (:func:`contract.recorded_contract_differences`).
    """
    recorded = metadata.get("contract")
    if not isinstance(recorded, dict):
        return recorded_contract_differences({})
    problems = recorded_contract_differences(recorded)
    if isinstance(recorded.get("grid"), dict) and recorded["grid"] != grid.to_dict():
        problems.append(f"grid: recorded contract {recorded['grid']!r} -> weights built for {grid.to_dict()!r}")
    return problems


def require_code_contract(metadata: dict[str, Any], grid: GridSpec, path: Path) -> None:
    """Raise :class:`CheckpointContractError` naming each difference when the recorded contract is not the code's."""
    problems = contract_problems(metadata, grid)
    if problems:
        raise CheckpointContractError(
            f"checkpoint {path} was recorded with another contract than this code's "
            f"({len(problems)} difference(s), recorded -> code): " + "; ".join(problems)
        )


def git_commit() -> str | None:
    """The repository's current commit (read-only ``git rev-parse``), or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code_version() -> dict[str, Any]:
    return {"mpmri": __version__, "git_commit": git_commit(), "torch": torch.__version__}


def default_metadata(nets: MpmriNetworks) -> dict[str, Any]:
    """Metadata every checkpoint carries (callers' keys are merged on top)."""
    return {
        "profile": nets.profile.name,
        "profile_settings": nets.profile.to_dict(),
        "contract": contract_dict(nets.grid),
        "code_version": code_version(),
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def save_checkpoint(
    path: Path, nets: MpmriNetworks, metadata: dict[str, Any], training_state: dict[str, Any] | None = None
) -> None:
    """Write ``nets`` + metadata to ``path`` (atomically: temp file then rename).

    Args:
        path: destination ``.pt`` file; parent folders are created.
        nets: the networks (any device; weights are stored on CPU).
        metadata: JSON-serializable dict merged over :func:`default_metadata`.
        training_state: optional optimizer/epoch state for resuming (omit for shipped checkpoints).
    """
    path = Path(path)
    meta = {**default_metadata(nets), **metadata}
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as err:
        raise CheckpointError(f"checkpoint metadata is not JSON-serializable: {err}") from err
    state = {name: {k: v.detach().cpu().clone() for k, v in sd.items()} for name, sd in nets.state_dict().items()}
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "profile": nets.profile.to_dict(),
        "grid": nets.grid.to_dict(),
        "state_dict": state,
        "metadata_json": meta_json,
    }
    if training_state is not None:
        payload["training_state"] = training_state
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _read(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is "unreadable"
        raise CheckpointError(f"cannot read checkpoint {path}: {err.__class__.__name__}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not an mpmri checkpoint: {path}")
    if int(payload.get("format_version", -1)) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has a newer format version {payload['format_version']}")
    return payload


def load_checkpoint(path: Path, check_contract: bool = True) -> tuple[MpmriNetworks, dict[str, Any]]:
    """Networks (eval mode, CPU) and metadata from ``path``.

    Args:
        path: the checkpoint file.
        check_contract: refuse a checkpoint whose recorded contract differs from the code's (see
            :func:`contract_problems`); ``False`` only to inspect such a file.

    Raises:
        CheckpointContractError: the recorded contract differs from the code's (names each difference).
        CheckpointError: missing/unreadable file, or weights that do not fit the recorded profile.
    """
    payload = _read(path)
    grid = GridSpec.from_dict(payload["grid"])
    metadata = json.loads(payload["metadata_json"])
    if check_contract:  # first: a checkpoint of an older contract may not even fit today's network classes
        require_code_contract(metadata, grid, path)
    try:
        profile = NetworkProfile.from_dict(payload["profile"])
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} records a network profile this code cannot build: {err}") from err
    nets = build_networks_from_profile(profile, grid)
    try:
        nets.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} weights do not match profile {profile.name!r}") from err
    nets.eval()
    return nets, metadata


def load_training_state(path: Path) -> dict[str, Any] | None:
    """The resumable training state stored in ``path`` (``None`` for a shipped, weights-only checkpoint)."""
    state = _read(path).get("training_state")
    return state if isinstance(state, dict) else None
