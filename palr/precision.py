"""Mixed precision and weight-only int8 for a transformers causal LM on CPU, applied at load time to
the fp32 checkpoint (a build saves fp32 and one line of build.json says which of these to apply).

    body_dtype(model, torch.bfloat16)  the decoder layers (and the token embeddings feeding them) in
                                       bf16; the final norm, the LM head and everything after them in
                                       fp32: the hidden state is cast to fp32 before the final norm,
                                       so label logits and scores are computed in fp32 from a bf16 body.
    body_dtype(model, torch.bfloat16, fp32_last_layers=1)
                                       the same with the last decoder layer also in fp32 (the hidden
                                       state is cast to fp32 before it): the layer that writes the
                                       label logits' input keeps full precision.
    int8_weight_only(model)            torchao int8 weight-only quantization of the decoder's Linear
                                       layers (weights int8 per output channel, activations stay float).

Why the head stays fp32: plain bf16 moves the label logits enough to reorder close candidates (top-1
agreement with fp32 0.81 on the fine-tuned ranker), while the decoder's matmuls are where the time
goes (oneDNN runs them on the AVX512-BF16 / AMX units). With the body in bf16 the 4-layer ranker sits
at the quality bar (top-1 agreement 0.94 in one build, 0.88 in the next, on 100 probes); keeping its
last layer in fp32 too measured 0.97 at about bf16-body's latency (59.5 vs 63.0 ms; fp32 93.3 ms).

Tied embeddings: the LM head is given its own fp32 copy of the (tied) embedding matrix, and the input
embeddings go to bf16 with the body, so `model.dtype` (its first parameter's) is the body's dtype
and the engines allocate their KV cache in it.
"""

from __future__ import annotations

import torch

INT8_WEIGHT_ONLY = "int8-weight-only"


def _float32(value):
    """Floating tensors (also inside tuples, e.g. the rotary (cos, sin)) in fp32; anything else as is."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    return value


def _to_float32(module, args, kwargs):
    """Forward pre-hook of an fp32 module after bf16 ones: its inputs (hidden state, rotary cos/sin) in fp32."""
    return tuple(_float32(a) for a in args), {k: _float32(v) for k, v in kwargs.items()}


def layer_dtypes(model) -> list[torch.dtype]:
    """The dtype of each decoder layer's weights, in order (what its keys/values come out in)."""
    return [next(layer.parameters()).dtype for layer in model.get_decoder().layers]


def body_dtype(model, dtype: torch.dtype = torch.bfloat16, fp32_last_layers: int = 0):
    """Decoder layers and input embeddings in `dtype`, except the last `fp32_last_layers` layers; those,
    the final norm and the LM head in fp32 (in place, on an fp32 model); returns the model. Rotary
    embeddings keep computing in fp32 and hand the layers cos/sin in the embeddings' dtype (as the model
    does by itself); an fp32 layer casts its inputs back to fp32."""
    decoder = model.get_decoder()
    layers = decoder.layers
    if not 0 <= fp32_last_layers < len(layers):
        raise ValueError(f"fp32_last_layers must be in 0..{len(layers) - 1} (the model has {len(layers)} layers), "
                         f"not {fp32_last_layers}")
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:  # tied: the head keeps its own fp32 copy
        head.weight = torch.nn.Parameter(embed.weight.detach().clone().float(), requires_grad=False)
    embed.to(dtype)
    split = len(layers) - fp32_last_layers
    for layer in layers[:split]:
        layer.to(dtype)
    for layer in layers[split:]:
        layer.float()
    if fp32_last_layers:
        layers[split].register_forward_pre_hook(_to_float32, with_kwargs=True)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"{type(decoder).__name__} has no final norm `norm`; cannot keep the head in fp32")
    norm.float()
    norm.register_forward_pre_hook(_to_float32, with_kwargs=True)
    if head is not None:
        head.float()
    return model


def torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return getattr(torchao, "__version__", "unknown")


def int8_weight_only(model):
    """torchao int8 weight-only quantization of every Linear inside the decoder layers (in place);
    returns the model. The LM head stays float (the engines read only its label rows)."""
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ImportError("int8 weight-only needs torchao (pip install 'palr-serving[cpu-quant]')") from e
    try:
        from torchao.quantization import Int8WeightOnlyConfig as config
    except ImportError:  # older torchao
        from torchao.quantization import int8_weight_only as config
    quantize_(model.get_decoder().layers, config())
    return model
