"""`namm-lm-eval`: lm-eval-harness's CLI with the `namm` model registered and the task pack included.

lm-eval 0.4.13 has no plugin discovery, so this imports `namm_cache.lm_eval_model` (which registers the
model) and then runs lm-eval's own CLI. Unless `--include_path` is given, the namm-cache task pack is added.

    namm-lm-eval run --model namm --model_args pretrained=smollm2-135m-instruct,policy=h2o,budget=0.25 \
        --tasks namm_passkey --limit 10
"""

from __future__ import annotations

import os
import sys


def resolve_offline_names(argv: list[str]) -> list[str]:
    """Replace `pretrained=<offline model name>` in --model_args by its converted folder, so that tasks which
    build data from the model's tokenizer (RULER, the pack) get a path they can load offline."""
    from .offline import OFFLINE_MODELS, ensure_converted

    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--model_args":
            parts = []
            for part in argv[i + 1].split(","):
                key, _, value = part.partition("=")
                if key.strip() in ("pretrained", "tokenizer") and value in OFFLINE_MODELS:
                    part = f"{key}={ensure_converted(value)}"
                parts.append(part)
            argv[i + 1] = ",".join(parts)
    return argv


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from . import lm_eval_model  # noqa: F401  (registers the "namm" model)

    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", lm_eval_model.TASK_PACK]
    sys.argv = resolve_offline_names(sys.argv)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
