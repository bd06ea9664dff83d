"""Mixed precision and weight-only int8 for a transformers causal LM on CPU, applied at load time to
the fp32 checkpoint (a build saves fp32 and one line of build.json says which of these to apply).

    body_dtype(model, torch.bfloat16)  the decoder layers (and the token embeddings feeding them) in
                                       bf16; the final norm, the LM head and everything after them in
                                       fp32: the hidden state is cast to fp32 before the final norm,
                                       so label logits and scores are computed in fp32 from a bf16 body.
    int8_weight_only(model)            torchao int8 weight-only quantization of the decoder's Linear
                                       layers (weights int8 per output channel, activations stay float).

Why the head stays fp32: plain bf16 moves the label logits enough to reorder close candidates (top-1
agreement with fp32 0.81 on the fine-tuned ranker), while the decoder's matmuls are where the time
goes (oneDNN runs them on the AVX512-BF16 / AMX units).

Tied embeddings: the LM head is given its own fp32 copy of the (tied) embedding matrix, and the input
embeddings go to bf16 with the body, so `model.dtype` (its first parameter's) is the body's dtype
and the engines allocate their KV cache in it.
"""

from __future__ import annotations

import torch

INT8_WEIGHT_ONLY = "int8-weight-only"
TORCHAO = "torchao"


def _to_float32(module, args, kwargs):
    """Forward pre-hook of the final norm: its input (the body's last hidden state) in fp32."""
    args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    return args, kwargs


def body_dtype(model, dtype: torch.dtype = torch.bfloat16):
    """Decoder layers and input embeddings in `dtype`; final norm and LM head in fp32 (in place, on an
    fp32 model); returns the model. Rotary embeddings keep computing in fp32 and hand the layers
    cos/sin in their dtype (as the model does by itself)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:  # tied: the head keeps its own fp32 copy
        head.weight = torch.nn.Parameter(embed.weight.detach().clone().float(), requires_grad=False)
    embed.to(dtype)
    decoder.layers.to(dtype)
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
