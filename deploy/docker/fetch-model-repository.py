#!/usr/bin/env python3
"""``mpmri-fetch-model-repository URL DEST [--sha256 HEX]``: pull the model-repository tarball into DEST.

The chart's init container runs this (in the Triton image: stdlib only, so it runs on NVIDIA's image and on
the CPU image alike). URL is ``https://``/``http://`` (object storage through a presigned or public URL: S3,
GCS, Azure Blob, MinIO, Artifactory) or ``file://``. The tarball is ``build-model-repository.sh`` output.

* The download is checked against ``--sha256`` before anything is unpacked; a mismatch fails the pod.
* Unpacking refuses absolute paths, ``..``, links and devices, then moves the tree into DEST atomically
  enough for one pod: files land in ``DEST/.incoming`` first.
* ``DEST/.sha256`` records what is there, so a persistent DEST is not downloaded again (idempotent).

Exit status: 0 done, 1 failure (message on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20


def download(url: str, dest: Path, retries: int, timeout_s: float) -> str:
    """Stream ``url`` into ``dest``; return its SHA-256 (hex). Retries transient failures."""
    for attempt in range(1, retries + 1):
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, dest.open("wb") as out:  # noqa: S310
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()
        except OSError as err:
            if attempt == retries:
                raise
            print(f"download attempt {attempt} failed ({err}); retrying", file=sys.stderr)
            time.sleep(min(30, 2**attempt))
    raise AssertionError("unreachable")


def safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Members after checks: regular files and folders only, relative paths inside the archive."""
    members = []
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"unsafe path in archive: {member.name!r}")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"archive member is not a file or folder: {member.name!r}")
        member.mode = 0o755 if member.isdir() else 0o644
        members.append(member)
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sha256", default="", help="expected SHA-256 of the tarball (strongly recommended)")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)

    dest: Path = args.dest
    marker = dest / ".sha256"
    expected = args.sha256.strip().lower()
    if expected and marker.is_file() and marker.read_text().strip() == expected:
        print(f"{dest} already holds {expected[:12]}; nothing to do")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        tarball = Path(tmp) / "model-repository.tar.gz"
        try:
            actual = download(args.url, tarball, args.retries, args.timeout_s)
        except OSError as err:
            print(f"cannot download {args.url}: {err}", file=sys.stderr)
            return 1
        if expected and actual != expected:
            print(f"SHA-256 mismatch for {args.url}: expected {expected}, got {actual}", file=sys.stderr)
            return 1
        incoming = dest / ".incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            with tarfile.open(tarball, "r:gz") as archive:
                archive.extractall(incoming, members=safe_members(archive))  # noqa: S202 (checked above)
        except (tarfile.TarError, ValueError) as err:
            print(f"bad model-repository archive: {err}", file=sys.stderr)
            return 1
    for old in dest.iterdir():
        if old.name not in (".incoming",):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for item in incoming.iterdir():
        os.replace(item, dest / item.name)
    incoming.rmdir()
    marker.write_text(actual + "\n")
    models = sorted(p.name for p in dest.iterdir() if p.is_dir() and not p.name.startswith("."))
    print(f"{dest}: {', '.join(models)} (sha256 {actual[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
