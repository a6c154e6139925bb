"""What every benchmark result records about the run that produced it."""

from __future__ import annotations

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
