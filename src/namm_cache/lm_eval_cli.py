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


def one_line(error: BaseException) -> str:
    """An error as one line: its message with newlines folded (the CLIs print this instead of a traceback)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}"


def usage(namm_args: tuple[str, ...]) -> str:
    """What `namm-lm-eval` adds to lm-eval's CLI, printed before lm-eval's help (and alone without arguments)."""
    return (
        "usage: namm-lm-eval run --model namm --model_args pretrained=MODEL[,ARG=VALUE...] --tasks TASKS [lm-eval options]\n\n"
        "lm-eval's CLI with the `namm` model registered and the namm-cache task pack included (namm_passkey, ...).\n"
        f"The namm model's own model_args: {', '.join(namm_args)}; e.g.\n"
        "  namm-lm-eval run --model namm --model_args pretrained=smollm2-135m-instruct,policy=h2o,budget=0.25 "
        "--tasks namm_passkey --limit 10\n"
        "  namm-lm-eval run --model namm --model_args pretrained=smollm2-135m-instruct,scorer=namm-cache/smollm2-135m-linear "
        "--tasks namm_passkey\n"
        "`namm-lm-eval run --help` lists lm-eval's options.\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI; argument errors (bad model_args, a missing scorer or model, ...) print one line and
    return 2 instead of a traceback (set NAMM_TRACEBACK=1 to see it). The `namm` model's own arguments are
    checked right after parsing, before lm-eval indexes tasks or loads the model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from . import lm_eval_model  # registers the "namm" model

    if len(sys.argv) == 1 or sys.argv[1] in ("-h", "--help"):  # ours first, then lm-eval's own help
        print(usage(lm_eval_model.NAMM_ARGS))
        if len(sys.argv) == 1:
            return 2
    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", lm_eval_model.TASK_PACK]
    try:
        sys.argv = resolve_offline_names(sys.argv)
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        setup_logging()  # what lm-eval's own cli_evaluate does, with a check between parsing and running
        parser = HarnessCLI()
        args = parser.parse_args()
        if getattr(args, "model", None) == "namm":
            model_args = dict(getattr(args, "model_args", None) or {})
            namm_args = {key: model_args.pop(key) for key in lm_eval_model.NAMM_ARGS if key in model_args}
            lm_eval_model.check_namm_args(namm_args, other_keys=model_args)
        parser.execute(args)
    except (ValueError, OSError, RecursionError) as error:
        if os.environ.get("NAMM_TRACEBACK"):
            raise
        print(f"namm-lm-eval: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
