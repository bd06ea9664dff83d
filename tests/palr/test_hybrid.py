"""Hybrid prompts (palr/hybrid.py): each item's soft token sits right after its title and carries that
item's projected SASRec embedding; folding the projector into the vocabulary changes no logit; the
projector round-trips through its files; the in-flight engine ranks hybrid prompts as the reference does."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

from palr.hybrid import (  # noqa: E402
    ItemTokens, fold_into_vocabulary, input_embeddings, item_projector, load_projector, save_projector)
from palr.prompt import PalrPrompt, PromptError, PromptSettings  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def test_hybrid_prompt_puts_each_items_soft_token_after_its_title(tokenizer, ml100k):
    catalog, split = ml100k.catalog, ml100k.split
    offset = len(tokenizer)
    tokens = ItemTokens.for_catalog(offset, [item.id for item in catalog.items])
    user = sorted(split.train)[0]
    history = [catalog.by_id(i) for i in split.train[user][-3:]]
    candidates = [catalog.by_id(i) for i in split.train[sorted(split.train)[1]][:4]]
    text = PalrPrompt(tokenizer, PromptSettings(history_items=3)).retrieval("", history, candidates)
    hybrid = PalrPrompt(tokenizer, PromptSettings(history_items=3, prompt="hybrid"), tokens).retrieval(
        "", history, candidates)
    soft = [t for t in hybrid.input_ids if t >= offset]
    expected = [offset + catalog.index(item.id) for item in history + candidates]
    assert soft == expected, "one soft token per item, in prompt order, carrying that item's catalog index"
    assert [t for t in hybrid.input_ids if t < offset] == text.input_ids, "the text around them is the text prompt"
    for item in history + candidates:  # each soft token right after its own title
        at = hybrid.input_ids.index(offset + catalog.index(item.id))
        title = list(PalrPrompt(tokenizer, PromptSettings())._title_ids(item.title, item.year, item in history))
        assert hybrid.input_ids[at - len(title):at] == title
    assert hybrid.candidate_line_ids == text.candidate_line_ids, "answers (generate mode) stay text"
    ids_only = PalrPrompt(tokenizer, PromptSettings(history_items=3, prompt="ids"), tokens).retrieval(
        "", history, candidates)
    assert [t for t in ids_only.input_ids if t >= offset] == expected and len(ids_only.input_ids) < len(text.input_ids)


def test_an_item_without_an_embedding_is_shown_by_its_title_alone(tokenizer, ml100k):
    catalog = ml100k.catalog
    items = catalog.items[:3]
    tokens = ItemTokens(len(tokenizer), {items[0].id: 1, items[2].id: 3})  # items[1] is "new": no row
    prompt = PalrPrompt(tokenizer, PromptSettings(prompt="hybrid"), tokens)
    assert prompt.item_ids(items[1], False) == list(prompt._title_ids(items[1].title, items[1].year, False))
    assert prompt.item_ids(items[0], False)[-1] == len(tokenizer) + 1
    with pytest.raises(PromptError, match="soft tokens"):
        PalrPrompt(tokenizer, PromptSettings(prompt="hybrid"))


@pytest.fixture(scope="module")
def tiny_hybrid(tiny_llama_dir):
    """The tiny random Llama and a projector over a random 64-d item table (11 rows)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    projector = item_projector(torch.randn(11, 64), model.config.hidden_size).eval()
    return model, projector


def test_input_embeddings_hold_the_projected_row_at_soft_positions(tiny_hybrid):
    model, projector = tiny_hybrid
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[5, vocab + 3, 7, vocab + 10]])
    with torch.no_grad():
        items = projector()
        embeds = input_embeddings(model, ids, items)
        text = model.get_input_embeddings()(torch.tensor([[5, 7]]))
    assert torch.equal(embeds[0, 1], items[3]) and torch.equal(embeds[0, 3], items[10])
    assert torch.equal(embeds[0, [0, 2]], text[0])


def test_folding_the_projector_into_the_vocabulary_changes_no_logit(tiny_hybrid, tmp_path):
    import copy

    model, projector = tiny_hybrid
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[5, vocab + 3, 7, 9, vocab + 10, 11]])
    with torch.no_grad():
        on_the_fly = model(inputs_embeds=input_embeddings(model, ids, projector())).logits  # [1, T, V]
    folded = copy.deepcopy(model)
    assert fold_into_vocabulary(folded, projector, vocab) == vocab + 11
    with torch.no_grad():
        logits = folded(input_ids=ids).logits[..., :vocab]
    assert float((logits - on_the_fly).abs().max()) <= 1e-5
    save_projector(tmp_path / "projector", projector, {"offset": vocab})
    again = load_projector(tmp_path / "projector", model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(again(), projector())


def test_in_flight_engine_ranks_hybrid_prompts_as_the_reference(tiny_hybrid):
    import copy

    from palr.decoding import LabelConstraint
    from palr.llm import generate_constrained, score_labels
    from ranking_server.engines.base import EngineRequest
    from ranking_server.engines.hf import EngineConfig, HFEngine

    model, projector = tiny_hybrid
    vocab = model.get_input_embeddings().num_embeddings
    folded = copy.deepcopy(model)
    fold_into_vocabulary(folded, projector, vocab)
    labels = list(range(300, 305))
    prefix = [11, 12, 13, 14]
    suffixes = [[20, vocab + 1, 21, vocab + 2, 22], [23, vocab + 4, vocab + 5, 24, 25, vocab + 9, 26]]
    requests = [EngineRequest(f"s{i}", prefix, s, labels, mode="score") for i, s in enumerate(suffixes)]
    requests += [EngineRequest(f"g{i}", prefix, s, labels, mode="generate", k=3) for i, s in enumerate(suffixes)]
    engine = HFEngine(folded, EngineConfig(max_batch_size=4, max_tokens_per_step=64))

    async def all_at_once():
        return await asyncio.gather(*(engine.rank(r) for r in requests))

    try:
        results = asyncio.run(all_at_once())
    finally:
        engine.close()
    for request, result in zip(requests, results):
        if request.mode == "score":
            want = score_labels(folded, request.input_ids, labels)
            assert result.scores == pytest.approx(want, abs=1e-5)
        else:
            assert result.order == generate_constrained(folded, request.input_ids, LabelConstraint(labels, 3))
