"""ONNX export of the (LoRA-merged) FLUX.2-klein transformer with a dynamic reference-token axis.

- ``spec`` (numpy only): :func:`build_spec`, :class:`ExportSpec` — names, dynamic axes, bounds, profiles, samples.
- ``rope`` (numpy only): :func:`rope_cos_sin`, diffusers' ``Flux2PosEmbed`` outside the graph.
- ``manifest`` (no numpy, no torch): :func:`read_export_manifest`.
- ``graphs`` (torch): :class:`FullGraph`, :class:`KVGraph`, :func:`attention_form`.
- ``exporter`` (torch): :class:`ExportOptions`, :func:`export_onnx`, :func:`export_graphs`.
- ``loading`` / ``lora`` (torch): a local diffusers folder, a single-file transformer, a LoRA merged in.
- ``checks``: :func:`check_graph`; ``trt_ops``: TensorRT 10.3 parser operator table.
- ``cli``: :func:`add_export_arguments`, :func:`run_export`.
- ``part_specs`` (numpy only): :func:`vae_encoder_spec`, :func:`vae_decoder_spec`, :func:`text_encoder_spec`.
- ``vae``, ``text_encoder`` (torch): :func:`export_vae_encoder`, :func:`export_vae_decoder`,
  :func:`export_text_encoder`; ``part_exporter``: :func:`export_parts` (all three, the VAE loaded once).

This layer imports only ``runtime``; running an export (onnxruntime: ``engines.ort``, the parts in
``engines.ort.parts``) and validating it against PyTorch (``reference.validate``, ``reference.validate_parts``) live
above it. Sub-modules are imported on use, so
``import sparse_context.export.spec`` needs neither torch nor onnx.
"""
