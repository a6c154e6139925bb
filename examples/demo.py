"""Answer a long passkey prompt with a full cache and with NAMMCache on the offline SmolLM2-135M-Instruct.

    make demo                      # or: python examples/demo.py --tokens 1500 --depth 0.5 --max-tokens 512

Prints both answers and the KV memory each cache held. Runs on CPU with no network.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache

from namm_cache import NAMMCache
from namm_cache.offline import load_offline_model
from namm_cache.tasks import passkey_prompt


def kv_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens")
    parser.add_argument("--depth", type=float, default=0.8, help="where the passkey sits (0 = start, 1 = end)")
    parser.add_argument("--update-interval", type=int, default=128, help="tokens between eviction rounds (the scorer trained with 128)")
    parser.add_argument("--max-tokens", type=int, default=None, help="optional cap on tokens each layer/head keeps")
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth must be in [0, 1], got {args.depth}")
    print("Loading SmolLM2-135M-Instruct (offline GGUF, converted once to safetensors)...")
    model, tokenizer = load_offline_model()
    try:  # a user's setting the prompt or the cache cannot take: one line, no traceback
        prompt = passkey_prompt(tokenizer, args.tokens, depth=args.depth, seed=args.seed)
        namm = NAMMCache.from_pretrained(model=model, update_interval=args.update_interval, max_tokens=args.max_tokens)
    except ValueError as error:
        message = str(error)
        for name, flag in (("n_tokens", "--tokens"), ("update_interval", "--update-interval"), ("max_tokens", "--max-tokens")):
            message = message.replace(f"{name}=", f"{flag} ").replace(f"{name} ", f"{flag} ")
        parser.error(message)
    inputs = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False)
    n_prompt = inputs.input_ids.shape[1]
    print(f"Prompt: {n_prompt} tokens, pass key {prompt.passkey} at depth {args.depth:.0%}.")

    # The package's default scorer: evolved with CMA-ES on SmolLM2-135M; it keeps the tokens it scores above
    # its threshold (no cap unless --max-tokens is given).
    cap = f"cap {args.max_tokens}" if args.max_tokens else "threshold"
    runs = {
        "full cache (DynamicCache)": DynamicCache(config=model.config),
        f"NAMMCache ({namm.scorer_source}, {cap}, every {args.update_interval})": namm,
    }
    for name, cache in runs.items():
        start = time.perf_counter()
        output = model.generate(
            **inputs, cache=cache, max_new_tokens=12, do_sample=False, prefill_chunk_size=args.update_interval
        )
        elapsed = time.perf_counter() - start
        answer = tokenizer.decode(output[0, n_prompt:], skip_special_tokens=True)
        verdict = "right" if prompt.is_answered(answer) else "wrong"
        print(f"\n{name}\n  answer: The pass key is{answer!r} ({verdict})")
        print(f"  KV memory held at the end: {kv_bytes(cache) / 2**20:.1f} MiB, time {elapsed:.1f} s")
        if isinstance(cache, NAMMCache):
            stats = cache.stats()
            print(
                f"  kept {stats['mean_kept_fraction']:.0%} of tokens on average, peak KV {stats['peak_kv_bytes'] / 2**20:.1f} MiB "
                f"vs {stats['full_cache_kv_bytes'] / 2**20:.1f} MiB for a full cache"
            )


if __name__ == "__main__":
    main()
