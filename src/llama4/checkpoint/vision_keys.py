"""Key table: HF ``Llama4ForConditionalGeneration`` vision weights <-> our ``VisionTower`` names.

Rows are ``(HF name, our name)`` templates in the format of ``TEXT_KEYS`` in
``llama4.checkpoint.hf`` (which loads and saves with this table): ``{i}`` is a layer index,
``{rest}`` any suffix (here ``weight`` or ``bias``), the same placeholders on both sides, so the
table reads in both directions. Our names are relative to the tower; the decoder holds it as
attribute ``vision``, so full keys are ``vision.<ours>``.

Tensor layouts are HF's, unchanged (no transforms): e.g. ``patch_embed.weight`` is (D, C*p*p)
with each patch flattened in (channel, row, col) order, ``torch.nn.Unfold``'s order. HF's rotary
table ``vision_model.rotary_embedding.freqs_ci`` is a non-persistent buffer, never in
checkpoints; we compute ours on the fly.
"""

from __future__ import annotations

import re

from torch import Tensor

VISION_KEYS: list[tuple[str, str]] = [
    ("vision_model.patch_embedding.linear.weight", "patch_embed.weight"),
    ("vision_model.class_embedding", "cls_embed"),
    ("vision_model.positional_embedding_vlm", "pos_embed"),
    ("vision_model.layernorm_pre.{rest}", "norm_pre.{rest}"),
    ("vision_model.model.layers.{i}.input_layernorm.{rest}", "layers.{i}.attn_norm.{rest}"),
    ("vision_model.model.layers.{i}.self_attn.q_proj.{rest}", "layers.{i}.attn.wq.{rest}"),
    ("vision_model.model.layers.{i}.self_attn.k_proj.{rest}", "layers.{i}.attn.wk.{rest}"),
    ("vision_model.model.layers.{i}.self_attn.v_proj.{rest}", "layers.{i}.attn.wv.{rest}"),
    ("vision_model.model.layers.{i}.self_attn.o_proj.{rest}", "layers.{i}.attn.wo.{rest}"),
    ("vision_model.model.layers.{i}.post_attention_layernorm.{rest}", "layers.{i}.mlp_norm.{rest}"),
    ("vision_model.model.layers.{i}.mlp.fc1.{rest}", "layers.{i}.mlp.fc1.{rest}"),
    ("vision_model.model.layers.{i}.mlp.fc2.{rest}", "layers.{i}.mlp.fc2.{rest}"),
    ("vision_model.layernorm_post.{rest}", "norm_post.{rest}"),
    ("vision_model.vision_adapter.mlp.fc1.{rest}", "adapter.fc1.{rest}"),
    ("vision_model.vision_adapter.mlp.fc2.{rest}", "adapter.fc2.{rest}"),
    ("multi_modal_projector.linear_1.{rest}", "projector.{rest}"),
]

HF_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(escaped)


_HF_TO_OURS = [(_pattern(hf), ours) for hf, ours in VISION_KEYS]
_OURS_TO_HF = [(_pattern(ours), hf) for hf, ours in VISION_KEYS]


def vision_key(hf_key: str) -> str | None:
    """Our tower-relative name for an HF key, or None if the table has no row for it."""
    for pattern, template in _HF_TO_OURS:
        m = pattern.fullmatch(hf_key)
        if m:
            return template.format(**m.groupdict())
    return None


def hf_vision_key(our_key: str) -> str | None:
    """The HF name of one of our (tower-relative) names, or None."""
    for pattern, template in _OURS_TO_HF:
        m = pattern.fullmatch(our_key)
        if m:
            return template.format(**m.groupdict())
    return None


def convert_vision_state_dict(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The vision weights of an HF state dict, renamed for ``VisionTower.load_state_dict``.

    Keys outside ``vision_model.*`` / ``multi_modal_projector.*`` are ignored; a key inside them
    that the table does not know raises ``KeyError`` (an unknown weight is a bug, not noise).
    """
    out: dict[str, Tensor] = {}
    for key, tensor in hf_state.items():
        if not key.startswith(HF_VISION_PREFIXES):
            continue
        ours = vision_key(key)
        if ours is None:
            raise KeyError(f"no entry in VISION_KEYS for HF key {key!r}")
        out[ours] = tensor
    return out
