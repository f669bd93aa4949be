"""ONNX graph of the Qwen3 text encoder as the Klein pipeline uses it, with a dynamic sequence axis.

:class:`TextEncoderGraph` is the model half of the pipeline's ``_get_qwen3_prompt_embeds``: the text encoder run on
padded ids and their mask (no KV cache), the hidden states of ``layers`` stacked, then laid side by side per token:
(1, L) ids -> (1, L, len(layers) x hidden). Only the decoder layers up to the last one read are in the graph (no LM
head, no unused layers). Tokenization stays outside the graph (``runtime.tokenizer``).

:func:`export_text_encoder` writes it like the transformer export (staging, checks, manifest, cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_context.export.exporter import ExportResult, Progress
from sparse_context.export.part_exporter import DEFAULT_PART_OPSET, export_part
from sparse_context.export.part_specs import text_encoder_spec, text_settings
from sparse_context.export.vae import PRECISION_DTYPES
from sparse_context.runtime.errors import ModelLoadError, bad_value


def layers_needed(text_encoder: Any, layers: Sequence[int]) -> Any:
    """The decoder stack cut after the last layer whose output is used, without the LM head.

    ``hidden_states[k]`` is the output of decoder layer k-1 for k < num_hidden_layers, and the final-normed output
    for k = num_hidden_layers. Klein reads (9, 18, 27) of Qwen3's 36 layers, so layers 27..35, the final norm and
    the LM head only cost time and weight memory. The cut model shares the weights; with the norm replaced by an
    identity, its last hidden state is the raw output of its last layer, as the full model's ``hidden_states[k]``.
    """
    import copy

    base = getattr(text_encoder, "model", text_encoder)  # Qwen3ForCausalLM -> Qwen3Model: no logits
    last = max(max(layers), 1)  # hidden_states[0] (the embeddings) is recorded as the input of layer 0
    if last >= int(base.config.num_hidden_layers):
        return base  # the final-normed state is read: every layer runs
    # transformers records hidden states with hooks it installs on the decoder layers at a model's first call,
    # once per model object. The cut shares those layers: installed by both models, every layer would record twice
    # and shift the indices. A one-token call installs them on the original first; the cut inherits the mark.
    with torch.no_grad():
        base(input_ids=torch.zeros((1, 1), dtype=torch.long, device=base.embed_tokens.weight.device),
             output_hidden_states=True, use_cache=False)
    cut = copy.copy(base)
    cut._modules = dict(base._modules)  # a shallow copy would share (and so edit) the original's child table
    cut.layers = torch.nn.ModuleList(list(base.layers)[:last])
    cut.norm = torch.nn.Identity()
    cut.config = copy.deepcopy(base.config)
    cut.config.num_hidden_layers = last
    return cut


class TextEncoderGraph(torch.nn.Module):
    """(1, L) int64 ids and mask -> (1, L, len(layers) x hidden) prompt embeddings."""

    def __init__(self, text_encoder: Any, layers: Sequence[int]):
        super().__init__()
        self.layers = tuple(int(k) for k in layers)
        available = int(text_encoder.config.num_hidden_layers) + 1  # hidden_states[0] is the embedding output
        if not self.layers or any(not 0 <= k < available for k in self.layers):
            raise ModelLoadError(bad_value("text encoder layers", list(self.layers),
                                           f"hidden-state indices in 0..{available - 1} for this text encoder "
                                           "(text_encoder_out_layers in sparse_context.json)"))
        self.text_encoder = layers_needed(text_encoder, self.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                   use_cache=False)
        stacked = torch.stack([output.hidden_states[k] for k in self.layers], dim=1)  # (1, layers, L, D)
        batch, layers, length, hidden = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, length, layers * hidden)  # (1, L, layers * D)


def load_text_encoder(model_dir: str | Path, precision: str = "fp32") -> Any:
    """The folder's ``Qwen3ForCausalLM`` in eval mode at the export precision."""
    from transformers import Qwen3ForCausalLM

    from sparse_context.export.loading import check_module_weights, read_model_index

    read_model_index(model_dir)
    try:
        model = Qwen3ForCausalLM.from_pretrained(str(model_dir), subfolder="text_encoder",
                                                 torch_dtype=PRECISION_DTYPES[precision], local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the text encoder of {model_dir}: {error} (check --model)") from error
    check_module_weights(model, "text_encoder", model_dir)
    return model.eval()


def _hidden_size(model_dir: str | Path) -> int:
    import json

    path = Path(model_dir) / "text_encoder" / "config.json"
    try:
        return int(json.loads(path.read_text())["hidden_size"])
    except (OSError, KeyError, ValueError) as error:
        raise ModelLoadError(bad_value("text encoder config", str(path), "a config.json with hidden_size",
                                       "--model")) from error


def export_text_encoder(model_dir: str | Path, out_dir: str | Path, max_tokens: int | None = None,
                        layers: Sequence[int] | None = None, precision: str = "fp32",
                        opset: int = DEFAULT_PART_OPSET, min_tokens: int = 1, progress: Progress | None = None,
                        text_encoder: Any = None) -> ExportResult:
    """Export (or reuse) the text encoder graph for prompts of ``min_tokens..max_tokens`` tokens.

    ``max_tokens`` and ``layers`` default to the folder's ``sparse_context.json`` (else Klein's 512 and (9, 18, 27)).
    ``text_encoder``: an already loaded model of the same folder, to skip loading.
    """
    default_layers, default_tokens = text_settings(model_dir)
    layers = tuple(layers) if layers is not None else default_layers
    spec = text_encoder_spec(_hidden_size(model_dir), layers, int(max_tokens or default_tokens), precision,
                             min_tokens)

    def module() -> TextEncoderGraph:
        model = text_encoder if text_encoder is not None else load_text_encoder(model_dir, precision)
        dtype = PRECISION_DTYPES[precision]
        return TextEncoderGraph(model if model.dtype == dtype else model.to(dtype), layers).eval()

    return export_part(spec, model_dir, out_dir, module, opset, progress, {"text_encoder_out_layers": list(layers)})
