"""`create_model`: a registered model, optionally with published weights and int8 layers.

A thin facade above the layers it joins (as timm's `_factory` sits above its builder and hub): the registry
builds the model, `vitlab.weights.hub` fills it, `vitlab.export.quantize` turns it into an int8 inference model.
`vitlab.models` itself knows nothing of weights or export.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitlab.models.registry import build_model, model_config


def create_model(name: str, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 pretrained: str | None = None, quantize: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; `pretrained` names a published checkpoint from `vitlab.weights.hub`.

    With `pretrained`, the weights are downloaded once into the cache, verified, resampled to `img_size` and,
    when `num_classes` differs from the checkpoint's, given a new zero-initialised head. `quantize="int8"` returns
    an inference-only model with int8 dense layers (`vitlab.export.quantize`; needs onnxruntime).
    """
    # weights and export are imported when asked for, so that `import vitlab` stays as light as `vitlab.models`.
    if quantize is not None:
        from vitlab.export.quantize import check_quantize_mode

        check_quantize_mode(quantize)
    model = build_model(model_config(name, num_classes=num_classes, img_size=img_size, **overrides))
    if pretrained is not None:
        from vitlab.weights.io import load_pretrained

        load_pretrained(model, name, pretrained)
    if quantize is not None:
        from vitlab.export.quantize import quantize_model

        return quantize_model(model, quantize)
    return model
