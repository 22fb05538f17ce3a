"""The GPU paths: device auto-detection, bf16 autocast, SDPA's flash kernel, CPU/CUDA agreement.

Skipped where no CUDA device is present (CI and the 2-core development machines); a session lent a GPU runs
`pytest tests/test_cuda.py` there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitlab import create_model
from vitlab.precision import select_device
from vitlab.train.config import TrainConfig
from vitlab.train.loop import Trainer
from vitlab.weights import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter nudged at random: zero heads would make every logit 0, whatever the rest computes."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def test_auto_device_is_cuda_and_training_runs_under_bf16(tmp_path: Path) -> None:
    assert select_device("auto").type == "cuda"
    config = TrainConfig(model="vit-mini-p4-28", model_overrides={"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                                  "mlp_dim": 64, "patch_size": 4},
                         dataset="digits", img_size=8, epochs=3, batch_size=64, lr=3e-3, weight_decay=0.05,
                         warmup_steps=5, out=str(tmp_path), progress=False, device="auto")
    trainer = Trainer(config)
    assert trainer.autocast  # amp=auto means bf16 on CUDA
    result = trainer.fit()
    assert result["test_top1"] > 0.5  # chance is 0.1
    record = json.loads((tmp_path / "last.json").read_text())
    assert record["step"] == record["total_steps"]
    model = load_model(tmp_path)  # a checkpoint written on the GPU loads on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_vit_attention_runs_on_the_flash_kernel_in_bf16() -> None:
    model = randomised(create_model("vit-s16")).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the flash kernel cannot take these inputs
            flash = model(x).float()
        with sdpa_kernel([SDPBackend.MATH]):
            math = model(x).float()
    assert torch.allclose(flash, math, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["vit-ti16", "resnet-bit-mini-28", "mixer-mini-p4-28", "perceiver-mini-28"])
def test_cuda_fp32_logits_match_the_cpu(name: str) -> None:
    model = randomised(create_model(name)).eval()
    config = model.config
    x = torch.randn(2, config.in_chans, *config.img_size)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            cpu = model(x)
            cuda = model.cuda()(x.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow_tf32
    assert torch.allclose(cpu, cuda, atol=1e-4, rtol=1e-4), (cpu - cuda).abs().max()
