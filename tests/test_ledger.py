"""The pooled key norm: one token-level signal from every layer's keys, read by the `linear_pooled` scorer."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.evolution.replay import record_prompt, replay_kept
from namm_cache.ledger import pooled_key_norm
from namm_cache.scorers import LinearPooledScorer


def pooled_only_scorer(weight: float = 1.0, bias: float = 0.0) -> LinearPooledScorer:
    """Scores = weight x (standardised pooled key norm) + bias: blind to attention and age."""
    scorer = LinearPooledScorer()
    with torch.no_grad():
        scorer.readout.weight[0, -1] = weight
        scorer.readout.bias[0] = bias
    return scorer


def held(cache: NAMMCache, row: int = 0, tokens: int | None = None) -> torch.Tensor:
    """`(L*H, tokens)` bool: which positions each (layer, head) of batch `row` holds (position = column)."""
    tokens = tokens or cache.get_seq_length()
    rows = []
    for layer in cache.namm_layers:
        for head in range(layer.keys.shape[1]):
            mask = torch.zeros(tokens, dtype=torch.bool)
            mask[layer.positions[row, head][layer.token_valid[row, head]]] = True
            rows.append(mask)
    return torch.stack(rows)


def test_pooled_key_norm_is_the_mean_of_row_z_scores_over_real_tokens():
    generator = torch.Generator().manual_seed(0)
    norms = torch.randn(2, 5, 12, generator=generator) * torch.tensor([1.0, 3.0, 0.5, 2.0, 8.0]).view(1, 5, 1) + 4.0
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, :3] = False  # padding of row 1
    real[:, 10:] = False  # after the round's position
    pooled = pooled_key_norm(norms, real)
    for b in range(2):
        x = norms[b][:, real[b]].double()
        z = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
        torch.testing.assert_close(pooled[b, real[b]].double(), z.mean(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled[~real], torch.zeros(int((~real).sum())))
    # Rows on scales far apart weigh the same: scaling one row changes nothing.
    scaled = norms.clone()
    scaled[:, 4] = scaled[:, 4] * 100 + 7
    torch.testing.assert_close(pooled_key_norm(scaled, real), pooled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1000, 20])
def test_the_cache_keeps_what_the_pooled_key_norm_asks_for_whatever_the_chunking(chunk):
    """A scorer reading only the pooled key norm keeps, in layer 0 (whose keys no eviction changes), exactly the
    tokens the definition picks; one long chunk (rounds inside it) and 20-token chunks agree everywhere."""
    model = tiny_model("llama")
    prompt = random_ids(160)
    config = NAMMConfig(update_interval=32, max_tokens=40)
    cache = NAMMCache(model=model, scorer=pooled_only_scorer(), config=config)
    with torch.no_grad():
        for part in prompt.split(chunk, dim=1):
            model(input_ids=part, cache=cache, use_cache=True)
    assert cache.ledger is not None and sorted(cache.ledger.norms) == [0, 1, 2, 3]
    kept = held(cache)
    assert 0.1 < kept.float().mean() < 0.5
    # The same through 32-token chunks (rounds between chunks).
    reference = NAMMCache(model=model, scorer=pooled_only_scorer(), config=config)
    with torch.no_grad():
        for part in prompt.split(32, dim=1):
            model(input_ids=part, cache=reference, use_cache=True)
    assert torch.equal(kept, held(reference))
    # Layer 0 by hand: its 2 heads' key norms z-scored over the tokens seen, averaged, then standardised over the
    # tokens the row holds; a round keeps the newest token and those at or above the mean, at most 40 (the
    # newest first). Rounds at 31, 63, 95, 127.
    full = NAMMCache(model=model, policy="full", config=config)
    with torch.no_grad():
        model(input_ids=prompt, cache=full, use_cache=True)
    log_norms = full.namm_layers[0].keys[0].float().norm(dim=-1).log()  # (2 heads, 160)
    holding = torch.ones(160, dtype=torch.bool)
    for now in (31, 63, 95, 127):
        real = torch.arange(160) <= now
        candidates = holding & real
        value = pooled_key_norm(log_norms, real)
        mean, std = value[candidates].mean(), value[candidates].std(unbiased=False)
        score = torch.where(candidates & ((value - mean) / std >= 0), value, torch.tensor(float("-inf")))
        score[now] = float("inf")
        keep = torch.zeros(160, dtype=torch.bool)
        keep[score.topk(40).indices] = True
        keep &= score > float("-inf")
        holding = (holding & ~real) | (keep & candidates)
    assert torch.equal(kept[0], holding) and torch.equal(kept[1], holding)


def test_the_replay_reads_the_pooled_key_norm_like_the_cache_and_the_input_matters():
    model = tiny_model("llama")
    config = NAMMConfig(update_interval=32, max_tokens=40)
    prompt, answer = random_ids(161), random_ids(3, seed=1)
    recording = record_prompt(model, prompt, answer, config, 32)
    scorer = pooled_only_scorer()
    recording.prepare(scorer, config)
    replayed = replay_kept(recording, scorer, config)
    cache = NAMMCache(model=model, scorer=pooled_only_scorer(), config=config)
    with torch.no_grad():
        for part in prompt[:, :-1].split(32, dim=1):
            model(input_ids=part, cache=cache, use_cache=True)
    real = held(cache)
    # Layer 0 reads only its own keys, which evictions do not change: exact. Deeper layers' keys follow hidden
    # states that evictions change a little (the replay's approximation).
    assert torch.equal(replayed[:2], real[:2])
    assert (replayed == real).float().mean() > 0.9
    flipped = pooled_only_scorer(weight=-1.0)
    recording.prepare(flipped, config)
    assert (replay_kept(recording, flipped, config)[:2] & replayed[:2]).float().mean() < 0.5 * replayed[:2].float().mean()


def test_the_replay_refuses_the_pooled_key_norm_of_a_hybrid_model():
    model = tiny_model("gemma3")
    config = NAMMConfig(update_interval=32, max_tokens=40)
    recording = record_prompt(model, random_ids(100), random_ids(3, seed=1), config, 32)
    with pytest.raises(ValueError, match="layers \\[0, 2\\] are not full-attention layers"):
        recording.prepare(pooled_only_scorer(), config)


def test_a_hybrid_models_sliding_layers_feed_the_pooled_key_norm():
    model = tiny_model("gemma3")
    prompt = random_ids(100)
    cache = NAMMCache(model=model, scorer=pooled_only_scorer(), update_interval=32, max_tokens=40)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, use_cache=True)
    assert sorted(cache.ledger.norms) == [0, 1, 2, 3] and all(n == 100 for n in cache.ledger.lengths.values())
    # Layer 3 (full attention) reads layers 0-3, the sliding ones included.
    by_hand = pooled_key_norm(torch.cat([cache.ledger.norms[i][0, :, :96] for i in range(4)]), torch.ones(96, dtype=torch.bool))
    torch.testing.assert_close(cache.ledger.pooled(torch.tensor([0]), 95, 3)[0], by_hand)
    assert not torch.allclose(cache.ledger.pooled(torch.tensor([0]), 95, 1)[0], by_hand)
    # What the ledger holds is each layer's log key norms: the sliding layer's last keys, the full layer's kept ones.
    sliding = cache.layers[0].keys[0]  # (2 heads, window, D): the newest tokens
    window = sliding.shape[1]
    torch.testing.assert_close(cache.ledger.norms[0][0, :, 100 - window:100], sliding.float().norm(dim=-1).log())
    full = cache.layers[1]
    for head in range(2):
        kept = full.token_valid[0, head]
        torch.testing.assert_close(cache.ledger.norms[1][0, head, full.positions[0, head][kept]],
                                   full.keys[0, head][kept].float().norm(dim=-1).log())
    assert cache.stats()["state_bytes"] >= sum(layer.state_bytes() for layer in cache.namm_layers) + cache.ledger.nbytes()
    with pytest.raises(RuntimeError, match="no keys up to position 100"):
        cache.ledger.pooled(torch.tensor([0]), 100, 3)


def test_a_left_padded_batch_and_beam_search_carry_the_ledger_rows():
    model = tiny_model("llama")
    lengths = [100, 61]
    prompts = [random_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    config = NAMMConfig(update_interval=32, max_tokens=40)

    def run(ids, mask, **kwargs):
        cache = NAMMCache(model=model, scorer=pooled_only_scorer(), config=config)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=8, do_sample=False,
                             prefill_chunk_size=32, pad_token_id=0, **kwargs)
        return out[:, ids.shape[1]:], cache

    alone = [run(p, torch.ones_like(p))[0][0] for p in prompts]
    width = max(lengths)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - p.shape[1]:] = p[0]
        mask[i, width - p.shape[1]:] = 1
    out, cache = run(batch, mask)
    assert cache.stats()["evicted_tokens"] > 0
    for i in range(2):
        assert torch.equal(out[i], alone[i]), f"row {i} differs from the prompt alone"
    assert not cache.ledger.real[1, : width - lengths[1]].any()  # padding counts in no statistic
    # Beam search runs; batch operations move the ledger's rows with the layers'.
    beams, _ = run(prompts[0], torch.ones_like(prompts[0]), num_beams=3)
    assert beams.shape == (1, 8)
    before = {layer: tensor.clone() for layer, tensor in cache.ledger.norms.items()}
    assert not torch.equal(before[3][0], before[3][1])
    cache.reorder_cache(torch.tensor([1, 0]))
    for layer, tensor in cache.ledger.norms.items():
        assert torch.equal(tensor, before[layer][[1, 0]])
    cache.batch_repeat_interleave(2)  # rows 1, 1, 0, 0 of the original order
    cache.batch_select_indices(torch.tensor([True, False, False, True]))  # rows 1, 0
    assert torch.equal(cache.ledger.norms[3], before[3][[1, 0]]) and torch.equal(cache.ledger.real[:, :width], mask.bool()[[1, 0]])
    assert cache.namm_layers[0].keys.shape[0] == 2
    with pytest.raises(ValueError, match="Batch size changed"):
        model(input_ids=random_ids(4, batch=3), cache=cache, use_cache=True)


def test_a_pooled_scorer_saves_loads_and_refuses_to_score_without_the_pooled_value(tmp_path):
    from namm_cache.features import with_extra_inputs

    model = tiny_model("llama")
    scorer = pooled_only_scorer(weight=0.7, bias=-0.2)
    NAMMCache(model=model, scorer=scorer).save_pretrained(tmp_path / "pooled")
    loaded = NAMMCache.from_pretrained(tmp_path / "pooled", model=model)
    assert loaded.scorer.kind == "linear_pooled" and loaded.scorer.num_parameters() == 29
    torch.testing.assert_close(loaded.scorer.get_flat_params(), scorer.get_flat_params())
    assert loaded.ledger is not None and NAMMCache(model=model, policy="h2o", budget=0.5).ledger is None
    features, norms, valid = torch.randn(2, 5, 25), torch.randn(2, 5, 2), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="pooled key norm"):
        with_extra_inputs(scorer.extra_inputs, features, norms, valid)
    assert with_extra_inputs(scorer.extra_inputs, features, norms, valid, torch.randn(2, 5)).shape == (2, 5, 28)


def test_weight_sweep_scores_each_value_on_the_validation_set_and_refuses_bad_arguments(tmp_path, tiny_model_dir, capsys):
    import json
    import sys
    from pathlib import Path

    from namm_cache.hub import save_scorer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import weight_sweep

    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model": str(tiny_model_dir), "scorer": {"kind": "linear_pooled"}, "namm": {"update_interval": 32, "max_tokens": None},
        "population": 4, "seed": 3, "prompts_per_task": 1, "calibration_prompts": 1, "threads": 1, "fitness": "replay",
        "validation_prompts_per_task": 2, "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 1}],
    }))
    start = tmp_path / "start"
    save_scorer(start, LinearPooledScorer(), NAMMConfig(update_interval=32))  # all zero: keeps every token
    out = tmp_path / "sweep.json"
    assert weight_sweep.main([str(config), str(start), "27", "0", "30", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["value"] for row in rows] == [0.0, 30.0] and all(row["prompts"] == 2 for row in rows)
    assert rows[0]["kept"] == pytest.approx(1.0) and rows[0]["quality"] == pytest.approx(1.0)
    assert rows[1]["kept"] < 0.9  # the pooled key norm alone now decides: tokens below the mean go
    for bad, message in ((["29", "0"], "index must be in [0, 28], got 29"), (["-1", "0"], "got -1")):
        assert weight_sweep.main([str(config), str(start), *bad]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "novalidation.json").write_text(json.dumps({**json.loads(config.read_text()), "validation_prompts_per_task": 0}))
    assert weight_sweep.main([str(tmp_path / "novalidation.json"), str(start), "3", "0"]) == 2
    assert "has no validation set" in capsys.readouterr().err
    other = tmp_path / "linear"
    save_scorer(other, __import__("namm_cache").scorers.LinearScorer(), NAMMConfig(update_interval=32))
    assert weight_sweep.main([str(config), str(other), "3", "0"]) == 2
    assert "is a linear scorer; the config evolves a linear_pooled scorer" in capsys.readouterr().err


def test_an_evolution_run_refuses_to_replay_the_pooled_key_norm_of_a_hybrid_model(tmp_path, tiny_model_dir):
    import shutil

    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun

    folder = tmp_path / "gemma3"
    tiny_model("gemma3", vocab_size=49152).save_pretrained(folder)
    for tokenizer_file in tiny_model_dir.glob("*token*"):
        shutil.copy(tokenizer_file, folder)
    spec = {"model": str(folder), "scorer": {"kind": "linear_pooled"}, "namm": {"update_interval": 32}, "population": 4,
            "prompts_per_task": 1, "calibration_prompts": 1, "threads": 1, "fitness": "replay",
            "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 1}]}
    with pytest.raises(ValueError, match="sliding_attention layers are not recorded"):
        EvolutionRun(EvolutionConfig.from_dict(spec), tmp_path / "out", progress=False)
    EvolutionRun(EvolutionConfig.from_dict({**spec, "fitness": "exact"}), tmp_path / "out", progress=False)  # the cache can
