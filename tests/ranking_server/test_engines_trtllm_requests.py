"""The pure-Python half of the trtllm backend, on CPU tensors and the tiny real Llama: the logits
processor enforces the generate-mode constraint the way TensorRT-LLM would call it (a greedy loop
that hands it `[beam, 1, V]` logits and the tokens so far), so its answers equal the one-at-a-time
reference; score mode's generation logits give the reference scores; requests become the right
SamplingParams arguments."""

from __future__ import annotations

import math
import pickle
import random

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from palr.decoding import LabelConstraint, TitleConstraint  # noqa: E402
from palr.llm import generate_constrained, generate_labels, load_causal_lm, score_labels  # noqa: E402
from ranking_server.engines.base import EngineError, EngineRequest  # noqa: E402
from ranking_server.engines.trtllm_requests import (  # noqa: E402
    ConstraintLogitsProcessor, emitted_order, label_scores, sampling_kwargs)
from tests.fixtures.engine_workload import label_ids  # noqa: E402

END = 2
VOCAB = 64


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    labels = label_ids(tokenizer, 12)
    return model, labels


def call(processor, logits, tokens):
    processor(7, logits, [list(tokens)], None, None)
    return logits


def test_first_step_leaves_only_the_labels_with_their_bias():
    processor = ConstraintLogitsProcessor(LabelConstraint([10, 11, 12], 2), [0.5, -1.0, 0.0], END)
    logits = call(processor, torch.zeros(1, 1, VOCAB), [1, 2, 3])  # [beam, 1, V] as the TRT backend passes them
    assert logits[0, 0, [10, 11, 12]].tolist() == [0.0, -1.5, -0.5]  # the bias, shifted to a largest 0
    others = [t for t in range(VOCAB) if t not in (10, 11, 12)]
    assert torch.isinf(logits[0, 0, others]).all() and (logits[0, 0, others] < 0).all()


def test_a_large_fused_bias_keeps_its_order_in_bf16_logits():
    """At fusion weight 1000 the bias is ~1000 x log-softmax: -2003, -2000 and -2002 are one bf16 value (spacing 8
    there), so the best candidate tied with the others and the first label won; shifted to a largest 0 they differ."""
    assert torch.tensor([-2003.0, -2000.0, -2002.0], dtype=torch.bfloat16).unique().numel() == 1
    processor = ConstraintLogitsProcessor(LabelConstraint([10, 11, 12], 3), [-2003.0, -2000.0, -2002.0], END)
    logits = call(processor, torch.zeros(1, 1, VOCAB, dtype=torch.bfloat16), [1, 2, 3])
    assert logits[0, 0].argmax().item() == 11
    assert logits[0, 0, [10, 11, 12]].tolist() == [-3.0, 0.0, -2.0]


def test_labels_already_emitted_are_masked_then_only_the_end_token_is_left():
    processor = ConstraintLogitsProcessor(LabelConstraint([10, 11, 12], 2), None, END)
    prompt = [1, 2, 3]
    call(processor, torch.zeros(VOCAB), prompt)
    logits = call(processor, torch.zeros(VOCAB), prompt + [11])
    assert [math.isfinite(x) for x in logits[[10, 11, 12]].tolist()] == [True, False, True]
    logits = call(processor, torch.zeros(VOCAB), prompt + [11, 12])
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [END]


def test_backends_that_pass_only_generated_tokens_are_handled_the_same():
    with_prompt = ConstraintLogitsProcessor(LabelConstraint([10, 11, 12], 3), None, END)
    without = ConstraintLogitsProcessor(LabelConstraint([10, 11, 12], 3), None, END)
    generated = []
    for token in (12, 10):
        a = call(with_prompt, torch.zeros(VOCAB), [5, 6, 7, 8] + generated)
        b = call(without, torch.zeros(VOCAB), generated)
        assert torch.equal(a, b)
        generated.append(token)
    assert with_prompt.constraint.emitted() == without.constraint.emitted() == [2]


def greedy_with_processor(model, input_ids, processor, max_tokens, include_prompt=True) -> list[int]:
    """What TensorRT-LLM does per request: logits → processor (in place) → argmax, until end_id."""
    generated: list[int] = []
    ids = list(input_ids)
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1:, :].float().clone()  # [1, 1, V]
            processor(0, logits, [ids if include_prompt else generated], None, None)
            token = int(logits[0, 0].argmax())
            if token == processor.end_id:
                break
            generated.append(token)
            ids.append(token)
    return generated


@pytest.mark.parametrize("include_prompt", [True, False], ids=["token_ids-with-prompt", "generated-only"])
def test_greedy_decoding_under_the_processor_equals_the_reference(tiny, include_prompt):
    model, labels = tiny
    rng = random.Random(1)
    for i in range(4):
        n = rng.choice([4, 8, 12])
        ids = [rng.randrange(100, 40000) for _ in range(rng.randint(8, 40))]
        k = rng.randint(1, n)
        bias = [rng.uniform(-2, 2) for _ in range(n)] if i % 2 else None
        request = EngineRequest(f"r{i}", ids[:4], ids[4:], labels[:n], "generate", k, bias)
        constraint = request.validate(model.config.vocab_size, 4096)
        kwargs = sampling_kwargs(request, constraint, END)
        processor = pickle.loads(pickle.dumps(kwargs["logits_processor"]))  # as sent to TRT-LLM's worker
        tokens = greedy_with_processor(model, ids, processor, kwargs["max_tokens"], include_prompt)
        order, used = emitted_order(request.validate(model.config.vocab_size, 4096), tokens)
        assert used == len(tokens) == k
        assert order == generate_labels(model, ids, labels[:n], k, bias)


def test_title_lines_are_forced_after_each_label_like_the_reference(tiny):
    model, labels = tiny
    lines = [[300 + i, 400 + i, 198] for i in range(5)]  # a title token, another, a newline
    ids = list(range(1000, 1030))
    processor = ConstraintLogitsProcessor(TitleConstraint(labels[:5], lines, 2), None, END)
    tokens = greedy_with_processor(model, ids, processor, max_tokens=20)
    order, used = emitted_order(TitleConstraint(labels[:5], lines, 2), tokens)
    assert used == len(tokens) == 2 * 4
    assert tokens[1:4] == lines[order[0]] and tokens[5:8] == lines[order[1]]
    assert order == generate_constrained(model, ids, TitleConstraint(labels[:5], lines, 2))


def test_score_mode_is_one_step_with_generation_logits_giving_the_reference_scores(tiny):
    model, labels = tiny
    ids = list(range(2000, 2050))
    request = EngineRequest("s", ids[:10], ids[10:], labels[:8])
    kwargs = sampling_kwargs(request, request.validate(model.config.vocab_size, 4096), END)
    assert kwargs == {"top_k": 1, "detokenize": False, "end_id": END, "max_tokens": 1,
                      "return_generation_logits": True}
    with torch.inference_mode():
        generation_logits = model(input_ids=torch.tensor([ids])).logits[:, -1:, :]  # [beam, steps, V]
    assert label_scores(generation_logits, labels[:8]) == pytest.approx(score_labels(model, ids, labels[:8]), abs=1e-5)


def test_generate_mode_arguments_bound_the_length_and_carry_the_processor():
    request = EngineRequest("g", [1], [2, 3], [10, 11, 12, 13], "generate", k=3, bias=[0.0, 0.1, 0.2, 0.3])
    constraint = request.validate(100, 100)
    kwargs = sampling_kwargs(request, constraint, END)
    assert kwargs["max_tokens"] == 3 + 1 and kwargs["top_k"] == 1 and kwargs["end_id"] == END
    processor = kwargs["logits_processor"]
    assert isinstance(processor, ConstraintLogitsProcessor) and processor.bias == [0.0, 0.1, 0.2, 0.3]
    with pytest.raises(EngineError, match="needs a constraint"):
        sampling_kwargs(request, None, END)


def test_generation_that_stopped_early_is_an_error_not_a_short_answer():
    with pytest.raises(EngineError, match="before the constraint was done"):
        emitted_order(LabelConstraint([10, 11, 12], 3), [11])
    assert emitted_order(LabelConstraint([10, 11, 12], 2), [11, 10, END]) == ([1, 0], 2)


def test_engine_and_build_say_what_to_install_when_tensorrt_llm_is_missing(tmp_path):
    import importlib.util
    import json

    from compile import build
    from palr.bundle import Bundle
    from ranking_server.engines.trtllm import TrtllmEngine
    from tests.fixtures.builds import build_config

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed here")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "config.json").write_text(json.dumps(
        {"version": "1.2.1", "pretrained_config": {"vocab_size": 100}, "build_config": {"max_seq_len": 64}}))
    with pytest.raises(EngineError, match="needs TensorRT-LLM, which is not installed here or does not import "
                                         ".*tensorrt-llm/release"):
        TrtllmEngine(engine_dir)
    bundle = Bundle.open_or_create(tmp_path / "bundle")
    (bundle.root / "llm" / "merged").mkdir(parents=True)
    (bundle.root / "llm" / "merged" / "config.json").write_text("{}")
    bundle.add_artifact("llm_merged", "llm/merged")
    bundle.save()
    with pytest.raises(RuntimeError, match="--target trtllm needs tensorrt_llm and tensorrt, which are not installed"):
        build.run(build_config(bundle.root, "trtllm"))
