"""onnxruntime's own fused kernels as an export form: ``com.microsoft.MultiHeadAttention`` and
``com.microsoft.RotaryEmbedding``.

The ONNX ``Attention`` op (opset 23) runs on onnxruntime's CUDA provider, but measured 1.07-1.29x PyTorch eager on
an H200 at the real Klein sizes, the gap growing with the sequence. onnxruntime's contrib ``MultiHeadAttention``
takes query/key/value as (B, S, H*D) and dispatches to its flash / memory-efficient kernels on CUDA (fp16/bf16,
head size <= 256) and to a plain kernel on the CPU, so the same graph is checked on the CPU and timed on a GPU.
RoPE written out (reshape, stack, two casts to float32, two products, a sum, a cast back) is eight passes over each
query and key tensor, about 5 % of a dense klein-9b call; the contrib ``RotaryEmbedding`` (interleaved pairs, which
is the FLUX layout) is one. TensorRT cannot parse contrib ops: this form is for onnxruntime only.

How it is traced: torch custom ops (``sparse_context::ort_mha``, ``sparse_context::ort_rope``) compute the same
thing in PyTorch, so the graphs run eagerly and under ``torch.export``; the exporter translates them to the contrib
nodes through :func:`translation_table`. onnxscript needs an ``OpSchema`` for any op it writes, and ONNX does not
know onnxruntime's contrib ops, so minimal schemas are registered in-process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

CONTRIB_DOMAIN = "com.microsoft"
OP_NAME = "MultiHeadAttention"
ROPE_NAME = "RotaryEmbedding"


@torch.library.custom_op("sparse_context::ort_mha", mutates_args=())
def ort_mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S_q, H*D), (B, S_k, H*D), (B, S_k, H*D) -> (B, S_q, H*D), softmax scale 1/sqrt(D) (the op's default)."""
    batch, _, width = query.shape
    head_dim = width // num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, x.shape[1], num_heads, head_dim).transpose(1, 2)  # (B, H, S, D)

    output = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))  # (B, H, S_q, D)
    return output.transpose(1, 2).reshape(batch, query.shape[1], width).contiguous()


@ort_mha.register_fake
def _ort_mha_shape(query, key, value, num_heads):
    return torch.empty_like(query)


def mha_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The graphs' attention signature: (B, S, H, D) in and out, through the contrib op."""
    batch, tokens, heads, head_dim = query.shape
    flat = lambda x: x.reshape(x.shape[0], x.shape[1], heads * head_dim)  # (B, S, H*D)
    output = torch.ops.sparse_context.ort_mha(flat(query), flat(key), flat(value), heads)
    return output.reshape(batch, tokens, heads, head_dim)


@torch.library.custom_op("sparse_context::ort_rope", mutates_args=())
def ort_rope(x: torch.Tensor, positions: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor,
             num_heads: int) -> torch.Tensor:
    """(B, S, H*D) rotated by pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s); ``cos_half``/``sin_half`` (S, D/2) are
    indexed by ``positions`` (1, S), as onnxruntime's ``RotaryEmbedding(interleaved=1)`` does."""
    batch, tokens, width = x.shape
    cos, sin = cos_half[positions[0]], sin_half[positions[0]]  # (S, D/2)
    pairs = x.reshape(batch, tokens, num_heads, width // num_heads // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.reshape(batch, tokens, width)


@ort_rope.register_fake
def _ort_rope_shape(x, positions, cos_half, sin_half, num_heads):
    return torch.empty_like(x)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """The graphs' RoPE signature: x (B, S, H, D), cos/sin (S, D) float32 with each pair's angle repeated (the
    diffusers tables); through the contrib op in x's dtype. ``flat``: return the op's own (B, S, H*D) output."""
    batch, tokens, heads, head_dim = x.shape
    positions = torch.arange(tokens, device=x.device)[None]  # (1, S)
    cos_half, sin_half = cos[:, 0::2].to(x.dtype), sin[:, 0::2].to(x.dtype)  # (S, D/2)
    output = torch.ops.sparse_context.ort_rope(x.reshape(batch, tokens, heads * head_dim), positions, cos_half,
                                              sin_half, heads)
    return output if flat else output.reshape(batch, tokens, heads, head_dim)


def _register_schemas() -> None:
    import onnx
    from onnx.defs import OpSchema

    parameter = OpSchema.FormalParameter
    floats = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "compute dtype")
    heads = OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "attention heads", required=True)
    if not onnx.defs.has(OP_NAME, CONTRIB_DOMAIN):
        onnx.defs.register_schema(OpSchema(
            OP_NAME, CONTRIB_DOMAIN, 1,
            inputs=[parameter("query", "T"), parameter("key", "T"), parameter("value", "T")],
            outputs=[parameter("output", "T")], type_constraints=[floats], attributes=[heads]))
    if not onnx.defs.has(ROPE_NAME, CONTRIB_DOMAIN):
        onnx.defs.register_schema(OpSchema(
            ROPE_NAME, CONTRIB_DOMAIN, 1,
            inputs=[parameter("input", "T"), parameter("position_ids", "M"), parameter("cos_cache", "T"),
                    parameter("sin_cache", "T")],
            outputs=[parameter("output", "T")],
            type_constraints=[floats, ("M", ["tensor(int64)"], "positions")],
            attributes=[heads, OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, "pair layout",
                                                  required=True)]))


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the custom op -> the contrib node."""
    from onnxscript.values import Op, Opset

    _register_schemas()
    attention = Op(Opset(CONTRIB_DOMAIN, 1), OP_NAME)
    rotary = Op(Opset(CONTRIB_DOMAIN, 1), ROPE_NAME)

    def multi_head_attention(query, key, value, num_heads: int):
        return attention(query, key, value, num_heads=num_heads)

    def rotary_embedding(x, positions, cos_half, sin_half, num_heads: int):
        return rotary(x, positions, cos_half, sin_half, num_heads=num_heads, interleaved=1)

    return {torch.ops.sparse_context.ort_mha.default: multi_head_attention,
            torch.ops.sparse_context.ort_rope.default: rotary_embedding}
