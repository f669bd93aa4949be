"""Transformer configs of the benchmarks (no torch): the real FLUX.2-klein sizes, the tiny embedded model, and
full-width reduced-depth variants of each.

A reduced-depth variant keeps every matrix shape, token count and attention kernel of its model; only the block
count differs (``klein-9b-d4``: 1 double + 3 single blocks, ``-d8``: 2 + 6). Time per call is a fixed cost plus a
cost per block, so two depths predict the full-depth time (``reference.gpu_plan.extrapolate``) without exporting
2 x 18 GB at full depth.
"""

from __future__ import annotations

from typing import Any

from sparse_context.reference.tiny import TINY_TRANSFORMER

# FLUX.2-klein transformer configs; "tiny" is the embedded default.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(TINY_TRANSFORMER),
    "klein-4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                     mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
    "klein-9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                     num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256,
                     mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
}
# (double blocks, single blocks) of each reduced depth, per model; the first two are the check's default pair. The
# extrapolation to full depth multiplies the difference of the pair's times by (full - a) / (b - a) in single-block
# units: 7 for klein-9b's d4/d8, 2.3 for d4/d16 (a costlier export and rows; about a third of the noise's reach). The
# tiny ladder only exercises the plan on a CPU.
REDUCED_DEPTHS: dict[str, dict[str, tuple[int, int]]] = {
    "klein-4b": {"d4": (1, 3), "d8": (2, 6), "d16": (4, 12)},
    "klein-9b": {"d4": (1, 3), "d8": (2, 6), "d16": (4, 12)},
    "tiny": {"d2": (1, 1), "d4": (2, 2)},
}
for _name, _ladder in REDUCED_DEPTHS.items():
    for _suffix, (_double, _single) in _ladder.items():
        CONFIGS[f"{_name}-{_suffix}"] = dict(CONFIGS[_name], num_layers=_double, num_single_layers=_single)

KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
