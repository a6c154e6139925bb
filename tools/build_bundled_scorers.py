"""Build the scorers bundled inside the package (run after changing the format or the calibration).

    python tools/build_bundled_scorers.py

- `namm-cache/keep-all`: a zero-initialised BAM scorer (scores 0, keeps every token), identity
  normalisation: the paper's starting point and the package default until an evolved scorer ships.
- `namm-cache/smollm2-135m-attention-mass`: a hand-set scorer that keeps tokens receiving more attention
  than average (spectrogram bin 0), normalised with statistics calibrated on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from namm_cache import BAMScorer, NAMMConfig, attention_mass_scorer
from namm_cache.calibration import calibrate_normalization
from namm_cache.hub import ScorerMetadata, save_scorer
from namm_cache.offline import load_offline_model
from namm_cache.tasks import passkey_prompt

ROOT = Path(__file__).resolve().parent.parent / "src" / "namm_cache" / "bundled" / "namm-cache"


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = NAMMConfig()
    save_scorer(
        ROOT / "keep-all",
        BAMScorer(),
        config,
        ScorerMetadata(
            description="Zero-initialised BAM scorer: every score is 0, so every token is kept. The CMA-ES starting "
            "point of the paper and this package's default scorer until an evolved one is bundled.",
        ),
        repo_id="namm-cache/keep-all",
    )
    model, tokenizer = load_offline_model()
    calibration_config = config.replace(update_interval=256)
    sequences = [tokenizer(passkey_prompt(tokenizer, 1500, seed=500 + i).text, return_tensors="pt").input_ids for i in range(4)]
    scorer = attention_mass_scorer()
    calibrate_normalization(model, sequences, config=calibration_config, scorer=scorer)
    save_scorer(
        ROOT / "smollm2-135m-attention-mass",
        scorer,
        config,
        ScorerMetadata(
            base_models=["HuggingFaceTB/SmolLM2-135M-Instruct"],
            description="Hand-set (not evolved) MLP scorer: score = z-normalised attention mass (spectrogram bin 0), "
            "so tokens that receive more attention than the calibration average are kept. Normalisation statistics "
            "were calibrated with a keep-all policy on four 1.5k-token passkey prompts with SmolLM2-135M-Instruct "
            "(offline GGUF). Pair it with max_tokens or a token budget to control memory.",
        ),
        repo_id="namm-cache/smollm2-135m-attention-mass",
    )
    print("bundled scorers written under", ROOT)


if __name__ == "__main__":
    main()
