"""The FLUX.2 transformer forward, re-written with explicit tensors so the exported graph has fixed semantics.

The modules below reuse the weights and sub-modules of a diffusers ``Flux2Transformer2DModel`` (nothing is
copied) but take every input as a tensor: RoPE cos/sin come from outside (computed in float64 by numpy or
diffusers, fed as float32), so the graph holds no float64 and no position-id arithmetic.

Tokens are kept as three streams (text, references, target) through the double blocks, where text has weights of
its own and references can have a modulation of their own. The single blocks give text and target the same weights
and modulation, so those two streams are joined once after the double blocks (:class:`SingleStreams`): every single
block then runs one set of kernels on them, and its attention needs no copy of their queries in and no slices of
its output out. That lets one code path express both graphs:

- :class:`FullGraph`: every token attends to every token and references are modulated with the real timestep;
  equals diffusers' dense forward on ``[target, references]``.
- :class:`KVGraph`: reference tokens attend only to reference tokens (cached + new), are modulated with a fixed
  timestep 0, and their per-layer K/V after RoPE are returned; text and target attend to text, every reference
  and target. With only new references this is diffusers' ``kv_cache_mode="extract"``; with only cached ones it
  is ``"cached"``. One graph, so one ORT session / TensorRT engine holds one copy of the weights.

Reshapes never use -1: with a zero-length token axis ONNX Reshape cannot infer -1 ("Reshape ... dimension with
value zero"), while a 0 that copies a 0-length input axis is harmless.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

ATTENTION_FORMS = ("matmul", "fused", "mha")
# Reference modulation timestep of diffusers' KV path (``ref_fixed_timestep``).
REF_FIXED_TIMESTEP = 0.0


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Explicit MatMul-Softmax-MatMul (TensorRT 10.3 parses and fuses this); (B, S, H, D) in and out."""
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
    # Scaling the query before the product keeps fp16 scores small, as SDPA's math backend does.
    scores = torch.matmul(query * (query.shape[-1] ** -0.5), key.transpose(-1, -2))  # (B, H, S_q, S_k)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2)  # (B, S_q, H, D)


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention``: the exporter writes the ONNX ``Attention`` op at opset >= 23."""
    output = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return output.transpose(1, 2)  # (B, S_q, H, D)


_ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"fn": matmul_attention}


@contextlib.contextmanager
def attention_form(form: str) -> Iterator[None]:
    """Trace/run the graphs with attention written as ``form``; restores the previous one.

    'matmul': MatMul-Softmax-MatMul (TensorRT); 'fused': the ONNX ``Attention`` op (opset 23); 'mha': onnxruntime's
    contrib ``MultiHeadAttention`` (``export.ort_attention``, onnxruntime only)."""
    if form not in ATTENTION_FORMS:
        from sparse_context.export.errors import ExportConfigError
        from sparse_context.runtime.errors import bad_value

        raise ExportConfigError(bad_value("attention form", form, " or ".join(ATTENTION_FORMS), "--attention"))
    previous = _ATTENTION["fn"]
    if form == "mha":
        from sparse_context.export.ort_attention import mha_attention

        _ATTENTION["fn"] = mha_attention
    else:
        _ATTENTION["fn"] = matmul_attention if form == "matmul" else fused_attention
    try:
        yield
    finally:
        _ATTENTION["fn"] = previous


REF_STREAM_FORMS = ("guarded", "plain")
_REF_STREAM = {"form": "guarded"}


@contextlib.contextmanager
def ref_stream_form(form: str) -> Iterator[None]:
    """Trace/run the reference stream's RoPE and attention (the operations that see 0 reference tokens in a cached
    step) as ``form``; restores the previous one.

    'guarded': the active attention form's fused RoPE and attention, each behind an ONNX ``If`` on the token count
    (onnxruntime's fused kernels refuse 0 tokens). 'plain': the elementwise RoPE and MatMul-Softmax-MatMul, which
    take 0 tokens as they are: no ``If`` node, at the cost of an unfused attention over the new references in the
    extract step. Only the fused forms ('mha', 'fused') have guards to remove."""
    if form not in REF_STREAM_FORMS:
        from sparse_context.export.errors import ExportConfigError
        from sparse_context.runtime.errors import bad_value

        raise ExportConfigError(bad_value("reference stream form", form, " or ".join(REF_STREAM_FORMS),
                                          "--ref-stream"))
    previous, _REF_STREAM["form"] = _REF_STREAM["form"], form
    try:
        yield
    finally:
        _REF_STREAM["form"] = previous


PROJECTION_FORMS = ("fused", "split")
_PROJECTIONS = {"form": "fused"}


@contextlib.contextmanager
def projection_form(form: str) -> Iterator[None]:
    """Trace/run the graphs with the fused projections written as ``form``; restores the previous one.

    'fused': as diffusers computes them, one matrix product for Q, K, V and the MLP input of a single block (and for
    the gate and value halves of a feed-forward), then slices of its output; onnxruntime copies every slice
    (``Split``), measured at 5.9 of 83.6 ms of GPU time in a klein-9b d4 generation. 'split': one matrix product per
    slice, on slices of the weight (constant-folded when the session loads) and the output projection as two
    products summed instead of a concatenation; the same numbers up to summation order."""
    if form not in PROJECTION_FORMS:
        from sparse_context.export.errors import ExportConfigError
        from sparse_context.runtime.errors import bad_value

        raise ExportConfigError(bad_value("projection form", form, " or ".join(PROJECTION_FORMS), "--projections"))
    previous, _PROJECTIONS["form"] = _PROJECTIONS["form"], form
    try:
        yield
    finally:
        _PROJECTIONS["form"] = previous


def _row_slices(linear: torch.nn.Module, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, Any]]:
    """(weight, bias) of each output slice of ``linear``. Taken once per block and shared by its streams, so the
    graph holds one slice of each weight (folded into an initializer when the session loads), not one per stream."""
    slices, start = [], 0
    for size in sizes:
        bias = None if linear.bias is None else linear.bias[start:start + size]
        slices.append((linear.weight[start:start + size], bias))
        start += size
    return slices


def _column_slices(linear: torch.nn.Module, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, Any]]:
    """(weight, bias) per input slice of ``linear``: ``linear(cat(parts))`` = the sum of ``F.linear(part, w, b)``;
    the bias goes with the first part."""
    slices, start = [], 0
    for index, size in enumerate(sizes):
        slices.append((linear.weight[:, start:start + size], linear.bias if index == 0 else None))
        start += size
    return slices


def _products(x: torch.Tensor, slices: list[tuple[torch.Tensor, Any]]) -> list[torch.Tensor]:
    return [F.linear(x, weight, bias) for weight, bias in slices]


def _summed_products(parts: list[torch.Tensor], slices: list[tuple[torch.Tensor, Any]]) -> torch.Tensor:
    total = None
    for part, (weight, bias) in zip(parts, slices):
        product = F.linear(part, weight, bias)
        total = product if total is None else total + product
    return total


def _swiglu(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * value  # Flux2SwiGLU on its two halves


def _feed_forward(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Flux2FeedForward``: linear_in -> SwiGLU on its two halves -> linear_out."""
    if _PROJECTIONS["form"] == "fused":
        return ff(x)
    hidden = ff.linear_in.out_features // 2
    return ff.linear_out(_swiglu(*_products(x, _row_slices(ff.linear_in, (hidden, hidden)))))


# Guards (ONNX ``If``) and what their branches return. onnxruntime allocates a subgraph's outputs apart from the
# values inside it, so a branch whose value leaves through a view (Reshape, Squeeze) pays a copy of it. Every branch
# below returns the tensor its op wrote, in that op's layout; the view into the graphs' (B, S, H, D) layout is taken
# after the ``If``, where onnxruntime aliases it.


def _core_attention(fused: bool) -> tuple[Callable, Callable, Callable]:
    """(core, empty, finish) of a guarded attention form (``fused``: the ONNX Attention op, else onnxruntime's
    contrib op): ``core(q, k, v)`` is the attention op's own output, ``empty(q)`` the same layout with no queries,
    ``finish(out, q)`` the (B, S, H, D) view of either."""
    if fused:
        def core(query, key, value):  # the ONNX Attention op's (B, H, S, D)
            return F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))

        return core, lambda query: query.transpose(1, 2) * 0, lambda out, query: out.transpose(1, 2)

    def core_mha(query, key, value):  # the contrib MultiHeadAttention's (B, S, H*D)
        from sparse_context.export.ort_attention import ort_mha

        return ort_mha(_flat(query), _flat(key), _flat(value), query.shape[2])

    return core_mha, lambda query: _flat(query) * 0, lambda out, query: out.reshape(query.shape)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])


def _join(parts) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)


def _attend_parts(core, query, key_parts, value_parts, optional: tuple[bool, ...]) -> torch.Tensor:
    """``core(query, keys, values)`` with the parts joined, leaving out at run time each part flagged in ``optional``
    that holds 0 tokens (an ONNX ``If`` per flagged part when traced); in ``core``'s layout.

    Attention does not depend on the order of its keys, so a part with no tokens can simply be left out of the join,
    and it should be: onnxruntime CUDA's ``Concat`` copies with its coalesced input-major kernel only when every input
    has rows to copy; one empty input sends the whole join to an element-wise kernel that indexes every output
    element (about 74 us instead of 36 us per K/V join of a klein-9b cached call on an H200: runs 9 and 7). A cached
    call has no new references, a first KV call no cached ones: each takes the branch without its empty part."""
    flagged = [index for index, flag in enumerate(optional) if flag]
    if not flagged:
        return core(query, _join(key_parts), _join(value_parts)).contiguous()  # both branches agree on strides
    index = flagged[0]
    rest = tuple(flag and i != index for i, flag in enumerate(optional))

    def without(query, *keys_and_values):
        half = len(keys_and_values) // 2
        keep = [i for i in range(half) if i != index]
        return _attend_parts(core, query, [keys_and_values[i] for i in keep],
                             [keys_and_values[half + i] for i in keep], tuple(rest[i] for i in keep))

    def with_all(query, *keys_and_values):
        half = len(keys_and_values) // 2
        return _attend_parts(core, query, keys_and_values[:half], keys_and_values[half:], rest)

    operands = (query, *key_parts, *value_parts)
    if not (torch.compiler.is_exporting() or torch.compiler.is_compiling()):
        return (without if key_parts[index].shape[1] == 0 else with_all)(*operands)
    is_empty = torch._shape_as_tensor(key_parts[index])[1] == 0
    return torch.cond(is_empty, without, with_all, operands)


def attend(query: torch.Tensor, key, value, may_be_empty: bool = False, optional: tuple[bool, ...] = ()
           ) -> torch.Tensor:
    """Attention with the active form. ``key``/``value``: a tensor, or a tuple of parts along the token axis, joined
    only where the attention runs. ``may_be_empty``: the query axis can be 0 at run time (reference queries).
    ``optional``: per key/value part, whether it can hold 0 tokens at run time; the guarded onnxruntime forms then
    leave an empty part out of the join (:func:`_attend_parts`).

    onnxruntime's ``Attention`` kernel refuses empty queries ("Q sequence length must be greater than 0"), and
    torch.export assumes traced sizes are >= 2, so a shape-based guard is folded away; a ``torch.cond`` on the
    runtime length (an ONNX ``If``) skips the op instead. The contrib ``MultiHeadAttention`` gets the same guard.
    The parts are joined inside the guard, so a KV graph's cached step (no reference queries) does not copy the
    cached keys a second time for an attention it skips. MatMul-Softmax-MatMul handles empty axes as is.
    """
    key_parts = tuple(key) if isinstance(key, (tuple, list)) else (key,)
    value_parts = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    function = _ATTENTION["fn"]
    if may_be_empty and _REF_STREAM["form"] == "plain":
        return matmul_attention(query, _join(key_parts), _join(value_parts))  # takes 0 queries as is: no guard
    tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
    guarded = function is not matmul_attention
    if not tracing or not guarded or not (may_be_empty or any(optional)):
        if may_be_empty and guarded and query.shape[1] == 0:
            return (query * 0).contiguous()  # (B, 0, H, D): there is nothing to attend with
        return function(query, _join(key_parts), _join(value_parts))
    # Traced, guarded form. Only the guarded reference stream leaves empty parts out: the plain form is for CUDA
    # graphs (no If nodes), and TensorRT's MatMul attention concatenates its own way.
    optional = tuple(optional) if _REF_STREAM["form"] == "guarded" else ()
    core, empty, finish = _core_attention(function is fused_attention)
    if may_be_empty:
        is_empty = torch._shape_as_tensor(query)[1] == 0  # a tensor, so the check survives tracing

        def no_queries(query, *keys_and_values):
            return empty(query).contiguous()

        def otherwise(query, *keys_and_values):
            half = len(keys_and_values) // 2
            return _attend_parts(core, query, keys_and_values[:half], keys_and_values[half:], optional)

        out = torch.cond(is_empty, no_queries, otherwise, (query, *key_parts, *value_parts))
    else:
        out = _attend_parts(core, query, key_parts, value_parts, optional)
    return finish(out, query)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, may_be_empty: bool = False) -> torch.Tensor:
    """RoPE with the active form: onnxruntime's fused ``RotaryEmbedding`` for 'mha' (one kernel instead of the
    reshape/stack/cast/multiply chain below), :func:`apply_rope` otherwise. ``may_be_empty``: the token axis can be
    0 at run time (references), guarded like :func:`attend`: its branches return the (B, S, H*D) tensor the
    rotation (or the empty branch's copy) wrote, viewed as (B, S, H, D) after the guard."""
    if _ATTENTION["fn"] is matmul_attention or _ATTENTION["fn"] is fused_attention or (
            may_be_empty and _REF_STREAM["form"] == "plain"):
        return apply_rope(x, cos, sin)
    from sparse_context.export.ort_attention import fused_rope

    tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
    if may_be_empty and not tracing:
        return x if x.shape[1] == 0 else fused_rope(x, cos, sin)
    if may_be_empty:
        is_empty = torch._shape_as_tensor(x)[1] == 0
        return torch.cond(is_empty, _unchanged, _flat_rope, (x, cos, sin)).reshape(x.shape)
    return fused_rope(x, cos, sin)


def _unchanged(x, cos, sin):
    return _flat(x).clone()  # a cond branch may not return its input as is


def _flat_rope(x, cos, sin):
    from sparse_context.export.ort_attention import fused_rope

    return fused_rope(x, cos, sin, flat=True).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers ``apply_rotary_emb(..., sequence_dim=1)``: pairs (x0, x1) rotate; math in float32."""
    batch, tokens, heads, dim = x.shape
    pairs = x.reshape(batch, tokens, heads, dim // 2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(batch, tokens, heads, dim)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass(frozen=True)
class PlusOne:
    """A modulation scale held as ``1 + scale``, computed when the graph is built: the references' modulation is a
    constant (timestep 0), and an ``Add`` of two fp16 constants is one onnxruntime cannot fold (no fp16 CPU kernel:
    "can't constant fold Add node"), so every call would run it. The same rounding: one fp16 addition either way."""

    value: torch.Tensor


def _modulate(norm: torch.nn.Module, x: torch.Tensor, shift: torch.Tensor, scale) -> torch.Tensor:
    """``(1 + scale) * norm(x) + shift`` for diffusers' affine-free LayerNorms (``scale``: a tensor, or a
    :class:`PlusOne` already holding ``1 + scale``).

    The graphs run one sample (batch 1), so the modulation is a per-channel affine: exactly LayerNormalization's
    own scale and bias. Fed to it, the norm, the multiply and the add are one kernel instead of three (three passes
    over the tokens fewer per modulated norm; onnxruntime and TensorRT take the scale and bias as tensors). In
    fp16 the kernel rounds once where the written-out form rounds after each step."""
    weight = scale.value if isinstance(scale, PlusOne) else 1 + scale
    if isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None and weight.dim() == 1:
        return F.layer_norm(x, (x.shape[-1],), weight, shift, norm.eps)
    return weight * norm(x) + shift


def _heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, head_dim)  # (B, S, H, D)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])  # (B, S, H*D)


def _split_mods(img: torch.Tensor, single: torch.Tensor, txt: torch.Tensor | None = None) -> dict[str, tuple]:
    """The modulation outputs split into their (shift, scale, gate) sets, keyed as the blocks take them."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    def split(mod: torch.Tensor, sets: int) -> tuple:
        # One sample (every graph's batch): per-channel vectors, which :func:`_modulate` hands to the norm.
        return Flux2Modulation.split(mod.reshape(mod.shape[1]) if mod.shape[0] == 1 else mod, sets)

    mods = {"img": split(img, 2), "single": split(single, 1)[0]}
    if txt is not None:
        mods["txt"] = split(txt, 2)
    return mods


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # diffusers clips fp16 hidden states after each block to keep inf out of later layers.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


@dataclass(frozen=True)
class SingleStreams:
    """How a graph's single blocks see its tokens: the streams ``join`` makes of (text, references, target) after the
    double blocks, their RoPE rows, which of them take the references' modulation and which can hold 0 tokens at run
    time, the attention over them (called per layer with the layer's index, like the double blocks'), and where the
    target's rows are in the joined streams (``target``)."""

    join: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    ropes: list[tuple[torch.Tensor, torch.Tensor]]
    ref_mods: tuple[bool, ...]
    may_be_empty: tuple[bool, ...]
    attention: Callable
    target: Callable[[list[torch.Tensor]], torch.Tensor]


class _Flux2Streams(torch.nn.Module):
    """Shared machinery: embeddings, modulations and the two block types over (text, refs, target) streams."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        config = transformer.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.attention_head_dim)
        self.num_layers = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    def _temb(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.transformer.time_guidance_embed(timestep.to(self.dtype) * 1000, None)  # (1, dim)

    def _mods(self, temb: torch.Tensor) -> dict[str, tuple]:
        model = self.transformer
        return _split_mods(model.double_stream_modulation_img(temb), model.single_stream_modulation(temb),
                           model.double_stream_modulation_txt(temb))

    def _qk_norm_rope(self, attn, q, k, ropes, added: bool = False, may_be_empty: bool = False):
        q = (attn.norm_added_q if added else attn.norm_q)(_heads(q, self.heads, self.head_dim))
        k = (attn.norm_added_k if added else attn.norm_k)(_heads(k, self.heads, self.head_dim))
        return rope(q, *ropes, may_be_empty=may_be_empty), rope(k, *ropes, may_be_empty=may_be_empty)

    def _double_block(self, block, streams, mods, ropes, attention):
        """One ``Flux2TransformerBlock`` on streams (txt, ref, tgt); ``mods`` = (txt, ref, tgt) mod sets."""
        attn = block.attn
        qkv = []
        for index, (x, mod, stream_rope) in enumerate(zip(streams, mods, ropes)):
            shift, scale, _ = mod[0]
            if index == 0:  # text uses the added projections
                h = _modulate(block.norm1_context, x, shift, scale)
                q, k = self._qk_norm_rope(attn, attn.add_q_proj(h), attn.add_k_proj(h), stream_rope, added=True)
                v = _heads(attn.add_v_proj(h), self.heads, self.head_dim)
            else:
                h = _modulate(block.norm1, x, shift, scale)
                q, k = self._qk_norm_rope(attn, attn.to_q(h), attn.to_k(h), stream_rope, may_be_empty=index == 1)
                v = _heads(attn.to_v(h), self.heads, self.head_dim)
            qkv.append((q, k, v))
        outputs, ref_kv = attention(qkv)
        results = []
        for index, (x, mod, out) in enumerate(zip(streams, mods, outputs)):
            (_, _, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = mod
            out = _merge_heads(out).to(qkv[0][0].dtype)
            if index == 0:
                x = x + gate_msa * attn.to_add_out(out)
                x = x + gate_mlp * _feed_forward(block.ff_context, _modulate(block.norm2_context, x, shift_mlp,
                                                                             scale_mlp))
                x = _clip_fp16(x)
            else:
                x = x + gate_msa * attn.to_out[0](out)
                x = x + gate_mlp * _feed_forward(block.ff, _modulate(block.norm2, x, shift_mlp, scale_mlp))
            results.append(x)
        return results, ref_kv

    def _single_block(self, block, streams, mods, ropes, attention, may_be_empty):
        """One ``Flux2SingleTransformerBlock`` (parallel attention + MLP) on the streams of :class:`SingleStreams`."""
        attn = block.attn
        inner, hidden = attn.inner_dim, attn.mlp_hidden_dim
        sizes = (inner, inner, inner, hidden, attn.to_qkv_mlp_proj.out_features - 3 * inner - hidden)
        qkv, mlps = [], []
        split = _PROJECTIONS["form"] == "split"
        if split:  # once per block: the three streams share the weight slices
            in_slices = _row_slices(attn.to_qkv_mlp_proj, sizes)
            out_slices = _column_slices(attn.to_out, (inner, attn.to_out.in_features - inner))
        for index, (x, (shift, scale, _), stream_rope) in enumerate(zip(streams, mods, ropes)):
            h = _modulate(block.norm, x, shift, scale)
            if split:
                q, k, v, gate, value = _products(h, in_slices)
                mlp = _swiglu(gate, value)
            else:
                projected = attn.to_qkv_mlp_proj(h)
                q, k, v = projected[..., :inner], projected[..., inner:2 * inner], projected[..., 2 * inner:3 * inner]
                mlp = attn.mlp_act_fn(projected[..., 3 * inner:])
            q, k = self._qk_norm_rope(attn, q, k, stream_rope, may_be_empty=may_be_empty[index])
            qkv.append((q, k, _heads(v, self.heads, self.head_dim)))
            mlps.append(mlp)
        outputs, ref_kv = attention(qkv)
        results = []
        for x, (_, _, gate), out, mlp in zip(streams, mods, outputs, mlps):
            out = _merge_heads(out).to(qkv[0][0].dtype)
            projected = _summed_products([out, mlp], out_slices) if split else attn.to_out(torch.cat([out, mlp], -1))
            results.append(_clip_fp16(x + gate * projected))
        return results, ref_kv

    def _run(self, target, refs, text, timestep, ropes, ref_mods: dict[str, tuple] | None, attention,
             single: SingleStreams):
        """Embed, run the double blocks on (text, references, target) with ``attention`` (called per layer with that
        layer's index), the single blocks on ``single``'s streams, project the target out. ``ref_mods``: the
        references' own modulation (None: the timestep's, as every other stream's)."""
        model = self.transformer
        temb = self._temb(timestep)
        mods = self._mods(temb)
        ref_mods = mods if ref_mods is None else ref_mods
        streams = [model.context_embedder(text), model.x_embedder(refs), model.x_embedder(target)]
        layer_kv = []
        for index, block in enumerate(model.transformer_blocks):
            block_mods = (mods["txt"], ref_mods["img"], mods["img"])
            streams, kv = self._double_block(block, streams, block_mods, ropes, lambda qkv: attention(qkv, index))
            layer_kv.append(kv)
        offset = len(model.transformer_blocks)
        streams = single.join(streams)
        block_mods = tuple(ref_mods["single"] if ref else mods["single"] for ref in single.ref_mods)
        for index, block in enumerate(model.single_transformer_blocks):
            streams, kv = self._single_block(block, streams, block_mods, single.ropes,
                                             lambda qkv: single.attention(qkv, offset + index), single.may_be_empty)
            layer_kv.append(kv)
        hidden = model.norm_out(single.target(streams), temb)
        return model.proj_out(hidden), layer_kv  # (1, N_t, C)


class FullGraph(_Flux2Streams):
    """Dense forward on ``[text, target, references]``; rope rows in that order; returns the target velocity.

    The single blocks see one stream, ``[text, target, references]``, as diffusers' dense forward does."""

    def forward(self, target, refs, text, timestep, rope_cos, rope_sin):
        num_text, num_target = text.shape[1], target.shape[1]
        ropes = []
        for start, stop in ((0, num_text), (num_text, num_text + num_target), (num_text + num_target, None)):
            ropes.append((rope_cos[start:stop], rope_sin[start:stop]))
        ropes = [ropes[0], ropes[2], ropes[1]]  # stream order (txt, ref, tgt)

        def joint(qkv, _layer):
            # Token order [text, target, refs] as diffusers' dense forward concatenates them.
            (qt, kt, vt), (qr, kr, vr), (qi, ki, vi) = qkv
            out = attend(torch.cat([qt, qi, qr], 1), torch.cat([kt, ki, kr], 1), torch.cat([vt, vi, vr], 1))
            n_ref = qr.shape[1]
            return (out[:, :num_text], out[:, num_text + num_target:num_text + num_target + n_ref],
                    out[:, num_text:num_text + num_target]), None

        def every_token(qkv, _layer):
            ((query, key, value),) = qkv
            return (attend(query, key, value),), None

        single = SingleStreams(
            join=lambda streams: [torch.cat([streams[0], streams[2], streams[1]], 1)],  # [text, target, refs]
            ropes=[(rope_cos, rope_sin)], ref_mods=(False,), may_be_empty=(False,), attention=every_token,
            target=lambda streams: streams[0][:, num_text:num_text + num_target])
        velocity, _ = self._run(target, refs, text, timestep, ropes, ref_mods=None, attention=joint,
                                single=single)
        return velocity


class KVGraph(_Flux2Streams):
    """One graph for KV extract and cached steps.

    ``cached_keys``/``cached_values``: one (1, N_cached, H, D) tensor per layer (double blocks then single blocks),
    the references' K/V after RoPE, as a sequence (the exported graph has one input per layer: ``export.spec``;
    a stacked (layers, 1, N_cached, H, D) tensor reads the same); ``rope_*``: rows for [text, target];
    ``ref_rope_*``: rows for the new references. Returns the target velocity and the new references' K/V as two
    lists, one (1, N_new, H, D) tensor per layer (graph outputs of their own, so nothing stacks them). The single
    blocks see two streams: ``[text, target]`` (on ``rope_*`` as they are) and the references.
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__(transformer)
        # The references' modulation: diffusers' KV path modulates them at the fixed timestep 0, so it is a constant
        # of the weights. Computed once here (in the weights' dtype, as at run time), it is an initializer of the
        # graph rather than a time embedding and two modulation products at every step, which onnxruntime cannot
        # fold in fp16 (no fp16 Gemm on its CPU: "can't constant fold Gemm node") and which read ~340 MB of
        # weights per step at klein-9b. Build the graph after the weights are final (LoRA merged, cast). Each set is
        # held split, its scale as 1 + scale (PlusOne): no slices or additions of constants are left to run.
        with torch.no_grad():
            device = transformer.x_embedder.weight.device
            temb = self._temb(torch.full((1,), REF_FIXED_TIMESTEP, dtype=torch.float32, device=device))
            mods = _split_mods(transformer.double_stream_modulation_img(temb),
                               transformer.single_stream_modulation(temb))
            sets = [("img_0", mods["img"][0]), ("img_1", mods["img"][1]), ("single", mods["single"])]
            for name, (shift, scale, gate) in sets:
                for part, value in (("shift", shift), ("scale_plus_one", 1 + scale), ("gate", gate)):
                    self.register_buffer(f"ref_mod_{name}_{part}", value.contiguous(), persistent=False)

    def _ref_mods(self) -> dict[str, tuple]:
        """The references' modulation sets, keyed and shaped as :func:`_split_mods` gives them."""
        def held(name):
            return (getattr(self, f"ref_mod_{name}_shift"), PlusOne(getattr(self, f"ref_mod_{name}_scale_plus_one")),
                    getattr(self, f"ref_mod_{name}_gate"))

        return {"img": (held("img_0"), held("img_1")), "single": held("single")}

    def forward(self, target, refs, text, timestep, rope_cos, rope_sin, ref_rope_cos, ref_rope_sin, cached_keys,
                cached_values):
        num_text = text.shape[1]
        ropes = [(rope_cos[:num_text], rope_sin[:num_text]), (ref_rope_cos, ref_rope_sin),
                 (rope_cos[num_text:], rope_sin[num_text:])]

        def split_attention(qkv, layer):
            (qt, kt, vt), (qr, kr, vr), (qi, ki, vi) = qkv
            k_cached, v_cached = cached_keys[layer], cached_values[layer]  # (1, N_cached, H, D): an input each
            # Text and target see text, every reference (cached, then new) and the target; references see only
            # references. Each key tensor is joined once: the references' own attention joins its keys inside its
            # guard, so a cached step (no new references) copies the cached keys only into the joint attention's.
            # A part that is empty at run time (new references in a cached step, cached ones in a first KV step) is
            # left out of the join (_attend_parts).
            out = attend(torch.cat([qt, qi], 1), (kt, k_cached, kr, ki), (vt, v_cached, vr, vi),
                         optional=(False, True, True, False))
            out_refs = attend(qr, (k_cached, kr), (v_cached, vr), may_be_empty=True, optional=(True, False))
            return (out[:, :num_text], out_refs, out[:, num_text:]), (kr, vr)

        def joined_attention(qkv, layer):
            (qj, kj, vj), (qr, kr, vr) = qkv  # [text, target] and the new references
            k_cached, v_cached = cached_keys[layer], cached_values[layer]
            out = attend(qj, (kj, k_cached, kr), (vj, v_cached, vr), optional=(False, True, True))
            out_refs = attend(qr, (k_cached, kr), (v_cached, vr), may_be_empty=True, optional=(True, False))
            return (out, out_refs), (kr, vr)

        single = SingleStreams(
            join=lambda streams: [torch.cat([streams[0], streams[2]], 1), streams[1]],  # [text, target], refs
            ropes=[(rope_cos, rope_sin), (ref_rope_cos, ref_rope_sin)], ref_mods=(False, True),
            may_be_empty=(False, True), attention=joined_attention, target=lambda streams: streams[0][:, num_text:])
        velocity, layer_kv = self._run(target, refs, text, timestep, ropes,
                                       ref_mods=self._ref_mods(),
                                       attention=split_attention, single=single)
        return velocity, [k for k, _ in layer_kv], [v for _, v in layer_kv]  # per layer: (1, N_new, H, D)
