"""Attention analysis of timm and Hugging Face ViTs loaded into vitlab agrees with their own attention."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.analysis import attention_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_timm_checkpoint_gives_timm_attention():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    model = vitlab.create_model("vit-ti16", num_classes=10)
    model.load_state_dict(reference.state_dict(), strict=True)  # same key layout, no renaming

    captured: list[torch.Tensor] = []
    for block in reference.blocks:
        block.attn.fused_attn = False  # timm's explicit path: softmax(q·kᵀ·scale) → attn_drop
        block.attn.attn_drop.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = reference(x)
    expected = torch.stack(captured)

    maps = attention_maps(model, x)
    assert maps.shape == expected.shape == (12, 1, 3, 197, 197)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)


def hf_to_vitlab(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Hugging Face ViTForImageClassification keys (transformers 5 names) → vitlab/timm keys."""
    out = {"cls_token": state["vit.embeddings.cls_token"],
           "pos_embed": state["vit.embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["vit.embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["vit.embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["vit.layernorm.weight"], "norm.bias": state["vit.layernorm.bias"],
           "head.weight": state["classifier.weight"], "head.bias": state["classifier.bias"]}
    for i in range(depth):
        hf, ours = f"vit.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[ours + f"attn.qkv.{kind}"] = torch.cat([state[hf + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, mine in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                                 ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[ours + f"{mine}.{kind}"] = state[hf + f"{theirs}.{kind}"]
    return out


def test_hugging_face_eager_attention_matches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                    image_size=28, patch_size=7, num_channels=1, num_labels=10, layer_norm_eps=1e-6,
                                    hidden_act="gelu", qkv_bias=True, attn_implementation="eager")
    reference = transformers.ViTForImageClassification(config).eval()
    if not any(key.startswith("vit.layers.0.attention.q_proj") for key in reference.state_dict()):
        pytest.skip("this transformers version uses another key layout")
    model = vitlab.create_model("vit-mini-p7-28", embed_dim=64, depth=3, num_heads=4, mlp_dim=128)
    model.load_state_dict(hf_to_vitlab(reference.state_dict(), 3), strict=True)

    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = reference(pixel_values=x, output_attentions=True)
    expected = torch.stack(output.attentions)
    maps = attention_maps(model, x)
    assert maps.shape == expected.shape == (3, 3, 4, 17, 17)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(x), output.logits, atol=1e-5, rtol=1e-4)
