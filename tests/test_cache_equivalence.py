"""A cache that keeps everything must be invisible: same logits as DynamicCache, all families, eager and sdpa."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import observing_keep_all_scorer
from transformers import DynamicCache

from namm_cache import NAMMCache


def generate_logits(model, ids, cache, **kwargs):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        cache=cache,
        max_new_tokens=32,
        do_sample=False,
        prefill_chunk_size=32,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("observing", [False, True], ids=["zero-scorer", "observing-scorer"])
def test_keep_all_matches_dynamic_cache(family, attn_implementation, observing):
    model = tiny_model(family, attn_implementation)
    ids = random_ids(150)
    ref_tokens, ref_logits = generate_logits(model, ids, DynamicCache(config=model.config))
    scorer = observing_keep_all_scorer() if observing else None
    cache = NAMMCache(model=model, scorer=scorer, update_interval=32)
    tokens, logits = generate_logits(model, ids, cache)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    stats = cache.stats()
    assert stats["evicted_tokens"] == 0
    assert stats["evictions"] > 0  # eviction rounds ran; they just kept everything
    # It holds what DynamicCache holds, plus free slots reserved for the tokens until the next round.
    assert stats["kv_bytes"] - stats["reserved_kv_bytes"] == stats["full_cache_kv_bytes"]
    slot_bytes = sum(2 * layer.keys[..., :1, :].nbytes for layer in cache.namm_layers)
    assert 0 <= stats["reserved_kv_bytes"] <= 32 * slot_bytes
    if observing:
        layer = cache.namm_layers[0]
        assert layer.observing and torch.count_nonzero(layer.ema) > 0


def test_hand_written_forward_loop_matches_dynamic_cache():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(100)

    def run(cache):
        logits = []
        with torch.no_grad():
            for chunk in ids.split(25, dim=1):
                out = model(input_ids=chunk, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
            token = logits[-1][:, -1:].argmax(-1)
            for _ in range(10):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
        return torch.cat(logits, dim=1)

    reference = run(DynamicCache(config=model.config))
    namm = run(NAMMCache(model=model, scorer=observing_keep_all_scorer(), update_interval=16))
    assert (namm - reference).abs().max().item() <= 1e-5


def test_pass_through_for_other_caches_after_install():
    """Installing the wrapper leaves the model exact for any other cache."""
    model = tiny_model("qwen3", "sdpa")
    ids = random_ids(64)
    before = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    NAMMCache(model=model)
    assert model.config._attn_implementation == "namm_sdpa"
    after = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    assert torch.equal(before, after)


def test_two_models_with_two_caches_do_not_interfere():
    model_a = tiny_model("llama", "sdpa", seed=1)
    model_b = tiny_model("gemma3", "eager", seed=2)
    ids = random_ids(96, seed=3)
    from helpers import random_scorer

    def step_all(pairs):
        outputs = {name: [] for name in pairs}
        with torch.no_grad():
            for chunk in ids.split(16, dim=1):
                for name, (model, cache) in pairs.items():
                    outputs[name].append(model(input_ids=chunk, past_key_values=cache).logits)
        return {name: torch.cat(v, dim=1) for name, v in outputs.items()}

    def fresh():
        return {
            "a": (model_a, NAMMCache(model=model_a, scorer=random_scorer(1), update_interval=32)),
            "b": (model_b, NAMMCache(model=model_b, scorer=random_scorer(2), update_interval=16)),
        }

    interleaved = step_all(fresh())
    separate_pairs = fresh()
    alone_a = step_all({"a": separate_pairs["a"]})["a"]
    alone_b = step_all({"b": separate_pairs["b"]})["b"]
    torch.testing.assert_close(interleaved["a"], alone_a, rtol=0, atol=0)
    torch.testing.assert_close(interleaved["b"], alone_b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grouped_attention_equals_the_model_eager_function_and_steps_aside_when_it_would_not(dtype):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from namm_cache.attention import grouped_attention_applies, grouped_eager_attention

    model = tiny_model("llama", "eager")
    module = model.model.layers[0].self_attn  # 4 query heads over 2 KV heads
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, n, 16, generator=generator).to(dtype) for h, n in ((4, 5), (2, 9), (2, 9)))
    hidden = torch.rand(2, 2, 1, 5, 9, generator=generator) < 0.3  # per KV head
    hidden[..., -1] = False  # every query sees at least one slot
    additive = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, torch.finfo(dtype).min)
    additive = additive.expand(2, 2, 2, 5, 9).reshape(2, 4, 5, 9)  # per query head, as the model's eager takes it
    expected_output, expected_weights = eager_attention_forward(module, query, key, value, additive, scaling=0.25)
    output, probabilities = grouped_eager_attention(module, query, key, value, hidden, scaling=0.25)
    assert torch.equal(output, expected_output)  # the same arithmetic, bit for bit, in every dtype
    # The model's eager rounds probabilities to its dtype; the cache keeps them in float32.
    assert probabilities.dtype == torch.float32
    assert torch.equal(probabilities.reshape(2, 4, 5, 9).to(dtype), expected_weights)
    assert grouped_attention_applies(module, {"scaling": 0.25, "dropout": 0.0, "position_ids": None, "sliding_window": None})
    # Anything that changes the arithmetic, or that the wrapper does not know, goes to the model's own function.
    for extra in ({"softcap": 50.0}, {"dropout": 0.1}, {"sliding_window": 128}, {"s_aux": torch.zeros(4)}):
        assert not grouped_attention_applies(module, {"scaling": 0.25, **extra}), extra
    module.sinks = torch.nn.Parameter(torch.zeros(4))
    assert not grouped_attention_applies(module, {"scaling": 0.25})
