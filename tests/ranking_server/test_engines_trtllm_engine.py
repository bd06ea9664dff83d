"""`TrtllmEngine` itself, around a stand-in for `tensorrt_llm.LLM` (TensorRT-LLM needs an NVIDIA GPU and cannot be
installed here): the stand-in runs the tiny real Llama for the passes that end with the prompt and returns what
TensorRT-LLM's RequestOutput carries (`context_logits` on the output, `outputs[0]` the completion). The engine's
own code (the readout, the score pass before a generate request, abort handling) runs as on a GPU."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from palr.decoding import LabelConstraint  # noqa: E402
from palr.llm import emit_by_bias, generate_constrained, load_causal_lm, score_candidates  # noqa: E402
from palr.prompt import Readout  # noqa: E402
from ranking_server.engines.base import EngineAborted, EngineRequest  # noqa: E402
from ranking_server.engines.trtllm import TrtllmEngine  # noqa: E402
from tests.fixtures.engine_workload import label_ids  # noqa: E402

N = 6


class SamplingParams:
    """The fields of `tensorrt_llm.SamplingParams` the engine sets (unset flags False, as there)."""

    def __init__(self, **kwargs):
        self.return_context_logits = self.return_generation_logits = False
        self.__dict__.update(kwargs)


@dataclass
class FinishedOutput:
    """A RequestOutput that has finished: awaitable with `aresult()`, abortable."""

    context_logits: torch.Tensor | None
    outputs: list
    aborted_by: list = field(default_factory=list)

    async def aresult(self):
        return self

    def abort(self) -> None:
        self.aborted_by.append("abort")


class PromptPassLlm:
    """`tensorrt_llm.LLM.generate_async` for passes of one step: the tiny Llama's logits over the prompt."""

    def __init__(self, model, end_id: int, cancel: bool = False):
        self.model, self.cancel, self.params = model, cancel, []
        self.tokenizer = SimpleNamespace(eos_token_id=end_id)

    def generate_async(self, prompt, sampling_params, streaming=False):
        assert sampling_params.max_tokens == 1 and not streaming, "only passes that end with the prompt run here"
        self.params.append(sampling_params)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([list(prompt)])).logits[0].float()  # [T, V]
        completion = SimpleNamespace(token_ids=[int(logits[-1].argmax())],
                                     finish_reason="cancelled" if self.cancel else "length",
                                     generation_logits=logits[-1:][None] if sampling_params.return_generation_logits
                                     else None)  # [1, 1, V]
        return FinishedOutput(logits if sampling_params.return_context_logits else None, [completion])

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    return model, tokenizer, label_ids(tokenizer, N)


def readout_request(rid: str, labels, mode: str, rng: random.Random) -> EngineRequest:
    """A candidate-readout request (each candidate's last token read), with a bias; generate mode at weight 0."""
    prefix = [rng.randrange(100, 40000) for _ in range(12)]
    candidates, ends = [], []
    for label in labels:
        candidates += [label, rng.randrange(100, 40000)]
        ends.append(len(prefix) + len(candidates) - 1)
    return EngineRequest(rid, prefix, candidates + [rng.randrange(100, 40000)], labels, mode=mode, k=3,
                         bias=[rng.uniform(-0.5, 0.5) for _ in labels], readout=Readout(tuple(ends), tuple(labels)),
                         logit_weight=0.0)


def engine_around(llm, model) -> TrtllmEngine:
    return TrtllmEngine.around(llm, SamplingParams, model.config.vocab_size, max_seq_len=256)


def test_generate_with_a_readout_runs_its_score_pass_and_answers_like_the_reference(tiny):
    """The score pass's context logits come from the RequestOutput (an AttributeError on every such request
    before, which also failed the server's start-up warm-up)."""
    model, tokenizer, labels = tiny
    llm = PromptPassLlm(model, tokenizer.eos_token_id)
    engine = engine_around(llm, model)
    request = readout_request("g", labels, "generate", random.Random(3))
    result = asyncio.run(engine.rank(request))
    want = generate_constrained(model, request.input_ids, LabelConstraint(labels, request.k), request.bias,
                                readout=request.readout, logit_weight=0.0)
    assert result.order == want and len(set(want)) == request.k
    assert [p.return_context_logits for p in llm.params] == [True]  # one pass: weight 0 decodes nothing
    assert engine.stats().completed == 1 and engine.stats().active == 0


def test_score_with_a_readout_gives_the_reference_scores(tiny):
    model, tokenizer, labels = tiny
    engine = engine_around(PromptPassLlm(model, tokenizer.eos_token_id), model)
    request = readout_request("s", labels, "score", random.Random(4))
    result = asyncio.run(engine.rank(request))
    assert result.scores == pytest.approx(score_candidates(model, request.run_ids, request.readout), abs=1e-4)
    assert result.order == sorted(range(N), key=lambda c: -result.scores[c])


def test_generate_at_weight_0_with_the_label_readout_answers_by_its_bias_without_a_decode(tiny):
    """A label-readout ranker (no candidate readout) at logit weight 0: the answer is the bias's order, which the
    prompt does not change, so nothing is submitted (before: a streamed decode of up to max_new_tokens steps)."""
    model, tokenizer, labels = tiny
    llm = PromptPassLlm(model, tokenizer.eos_token_id)
    request = dataclasses.replace(readout_request("w", labels, "generate", random.Random(6)), readout=None)
    engine = engine_around(llm, model)
    result = asyncio.run(engine.rank(request))
    reference = LabelConstraint(labels, request.k)
    emit_by_bias(reference, request.bias)
    assert result.order == reference.emitted()
    assert result.order == sorted(range(N), key=lambda c: -request.bias[c])[:request.k]
    assert llm.params == [] and engine.stats().prompt_tokens == 0  # nothing ran, nothing counted as run


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_cancelled_pass_is_an_abort_not_a_crash(tiny, mode):
    model, tokenizer, labels = tiny
    engine = engine_around(PromptPassLlm(model, tokenizer.eos_token_id, cancel=True), model)
    with pytest.raises(EngineAborted):
        asyncio.run(engine.rank(readout_request("c", labels, mode, random.Random(5))))
    assert engine.stats().aborted == 1 and engine.stats().active == 0


class BlockReuseLlm(PromptPassLlm):
    """Context logits of the prompt's last 4 positions only, as TensorRT-LLM returns with KV block reuse on."""

    def generate_async(self, prompt, sampling_params, streaming=False):
        output = super().generate_async(prompt, sampling_params, streaming)
        output.context_logits = output.context_logits[-4:]
        return output


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_readout_the_output_cannot_give_fails_the_request_and_is_counted_failed(tiny, mode):
    """The engine's own EngineErrors after a pass (here: readout positions without context logits) reached the
    caller but not the counts: `failed` stayed 0."""
    from ranking_server.engines.base import EngineError

    model, tokenizer, labels = tiny
    engine = engine_around(BlockReuseLlm(model, tokenizer.eos_token_id), model)
    with pytest.raises(EngineError, match="fall in KV blocks reused"):
        asyncio.run(engine.rank(readout_request(mode, labels, mode, random.Random(7))))
    stats = engine.stats()
    assert (stats.failed, stats.completed, stats.aborted) == (1, 0, 0)


def test_the_score_pass_of_a_generate_request_counts_its_prompt_tokens(tiny):
    """Two passes may run for a generate request of a candidate-readout ranker; the score pass's tokens were not
    counted (at weight 0 the generate request's own, uncut prompt was counted in their place)."""
    model, tokenizer, labels = tiny
    engine = engine_around(PromptPassLlm(model, tokenizer.eos_token_id), model)
    request = readout_request("g", labels, "generate", random.Random(8))
    asyncio.run(engine.rank(request))
    assert engine.stats().prompt_tokens == request.readout.end  # the score pass stops at the last readout


class RefusingLlm(PromptPassLlm):
    """`generate_async` raising at submission, as TensorRT-LLM's own argument checks do (a ValueError)."""

    def generate_async(self, prompt, sampling_params, streaming=False):
        raise ValueError("prompt length exceeds max_input_len")


def test_a_submission_trtllm_refuses_fails_the_request_as_refused_by_the_engine(tiny):
    """It escaped as the library's ValueError: the ranking server answered INTERNAL instead of degrading (an
    engine's InvalidRequest: the server built the request, so it degrades and logs the error)."""
    from ranking_server.engines.base import InvalidRequest

    model, tokenizer, labels = tiny
    engine = engine_around(RefusingLlm(model, tokenizer.eos_token_id), model)
    with pytest.raises(InvalidRequest, match="TensorRT-LLM refused request s: prompt length exceeds"):
        asyncio.run(engine.rank(readout_request("s", labels, "score", random.Random(9))))
    assert engine.stats().failed == 1 and engine.stats().active == 0


def test_an_abort_between_a_generate_requests_two_passes_stops_the_second(tiny, monkeypatch):
    """Between the score pass and the generate pass the request had no output in flight: abort() answered False
    and the generate pass ran anyway."""
    import ranking_server.engines.trtllm as trtllm

    model, tokenizer, labels = tiny
    llm = PromptPassLlm(model, tokenizer.eos_token_id)
    engine = engine_around(llm, model)
    request = dataclasses.replace(readout_request("gap", labels, "generate", random.Random(4)), logit_weight=1.0)
    answered = []
    joined_bias = trtllm.decoding_bias

    def aborted_meanwhile(bias, read):  # runs between the passes: the caller aborts there
        answered.append(engine.abort("gap"))
        return joined_bias(bias, read)

    monkeypatch.setattr(trtllm, "decoding_bias", aborted_meanwhile)
    with pytest.raises(EngineAborted, match="after its score pass"):
        asyncio.run(engine.rank(request))
    assert answered == [True] and len(llm.params) == 1, "only the score pass was submitted"
    stats = engine.stats()
    assert (stats.aborted, stats.failed, stats.active) == (1, 0, 0) and not engine.abort("gap")
