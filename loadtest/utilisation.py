"""How close score-mode prefill runs to this machine's matmul peak, measured side by side in one run.

    peak       a 2048^3 torch.matmul (2 * 2048^3 FLOPs), median of a few, in fp32 and in the dtype the
               bundle's hf-cpu build runs its matmuls in (bf16 for bf16 / bf16-body builds); for a build
               whose layers differ (bf16-body-fp32-last), the time of the same FLOPs split as its layers
               are: share_bf16 x t(bf16 matmul) + share_fp32 x t(fp32 matmul)
    prefill    one forward pass of the decoder over a real score prompt (the bench's workload, the full
               prompt: no prefix reuse), median of a few, on the bench's model in that precision: the
               decoder alone, as the engines run it (padded as the hf engine pads a pass,
               `ranking_server.engines.kv.pass_input_ids`, FLOPs counted on the prompt's own tokens; the engines
               read a few rows of the LM head afterwards, never
               the whole vocabulary; a full-vocabulary head at one position reads 117 MB of fp32 weights on
               SmolLM2, ~9 ms, which the parameter count below leaves out)
    FLOP/s     2 x non-embedding parameters x prompt tokens / prefill time

reference  the same two rows on a random-weight Llama decoder of a production-class width (hidden 2048,
               MLP 5632, 32 heads / 4 KV heads: TinyLlama-1.1B's layer; 2 layers), same code, same prompt
               length, same interleaving: what this machine and this code reach when the matmuls, not the
               attention and element-wise ops between them, are most of a pass. On the 576-wide ranker the
               linears alone run at about the peak, but they are only ~56 % of a bf16 pass.

Non-embedding parameters: every parameter of the decoder layers plus the final norm, without the
token embeddings and the LM head (the engines compute the head for one position and only its label
rows, and an embedding lookup is no matmul). The attention-score FLOPs (4 x layers x hidden x context
per token, ~5 % of the total at 300 tokens on SmolLM2-135M) are not counted, so utilisation is a
slight underestimate. Peak and prefill are measured interleaved (peak, prefill, peak, ...) so a
machine that slows down mid-run slows both.
"""

from __future__ import annotations

import logging
import math
import statistics
import time

log = logging.getLogger(__name__)

MATMUL_N = 2048
REFERENCE_WIDTH = 2048  # the reference decoder's hidden size (0: no reference rows)
REFERENCE_LAYERS = 2
REFERENCE_VOCAB = 1024
PARAMETERS = "non-embedding (decoder layers + final norm; no token embeddings, no LM head)"
# which matmul a build candidate (compile/targets/hf_cpu.py) runs its decoder in: "int8" is torch's dynamic int8
# Linear (fbgemm: int8 weights, activations quantized per call), whose peak is that Linear's, not fp32's (an int8
# build measured against the fp32 peak read as 2x "utilisation")
MATMUL_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16-body": "bf16", "bf16-body-fp32-last": "bf16", "int8": "int8",
                "int8-wo": "fp32"}
INT8 = "int8"  # the peak kind of a dynamic int8 build (a key of `matmul_shares` beside torch dtypes)


def matmul_flops(n: int = MATMUL_N) -> int:
    """FLOPs of an n x n by n x n matmul (a multiply and an add per term)."""
    return 2 * n ** 3


def prefill_flops(parameters: int, tokens: int) -> int:
    """FLOPs of one prefill over `tokens` tokens through `parameters` matmul parameters."""
    return 2 * parameters * tokens


def flops_per_s(flops: float, seconds: float) -> float:
    return flops / seconds if seconds > 0 else 0.0


def non_embedding_parameters(model) -> int:
    decoder = model.get_decoder()
    count = sum(p.numel() for p in decoder.layers.parameters())
    norm = getattr(decoder, "norm", None)
    return count + (sum(p.numel() for p in norm.parameters()) if norm is not None else 0)


def utilisation_row(dtype: str, peak_s: float, prefill_s: float, parameters: int, tokens: int,
                    n: int = MATMUL_N, source: str = "direct forward") -> dict:
    """One row of the report: peak and prefill FLOP/s (GFLOP/s) and their ratio, with the parameters counted."""
    peak = flops_per_s(matmul_flops(n), peak_s)
    prefill = flops_per_s(prefill_flops(parameters, tokens), prefill_s)
    return {"dtype": dtype, "source": source, "matmul_n": n, "matmul_ms": round(1e3 * peak_s, 2),
            "peak_gflops": round(peak / 1e9, 2), "parameters": parameters, "prompt_tokens": tokens,
            "prefill_ms": round(1e3 * prefill_s, 2), "prefill_gflops": round(prefill / 1e9, 2),
            "utilisation": round(prefill / peak, 3) if peak else None}


def matmul_shares(candidate: str, model) -> dict:
    """{torch dtype: share of the decoder layers whose matmuls run in it} for `model` made `candidate`."""
    import torch

    kind = MATMUL_DTYPE.get(candidate, "fp32")
    if kind == INT8:
        return {INT8: 1.0}
    if kind != "bf16":
        return {torch.float32: 1.0}
    from palr.precision import layer_dtypes

    dtypes = layer_dtypes(model)
    return {d: dtypes.count(d) / len(dtypes) for d in dict.fromkeys(dtypes)}


def shares_label(shares: dict) -> str:
    """"bf16", or "bf16 75 % + fp32 25 %" for a mixed build."""
    from palr.hf_build import DTYPES

    names = {dtype: name for name, dtype in DTYPES.items()} | {INT8: "int8 (dynamic)"}
    if len(shares) == 1:
        return names[next(iter(shares))]
    return " + ".join(f"{names[d]} {100 * s:.0f} %" for d, s in shares.items())


def chosen_dtype(bundle_dir) -> tuple[str, str]:
    """(the hf-cpu build's candidate, how it was found): the bundle's engine:hf-cpu dtype, else fp32."""
    from palr.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    if bundle.has("engine:hf-cpu"):
        dtype = bundle.artifact("engine:hf-cpu").get("dtype") or "fp32"
        return dtype, f"the bundle's engine:hf-cpu build ({dtype})"
    return "fp32", "no engine:hf-cpu build in the bundle: fp32"


def reference_model(hidden: int, layers: int = REFERENCE_LAYERS):
    """A random-weight fp32 Llama decoder of width `hidden` (MLP 2.75x, 64-wide heads, 8 query heads per KV
    head: at 2048, TinyLlama-1.1B's layer), with a small vocabulary (token identity does not change a pass's time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=REFERENCE_VOCAB, hidden_size=hidden, intermediate_size=64 * round(2.75 * hidden / 64),
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 8), num_hidden_layers=layers)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def reference_source(model) -> str:
    c = model.config
    return (f"reference: random-weight decoder, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
            f"{c.num_hidden_layers} layers")


def measure(model, input_ids: list[int], dtypes: list[str], repeats: int = 5, n: int = MATMUL_N,
            source: str = "direct forward") -> list[dict]:
    """Per candidate in `dtypes` (hf-cpu names): matmul peak in its matmul dtype and prefill of
    `input_ids` on `model` made that candidate, interleaved, medians of `repeats`."""
    import torch

    from compile.targets.hf_cpu import variant
    from ranking_server.engines.kv import pass_input_ids

    parameters = non_embedding_parameters(model)
    rows = []
    for dtype in dict.fromkeys(dtypes):
        candidate = variant(model, dtype)
        shares = matmul_shares(dtype, candidate)
        matmuls = {d: peak_matmul(d, n) for d in shares}
        decoder = candidate.get_decoder()
        ids = pass_input_ids([input_ids])  # [1, T], padded as the engine pads a pass
        with torch.inference_mode():
            for matmul in matmuls.values():
                matmul()
            decoder(input_ids=ids[:, :16], use_cache=True)  # warm-up
            peaks, prefills = [], []
            for _ in range(repeats):
                peak = 0.0
                for d, matmul in matmuls.items():
                    started = time.perf_counter()
                    matmul()
                    peak += shares[d] * (time.perf_counter() - started)
                peaks.append(peak)
                started = time.perf_counter()
                decoder(input_ids=ids, use_cache=True)
                prefills.append(time.perf_counter() - started)
        row = utilisation_row(dtype, statistics.median(peaks), statistics.median(prefills), parameters, len(input_ids),
                              n, source)
        # each repeat's peak and prefill ran back to back: their ratio per repeat, median over repeats (the ratio of
        # the two medians could pair a fast repeat's peak with a slow one's prefill)
        runs = [utilisation_row(dtype, peak, prefill, parameters, len(input_ids), n)["utilisation"]
                for peak, prefill in zip(peaks, prefills)]
        row["utilisation"], row["utilisation_runs"] = round(statistics.median(runs), 3), runs
        row["matmul_dtype"] = shares_label(shares)
        row["prefill_ms_runs"] = [round(1e3 * x, 1) for x in prefills]
        rows.append(row)
        log.info("utilisation %s (%s): peak %.1f GFLOP/s, prefill %.1f GFLOP/s (%d tokens, %.0f ms) = %.0f %%", dtype,
                 source, row["peak_gflops"], row["prefill_gflops"], len(input_ids), row["prefill_ms"],
                 100 * (row["utilisation"] or 0))
        del decoder, candidate
    return rows


def peak_matmul(kind, n: int = MATMUL_N):
    """A call doing an n x n by n x n matmul of `kind`: a torch dtype's `a @ b`, or (INT8) the dynamic int8 Linear an
    int8 build's decoder runs (its weights quantized once, the n x n input quantized per call, as served)."""
    import torch

    a = torch.randn(n, n)
    if kind == INT8:
        linear = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)),
                                                        {torch.nn.Linear}, dtype=torch.qint8)
        return lambda: linear(a)
    a, b = a.to(kind), torch.randn(n, n, dtype=kind)
    return lambda: a @ b


def engine_row(peak_row: dict, cell: dict | None, parameters: int, tokens: float) -> dict | None:
    """The engine's own score-mode prefill (in-flight, concurrency 1, prefix reuse off: the whole
    prompt computed) against the peak measured after the rounds (for the record; the goal reads the direct forward,
    measured back to back with its peak): the mean request latency as the time of the mean prompt (`tokens`)."""
    if not cell or not cell.get("mean_ms") or not math.isfinite(cell["mean_ms"]):
        return None
    row = utilisation_row(peak_row["dtype"], peak_row["matmul_ms"] / 1e3, cell["mean_ms"] / 1e3, parameters,
                          round(tokens), peak_row["matmul_n"], source="engine cell score/inflight/c1/no-prefix-reuse mean")
    row["matmul_dtype"] = peak_row.get("matmul_dtype", "fp32")
    return row


def section(model, input_ids: list[int], bundle_dir, repeats: int = 5, reference_width: int = REFERENCE_WIDTH) -> dict:
    """The report's `utilisation` section: fp32 and the build's chosen precision side by side, on the model and
    (`reference_width` > 0) on a random-weight decoder of that width."""
    chosen, why = chosen_dtype(bundle_dir)
    rows = measure(model, input_ids, ["fp32", chosen], repeats)
    if reference_width:
        reference = reference_model(reference_width)
        rows += measure(reference, [t % REFERENCE_VOCAB for t in input_ids], ["fp32", chosen], repeats,
                        source=reference_source(reference))
        del reference
    return {"parameters": non_embedding_parameters(model), "parameter_count": PARAMETERS, "chosen": chosen,
            "chosen_from": why, "rows": rows,
            "flops": "2 x parameters x prompt tokens / prefill time; peak: 2 x n^3 / time of an n^3 torch.matmul "
                     "(a dynamic int8 build: of its int8 Linear on an n x n input)"}
