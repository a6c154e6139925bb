"""What every benchmark result records about the run that produced it."""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import sys
import time
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


def refuse(program: str, error: BaseException):
    """A user's mistake: one `PROGRAM: error: ...` line on stderr, exit status 2 (no traceback)."""
    print(f"{program}: error: {' '.join(str(error).split())}", file=sys.stderr)
    raise SystemExit(2)


def output_file(flag: str, value: str) -> Path:
    """`value` as a results file whose folder exists (a `ValueError` naming `flag` otherwise)."""
    out = Path(value)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"{flag} {value!r} must be a file in an existing folder.")
    return out


def task_names(flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of task names, each once, in order; a `ValueError` unless some and only `allowed`."""
    tasks = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not tasks or set(tasks) - set(allowed):
        raise ValueError(f"{flag} must name some of {', '.join(allowed)}, got {value!r}.")
    return tasks


def scorer_id(name_or_path: str) -> str:
    """The scorer's name plus a hash of its weights and config, so a re-exported folder is not mistaken for the old one."""
    from namm_cache.hub import resolve

    folder, _ = resolve(name_or_path)
    digest = hashlib.sha256()
    for file in ("config.json", "model.safetensors"):
        digest.update((folder / file).read_bytes())
    return f"{name_or_path}@{digest.hexdigest()[:12]}"


def median_seconds(function, repeats: int, *, warmup: int = 0) -> float:
    """Median wall seconds of `repeats` calls of `function`, after `warmup` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timers measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_settings(script: str, argv: list[str] | None, args, device: torch.device, names: tuple[str, ...]) -> dict:
    """Provenance plus the model, device, dtype and the named settings of a model benchmark run."""
    return {
        **provenance(script, argv),
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        **{name: getattr(args, name) for name in names},
    }


# Real architectures with random weights: for timing and memory only (weights do not change the work done).
RANDOM_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),  # for tests
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
}


def load_benchmark_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", max_positions: int = 32768,
                         attn_implementation: str = "sdpa"):
    """`(model, tokenizer or None)`: an offline real model by name, or `random:SHAPE` (a Llama of that shape,
    random weights, `max_positions` context) for timing and memory runs that need no real weights."""
    if name.startswith("random:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = name.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise SystemExit(f"Unknown random shape {shape!r}; choose from {sorted(RANDOM_SHAPES)}.")
        config = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=max_positions, attn_implementation=attn_implementation)
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise in the target dtype: an 8B model in fp32 would double the memory
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
        return model.eval(), None
    from namm_cache.offline import load_offline_model

    model, tokenizer = load_offline_model(name, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device), tokenizer
