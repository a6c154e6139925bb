"""`namm-lm-eval`: lm-eval-harness's CLI with the `namm` model registered and the task pack included.

lm-eval 0.4.13 has no plugin discovery, so this imports `namm_cache.lm_eval_model` (which registers the
model) and then runs lm-eval's own CLI. Unless `--include_path` is given, the namm-cache task pack is added.

    namm-lm-eval run --model namm --model_args pretrained=smollm2-135m-instruct,policy=h2o,budget=0.25 \
        --tasks namm_passkey --limit 10
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from . import lm_eval_model  # noqa: F401  (registers the "namm" model)

    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", lm_eval_model.TASK_PACK]
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
