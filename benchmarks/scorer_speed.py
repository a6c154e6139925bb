"""One BAM scoring round: the scorer as shipped (newest-first order, causal fused attention) vs the same
network written with an explicit S x S backward mask, side by side in one run.

    python benchmarks/scorer_speed.py --out benchmarks/results/scorer_speed.json

Rows are SmolLM2's 30 layers x 3 KV heads (one round scores every layer); tokens per row as given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, provenance  # noqa: E402


def masked_bam(scorer, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The BAM read-out computed with an explicit backward mask (the formulation the paper describes)."""
    x = features
    allowed = (positions.unsqueeze(-1) <= positions.unsqueeze(-2)) & valid.unsqueeze(-2)
    allowed |= torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    attended = F.scaled_dot_product_attention(scorer.query(x), scorer.key(x), scorer.value(x), attn_mask=allowed)
    residual, multiplier = scorer.gates(attended).chunk(2, dim=-1)
    return scorer.readout(x * (1 + multiplier) + residual).squeeze(-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="512,1024,2048", help="(the masked form needs rows x S x S floats: 4096 tokens take ~12 GB)")
    parser.add_argument("--rows", type=int, default=90, help="layers x KV heads scored in one round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from namm_cache import BAMScorer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scorer = BAMScorer()
    scorer.set_flat_params(torch.randn(scorer.num_parameters()) * 0.1)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        features = torch.randn(args.rows, tokens, scorer.input_dim)
        positions = torch.arange(tokens).expand(args.rows, tokens)
        valid = torch.ones(args.rows, tokens, dtype=torch.bool)
        with torch.no_grad():
            difference = float((scorer(features, positions, valid) - masked_bam(scorer, features, positions, valid)).abs().max())
            shipped = median_seconds(lambda: scorer(features, positions, valid), args.repeats, warmup=1)
            masked = median_seconds(lambda: masked_bam(scorer, features, positions, valid), args.repeats, warmup=1)
        rows.append({"tokens": tokens, "shipped_s": shipped, "masked_s": masked, "speedup": masked / shipped,
                     "max_abs_difference": difference})
        print(f"{tokens:>6} tokens: shipped {shipped:.3f} s, masked {masked:.3f} s ({masked / shipped:.1f}x), "
              f"max |difference| {difference:.1e}")
    result = {**provenance(__file__, argv), "rows_per_round": args.rows, "threads": args.threads, "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
