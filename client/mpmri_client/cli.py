"""The ``mpmri`` console script.

``mpmri analyze`` is this package's own. Every other subcommand belongs to mpmri-serve, found through the
``mpmri.cli`` entry point when it is installed: a client-only install has ``analyze`` alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import grpc

from mpmri_client.api import AnalysisClient, env_options
from mpmri_client.results import write_outputs

DEFAULT_SERVER = "127.0.0.1:50051"


def register(subparsers: Any) -> None:
    """Add ``analyze`` to an ``argparse`` sub-parser set (also used by mpmri-serve's full CLI)."""
    p = subparsers.add_parser(
        "analyze",
        help="send a DICOM study to the analysis service; write result.json, seg.dcm, sr.dcm, overlay.png",
        description="Send a DICOM study to the analysis service and write its findings.",
    )
    p.add_argument("dicom_dir", type=Path, help="folder with the study's DICOM files (searched recursively)")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"service host:port (default {DEFAULT_SERVER})")
    p.add_argument("--out", type=Path, default=Path("out/analyze"), help="output folder")
    p.add_argument("--request-id", default="", help="id echoed by the service and its logs")
    p.add_argument("--study-uid", default="", help="StudyInstanceUID to analyze when the folder holds several")
    p.add_argument("--deadline-s", type=float, default=300.0, help="whole-call deadline in seconds (with retries)")
    p.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE (exponential backoff)")
    p.add_argument("--ca", type=Path, default=None, help="CA PEM: enables TLS (env MPMRI_CLIENT_CA)")
    p.add_argument("--cert", type=Path, default=None, help="client certificate PEM for mutual TLS (MPMRI_CLIENT_CERT)")
    p.add_argument("--key", type=Path, default=None, help="client key PEM for mutual TLS (MPMRI_CLIENT_KEY)")
    p.add_argument("--server-name", default=None, help="TLS host name to verify, when it differs from --server")
    p.add_argument("--token", default=None, help="bearer token (better: env MPMRI_CLIENT_TOKEN)")
    p.add_argument("--no-dicom", action="store_true", help="do not ask for the SEG and SR")
    p.add_argument("--no-overlay", action="store_true", help="do not ask for the fused map and overlay")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    options = env_options(
        root_certificates=args.ca,
        certificate_chain=args.cert,
        private_key=args.key,
        server_name=args.server_name,
        token=args.token,
        retries=args.retries,
    )
    try:
        with AnalysisClient(args.server, options) as client:
            response = client.analyze_folder(
                args.dicom_dir,
                request_id=args.request_id,
                timeout_s=args.deadline_s,
                include_dicom_outputs=not args.no_dicom,
                include_cspca_map=not args.no_overlay,
                include_t2w_preview=not args.no_overlay,
                study_instance_uid=args.study_uid,
            )
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = write_outputs(response, args.out)
    lesions = ", ".join(
        f"#{les.id} LPS ({', '.join(f'{v:.1f}' for v in les.center_lps_mm)}) mm, {les.volume_ml:.2f} ml, "
        f"p={les.likelihood:.2f}, PI-RADS-like {les.pirads}"
        for les in response.lesions
    )
    print(
        f"csPCa probability {response.cspca_probability:.3f}, PI-RADS-like {response.pirads_score}, "
        f"{len(response.lesions)} lesion(s){': ' + lesions if lesions else ''}"
    )
    for warning in response.warnings:
        print(f"warning: {warning}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _full_cli() -> Any | None:
    for ep in entry_points(group="mpmri.cli"):
        if ep.name == "main":
            return ep.load()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `analyze` never loads the full CLI (its other commands import torch: seconds of start-up)
    full = None if args_list[:1] == ["analyze"] else _full_cli()
    if full is not None:
        return int(full(args_list) or 0)
    parser = argparse.ArgumentParser(prog="mpmri", description="mpmri-serve client (install mpmri-serve for more)")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
