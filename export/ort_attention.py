"""onnxruntime's own fused attention as an export form: ``com.microsoft.MultiHeadAttention``.

The ONNX ``Attention`` op (opset 23) runs on onnxruntime's CUDA provider, but measured 1.07-1.29x PyTorch eager on
an H200 at the real Klein sizes, the gap growing with the sequence. onnxruntime's contrib ``MultiHeadAttention``
takes query/key/value as (B, S, H*D) and dispatches to its flash / memory-efficient kernels on CUDA (fp16/bf16,
head size <= 256) and to a plain kernel on the CPU, so the same graph is checked on the CPU and timed on a GPU.
TensorRT cannot parse a contrib op: this form is for onnxruntime only.

How it is traced: a torch custom op (``sparse_context::ort_mha``) computes SDPA in PyTorch, so the graphs run
eagerly and under ``torch.export``; the exporter translates it to the contrib node through
:func:`translation_table`. onnxscript needs an ``OpSchema`` for any op it writes, and ONNX does not know
onnxruntime's contrib ops, so a minimal schema (three inputs, one output, ``num_heads``) is registered in-process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

CONTRIB_DOMAIN = "com.microsoft"
OP_NAME = "MultiHeadAttention"


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


def _register_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_NAME, CONTRIB_DOMAIN):
        return
    parameter = OpSchema.FormalParameter
    schema = OpSchema(
        OP_NAME, CONTRIB_DOMAIN, 1,
        inputs=[parameter("query", "T"), parameter("key", "T"), parameter("value", "T")],
        outputs=[parameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "attention dtype")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "attention heads", required=True)],
    )
    onnx.defs.register_schema(schema)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the custom op -> the contrib node."""
    from onnxscript.values import Op, Opset

    _register_schema()
    contrib = Op(Opset(CONTRIB_DOMAIN, 1), OP_NAME)

    def multi_head_attention(query, key, value, num_heads: int):
        return contrib(query, key, value, num_heads=num_heads)

    return {torch.ops.sparse_context.ort_mha.default: multi_head_attention}
