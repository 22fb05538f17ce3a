"""The precision decision (`vitlab.precision`) for each kind of CPU and device, with the CPU's capability faked."""

from __future__ import annotations

import warnings

import pytest
import torch

from vitlab import precision
from vitlab.errors import VitlabError
from vitlab.precision import describe_precision, normalise_amp, resolve_amp

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be an x86 CPU with the given bf16 units (None: neither AMX nor AVX512-BF16)."""

    def fake(units: str | None, machine: str = "x86_64") -> None:
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: units == "AMX-BF16")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units == "AVX512-BF16")

    return fake


@pytest.mark.parametrize("units", ["AMX-BF16", "AVX512-BF16"])
def test_auto_takes_bf16_where_the_cpu_multiplies_it_natively(fake_cpu, units: str) -> None:
    fake_cpu(units)
    assert precision.cpu_bf16_units() == units and not precision.bf16_emulated_on_cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("auto", CPU) and resolve_amp("bf16", CPU)
    assert not resolve_amp("fp32", CPU) and not resolve_amp("none", CPU)
    assert describe_precision(True, CPU) == f"bf16 autocast (CPU has {units})"
    assert describe_precision(False, CPU) == "fp32"


def test_auto_keeps_fp32_where_bf16_is_emulated(fake_cpu) -> None:
    fake_cpu(None)
    assert precision.cpu_bf16_units() is None and precision.bf16_emulated_on_cpu()
    assert not resolve_amp("auto", CPU) and not resolve_amp("fp32", CPU)
    with pytest.warns(UserWarning, match="slower than in fp32"):
        assert resolve_amp("bf16", CPU)  # forced: allowed, with a warning
    assert "emulated" in describe_precision(True, CPU)


def test_other_architectures_are_not_judged(fake_cpu) -> None:
    fake_cpu("AVX512-BF16", machine="aarch64")  # the x86 probes are not asked on another architecture
    assert precision.cpu_bf16_units() is None and not precision.bf16_emulated_on_cpu()
    assert not resolve_amp("auto", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("bf16", CPU)
    assert describe_precision(True, CPU) == "bf16 autocast (CPU, aarch64)"


def test_devices_other_than_the_cpu(fake_cpu) -> None:
    fake_cpu(None)
    assert resolve_amp("auto", CUDA) and not resolve_amp("fp32", CUDA)
    assert not resolve_amp("auto", MPS) and resolve_amp("bf16", MPS)
    assert describe_precision(True, CUDA) == "bf16 autocast (cuda)"


def test_names_and_bad_values() -> None:
    assert [normalise_amp(name) for name in ("auto", "bf16", "fp32", "none")] == ["auto", "bf16", "fp32", "fp32"]
    with pytest.raises(VitlabError, match="amp must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_amp("fp16", CPU)


def test_autocast_context_computes_in_bf16_only_when_enabled() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast(True, CPU):
        assert (a @ b).dtype == torch.bfloat16
    with precision.autocast(False, CPU):
        assert (a @ b).dtype == torch.float32
