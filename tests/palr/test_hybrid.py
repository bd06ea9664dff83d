"""Hybrid prompts and the ranker's extra vocabulary (palr/hybrid.py): each item's soft token sits right after
its title and carries that item's projected SASRec embedding; a trend prompt ends each candidate line with
its trend token, where the candidate readout reads; folding the extra rows into the vocabulary changes no
logit and puts the score row in the LM head (tied or not); the rows round-trip through their files; the
in-flight engine ranks hybrid and candidate-readout prompts as the reference does."""

from __future__ import annotations

import asyncio

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from palr.hybrid import (  # noqa: E402
    ItemTokens, extra_rows, fold_into_vocabulary, input_embeddings, load_projector, save_projector)
from palr.prompt import PalrPrompt, PromptError, PromptSettings, Readout  # noqa: E402


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


def test_trend_prompt_ends_each_candidate_line_with_its_trend_token_where_the_readout_reads(tokenizer, ml100k):
    catalog = ml100k.catalog
    offset = len(tokenizer)
    tokens = ItemTokens.for_catalog(offset, [item.id for item in catalog.items], trend_buckets=8)
    history, candidates = catalog.items[:3], catalog.items[3:8]
    trends = [0, 7, 3, 3, 1]
    settings = PromptSettings(history_items=3, prompt="hybrid", trend=True, readout="candidate")
    parts = PalrPrompt(tokenizer, settings, tokens).retrieval("", history, candidates, trends)
    ids = parts.input_ids
    assert tokens.score_token == offset + len(catalog) + 1 + 8, "layout: items, trend buckets, then the score row"
    assert parts.readout.tokens == (tokens.score_token,) * 5
    for c, (position, item) in enumerate(zip(parts.readout.positions, candidates)):
        assert ids[position] == tokens.trend_token(trends[c]), "each candidate is read at its own trend token"
        assert ids[position - 1] == tokens.token(item.id), "right after the candidate's soft token"
        assert ids[position + 1:position + 1 + len(parts.candidate_line_ids[c][-1:])] == parts.candidate_line_ids[c][-1:]
    plain = PalrPrompt(tokenizer, PromptSettings(history_items=3, prompt="hybrid"), tokens).retrieval("", history,
                                                                                                     candidates)
    assert [t for t in ids if not offset + len(catalog) + 1 <= t] == plain.input_ids, "trend tokens are all it adds"
    assert plain.readout == Readout.after_prompt(len(plain.input_ids), plain.label_token_ids), "label readout"
    with pytest.raises(PromptError, match="trend bucket per candidate"):
        PalrPrompt(tokenizer, settings, tokens).retrieval("", history, candidates)
    with pytest.raises(PromptError, match="trend buckets"):
        PalrPrompt(tokenizer, settings, ItemTokens.for_catalog(offset, [item.id for item in catalog.items]))


def test_rank_tokens_follow_the_trend_token_one_per_ranking_in_the_prompts_order(tokenizer, ml100k):
    from palr.ranking import RANK_BUCKETS

    catalog = ml100k.catalog
    offset = len(tokenizer)
    tokens = ItemTokens.for_catalog(offset, [item.id for item in catalog.items], trend_buckets=8,
                                    rank_rows=2 * RANK_BUCKETS)
    history, candidates = catalog.items[:3], catalog.items[3:7]
    trends, ranks = [0, 7, 3, 1], [[0, 5], [1, 0], [2, 2], [5, 1]]  # per candidate: (collab, retrieval) buckets
    settings = PromptSettings(history_items=3, prompt="hybrid", trend=True, rank_tokens=["collab", "retrieval"],
                              readout="candidate")
    parts = PalrPrompt(tokenizer, settings, tokens).retrieval("", history, candidates, trends, ranks)
    ids = parts.input_ids
    rank_base = offset + len(catalog) + 1 + 8
    assert tokens.score_token == rank_base + 2 * RANK_BUCKETS, "layout: items, trend buckets, rank rows, score row"
    for c, position in enumerate(parts.readout.positions):
        assert ids[position - 2:position + 1] == [tokens.trend_token(trends[c]), rank_base + ranks[c][0],
                                                  rank_base + RANK_BUCKETS + ranks[c][1]], \
            "trend, then collab's then retrieval's rank token; read at the last"
    with_trend = PalrPrompt(tokenizer, PromptSettings(history_items=3, prompt="hybrid", trend=True,
                                                      readout="candidate"), tokens).retrieval("", history, candidates,
                                                                                               trends)
    assert [t for t in ids if not rank_base <= t < tokens.score_token] == \
        [t for t in with_trend.input_ids if t != tokens.score_token], "the rank tokens are all they add"
    with pytest.raises(PromptError, match="rank bucket"):
        PalrPrompt(tokenizer, settings, tokens).retrieval("", history, candidates, trends, [[0, 1]] * 3)
    with pytest.raises(PromptError, match="rank rows"):
        PalrPrompt(tokenizer, settings, ItemTokens.for_catalog(offset, [item.id for item in catalog.items], 8,
                                                               RANK_BUCKETS))
    with pytest.raises(PromptError, match="unknown rank tokens"):
        PalrPrompt(tokenizer, PromptSettings(rank_tokens=["popularity"]), tokens)


TREND_BUCKETS = 3


@pytest.fixture(scope="module")
def tiny_hybrid(tiny_llama_dir):
    """The tiny random Llama and extra rows over a random 64-d item table (11 rows), 3 trend buckets and a
    random score row (so candidate readouts differ)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    projector = extra_rows(torch.randn(11, 64), model.config.hidden_size, TREND_BUCKETS).eval()
    with torch.no_grad():
        projector.score.normal_()
        projector.trend.normal_()
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
    assert fold_into_vocabulary(folded, projector, vocab) == vocab + 11 + TREND_BUCKETS + 1
    with torch.no_grad():
        full = folded(input_ids=ids).logits
        hidden = folded.model(input_ids=ids).last_hidden_state
    assert float((full[..., :vocab] - on_the_fly[..., :vocab]).abs().max()) <= 1e-5
    score_row = vocab + 11 + TREND_BUCKETS
    assert torch.allclose(full[0, :, score_row], hidden[0] @ projector.score.detach(), atol=1e-5), \
        "the LM head's last row is the score row"
    save_projector(tmp_path / "projector", projector, {"offset": vocab})
    again = load_projector(tmp_path / "projector", model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(again(), projector())


def test_an_untied_head_gets_the_score_row_and_nothing_else(tiny_hybrid):
    import copy

    model, projector = tiny_hybrid
    untied = copy.deepcopy(model)
    vocab = untied.get_input_embeddings().num_embeddings
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    untied.config.tie_word_embeddings = False
    size = fold_into_vocabulary(untied, projector, vocab)
    head = untied.get_output_embeddings().weight.detach()
    assert head.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    assert torch.equal(head[size - 1], projector.score.detach())
    assert not bool(head[vocab:size - 1].any()), "no extra token but the score row can win a logit"


def rank_all_at_once(engine, requests):
    """Every request submitted at once (they share the running batch); the engine closed after."""
    async def all_at_once():
        return await asyncio.gather(*(engine.rank(r) for r in requests))

    try:
        return asyncio.run(all_at_once())
    finally:
        engine.close()


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
    results = rank_all_at_once(HFEngine(folded, EngineConfig(max_batch_size=4, max_tokens_per_step=64)), requests)
    for request, result in zip(requests, results):
        if request.mode == "score":
            want = score_labels(folded, request.input_ids, labels)
            assert result.scores == pytest.approx(want, abs=1e-5)
        else:
            assert result.order == generate_constrained(folded, request.input_ids, LabelConstraint(labels, 3))


def test_in_flight_engine_reads_each_candidates_position_as_the_reference(tiny_hybrid):
    """Candidate readout: score mode reads the score row at each candidate's last token; generate mode adds
    those readouts to its bias. Prompts chunked across steps (max_tokens_per_step 5), shared prefix reused."""
    import copy

    from palr.decoding import LabelConstraint
    from palr.llm import generate_constrained, score_candidates
    from ranking_server.engines.base import EngineRequest, InvalidRequest
    from ranking_server.engines.hf import EngineConfig, HFEngine

    model, projector = tiny_hybrid
    vocab = model.get_input_embeddings().num_embeddings
    folded = copy.deepcopy(model)
    fold_into_vocabulary(folded, projector, vocab)
    score_token = vocab + 11 + TREND_BUCKETS
    trend = vocab + 11
    labels = list(range(300, 304))
    prefix = [11, 12, 13, 14]
    suffix = [40, 41, labels[0], 20, vocab + 1, trend + 2, 9, labels[1], 21, vocab + 2, trend, 9,
              labels[2], vocab + 4, trend + 1, 9, labels[3], 22, 23, vocab + 7, trend + 2, 9, 50, 51]
    ends = [len(prefix) + i for i, t in enumerate(suffix) if trend <= t < score_token]
    readout = Readout(tuple(ends), (score_token,) * 4)
    bias = [0.3, -0.2, 0.0, 0.5]
    requests = [EngineRequest("s", prefix, suffix, labels, mode="score", readout=readout),
                EngineRequest("g", prefix, suffix, labels, mode="generate", k=3, bias=bias, readout=readout),
                EngineRequest("s2", prefix, suffix[:-2] + [52], labels, mode="score", readout=readout)]
    results = rank_all_at_once(HFEngine(folded, EngineConfig(max_batch_size=4, max_tokens_per_step=5)), requests)
    want = score_candidates(folded, requests[0].input_ids, readout)
    assert results[0].scores == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in want)) == 4, "the readouts differ from candidate to candidate"
    assert results[2].scores == pytest.approx(score_candidates(folded, requests[2].input_ids, readout), abs=1e-5)
    assert results[1].order == generate_constrained(folded, requests[1].input_ids, LabelConstraint(labels, 3),
                                                    bias, readout=readout)
    with pytest.raises(InvalidRequest, match="outside the request's own tokens"):
        EngineRequest("bad", prefix, suffix, labels, mode="score",
                      readout=Readout((1, 2, 3, 4), (score_token,) * 4)).validate(vocab + 20, 512)
