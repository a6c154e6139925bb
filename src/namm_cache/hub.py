"""Scorer repositories: save, load by name (local folder, Hub, bundled), push, model cards.

A scorer repository holds three files:

- `config.json`: format version, scorer kind and sizes, the feature / eviction settings (`NAMMConfig`),
  the normalisation statistics' shape, base model(s), training tasks and fitness, results;
- `model.safetensors`: scorer parameters plus `spectrogram_mean` / `spectrogram_std`;
- `README.md`: the model card, rendered from `model_cards/template.md` with the run's own numbers.

Only safetensors are ever read and no code is loaded, so a repository cannot run anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import NAMMConfig
from .scorers import SCORER_KINDS, Scorer, build_scorer

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "namm-cache"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_SCORER = "namm-cache/smollm2-135m-bam"


class ScorerLoadError(ValueError):
    """A scorer repository could not be loaded; the message names the file and the fix."""


@dataclass
class ScorerMetadata:
    """What a scorer repository says about itself beyond its weights."""

    base_models: list[str] = field(default_factory=list)
    training_tasks: list[str] = field(default_factory=list)
    fitness: float | None = None
    license: str = "apache-2.0"
    description: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_models": list(self.base_models),
            "training_tasks": list(self.training_tasks),
            "fitness": self.fitness,
            "license": self.license,
            "description": self.description,
            "results": list(self.results),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScorerMetadata":
        known = {key: data[key] for key in ("base_models", "training_tasks", "fitness", "license", "description", "results", "extra") if key in data}
        return cls(**known)


@dataclass
class LoadedScorer:
    scorer: Scorer
    config: NAMMConfig
    metadata: ScorerMetadata
    source: str


# ---------------------------------------------------------------------------------------------- saving
def render_card(scorer: Scorer, config: NAMMConfig, metadata: ScorerMetadata, repo_id: str = "path/to/scorer"):
    """Render the model card (a `huggingface_hub.ModelCard`) from the template and the run's metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        license=metadata.license,
        library_name=LIBRARY_NAME,
        tags=["namm", "kv-cache", "kv-cache-compression", "long-context", f"namm-{scorer.kind}"],
        base_model=list(metadata.base_models) or None,
    )
    results_columns: list[str] = []
    for row in metadata.results:
        results_columns += [key for key in row if key not in results_columns]
    template = resources.files("namm_cache").joinpath("model_cards/template.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        description=metadata.description or "A NAMM scorer.",
        scorer_kind=scorer.kind.upper(),
        num_parameters=f"{scorer.num_parameters():,}",
        input_dim=scorer.input_dim,
        n_bins=scorer.n_bins,
        base_models=", ".join(metadata.base_models) or "not recorded",
        training_tasks=", ".join(metadata.training_tasks) or "none (not evolved)",
        fitness=None if metadata.fitness is None else f"{metadata.fitness:.4f}",
        results=metadata.results,
        results_columns=results_columns,
        format_version=FORMAT_VERSION,
        **config.to_dict(),
    )


def save_scorer(
    path: str | os.PathLike,
    scorer: Scorer,
    config: NAMMConfig,
    metadata: ScorerMetadata | None = None,
    *,
    repo_id: str | None = None,
) -> Path:
    """Write `config.json`, `model.safetensors` and `README.md` to `path` (created; files replaced atomically)."""
    from safetensors.torch import save_file

    _check_compatible(scorer, config, source=str(path))
    metadata = metadata or ScorerMetadata()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "library_name": LIBRARY_NAME,
        "scorer": scorer.config_dict(),
        "namm_config": config.to_dict(),
        "normalization": {"shape": [scorer.n_bins]},
        **metadata.to_dict(),
    }
    tensors = {name: tensor.detach().to(torch.float32).contiguous().cpu() for name, tensor in scorer.state_dict().items()}
    card = render_card(scorer, config, metadata, repo_id=repo_id or path.name)
    staging = Path(tempfile.mkdtemp(prefix=".namm-save-", dir=path))
    try:
        (staging / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "library": LIBRARY_NAME})
        card.save(staging / CARD_NAME)
        for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------- loading
def bundled_root() -> Path:
    return Path(str(resources.files("namm_cache").joinpath("bundled")))


def bundled_names() -> list[str]:
    """Names of the scorers shipped inside the package (`org/name`)."""
    root = bundled_root()
    if not root.is_dir():
        return []
    return sorted(f"{org.name}/{repo.name}" for org in root.iterdir() if org.is_dir() for repo in org.iterdir() if (repo / CONFIG_NAME).is_file())


def _download(repo_id: str, revision: str | None, token: str | bool | None, cache_dir: str | os.PathLike | None) -> Path:
    """Fetch config + weights through huggingface_hub (honours HF_HUB_OFFLINE / the local HF cache)."""
    from huggingface_hub import hf_hub_download

    config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, cache_dir=cache_dir, library_name=LIBRARY_NAME)
    hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, token=token, cache_dir=cache_dir, library_name=LIBRARY_NAME)
    try:
        hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token, cache_dir=cache_dir, library_name=LIBRARY_NAME)
    except Exception:  # the card is optional for loading
        pass
    return Path(config_path).parent


def resolve(name_or_path: str | os.PathLike, *, revision=None, token=None, cache_dir=None) -> tuple[Path, str]:
    """Find the folder of a scorer: a local folder, then the Hub (or its local cache), then the bundled ones.

    Returns `(folder, description of where it came from)`.
    """
    tried = []
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local, f"local folder {local}"
    tried.append(f"no local folder {str(local)!r}")
    name = str(name_or_path)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_repo:
        try:
            return _download(name, revision, token, cache_dir), f"Hub repository {name}"
        except Exception as error:  # network, offline mode, missing repo or file
            tried.append(f"Hub {name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        bundled = bundled_root() / name
        if (bundled / CONFIG_NAME).is_file():
            return bundled, f"bundled scorer {name}"
        tried.append(f"no bundled scorer {name!r} (bundled: {', '.join(bundled_names()) or 'none'})")
    raise ScorerLoadError(f"Cannot find scorer {name!r}: " + "; ".join(tried) + ".")


def _check_compatible(scorer: Scorer, config: NAMMConfig, source: str) -> None:
    if scorer.input_dim != config.feature_dim or scorer.n_bins != config.n_bins:
        raise ScorerLoadError(
            f"{source}: the scorer reads {scorer.input_dim} features ({scorer.n_bins} bins) but the feature config produces "
            f"{config.feature_dim} ({config.recency_dim} recency + {config.n_bins} bins); fix 'scorer' or 'namm_config' in {CONFIG_NAME}."
        )


def load_folder(folder: Path, source: str | None = None) -> LoadedScorer:
    """Load and validate a scorer folder; raise `ScorerLoadError` naming the file and the fix, or return it whole."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = source or str(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise ScorerLoadError(
                f"{source}: found only {', '.join(pickles)}; namm-cache reads safetensors only (pickle files can run code). "
                f"Convert with safetensors.torch.save_file(state_dict, '{WEIGHTS_NAME}')."
            )
        raise ScorerLoadError(f"{source}: missing {WEIGHTS_NAME}; save the scorer with NAMMCache.save_pretrained().")
    if not config_file.is_file():
        raise ScorerLoadError(f"{source}: missing {CONFIG_NAME}; save the scorer with NAMMCache.save_pretrained().")
    try:
        payload = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ScorerLoadError(f"{source}/{CONFIG_NAME} is not valid JSON: {error}.") from None
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ScorerLoadError(
            f"{source}/{CONFIG_NAME}: format_version {version!r} is not supported (this namm-cache reads {FORMAT_VERSION}); "
            "upgrade namm-cache or re-save the scorer."
        )
    scorer_spec = dict(payload.get("scorer") or {})
    kind = scorer_spec.pop("kind", None)
    if kind not in SCORER_KINDS:
        raise ScorerLoadError(f"{source}/{CONFIG_NAME}: unknown scorer kind {kind!r}; known kinds: {sorted(SCORER_KINDS)}.")
    try:
        config = NAMMConfig.from_dict(payload.get("namm_config") or {})
        scorer = build_scorer(kind, **scorer_spec)
    except (TypeError, ValueError) as error:
        raise ScorerLoadError(f"{source}/{CONFIG_NAME}: {error}") from None
    _check_compatible(scorer, config, f"{source}/{CONFIG_NAME}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise ScorerLoadError(f"{source}/{WEIGHTS_NAME} is not a readable safetensors file: {error}.") from None
    expected = scorer.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ScorerLoadError(
            f"{source}/{WEIGHTS_NAME} does not match a {kind} scorer with {scorer_spec}: missing {missing}, unexpected {unexpected}."
        )
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ScorerLoadError(
                f"{source}/{WEIGHTS_NAME}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} "
                f"for the sizes in {CONFIG_NAME}."
            )
        if not torch.isfinite(tensor).all():
            raise ScorerLoadError(f"{source}/{WEIGHTS_NAME}: tensor {key!r} contains NaN or inf.")
    if not bool((tensors["spectrogram_std"] > 0).all()):
        raise ScorerLoadError(f"{source}/{WEIGHTS_NAME}: spectrogram_std must be > 0; recalibrate the scorer.")
    scorer.load_state_dict(tensors)
    scorer.eval()
    return LoadedScorer(scorer=scorer, config=config, metadata=ScorerMetadata.from_dict(payload), source=source)


def load_scorer(name_or_path: str | os.PathLike = DEFAULT_SCORER, *, revision=None, token=None, cache_dir=None) -> LoadedScorer:
    """Resolve (local folder -> Hub / HF cache -> bundled) and load a scorer repository."""
    folder, source = resolve(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    return load_folder(folder, source)


# --------------------------------------------------------------------------------------------- pushing
def push_scorer(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload NAMM scorer",
    api: Any = None,
):
    """Upload a saved scorer folder as one commit (config, weights, card) with `huggingface_hub.HfApi`.

    The folder is validated first (`load_folder`), so a broken scorer is never published.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    load_folder(folder)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
        if (folder / name).is_file()
    ]
    return api.create_commit(
        repo_id, operations, commit_message=commit_message, token=token, revision=revision, create_pr=create_pr
    )


def describe(loaded: LoadedScorer) -> str:
    """A human summary for `namm-cache info`."""
    config = loaded.config
    meta = loaded.metadata
    lines = [
        f"source: {loaded.source}",
        f"scorer: {loaded.scorer.kind} ({loaded.scorer.num_parameters():,} parameters, input {loaded.scorer.input_dim})",
        f"features: n_fft {config.n_fft}, hop {config.hop_length}, ema_gamma {config.ema_gamma}, recency_dim {config.recency_dim}",
        f"eviction: every {config.update_interval} tokens, threshold {config.threshold}, max_tokens {config.max_tokens}",
        f"normalisation: mean {[round(float(v), 4) for v in loaded.scorer.spectrogram_mean[:4]]}..., "
        f"std {[round(float(v), 4) for v in loaded.scorer.spectrogram_std[:4]]}...",
        f"base models: {', '.join(meta.base_models) or 'not recorded'}",
        f"training tasks: {', '.join(meta.training_tasks) or 'none'}",
        f"fitness: {meta.fitness if meta.fitness is not None and not math.isnan(meta.fitness) else 'not recorded'}",
        f"license: {meta.license}",
    ]
    if meta.description:
        lines.append(f"description: {meta.description}")
    for row in meta.results:
        lines.append("result: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    return "\n".join(lines)
