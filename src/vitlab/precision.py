"""Which precision vitlab computes in: bf16 autocast where the hardware multiplies bf16 natively, fp32 elsewhere.

`amp` is one of `auto`, `bf16` or `fp32` (`none`, the name older run records and recipes use, means `fp32`).
`auto` chooses bf16 autocast on CUDA and on x86 CPUs with bf16 matrix instructions (AMX-BF16 or AVX512-BF16),
where oneDNN's bf16 matmuls run several times faster than fp32 ones (docs/precision.md); it keeps fp32 on other
CPUs, where PyTorch would emulate bf16 and run slower than fp32, and on other devices. Training and the inference
commands all decide through `resolve_amp`, so one run's numbers and its summary agree on what was computed.
"""

from __future__ import annotations

import platform
import warnings
from contextlib import AbstractContextManager

import torch

from vitlab.errors import VitlabError

AMP_CHOICES = ("auto", "bf16", "fp32")
AMP_ALIASES = {"none": "fp32"}  # what `amp` was called before `fp32` existed


def cpu_bf16_units() -> str | None:
    """The bf16 matrix instructions of this x86 CPU, as named in the summaries: `AMX-BF16`, `AVX512-BF16`, or
    None when it has neither or is not an x86 CPU (other architectures are not judged)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX-BF16"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def cpu_int8_units() -> str | None:
    """The int8 dot-product instructions of this x86 CPU: `AMX-INT8`, `AVX512-VNNI`, or None. Without them, x86
    int8 kernels multiply with `vpmaddubsw`, whose 16-bit sums saturate on full-range 8-bit weights."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX-INT8"
    if torch.cpu._is_vnni_supported():
        return "AVX512-VNNI"
    return None


def bf16_emulated_on_cpu() -> bool:
    """Whether this x86 CPU lacks bf16 instructions (AVX512-BF16, AMX), so that bf16 autocast would be slower than
    fp32. Other architectures are not judged."""
    return platform.machine().lower() in ("x86_64", "amd64") and cpu_bf16_units() is None


def normalise_amp(amp: str) -> str:
    """`amp` as one of AMP_CHOICES (`none` → `fp32`); anything else is refused, naming the value."""
    amp = AMP_ALIASES.get(amp, amp)
    if amp not in AMP_CHOICES:
        raise VitlabError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return amp


def resolve_amp(amp: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast on `device` for the setting `amp` (see the module docstring).

    A forced `bf16` on a CPU that emulates it warns once per call: it is allowed, but slower than fp32."""
    amp = normalise_amp(amp)
    if amp == "fp32":
        return False
    if amp == "bf16":
        if device.type == "cpu" and bf16_emulated_on_cpu():
            warnings.warn("amp=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): PyTorch emulates "
                          "them, so it runs slower than in fp32", stacklevel=2)
        return True
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_units() is not None)


def describe_precision(autocast: bool, device: torch.device) -> str:
    """One phrase for summaries and logs: `fp32`, or bf16 autocast and why it is native or emulated here."""
    if not autocast:
        return "fp32"
    if device.type != "cpu":
        return f"bf16 autocast ({device.type})"
    units = cpu_bf16_units()
    if units is not None:
        return f"bf16 autocast (CPU has {units})"
    if bf16_emulated_on_cpu():
        return "bf16 autocast (emulated: this CPU has no AVX512-BF16 or AMX)"
    return f"bf16 autocast (CPU, {platform.machine()})"


def autocast(enabled: bool, device: torch.device) -> AbstractContextManager[None]:
    """bf16 autocast on `device` when `enabled`, else nothing: the context every vitlab forward pass runs in."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VitlabError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError("device cuda was asked for but CUDA is not available")
    return device
