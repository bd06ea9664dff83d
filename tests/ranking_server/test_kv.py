"""SlotKVCache on a tiny real Llama: passes through the slot cache give the model's own hidden states, with
the attended key view wider than the rows need (KEY_ALIGN), rows padded past their tokens (TOKEN_ALIGN) and
stale entries from earlier requests in it."""

import pytest
import torch

from palr.llm import load_causal_lm
from ranking_server.engines.kv import KEY_ALIGN, TOKEN_ALIGN, SlotKVCache, pass_input_ids


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_causal_lm(tiny_llama_dir)[0]


def forward(decoder, kv, first, tokens, starts):
    plan = kv.plan(first, starts, [len(t) for t in tokens])
    with torch.inference_mode():
        out = decoder(input_ids=pass_input_ids(tokens), attention_mask=plan.attention_mask(),
                      position_ids=plan.position_ids(), past_key_values=kv, use_cache=True)
    return plan, out.last_hidden_state  # [B, T, D]


def test_plan_reads_an_aligned_key_view_within_the_cache(model):
    kv = SlotKVCache(model.config, slots=2, max_len=100, dtype=torch.float32, device="cpu")
    plan = kv.plan(0, [37, 5], [3, 1])
    assert plan.kv_len == 40 and plan.key_width == 64 and plan.key_width % KEY_ALIGN == 0
    assert plan.attention_mask().shape == (2, 1, 3, 64)
    assert kv.plan(0, [90], [7]).key_width == 100, "never past the cache's positions"
    with pytest.raises(ValueError, match="plan outside the cache"):
        kv.plan(0, [95], [7])


def test_plan_pads_a_prompt_pass_to_the_token_alignment_not_a_decode_pass(model):
    kv = SlotKVCache(model.config, slots=2, max_len=100, dtype=torch.float32, device="cpu")
    assert kv.plan(0, [0, 0], [TOKEN_ALIGN + 1, 4]).width == 2 * TOKEN_ALIGN
    assert kv.plan(0, [0], [2 * TOKEN_ALIGN]).width == 2 * TOKEN_ALIGN
    assert kv.plan(0, [5, 9], [3, 1]).width == 3, "a decode pass (a token and its draft a row) is not padded"
    plan = kv.plan(0, [80], [TOKEN_ALIGN + 1])  # the padding runs past the cache's 100 positions, never stored
    assert plan.width == 2 * TOKEN_ALIGN and plan.key_width == 100 and plan.attention_mask().shape[-1] == 100


def test_chunked_passes_over_stale_slots_match_the_models_own_forward(model):
    decoder = model.get_decoder()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (45, 29)]
    kv = SlotKVCache(model.config, slots=2, max_len=128, dtype=torch.float32, device="cpu")
    for keys, values in zip(kv.keys, kv.values):  # an earlier request's leftovers: large, finite, never attended
        keys.normal_(0, 50, generator=generator)
        values.normal_(0, 50, generator=generator)
    # each prompt in two chunks, both rows in one pass each time (rows of different lengths, padded)
    cuts = [17, 11]
    first, head = forward(decoder, kv, 0, [p[:c] for p, c in zip(prompts, cuts)], [0, 0])
    assert first.width == 2 * TOKEN_ALIGN > max(cuts), "the test must run padding past both rows' tokens"
    plan, tail = forward(decoder, kv, 0, [p[c:] for p, c in zip(prompts, cuts)], cuts)
    assert plan.key_width > plan.kv_len, "the test must read masked keys past the rows' lengths"
    for i, (prompt, cut) in enumerate(zip(prompts, cuts)):
        with torch.inference_mode():
            want = decoder(input_ids=torch.tensor([prompt])).last_hidden_state[0]  # [T, D]
        got = torch.cat([head[i, :cut], tail[i, :len(prompt) - cut]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
