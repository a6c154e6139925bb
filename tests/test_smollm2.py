"""The real offline SmolLM2-135M-Instruct: keep-all NAMMCache answers exactly like a full cache."""

from __future__ import annotations

import pytest
import torch
from helpers import observing_keep_all_scorer
from transformers import DynamicCache

from namm_cache import NAMMCache
from namm_cache.prompts import passkey_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from namm_cache.offline import load_offline_model

    try:
        return load_offline_model()
    except FileNotFoundError as error:  # pragma: no cover - the Makefile installs the package
        pytest.skip(str(error))


def test_keep_all_namm_gives_the_full_cache_answer(smollm2):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 1200, depth=0.5, seed=3)
    inputs = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=8, do_sample=False, prefill_chunk_size=256, output_logits=True, return_dict_in_generate=True)
    reference = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kwargs)
    cache = NAMMCache(model=model, scorer=observing_keep_all_scorer(), update_interval=256)
    namm = model.generate(**inputs, past_key_values=cache, **kwargs)
    answer = tokenizer.decode(reference.sequences[0, inputs.input_ids.shape[1] :])
    assert prompt.is_answered(answer), answer
    assert torch.equal(namm.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(namm.logits, reference.logits)) <= 1e-4
    stats = cache.stats()
    assert stats["evictions"] > 0 and stats["evicted_tokens"] == 0
    assert cache.namm_layers[0].observing
