"""Eviction: caps, positions, zero attention to evicted tokens, per-head counts, batches, memory."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import random_scorer
from transformers import DynamicCache

from namm_cache import NAMMCache


def generate(model, ids, cache, attention_mask=None, chunk=32, new_tokens=40):
    return model.generate(
        ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        cache=cache,
        max_new_tokens=new_tokens,
        do_sample=False,
        prefill_chunk_size=chunk,
        pad_token_id=0,
    )


def test_cap_is_respected_and_seq_length_counts_tokens_seen(family):
    model = tiny_model(family, "sdpa")
    ids = random_ids(200)
    cache = NAMMCache(model=model, scorer=random_scorer(0), update_interval=32, max_tokens=48)
    generate(model, ids, cache)
    seen = 200 + 40 - 1
    assert cache.get_seq_length() == seen
    for layer in cache.namm_layers:
        assert layer.get_seq_length() == seen
        kept = layer.kept_per_head()
        # At most the cap after the last eviction plus the tokens that arrived since.
        since_last = seen - (seen // 32) * 32
        assert int(kept.max()) <= 48 + since_last
        assert layer.keys.shape[-2] == int(kept.max())  # storage shrank to the largest head
    stats = cache.stats()
    assert stats["evicted_tokens"] > 0
    assert stats["kv_bytes"] < stats["full_cache_kv_bytes"]


def test_heads_keep_different_tokens_and_evicted_tokens_get_zero_attention():
    model = tiny_model("llama", "eager")
    ids = random_ids(160)
    cache = NAMMCache(model=model, scorer=random_scorer(1, scale=0.3), update_interval=32)
    with torch.no_grad():
        for chunk in ids.split(32, dim=1):
            model(input_ids=chunk, cache=cache)
        # The next forward evicts in update(), then attends: capture its attention.
        out = model(input_ids=random_ids(1, seed=9), cache=cache, output_attentions=True)
    per_head_kept = [layer.kept_per_head() for layer in cache.namm_layers]
    assert any(len(set(kept.flatten().tolist())) > 1 for kept in per_head_kept), "heads should differ"
    for layer, weights in zip(cache.namm_layers, out.attentions):
        heads = layer.keys.shape[1]
        groups = weights.shape[1] // heads
        assert weights.shape[-1] == layer.keys.shape[-2]
        valid = layer.token_valid.repeat_interleave(groups, dim=1).unsqueeze(2)  # (B, Hq, 1, S)
        assert torch.all(weights[~valid.expand_as(weights)] == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
        # Every position that received attention is a kept position of that head; evicted ones are gone.
        for h in range(heads):
            kept_positions = set(layer.positions[0, h][layer.token_valid[0, h]].tolist())
            assert len(kept_positions) == int(layer.token_valid[0, h].sum())
            assert max(kept_positions) == 160  # the newest token is kept
            assert len(kept_positions) < 161


def test_kept_tokens_keep_chronological_order_and_their_positions():
    model = tiny_model("qwen3", "sdpa")
    cache = NAMMCache(model=model, scorer=random_scorer(5), update_interval=16)
    generate(model, random_ids(120), cache, chunk=16, new_tokens=5)
    for layer in cache.namm_layers:
        for h in range(layer.keys.shape[1]):
            positions = layer.positions[0, h][layer.token_valid[0, h]]
            assert torch.all(positions[1:] > positions[:-1])


def test_kept_keys_are_the_original_post_rope_keys():
    """A kept token's key equals the key a full cache holds for that position (RoPE phase unchanged)."""
    model = tiny_model("llama", "sdpa")
    ids = random_ids(96)
    full = DynamicCache(config=model.config)
    cache = NAMMCache(model=model, scorer=random_scorer(7), update_interval=32)
    with torch.no_grad():
        model(input_ids=ids, cache=full)
        for chunk in ids.split(32, dim=1):
            model(input_ids=chunk, cache=cache)
        model(input_ids=random_ids(1, seed=4), cache=cache)  # triggers the eviction at 96
    # Layer 0's keys depend on the token embeddings only, so they are comparable across the two runs.
    layer = cache.namm_layers[0]
    reference = full.layers[0].keys
    assert layer.evictions > 0 and layer.tokens_evicted > 0
    for h in range(layer.keys.shape[1]):
        valid = layer.token_valid[0, h]
        positions = layer.positions[0, h][valid]
        old = positions < 96
        assert int(old.sum()) < 96
        torch.testing.assert_close(layer.keys[0, h][valid][old], reference[0, h, positions[old]])


@pytest.mark.parametrize("family_name, limit", [("llama", {"max_tokens": 40}), ("gemma3", {"max_tokens": 40}),
                                                ("llama", {"min_fraction": 0.7})])  # a floor counts each row's own tokens
def test_left_padded_batch_equals_each_row_alone(family_name, limit):
    model = tiny_model(family_name, "sdpa")
    lengths = [100, 70, 41]
    prompts = [random_ids(n, seed=10 + i) for i, n in enumerate(lengths)]

    def make_cache():
        return NAMMCache(model=model, scorer=random_scorer(1), update_interval=32, **limit)

    alone = [generate(model, p, make_cache())[0, p.shape[1] :] for p in prompts]
    width = max(lengths)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - p.shape[1] :] = p[0]
        mask[i, width - p.shape[1] :] = 1
    cache = make_cache()
    out = generate(model, batch, cache, attention_mask=mask)[:, width:]
    assert cache.stats()["evicted_tokens"] > 0
    for i in range(len(prompts)):
        assert torch.equal(out[i], alone[i]), f"row {i} differs from the prompt alone"
    # Padding is never kept.
    for layer in cache.namm_layers:
        for i, n in enumerate(lengths):
            kept = layer.positions[i][layer.token_valid[i]]
            assert int(kept.min()) >= width - n


def test_eviction_inside_long_chunks_happens_every_interval():
    """With 64-token chunks and a 16-token interval, eviction rounds still happen every 16 tokens."""
    model = tiny_model("llama", "sdpa")
    cache = NAMMCache(model=model, scorer=random_scorer(2), update_interval=16)
    with torch.no_grad():
        for chunk in random_ids(128).split(64, dim=1):
            model(input_ids=chunk, cache=cache)
    layer = cache.namm_layers[0]
    assert layer.evictions == 128 // 16 - 1  # the round at 128 runs at the next update
    assert layer.next_eviction[0] == 128


def test_peak_memory_is_bounded_by_cap_plus_chunk():
    model = tiny_model("llama", "sdpa")
    cap, chunk = 64, 32

    def peak(n):
        cache = NAMMCache(model=model, scorer=random_scorer(4), update_interval=chunk, max_tokens=cap)
        with torch.no_grad():
            for part in random_ids(n).split(chunk, dim=1):
                model(input_ids=part, cache=cache)
        return cache.peak_kv_bytes, cache.namm_layers[0].keys

    small, keys = peak(256)
    large, _ = peak(768)
    per_token = 2 * keys.shape[1] * keys.shape[-1] * keys.element_size() * len(model.model.layers)
    assert small == large  # flat as the prompt grows
    assert large <= (cap + chunk) * per_token


@pytest.mark.parametrize("interval", [16, 128])
def test_decode_steps_append_in_place_between_rounds_within_the_same_memory_bound(interval):
    """After a round, storage is reserved for the tokens until the next one (at most RESERVED_SLOTS): decode
    steps write into it (no allocation, no copy of the kept slots) and the memory held stays within
    cap + update_interval, as without reserving."""
    from namm_cache.layer import RESERVED_SLOTS

    model = tiny_model("llama", "sdpa")
    cap = 40
    cache = NAMMCache(model=model, scorer=random_scorer(4), update_interval=interval, max_tokens=cap)
    layer = cache.namm_layers[0]
    text = model.config
    per_token = 2 * text.num_key_value_heads * text.head_dim * 4 * text.num_hidden_layers  # float32 keys + values
    room = min(interval, RESERVED_SLOTS)
    rounds = in_place = 0
    with torch.no_grad():
        for part in random_ids(2 * interval).split(interval, dim=1):
            token = model(input_ids=part, cache=cache).logits[:, -1:].argmax(-1)
        for step in range(3 * interval):
            if step == 1:
                cache.peak_kv_bytes = 0  # the peak after the prompt's last round (the first decode step) ran
            free = cache.stats()["reserved_kv_bytes"]
            before = (layer.evictions, layer.keys.data_ptr(), layer.values.data_ptr(), layer.token_valid.data_ptr())
            token = model(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
            after = (layer.evictions, layer.keys.data_ptr(), layer.values.data_ptr(), layer.token_valid.data_ptr())
            if after[0] != before[0]:  # a round ran: room for the token just appended and those still to come
                rounds += 1
                assert cache.stats()["reserved_kv_bytes"] == (room - 1) * per_token
            elif free:
                assert after[1:] == before[1:]  # keys, values, flags written in place
                in_place += 1
    assert rounds == 3 and in_place == 3 * interval - 3 * (interval // room)
    assert cache.peak_kv_bytes <= (cap + interval) * per_token  # what a round every `interval` tokens reaches anyway


def test_storage_replaced_from_outside_moves_out_of_its_reserved_room():
    """A layer whose storage tensors were replaced (not views of its room any more) appends to the new tensors,
    and no stale room outlives a spectrogram frame."""
    model = tiny_model("llama", "sdpa")
    cache = NAMMCache(model=model, scorer=random_scorer(4), update_interval=64, max_tokens=40)
    layer = cache.namm_layers[0]
    spectrogram = layer.statistics["spectrogram"]
    with torch.no_grad():
        token = model(input_ids=random_ids(64), cache=cache).logits[:, -1:].argmax(-1)
        for step in range(40):
            if step == 20:
                layer.keys = layer.keys * 0.0
                layer.values = layer.values.clone()
            token = model(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
            if step >= 20:
                assert layer.keys[..., :-1 - (step - 20), :].abs().sum() == 0  # appended after the replaced keys
            # No reserved room outlives its tensors (a completed frame replaces the spectrogram's).
            for name, room in spectrogram._rooms.items():
                assert room.data_ptr() == spectrogram.tensors[name].data_ptr(), (step, name)
    slots = layer.token_valid.shape[-1]
    floats = 17 + 16 + 16  # spectrogram ema, tail, pending
    assert layer.state_bytes() >= slots * layer.token_valid.shape[1] * (8 + 1 + 4 * floats)


def test_beam_search_reorders_the_cache():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(80)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3, do_sample=False, prefill_chunk_size=32)
    from helpers import observing_keep_all_scorer

    reference = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    namm = model.generate(ids, cache=NAMMCache(model=model, scorer=observing_keep_all_scorer(), update_interval=16), **kwargs)
    assert torch.equal(reference, namm)
    # With eviction on, beam search runs and the batch stays consistent.
    cache = NAMMCache(model=model, scorer=random_scorer(0), update_interval=16, max_tokens=40)
    out = model.generate(ids, cache=cache, **kwargs)
    assert out.shape == (1, 80 + 12)
    assert cache.namm_layers[0].keys.shape[0] == 3


def test_sampling_runs_with_eviction():
    model = tiny_model("mistral", "sdpa")
    ids = random_ids(90)
    cache = NAMMCache(model=model, scorer=random_scorer(0), update_interval=32, max_tokens=40)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=20, min_new_tokens=20, do_sample=True, top_k=20)
    assert out.shape == (1, 110)
    assert cache.stats()["evicted_tokens"] > 0
