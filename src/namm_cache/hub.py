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
from .validation import check_float, check_known_keys, check_mapping

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "namm-cache"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# A scorer's config.json is a few kilobytes; anything far larger is not one (and is not read into memory).
MAX_CONFIG_BYTES = 16 * 2**20
METADATA_KEYS = ("base_models", "training_tasks", "fitness", "license", "description", "results", "extra")
CONFIG_KEYS = ("format_version", "library_name", "scorer", "namm_config", "normalization", *METADATA_KEYS)
DEFAULT_SCORER = "namm-cache/smollm2-135m-linear"


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

    def __post_init__(self) -> None:
        """Check field types, so a card and `namm-cache info` never meet a string fitness or a bare string list."""
        self.fitness = check_float("fitness", self.fitness, optional=True)
        for name in ("base_models", "training_tasks"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r:.80}.")
            setattr(self, name, list(value))
        for name in ("license", "description"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r:.80}.")
        if not isinstance(self.results, (list, tuple)) or not all(isinstance(row, dict) for row in self.results):
            raise ValueError(f"results must be a list of objects (one per result row), got {self.results!r:.80}.")
        self.results = list(self.results)
        self.extra = check_mapping("extra", self.extra)

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
        """The metadata fields of a parsed `config.json` (other keys are ignored here); null means the default."""
        known = {key: data[key] for key in METADATA_KEYS if data.get(key) is not None}
        return cls(**known)


@dataclass
class LoadedScorer:
    scorer: Scorer
    config: NAMMConfig
    metadata: ScorerMetadata
    source: str


def weights_digest(scorer: Scorer) -> str:
    """The sha256 of a scorer's tensors (names, shapes and float32 values, normalisation statistics included):
    equal for the same weights wherever they are stored, so a result can name exactly what it evaluated."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(scorer.state_dict().items()):
        values = tensor.detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


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
    read, ignored = scorer.inputs_read()
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
        extra_inputs=", ".join(scorer.extra_inputs),
        inputs_read=_spoken_list(read),
        inputs_ignored=_spoken_list(ignored),
        base_models=", ".join(metadata.base_models) or "not recorded",
        training_tasks=", ".join(metadata.training_tasks) or "none (not evolved)",
        fitness=None if metadata.fitness is None else f"{metadata.fitness:.4f}",
        results=metadata.results,
        results_columns=results_columns,
        format_version=FORMAT_VERSION,
        **config.to_dict(),
    )


def _spoken_list(names: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


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

    # Re-check what is written: a config or metadata edited after it was built (e.g. `cache.namm_config.threshold
    # = float("nan")`) must not reach config.json, where it would silently break every later load.
    config.validate()
    _check_compatible(scorer, config, source=str(path))
    if isinstance(metadata, dict):
        check_known_keys("metadata", metadata, METADATA_KEYS)
        metadata = ScorerMetadata(**metadata)
    elif metadata is not None and not isinstance(metadata, ScorerMetadata):
        raise ValueError(f"metadata must be a ScorerMetadata or a dict of its fields, got {type(metadata).__name__}.")
    metadata = ScorerMetadata(**(metadata or ScorerMetadata()).to_dict())
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
    """Fetch config + weights through huggingface_hub (honours HF_HUB_OFFLINE / the local HF cache).

    Raises the Hub's own error when the repository (or its `config.json`) cannot be had at all, and
    `ScorerLoadError` when `config.json` came but the weights did not: a half-downloaded copy is an error,
    never a reason to fall back to another scorer.
    """
    from huggingface_hub import hf_hub_download

    config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, cache_dir=cache_dir, library_name=LIBRARY_NAME)
    try:
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, token=token, cache_dir=cache_dir, library_name=LIBRARY_NAME)
    except Exception as error:
        raise ScorerLoadError(
            f"Hub repository {repo_id}{f' (revision {revision!r})' if revision else ''}: {CONFIG_NAME} was found "
            f"({Path(config_path).parent}) but {WEIGHTS_NAME} could not be had ({type(error).__name__}: "
            f"{_first_line(error)}). The copy is incomplete: download it again with network access "
            "(HF_HUB_OFFLINE unset) or delete that cache folder; no other scorer is substituted."
        ) from None
    try:
        hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token, cache_dir=cache_dir, library_name=LIBRARY_NAME)
    except Exception:  # the card is optional for loading
        pass
    return Path(config_path).parent


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0].rstrip(".") if text else ""


def resolve(name_or_path: str | os.PathLike, *, revision=None, token=None, cache_dir=None) -> tuple[Path, str]:
    """Find the folder of a scorer: a local folder, then the Hub (or its local cache), then the bundled ones.

    A bundled scorer stands in for a Hub name only when nothing of that repository can be had from the Hub
    or its cache and no `revision` was asked for: bundled scorers have no revisions, and a cache copy that
    lacks its weights is reported, not replaced.

    Returns `(folder, description of where it came from)`.
    """
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ScorerLoadError(f"revision must be a non-empty string (a branch, tag or commit), got {revision!r}.")
    tried = []
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ScorerLoadError(f"revision={revision!r} was given for the local folder {local}; a local folder has no revisions.")
        return local, f"local folder {local}"
    tried.append(f"no local folder {str(local)!r}")
    name = str(name_or_path)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_repo:
        try:
            return _download(name, revision, token, cache_dir), f"Hub repository {name}"
        except ScorerLoadError:
            raise
        except Exception as error:  # network, offline mode, missing repo or file
            tried.append(f"Hub {name}{f' revision {revision!r}' if revision else ''}: {type(error).__name__}: {_first_line(error)}")
        bundled = bundled_root() / name
        if (bundled / CONFIG_NAME).is_file():
            if revision is not None:
                raise ScorerLoadError(
                    f"Cannot find scorer {name!r} at revision {revision!r}: " + "; ".join(tried) + f". A scorer named {name!r} "
                    "is bundled with namm-cache, but bundled scorers have no revisions, so it is not substituted; "
                    "drop revision= to use the bundled copy."
                )
            return bundled, f"bundled scorer {name}"
        tried.append(f"no bundled scorer {name!r} (bundled: {', '.join(bundled_names()) or 'none'})")
    else:
        similar = [bundled for bundled in bundled_names() if bundled.split("/")[-1] == name.strip("/").split("/")[-1]]
        tried.append(f"not a Hub repository id (owner/name)"
                     + (f"; a bundled scorer is named {similar[0]!r}" if similar else f"; bundled: {', '.join(bundled_names()) or 'none'}"))
    raise ScorerLoadError(f"Cannot find scorer {name!r}: " + "; ".join(tried) + ".")


def _check_compatible(scorer: Scorer, config: NAMMConfig, source: str) -> None:
    if scorer.input_dim != scorer.input_dim_for(config) or scorer.n_bins != config.n_bins:
        raise ScorerLoadError(
            f"{source}: the scorer reads {scorer.input_dim} features ({scorer.n_bins} bins) but the feature config gives it "
            f"{scorer.input_dim_for(config)} ({config.recency_dim} recency + {config.n_bins} bins"
            f"{' + ' + '/'.join(scorer.extra_inputs) if scorer.extra_inputs else ''}); fix 'scorer' or 'namm_config' in {CONFIG_NAME}."
        )


def _read_config(config_file: Path, source: str) -> dict[str, Any]:
    """Parse `config.json` into a dict, or raise one `ScorerLoadError` naming the file."""
    where = f"{source}/{CONFIG_NAME}"
    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ScorerLoadError(f"{where} is {size:,} bytes; a scorer config is a few kilobytes, so this is not one.")
    try:
        payload = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ScorerLoadError(f"{where} is not valid JSON: {error}.") from None
    except RecursionError:
        raise ScorerLoadError(f"{where} is nested too deeply to be a scorer config.") from None
    try:
        payload = check_mapping(where, payload)
        check_known_keys(where, payload, CONFIG_KEYS)
    except ValueError as error:
        raise ScorerLoadError(str(error)) from None
    return payload


def _header_shapes(weights_file: Path, source: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading (or allocating) any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ScorerLoadError(f"{source}/{WEIGHTS_NAME} is not a readable safetensors file: {error}.") from None


def load_folder(folder: Path, source: str | None = None) -> LoadedScorer:
    """Load and validate a scorer folder; raise `ScorerLoadError` naming the file and the fix, or return it whole.

    Order matters: `config.json` is parsed and every number in it checked, then the sizes it declares are
    compared with the tensor shapes in the safetensors header (a scorer is first built on the meta device,
    which allocates nothing), and only then is a scorer allocated and the weights read.
    """
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
    payload = _read_config(config_file, source)
    where = f"{source}/{CONFIG_NAME}"
    version = payload.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ScorerLoadError(
            f"{where}: format_version {version!r} is not supported (this namm-cache reads {FORMAT_VERSION}); "
            "upgrade namm-cache or re-save the scorer."
        )
    try:
        scorer_spec = check_mapping(f"{where} 'scorer'", payload.get("scorer"))
    except ValueError as error:
        raise ScorerLoadError(str(error)) from None
    kind = scorer_spec.pop("kind", None)
    if not isinstance(kind, str) or kind not in SCORER_KINDS:
        raise ScorerLoadError(f"{where}: unknown scorer kind {kind!r}; known kinds: {sorted(SCORER_KINDS)}.")
    try:
        check_known_keys(f"{where} 'scorer'", scorer_spec, _constructor_arguments(SCORER_KINDS[kind]))
        stored_config = payload.get("namm_config")
        config = NAMMConfig.from_dict({} if stored_config is None else stored_config, where=f"{where} 'namm_config'")
        metadata = ScorerMetadata.from_dict(payload)
        with torch.device("meta"):  # sizes are checked without allocating: a meta tensor has no storage
            blueprint = build_scorer(kind, **scorer_spec)
    except ValueError as error:
        raise ScorerLoadError(f"{where}: {error}" if not str(error).startswith(where) else str(error)) from None
    _check_compatible(blueprint, config, where)
    normalization = payload.get("normalization")
    if normalization is not None and normalization != {"shape": [blueprint.n_bins]}:
        raise ScorerLoadError(f"{where}: 'normalization' must be {{\"shape\": [{blueprint.n_bins}]}} for {blueprint.n_bins} bins, got {normalization!r:.80}.")
    expected = {key: tuple(tensor.shape) for key, tensor in blueprint.state_dict().items()}
    stored = _header_shapes(weights_file, source)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ScorerLoadError(
            f"{source}/{WEIGHTS_NAME} does not match a {kind} scorer with {scorer_spec}: missing {missing}, unexpected {unexpected}."
        )
    for key, shape in stored.items():
        if shape != expected[key]:
            raise ScorerLoadError(
                f"{source}/{WEIGHTS_NAME}: tensor {key!r} has shape {shape}, expected {expected[key]} "
                f"for the sizes in {CONFIG_NAME}."
            )
    scorer = build_scorer(kind, **scorer_spec)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise ScorerLoadError(f"{source}/{WEIGHTS_NAME} is not a readable safetensors file: {error}.") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ScorerLoadError(f"{source}/{WEIGHTS_NAME}: tensor {key!r} has dtype {tensor.dtype}, expected a floating-point dtype.")
        if not torch.isfinite(tensor).all():
            raise ScorerLoadError(f"{source}/{WEIGHTS_NAME}: tensor {key!r} contains NaN or inf.")
    if not bool((tensors["spectrogram_std"] > 0).all()):
        raise ScorerLoadError(f"{source}/{WEIGHTS_NAME}: spectrogram_std must be > 0; recalibrate the scorer.")
    scorer.load_state_dict(tensors)
    scorer.eval()
    return LoadedScorer(scorer=scorer, config=config, metadata=metadata, source=source)


def _constructor_arguments(scorer_class: type[Scorer]) -> list[str]:
    import inspect

    return [name for name in inspect.signature(scorer_class.__init__).parameters if name != "self"]


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
        f"eviction: every {config.update_interval} tokens, threshold {config.threshold}, max_tokens {config.max_tokens}"
        f"{f', min_fraction {config.min_fraction}' if config.min_fraction is not None else ''}"
        f"{f', sinks {config.sinks}, recent_window {config.recent_window}' if config.sinks or config.recent_window else ''}"
        f"{f', neighbours {config.neighbours}' if config.neighbours else ''}"
        f"{f', smoothing {config.smoothing}' if config.smoothing else ''}",
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
