"""What every benchmark result records about the run that produced it."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def provenance(script: str, argv: list[str] | None = None) -> dict[str, str]:
    """Date, machine and the exact command, for the README tables (nothing typed by hand)."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "command": " ".join(["python", f"benchmarks/{Path(script).name}", *args]),
    }


def scorer_id(name_or_path: str) -> str:
    """The scorer's name plus a hash of its weights and config, so a re-exported folder is not mistaken for the old one."""
    from namm_cache.hub import resolve

    folder, _ = resolve(name_or_path)
    digest = hashlib.sha256()
    for file in ("config.json", "model.safetensors"):
        digest.update((folder / file).read_bytes())
    return f"{name_or_path}@{digest.hexdigest()[:12]}"
