"""The pooled key norm: one token-level signal from every layer's keys, read by the `linear_pooled` scorer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.evolution.replay import record_prompt, replay_kept
from namm_cache.ledger import pooled_key_norm
from namm_cache.policies import Policy
from namm_cache.scorers import LinearAllLayersScorer, LinearPooledScorer


def last_input_only(kind=LinearPooledScorer, weight: float = 1.0, bias: float = 0.0):
    """Scores = weight x (the scorer's last input, a standardised pooled key norm) + bias: blind to attention and age."""
    scorer = kind()
    with torch.no_grad():
        scorer.readout.weight[0, -1] = weight
        scorer.readout.bias[0] = bias
    return scorer


def pooled_only_scorer(weight: float = 1.0, bias: float = 0.0) -> LinearPooledScorer:
    return last_input_only(LinearPooledScorer, weight, bias)


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


# ---------------------------------------------------------------- every layer's key norm (`linear_all_layers`)
@dataclass(frozen=True)
class AllLayerProbe(Policy):
    """Keeps every token and records, per round, the all-layer key norm each layer was given."""

    name: ClassVar[str] = "all_layer_probe"
    supports_threshold: ClassVar[bool] = True
    reads_pooled_key_norm: ClassVar[bool] = True
    pools_every_layer: ClassVar[bool] = True
    seen: list = field(default_factory=list, compare=False)

    def score(self, observation):
        self.seen.append((observation.layer_idx, observation.positions.clone(), observation.valid.clone(),
                          observation.pooled_key_norm.clone()))
        return torch.ones(observation.valid.shape)


def all_layers_only_scorer(weight: float = 1.0, bias: float = 0.0) -> LinearAllLayersScorer:
    return last_input_only(LinearAllLayersScorer, weight, bias)


@pytest.mark.parametrize("chunk", [32, 20, 1000])
def test_the_all_layer_key_norm_pools_every_layer_that_has_seen_a_token_and_the_replay_agrees(chunk):
    """A round between chunks (32-token chunks: it runs when the next chunk arrives) reads every layer. A round
    inside a chunk (20 and 1000) runs before the layers after l have seen that chunk: they count for the tokens
    before it only, and the chunk's own tokens get the rows of layers 0..l. The replay, told the chunk, gives every
    round exactly what the cache gave (a keep-all cache: the keys are the recording's)."""
    model = tiny_model("llama")
    prompt, answer = random_ids(161), random_ids(3, seed=1)
    config = NAMMConfig(update_interval=32, max_tokens=None, threshold=0.0)
    probe = AllLayerProbe()
    cache = NAMMCache(model=model, policy=probe, config=config)
    with torch.no_grad():
        for part in prompt[:, :-1].split(chunk, dim=1):
            model(input_ids=part, cache=cache, use_cache=True)
    by_layer = {layer: [seen for seen in probe.seen if seen[0] == layer] for layer in range(4)}
    assert all(len(rounds) == 4 for rounds in by_layer.values())  # rounds at 31, 63, 95, 127
    # By hand, layer 1's round at 95: its z-scores per (layer, head) row over the tokens each row has seen.
    full = NAMMCache(model=model, policy="full", config=config)
    with torch.no_grad():
        model(input_ids=prompt[:, :-1], cache=full, use_cache=True)
    norms = torch.cat([layer.keys[0].float().norm(dim=-1).log() for layer in full.namm_layers])  # (8 rows, 160)
    now = 95
    later_seen = {32: 96, 20: 80, 1000: 0}[chunk]
    sums, counts = torch.zeros(96), torch.zeros(96)
    for row in range(8):
        seen = now + 1 if row // 2 <= 1 else later_seen
        if seen:
            x = norms[row, :seen]
            sums[:seen] += (x - x.mean()) / x.std(unbiased=False)
            counts[:seen] += 1
    _, positions, valid, given = by_layer[1][2]
    torch.testing.assert_close(given[0][valid[0]], (sums / counts)[positions[0][valid[0]]], rtol=1e-4, atol=1e-4)
    assert (counts == 8).sum() == later_seen and (counts == 4).sum() == 96 - later_seen
    # The replay's value of every round and layer.
    recording = record_prompt(model, prompt, answer, config, chunk)
    recording.prepare(all_layers_only_scorer(), config)
    assert len(recording.rounds) == 4
    for index, round_ in enumerate(recording.rounds):
        for layer in range(4):
            _, positions, valid, given = by_layer[layer][index]
            for head in range(2):
                row = 2 * layer + head
                replayed = round_.pooled[row, positions[head][valid[head]]]
                torch.testing.assert_close(given[head][valid[head]], replayed, rtol=1e-4, atol=1e-4)


def test_a_scorer_reading_every_layers_key_norm_evicts_by_it_live_and_in_the_replay(tmp_path):
    model = tiny_model("llama")
    config = NAMMConfig(update_interval=32, max_tokens=40)
    prompt, answer = random_ids(161), random_ids(3, seed=1)
    cache = NAMMCache(model=model, scorer=all_layers_only_scorer(), config=config)
    assert cache.ledger is not None and cache.policy.pools_every_layer
    with torch.no_grad():
        for part in prompt[:, :-1].split(32, dim=1):
            model(input_ids=part, cache=cache, use_cache=True)
    live = held(cache)
    recording = record_prompt(model, prompt, answer, config, 32)
    recording.prepare(all_layers_only_scorer(), config)
    replayed = replay_kept(recording, all_layers_only_scorer(), config)
    # Evictions change the deeper layers' keys a little (the replay's approximation).
    assert (replayed == live).float().mean() > 0.9
    # It is not the layers-0..l value: a scorer reading that keeps other tokens in layer 0.
    pooled = NAMMCache(model=model, scorer=pooled_only_scorer(), config=config)
    with torch.no_grad():
        for part in prompt[:, :-1].split(32, dim=1):
            model(input_ids=part, cache=pooled, use_cache=True)
    assert not torch.equal(held(pooled)[:2], live[:2])
    # Saved and loaded by kind; 29 parameters.
    cache.save_pretrained(tmp_path / "all-layers")
    loaded = NAMMCache.from_pretrained(tmp_path / "all-layers", model=model)
    assert loaded.scorer.kind == "linear_all_layers" and loaded.scorer.num_parameters() == 29
    assert loaded.policy.pools_every_layer and loaded.ledger is not None
    card = (tmp_path / "all-layers" / "README.md").read_text()
    assert "input 28 features (8 recency + 17 spectrogram bins + key_norm, value_norm, all_layer_key_norm)" in card


def test_widen_scorer_keeps_a_linear_scorers_weights_and_adds_the_new_input_at_the_given_weight(tmp_path, capsys):
    import sys
    from pathlib import Path

    from namm_cache.hub import ScorerMetadata, load_scorer, save_scorer
    from namm_cache.scorers import LinearScorer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import widen_scorer

    source = LinearScorer()
    source.set_flat_params(torch.linspace(-1, 1, 28))
    source.set_normalization(torch.arange(17.0), torch.arange(1.0, 18.0))
    config = NAMMConfig(update_interval=64, recent_window=16, sinks=2)
    save_scorer(tmp_path / "linear", source, config, ScorerMetadata(training_tasks=["passkey", "needle"]))
    save_scorer(tmp_path / "bam_norms", __import__("namm_cache").scorers.BAMNormsScorer(), config)  # same inputs as linear
    assert widen_scorer.main([str(tmp_path / "linear"), "linear_all_layers", str(tmp_path / "wide"), "--weight", "-0.5"]) == 0
    wide = load_scorer(tmp_path / "wide")
    assert wide.scorer.kind == "linear_all_layers" and wide.config == config
    assert wide.metadata.training_tasks == ["passkey", "needle"]
    flat = source.get_flat_params()
    torch.testing.assert_close(wide.scorer.get_flat_params(), torch.cat([flat[:27], torch.tensor([-0.5]), flat[27:]]))
    torch.testing.assert_close(wide.scorer.spectrogram_std, source.spectrogram_std)
    # At weight 0 it scores as the source: the new column reads nothing.
    assert widen_scorer.main([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "zero")]) == 0
    zero = load_scorer(tmp_path / "zero").scorer
    features, positions, valid = torch.randn(3, 10, 28), torch.arange(10).repeat(3, 1), torch.ones(3, 10, dtype=torch.bool)
    torch.testing.assert_close(zero(features, positions, valid), source(features[..., :27], positions, valid))
    # The new input alone, as a rule, with its own threshold and neighbours
    assert widen_scorer.main([str(tmp_path / "linear"), "linear_all_layers", str(tmp_path / "rule"), "--weight", "-1",
                              "--only-new", "--bias", "-1.1", "--neighbours", "4", "--smoothing", "8"]) == 0
    rule = load_scorer(tmp_path / "rule")
    torch.testing.assert_close(rule.scorer.get_flat_params(), torch.tensor([0.0] * 27 + [-1.0, -1.1]))
    assert rule.config == config.replace(neighbours=4, smoothing=8) and "every other weight 0, bias -1.1" in rule.metadata.description
    torch.testing.assert_close(rule.scorer.spectrogram_mean, source.spectrogram_mean)
    capsys.readouterr()
    for argv, message in (
        ([str(tmp_path / "linear"), "bam", str(tmp_path / "x")], "only a linear scorer widens"),
        ([str(tmp_path / "wide"), "linear_pooled", str(tmp_path / "x")], "got a linear_all_layers scorer and kind linear_pooled"),
        ([str(tmp_path / "bam_norms"), "linear_all_layers", str(tmp_path / "x")], "got a bam_norms scorer"),
        ([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "x"), "--weight", "1e300"], "within +-1e6"),
        ([str(tmp_path / "linear"), "linear_pooled", "/proc/widened"], "cannot write /proc/widened"),
        ([str(tmp_path / "linear"), "transformer", str(tmp_path / "x")], "unknown scorer kind 'transformer'"),
        ([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "wide")], "exists and is not empty"),
        ([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "x"), "--weight", "nan"], "--weight must be a finite number"),
        ([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "x"), "--bias", "inf"], "--bias must be a finite number"),
        ([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "x"), "--neighbours", "-1"], "neighbours must be an integer"),
        ([str(tmp_path / "linear"), "linear_pooled", str(tmp_path / "x"), "--smoothing", "-1"], "smoothing must be an integer"),
        ([str(tmp_path / "nowhere"), "linear_pooled", str(tmp_path / "x")], "nowhere"),
    ):
        assert widen_scorer.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_pooled_key_norm_policy_keeps_the_same_quietest_tokens_in_every_layer_and_head():
    """One round (at 63, run when the 65th token arrives): every layer reads every layer's rows, so all 8
    (layer, head) rows keep the same 20 tokens: the newest and the 19 of lowest pooled value."""
    from namm_cache.policies import COMPARABLE_POLICIES, BASELINE_POLICIES, build_policy

    assert "pooled_key_norm" in COMPARABLE_POLICIES and "pooled_key_norm" not in BASELINE_POLICIES
    model = tiny_model("llama")
    prompt = random_ids(65)
    cache = NAMMCache(model=model, policy=build_policy("pooled_key_norm"), budget=20, update_interval=64)
    assert cache.ledger is not None
    with torch.no_grad():
        model(input_ids=prompt[:, :64], cache=cache, use_cache=True)
        model(input_ids=prompt[:, 64:], cache=cache, use_cache=True)
    kept = held(cache, tokens=65)[:, :64]
    assert (kept.sum(-1) == 20).all() and (kept == kept[0]).all()
    value = cache.ledger.pooled_all_layers(torch.tensor([0]), 63)[0]
    expected = torch.zeros(64, dtype=torch.bool)
    expected[63] = True
    expected[value[:63].topk(19, largest=False).indices] = True
    assert torch.equal(kept[0], expected)
    # The per-head key-norm rule keeps different tokens in different rows.
    per_head = NAMMCache(model=model, policy="key_norm", budget=20, update_interval=64)
    with torch.no_grad():
        model(input_ids=prompt[:, :64], cache=per_head, use_cache=True)
        model(input_ids=prompt[:, 64:], cache=per_head, use_cache=True)
    assert not (held(per_head, tokens=65)[:, :64] == kept[0]).all()


def test_the_all_layer_value_is_computed_once_per_round_and_follows_row_moves_and_padding():
    from namm_cache.ledger import KeyNormLedger

    generator = torch.Generator().manual_seed(0)
    ledger = KeyNormLedger()
    for layer in range(3):
        ledger.append(layer, torch.randn(2, 2, 10, 4, generator=generator) * (layer + 1))
    rows = torch.tensor([0, 1])
    first = ledger.pooled_all_layers(rows, 9)
    assert ledger.pooled_all_layers(rows, 9) is first  # the next layer of the same round reuses it
    by_hand = pooled_key_norm(torch.cat([ledger.norms[i][:, :, :10] for i in range(3)], dim=1), torch.ones(2, 10, dtype=torch.bool))
    torch.testing.assert_close(first, by_hand)
    ledger.select_rows(torch.tensor([1, 0]))
    torch.testing.assert_close(ledger.pooled_all_layers(rows, 9), first[[1, 0]])
    ledger.mark_padding(0, torch.tensor([[True, False], [False, False]]))
    padded = ledger.pooled_all_layers(rows, 9)
    assert padded[0, 0] == 0 and not torch.allclose(padded[0, 1:], first[1, 1:])
    torch.testing.assert_close(padded[1], first[0])


@pytest.mark.parametrize("policy", ["pooled_key_norm", "linear_all_layers"])
def test_every_layer_readers_refuse_a_left_padded_batch_and_take_a_right_padded_one(policy):
    """Left padding moves a row's rounds inside chunks, where the layers after the scoring one have not seen the
    chunk: the row would evict differently from its prompt alone, so it is refused. Right padding (lm-eval's
    log-likelihood batches) leaves every row's rounds where they are."""
    model = tiny_model("llama")

    def cache():
        if policy == "pooled_key_norm":
            return NAMMCache(model=model, policy=policy, budget=40, update_interval=32)
        return NAMMCache(model=model, scorer=all_layers_only_scorer(), update_interval=32, max_tokens=40)

    prompts = [random_ids(100, seed=10), random_ids(61, seed=11)]
    left = torch.zeros(2, 100, dtype=torch.long)
    mask = torch.zeros(2, 100, dtype=torch.long)
    left[0], mask[0] = prompts[0][0], 1
    left[1, 39:], mask[1, 39:] = prompts[1][0], 1
    with pytest.raises(ValueError, match="left-padded batch .* one at a time .* cache.reset"):
        model.generate(left, attention_mask=mask, cache=cache(), max_new_tokens=4, do_sample=False, prefill_chunk_size=32,
                       pad_token_id=0)
    # Right-padded, fed in 32-token chunks: row 1's logits and kept tokens are those of its prompt alone.
    right = torch.zeros(2, 100, dtype=torch.long)
    right_mask = torch.zeros(2, 100, dtype=torch.long)
    right[0], right_mask[0] = prompts[0][0], 1
    right[1, :61], right_mask[1, :61] = prompts[1][0], 1
    batched, alone = cache(), cache()
    with torch.no_grad():
        logits = [model(input_ids=right[:, i:i + 32], attention_mask=right_mask[:, :i + 32], cache=batched, use_cache=True).logits
                  for i in range(0, 100, 32)]
        solo = [model(input_ids=part, cache=alone, use_cache=True).logits for part in prompts[1].split(32, dim=1)]
    torch.testing.assert_close(torch.cat(logits, 1)[1, :61], torch.cat(solo, 1)[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(held(batched, row=1, tokens=100)[:, :61], held(alone, tokens=61))


def test_a_round_inside_a_chunk_warns_that_every_layer_readers_read_fewer_layers():
    model = tiny_model("llama")
    cache = NAMMCache(model=model, policy="pooled_key_norm", budget=40, update_interval=32)
    with pytest.warns(UserWarning, match="inside a prefill chunk"):
        with torch.no_grad():
            model(input_ids=random_ids(100), cache=cache, use_cache=True)
    between = NAMMCache(model=model, policy="pooled_key_norm", budget=40, update_interval=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for part in random_ids(100).split(32, dim=1):
                model(input_ids=part, cache=between, use_cache=True)
