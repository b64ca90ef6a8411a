"""Key table: HF ``Llama4ForConditionalGeneration`` vision weights -> our ``VisionTower`` names.

Each row is ``(hf_regex, our_template)``; the regex must match the whole HF key, and its named
groups fill the template (``str.format``). Our names are relative to the tower; the decoder
holds the tower as attribute ``vision``, so full keys are ``vision.<ours>``. Tensor layouts are
HF's, unchanged (no transforms): e.g. ``patch_embed.weight`` is (D, C*p*p) with the patch
flattened in (channel, row, col) order, exactly ``torch.nn.Unfold``'s order.

HF's rotary table ``vision_model.rotary_embedding.freqs_ci`` is a non-persistent buffer, never in
checkpoints; we compute ours on the fly.
"""

from __future__ import annotations

import re

from torch import Tensor

_LAYER = r"vision_model\.model\.layers\.(?P<i>\d+)\."

VISION_KEYS: list[tuple[str, str]] = [
    (r"vision_model\.patch_embedding\.linear\.weight", "patch_embed.weight"),
    (r"vision_model\.class_embedding", "cls_embed"),
    (r"vision_model\.positional_embedding_vlm", "pos_embed"),
    (r"vision_model\.layernorm_pre\.(?P<p>weight|bias)", "norm_pre.{p}"),
    (_LAYER + r"input_layernorm\.(?P<p>weight|bias)", "layers.{i}.attn_norm.{p}"),
    (_LAYER + r"self_attn\.q_proj\.(?P<p>weight|bias)", "layers.{i}.attn.wq.{p}"),
    (_LAYER + r"self_attn\.k_proj\.(?P<p>weight|bias)", "layers.{i}.attn.wk.{p}"),
    (_LAYER + r"self_attn\.v_proj\.(?P<p>weight|bias)", "layers.{i}.attn.wv.{p}"),
    (_LAYER + r"self_attn\.o_proj\.(?P<p>weight|bias)", "layers.{i}.attn.wo.{p}"),
    (_LAYER + r"post_attention_layernorm\.(?P<p>weight|bias)", "layers.{i}.mlp_norm.{p}"),
    (_LAYER + r"mlp\.fc1\.(?P<p>weight|bias)", "layers.{i}.mlp.fc1.{p}"),
    (_LAYER + r"mlp\.fc2\.(?P<p>weight|bias)", "layers.{i}.mlp.fc2.{p}"),
    (r"vision_model\.layernorm_post\.(?P<p>weight|bias)", "norm_post.{p}"),
    (r"vision_model\.vision_adapter\.mlp\.fc1\.weight", "adapter.fc1.weight"),
    (r"vision_model\.vision_adapter\.mlp\.fc2\.weight", "adapter.fc2.weight"),
    (r"multi_modal_projector\.linear_1\.(?P<p>weight|bias)", "projector.{p}"),
]

_COMPILED = [(re.compile(hf), ours) for hf, ours in VISION_KEYS]
HF_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def vision_key(hf_key: str) -> str | None:
    """Our tower-relative name for an HF key, or None if the key is not a vision weight."""
    for pattern, template in _COMPILED:
        m = pattern.fullmatch(hf_key)
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
