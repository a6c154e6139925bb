"""The cache on every device and dtype it is meant for: CPU always, CUDA when present (skipped otherwise).

`benchmarks/gpu_check.sh` runs this file on a GPU machine. On CPU the same tests cover the float16 and
bfloat16 paths (masks in the model's dtype, probabilities and statistics in float32).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import observing_keep_all_scorer, random_scorer
from transformers import DynamicCache

from namm_cache import NAMMCache
from namm_cache.config import NAMMConfig
from namm_cache.features import SpectrogramState, fold_attention
from namm_cache.scorers import LinearAllLayersScorer, LinearPooledScorer

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# How far keep-all logits may drift from DynamicCache's: the observing path computes attention with a
# grouped eager kernel, DynamicCache with the fused sdpa one, so half precision rounds differently.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}


def model_on(device: str, dtype: torch.dtype, family: str = "llama"):
    return tiny_model(family, "sdpa").to(device=device, dtype=dtype)


def generate(model, ids, cache, new_tokens=16, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=32, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_observing_keep_all_matches_dynamic_cache(device, dtype):
    model = model_on(device, dtype)
    ids = random_ids(140).to(device)
    reference = generate(model, ids, DynamicCache(config=model.config))
    cache = NAMMCache(model=model, scorer=observing_keep_all_scorer(), update_interval=32)
    out = generate(model, ids, cache)
    ref_logits, logits = torch.stack(reference.logits).float(), torch.stack(out.logits).float()
    assert torch.isfinite(logits).all()
    # The first tokens agree in every dtype; float32 agrees all the way.
    prefix = ids.shape[1] + (16 if dtype == torch.float32 else 4)
    assert torch.equal(out.sequences[:, :prefix], reference.sequences[:, :prefix])
    if dtype == torch.float32:
        assert (logits - ref_logits).abs().max().item() <= LOGIT_TOLERANCE[dtype]
    else:
        first = slice(0, 4)  # before a differently rounded token could change what follows
        assert (logits[first] - ref_logits[first]).abs().max().item() <= LOGIT_TOLERANCE[dtype] * ref_logits.std().item() * 10
    layer = cache.namm_layers[0]
    assert layer.keys.device.type == device and layer.keys.dtype == dtype
    assert layer.ema.device.type == device and layer.ema.dtype == torch.float32  # statistics stay float32
    assert torch.count_nonzero(layer.ema) > 0 and cache.stats()["evicted_tokens"] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("policy", ["namm", "h2o", "key_norm", "streaming_llm", "snapkv", "tova", "random", "pooled_key_norm"])
def test_evicting_caches_run_and_free_memory(device, dtype, policy):
    model = model_on(device, dtype, "qwen3")
    ids = random_ids(160).to(device)
    if policy == "namm":
        cache = NAMMCache(model=model, scorer=random_scorer(3), update_interval=32, budget=0.25)
    else:
        cache = NAMMCache(model=model, policy=policy, update_interval=32, budget=0.25)
    out = generate(model, ids, cache, new_tokens=8)
    assert out.sequences.shape == (1, 168)
    assert torch.isfinite(torch.stack(out.logits).float()).all()
    stats = cache.stats()
    assert 0.2 <= stats["mean_kept_fraction"] <= 0.45
    assert stats["kv_bytes"] < 0.6 * stats["full_cache_kv_bytes"]
    for layer in cache.namm_layers:
        for name, tensor in layer.per_token_tensors().items():
            assert tensor.device.type == device, name
        assert layer.keys.dtype == dtype
        for h in range(layer.keys.shape[1]):  # kept tokens stay in order, the newest is kept
            positions = layer.positions[0, h][layer.token_valid[0, h]]
            assert torch.all(positions[1:] > positions[:-1]) and int(positions[-1]) == 160 + 8 - 2  # the last token is never fed back


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("neighbours, smoothing", [(0, 0), (2, 0), (2, 3)])
def test_evicting_namm_decides_the_same_on_the_device_as_on_cpu(device, neighbours, smoothing):
    """float32 on the device keeps what the CPU keeps (a budget, so ties at a threshold cannot flip), with
    scores averaged and spread to neighbours or not."""
    kept = {}
    for where in ("cpu", device):
        model = model_on(where, torch.float32)
        cache = NAMMCache(model=model, scorer=random_scorer(1), update_interval=32, budget=0.5, neighbours=neighbours,
                          smoothing=smoothing)
        generate(model, random_ids(128).to(where), cache, new_tokens=4)
        kept[where] = [{(h, int(p)) for h in range(layer.keys.shape[1]) for p in layer.positions[0, h][layer.token_valid[0, h]]}
                       for layer in cache.namm_layers]
    overlap = [len(a & b) / len(a) for a, b in zip(kept["cpu"], kept[device])]
    assert min(overlap) >= 0.97


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [LinearPooledScorer, LinearAllLayersScorer], ids=lambda kind: kind.kind)
def test_a_pooled_key_norm_cache_decides_the_same_on_the_device_as_on_cpu(device, kind):
    """The key-norm ledger lives on the model's device: a `linear_pooled` / `linear_all_layers` scorer with random
    weights (the pooled weight large, so the ledger drives the choice) keeps on the device what it keeps on CPU."""
    scorer = kind()
    generator = torch.Generator().manual_seed(3)
    scorer.set_flat_params(torch.randn(scorer.num_parameters(), generator=generator) * 0.3)
    with torch.no_grad():
        scorer.readout.weight[0, -1] = -3.0
    kept, ledgers = {}, {}
    for where in ("cpu", device):
        model = model_on(where, torch.float32)
        cache = NAMMCache(model=model, scorer=scorer, update_interval=32, budget=0.5)
        generate(model, random_ids(128).to(where), cache, new_tokens=4)
        ledgers[where] = cache.ledger
        kept[where] = [{(h, int(p)) for h in range(layer.keys.shape[1]) for p in layer.positions[0, h][layer.token_valid[0, h]]}
                       for layer in cache.namm_layers]
    assert ledgers[device].pooled(torch.tensor([0]), now=100, up_to_layer=1).device.type == device
    assert ledgers[device].pooled_all_layers(torch.tensor([0]), now=100).device.type == device
    overlap = [len(a & b) / len(a) for a, b in zip(kept["cpu"], kept[device])]
    assert min(overlap) >= 0.97


@pytest.mark.parametrize("device", DEVICES)
def test_spectrogram_fold_on_the_device_matches_float64_cpu(device):
    config = NAMMConfig()
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(3, 5, 64, 70, generator=generator, dtype=torch.float64)  # (B, H, S, q) any strides
    reference = fold_attention(SpectrogramState(torch.zeros(3, 5, 64, 17, dtype=torch.float64),
                                                torch.zeros(3, 5, 64, 16, dtype=torch.float64),
                                                torch.zeros(3, 5, 64, 16, dtype=torch.float64), 0), values, config)
    state = SpectrogramState(torch.zeros(3, 5, 64, 17, device=device), torch.zeros(3, 5, 64, 16, device=device),
                             torch.zeros(3, 5, 64, 16, device=device), 0)
    strided = values.float().to(device).transpose(-1, -2).contiguous().transpose(-1, -2)  # like probabilities
    state = fold_attention(state, strided, config)
    assert state.pending_count == reference.pending_count == 70 % 16
    torch.testing.assert_close(state.ema.cpu().double(), reference.ema, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.pending.cpu().double(), reference.pending, rtol=0, atol=1e-7)
