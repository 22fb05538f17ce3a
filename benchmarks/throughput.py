"""Throughput of vitlab against timm and Hugging Face on identical weights: inference and full training steps.

    python benchmarks/throughput.py [--models vit-ti16 vit-s16 fmnist-vit] [--repeats 3] [--json PATH] [--quick]
                                    [--precisions fp32 bf16]
    python benchmarks/throughput.py --device cuda [--bf16] [--compile]     # on a GPU

Every row runs its contenders interleaved (A, B, C, A, B, C, ...) after a warm-up and reports the median of the
repeats, so drift on a shared machine hits all of them alike; ratios to timm are the numbers to compare, not
absolute img/s. 2 threads (`--threads`), `torch.inference_mode()` for inference. On a CPU with bf16 matrix
instructions (AMX-BF16 or AVX512-BF16, `vitlab.precision.cpu_bf16_units`) every row runs in fp32 and again under
bf16 autocast, every PyTorch contender alike, and each row's share of the peak is of the matmul peak of its own
precision, both timed at the start of the run; elsewhere the rows are fp32 (`--precisions` chooses). A training step
is zero_grad, forward, cross-entropy, backward and AdamW (PyTorch's default implementation) on the bare model, the
same for every library. Achieved GFLOP/s divide the FLOPs `torch.utils.flop_counter` counts (matmuls, convolutions
and attention; forward + backward for training) by the time, and are compared with a square matmul in the row's
precision timed the same way at the start of the run. A training step's memory is measured in a fresh subprocess per
library: the peak resident set size during two steps (VmHWM, reset just before them) minus the size before them
(model, inputs and optimizer built, freed heap memory handed back by `malloc_trim`), i.e. activations, gradients,
AdamW state and workspace. tracemalloc does not see torch's CPU tensors; the RSS peak does. The timed rows run with
glibc told to keep freed memory (`vitlab.allocator`, as the `vitlab` command does), for all three libraries: without
it, repeated page faults decide some rows rather than the models (README, Performance).

On a GPU (`--device cuda`) the same rows run with CUDA synchronised around every timing, optionally under bf16
autocast (`--bf16`, so SDPA can take its flash kernel) and with every library's model compiled (`--compile`); the
matmul peak is then timed in the run's dtype, a step's memory is the CUDA allocator's peak growth over two steps,
and the int8 contender (ONNX Runtime on the CPU) is left out.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from vitlab.allocator import keep_freed_memory
from vitlab.models.layers import sincos_2d_position_embedding
from vitlab.models.registry import model_config
from vitlab.models.vit import ViTConfig, VisionTransformer
from vitlab.precision import cpu_bf16_units
from vitlab.train.config import recipe_config

DEFAULT_THREADS = 2
LIBRARIES = ("vitlab", "timm", "hf", "vitlab-int8")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Spec:
    """One benchmarked model: a vitlab registry name with overrides, and timm's name for it if timm has one."""

    key: str
    model: str
    overrides: dict[str, Any]
    train_batch: int
    timm_name: str | None = None  # None: timm's VisionTransformer built with the same shape

    @property
    def config(self) -> ViTConfig:
        return model_config(self.model, **self.overrides)


def _fmnist_spec() -> Spec:
    """The demo's model exactly as the `fmnist-vit` recipe builds it, at the recipe's batch size."""
    recipe = recipe_config("fmnist-vit")
    overrides = dict(recipe.model_overrides)
    if recipe.img_size is not None:
        overrides["img_size"] = recipe.img_size
    return Spec("fmnist-vit", recipe.model, overrides, recipe.batch_size)


SPECS: dict[str, Spec] = {spec.key: spec for spec in (
    Spec("vit-ti16", "vit-ti16", {}, 32, "vit_tiny_patch16_224"),
    Spec("vit-s16", "vit-s16", {}, 32, "vit_small_patch16_224"),
    _fmnist_spec(),
)}


@dataclass
class Contender:
    """A library's model and how to call it; `note` says where it is not the same function as vitlab's."""

    library: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    trainable: bool = True
    note: str = ""
    same_function: bool = True  # False: another model, whose FLOPs are counted on their own


# ---------------------------------------------------------------- models with identical weights

def build_vitlab(spec: Spec, seed: int = 0) -> VisionTransformer:
    """A vitlab model whose zero-initialised tensors (head, class token, biases) are random too."""
    torch.manual_seed(seed)
    model = VisionTransformer(spec.config)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02)
    return model


def sincos_rows(config: ViTConfig) -> torch.Tensor:
    return sincos_2d_position_embedding(*config.grid_size, config.embed_dim)[None]


def build_timm(spec: Spec, source: VisionTransformer) -> Contender:
    """timm's model with `source`'s weights (vitlab's keys are timm's)."""
    import timm

    config = spec.config
    if spec.timm_name is not None:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=config.num_classes,
                                  img_size=config.img_size)
        model.load_state_dict(source.state_dict())
        return Contender("timm", model, model)
    if config.pool != "gap" or config.posemb != "sincos2d":
        raise ValueError(f"no timm equivalent written for pool={config.pool!r}, posemb={config.posemb!r}")
    # fc_norm=False keeps the final LayerNorm on every token before the average, as vitlab does (timm's default for
    # 'avg' normalises the pooled vector instead). timm has no fixed sin-cos table: a frozen learned one holds it.
    model = timm.models.VisionTransformer(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.embed_dim, qkv_bias=config.qkv_bias, global_pool="avg", fc_norm=False,
        class_token=False, pos_embed="learn")
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if missing != ["pos_embed"] or unexpected:
        raise RuntimeError(f"timm model does not match: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.pos_embed.copy_(sincos_rows(config))
    model.pos_embed.requires_grad_(False)
    return Contender("timm", model, model, note="timm: the sin-cos table is a frozen learned pos_embed (same values)")


def build_hf(spec: Spec, source: VisionTransformer, folder: Path) -> Contender:
    """transformers' ViTForImageClassification through vitlab's own HF writer (SDPA attention)."""
    import transformers

    config = spec.config
    note = ""
    if config.pool != "token" or config.posemb != "learned":
        # HF classifies a class token and learns its positions: the closest model prepends a class token (one more
        # token) and holds the sin-cos table, with a zero class row, in its learned position embedding.
        closest = VisionTransformer(dataclasses.replace(config, pool="token", posemb="learned"))
        state = closest.state_dict()
        state.update(source.state_dict())
        state["pos_embed"] = torch.cat([torch.zeros(1, 1, config.embed_dim), sincos_rows(config)], dim=1)
        state["cls_token"] = torch.randn(1, 1, config.embed_dim) * 0.02
        closest.load_state_dict(state)
        source = closest
        note = (f"HF: has no GAP or fixed sin-cos positions; closest model: class token ({closest.config.grid_size[0]}"
                f"x{closest.config.grid_size[1]}+1 tokens) classified, sin-cos values in a learned pos embedding; "
                "same weights otherwise, not the same function")
    from vitlab.weights import save_weights

    save_weights(source, folder / spec.key, "hf")
    model = transformers.ViTForImageClassification.from_pretrained(folder / spec.key, attn_implementation="sdpa")
    return Contender("hf", model, lambda x: model(pixel_values=x).logits, note=note, same_function=not note)


def build_int8(source: VisionTransformer, folder: Path, threads: int) -> Contender:
    """vitlab's `quantize="int8"` model (what `create_model(..., quantize="int8")` returns) on the same weights.

    Its ONNX Runtime session is rebuilt with the thread pool's spin-waiting off: spinning workers would keep taking
    the cores from the PyTorch contenders timed right after them."""
    import onnxruntime as ort

    from vitlab.export import OnnxRuntimeModel, export_int8_onnx

    graph = export_int8_onnx(source, folder / f"{id(source)}-int8.onnx").read_bytes()
    model = OnnxRuntimeModel(graph, source.config, threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return Contender("vitlab-int8", model, model, trainable=False,
                     note="vitlab-int8: ONNX Runtime dynamic int8 dense layers (its threads set not to spin-wait); "
                          "GFLOP/s are fp32-equivalent")


def build_contenders(spec: Spec, libraries: tuple[str, ...], folder: Path,
                     device: torch.device = torch.device("cpu")) -> dict[str, Contender]:
    source = build_vitlab(spec)
    contenders = {"vitlab": Contender("vitlab", source, source)}
    if "timm" in libraries:
        contenders["timm"] = build_timm(spec, source)
    if "hf" in libraries:
        contenders["hf"] = build_hf(spec, source, folder)
    if "vitlab-int8" in libraries:
        contenders["vitlab-int8"] = build_int8(source, folder, torch.get_num_threads())
    for contender in contenders.values():
        if contender.library != "vitlab-int8":  # ONNX Runtime's CPU session stays where it is
            contender.model.to(device)
    return contenders


def images(spec: Spec, batch: int, seed: int = 1,
           device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    config = spec.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_chans, *config.img_size, generator=generator)
    return x.to(device), torch.randint(config.num_classes, (batch,), generator=generator).to(device)


def max_logit_difference(contenders: dict[str, Contender], spec: Spec,
                         device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Largest |logit - vitlab's logit| per library on two images: 0 up to float rounding for identical functions."""
    x, _ = images(spec, 2, seed=2, device=device)
    with torch.inference_mode():
        for contender in contenders.values():
            contender.model.eval()
        reference = contenders["vitlab"].forward(x)
        return {name: float((c.forward(x) - reference).abs().max()) for name, c in contenders.items()
                if name != "vitlab"}


# ---------------------------------------------------------------- FLOPs, timing, memory

def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                             **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad, query, key, value)


# The flop counter knows the CUDA attention kernels only; CPU's fused attention is these two ops.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def flops_per_image(contender: Contender, spec: Spec, train: bool,
                    device: torch.device = torch.device("cpu")) -> int:
    """FLOPs of one image (a batch of 1; every op here is linear in the batch): forward, or forward + backward."""
    x, y = images(spec, 1, device=device)
    model = contender.model.train(train)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        if train:
            F.cross_entropy(contender.forward(x), y).backward()
        else:
            with torch.inference_mode():
                contender.forward(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a timing end when the work does: CUDA kernels run asynchronously, CPU ops do not."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def autocast_call(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with autocast(x.device, bf16):
        return forward(x)


def interleaved_rates(calls: dict[str, Callable[[], Any]], batch: int, repeats: int, warmup: int,
                      target_s: float, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median images per second of each call, timed A, B, C, A, B, C, ... with the same iteration count for all.

    The iteration count makes one timing last about `target_s` (at least one call), from the warm-up's last call.
    `sync` waits for the device before a timing starts and before it ends."""
    last = {}
    for name, call in calls.items():
        for _ in range(warmup):
            sync()
            start = time.perf_counter()
            call()
            sync()
            last[name] = time.perf_counter() - start
    iterations = max(1, math.ceil(target_s / statistics.median(last.values())))
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            for _ in range(iterations):
                call()
            sync()
            rates[name].append(batch * iterations / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def matmul_peak(size: int, repeats: int, warmup: int, target_s: float, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a square matmul in the run's dtype, timed like the models (median of repeats)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    rate = interleaved_rates({"mm": lambda: torch.mm(a, b, out=out)}, 1, repeats, warmup, target_s,
                             synchronizer(device))["mm"]
    return rate * 2 * size ** 3 / 1e9


def training_step(contender: Contender, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Callable[[], None]:
    model = contender.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, bf16):
            loss = F.cross_entropy(contender.forward(x), y)
        loss.backward()
        optimizer.step()
    return step


def _memory_mb(field: str) -> float:
    """A memory line of /proc/self/status in MiB: VmRSS is resident now, VmHWM its peak since the last reset.

    Not getrusage's ru_maxrss: a child started by fork + exec inherits its parent's peak there."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


def memory_probe(library: str, key: str, batch: int, bf16: bool = False) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth over two training steps of one library's model."""
    spec = SPECS[key]
    with tempfile.TemporaryDirectory(prefix="vitlab-bench-") as folder:
        contenders = build_contenders(spec, ("vitlab", library), Path(folder))  # all kept alive: nothing freed
    x, y = images(spec, batch)
    step = training_step(contenders[library], x, y, bf16)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed while building goes back, so the baseline is live data
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts here: building's own peaks do not count
    baseline = _memory_mb("VmRSS")
    step()
    step()
    peak = _memory_mb("VmHWM")
    return {"baseline_mb": baseline, "peak_mb": peak, "step_mb": peak - baseline}


def cuda_step_memory(contender: Contender, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> dict[str, float]:
    """The CUDA allocator's peak growth over two training steps with a fresh optimizer (the GPU's memory probe)."""
    step = training_step(contender, x, y, bf16)
    contender.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(x.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(x.device)
    baseline = torch.cuda.memory_allocated(x.device) / 2 ** 20
    step()
    step()
    torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device) / 2 ** 20
    contender.model.zero_grad(set_to_none=True)
    return {"baseline_mb": baseline, "peak_mb": peak, "step_mb": peak - baseline}


def measure_memory(library: str, key: str, batch: int, bf16: bool = False) -> dict[str, float] | None:
    """The CPU's memory probe, in a fresh process; eager (a compiled step's memory is measured on the GPU only)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--threads", str(torch.get_num_threads()),
               "--memory-probe", library, key, str(batch)] + (["--bf16"] if bf16 else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        print(f"  memory probe {library} {key} failed: {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run

@dataclass
class Settings:
    repeats: int
    warmup: int
    target_s: float
    infer_batches: tuple[int, ...]
    train_batch: Callable[[Spec], int]
    peak_size: int
    threads: int = DEFAULT_THREADS
    memory: bool = True
    libraries: tuple[str, ...] = LIBRARIES
    device: torch.device = torch.device("cpu")
    bf16: bool = False  # bf16 autocast for the PyTorch contenders in this pass
    compile: bool = False  # torch.compile every PyTorch contender's model
    precisions: tuple[str, ...] = ("fp32",)  # one pass over the models per precision, in this order

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    precision: str = "fp32"
    img_s: dict[str, float] = field(default_factory=dict)
    ratio_to_timm: dict[str, float] = field(default_factory=dict)
    gflop_per_img: dict[str, float] = field(default_factory=dict)
    gflops: dict[str, float] = field(default_factory=dict)
    peak_share: dict[str, float] = field(default_factory=dict)
    step_memory_mb: dict[str, float] = field(default_factory=dict)
    memory_ratio_to_timm: dict[str, float] = field(default_factory=dict)


def bench_model(spec: Spec, settings: Settings, peak: float, folder: Path) -> tuple[list[Row], dict[str, Any]]:
    device = settings.device
    contenders = build_contenders(spec, settings.libraries, folder, device)
    info = {"max_logit_diff_to_vitlab": max_logit_difference(contenders, spec, device),
            "notes": [c.note for c in contenders.values() if c.note]}
    # One count per function, on timm's model: the same math counts differently per kernel (vitlab's explicit
    # attention for short sequences is bmm + softmax, whose backward the counter rates above fused attention's).
    reference = contenders.get("timm", contenders["vitlab"])
    counted = {train: flops_per_image(reference, spec, train, device) for train in (False, True)}
    flops = {(name, train): counted[train] if c.same_function else flops_per_image(c, spec, train, device)
             for name, c in contenders.items() for train in (False, True)}
    if settings.compile:  # after counting: the counter sees the eager ops; the parameters stay the module's
        # Dynamo keys its shape guesses and recompile count by code object, which every model shares: without a
        # reset, later models would compile with dynamic shapes or, past the recompile limit, run eagerly.
        torch._dynamo.reset()
        for contender in contenders.values():
            if contender.library != "vitlab-int8":
                contender.forward = torch.compile(contender.forward, dynamic=False)
    sync = synchronizer(device)
    rows = []
    for mode, batch in [("infer", b) for b in settings.infer_batches] + [("train", settings.train_batch(spec))]:
        train = mode == "train"
        active = {name: c for name, c in contenders.items() if c.trainable or not train}
        row = Row(spec.key, mode, batch, settings.precision)
        row.gflop_per_img = {name: flops[name, train] / 1e9 for name in active}
        x, y = images(spec, batch, device=device)
        if train:
            calls = {name: training_step(c, x, y, settings.bf16) for name, c in active.items()}
            row.img_s = interleaved_rates(calls, batch, settings.repeats, settings.warmup, settings.target_s, sync)
        else:
            for contender in active.values():
                contender.model.eval()
            # autocast is entered per call, as a user does per batch: its weight-cast cache lives that long
            calls = {name: (lambda c=c, x=x: autocast_call(c.forward, x, settings.bf16)) for name, c in active.items()}
            with torch.inference_mode():
                row.img_s = interleaved_rates(calls, batch, settings.repeats, settings.warmup, settings.target_s,
                                              sync)
        for name, rate in row.img_s.items():
            row.ratio_to_timm[name] = rate / row.img_s["timm"] if "timm" in row.img_s else math.nan
            row.gflops[name] = rate * row.gflop_per_img[name]
            row.peak_share[name] = row.gflops[name] / peak
        if train and settings.memory:
            for name, contender in active.items():
                probe = (cuda_step_memory(contender, x, y, settings.bf16) if device.type == "cuda"
                         else measure_memory(name, spec.key, batch, settings.bf16))
                if probe is not None:
                    row.step_memory_mb[name] = probe["step_mb"]
            if "timm" in row.step_memory_mb:
                row.memory_ratio_to_timm = {name: mb / row.step_memory_mb["timm"]
                                            for name, mb in row.step_memory_mb.items()}
        rows.append(row)
        print(f"  {spec.key} {mode} batch {batch} {settings.precision}: " + ", ".join(
            f"{name} {rate:.1f} img/s" for name, rate in row.img_s.items()), flush=True)
    return rows, info


def machine(threads: int, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"torch": torch.__version__}
    for name in ("timm", "transformers", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_bf16_units": cpu_bf16_units(), "cores": os.cpu_count(), "threads": threads, "gpu": gpu,
            "versions": versions}


LABELS = {"vitlab": "vitlab", "timm": "timm", "hf": "HF", "vitlab-int8": "vitlab int8"}


def _cell(values: dict[str, float], name: str, fmt: str, suffix: str = "") -> str:
    value = values.get(name)
    return "—" if value is None or math.isnan(value) else format(value, fmt) + suffix


def markdown(rows: list[Row], libraries: tuple[str, ...]) -> str:
    """img/s per library, ratios to timm, vitlab's and timm's GFLOP/s (share of the matmul peak of the row's
    precision), step memory."""
    present = [name for name in libraries if any(name in row.img_s for row in rows)]
    others = [name for name in present if name != "timm"]
    trained = [name for name in present if any(name in row.step_memory_mb for row in rows)]
    header = (["model", "run", "batch", "precision"] + [f"{LABELS[name]} img/s" for name in present]
              + [f"{LABELS[name]}/timm" for name in others]
              + [f"{LABELS[name]} GFLOP/s (% of peak)" for name in ("vitlab", "timm") if name in present])
    if trained:
        header += ["step memory MB (" + " / ".join(LABELS[name] for name in trained) + ")", "memory vitlab/timm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.model, row.mode, str(row.batch), row.precision]
        cells += [_cell(row.img_s, name, ".1f") for name in present]
        cells += [_cell(row.ratio_to_timm, name, ".2f", "×") for name in others]
        cells += [f"{row.gflops[name]:.0f} ({row.peak_share[name]:.0%})" if name in row.gflops else "—"
                  for name in ("vitlab", "timm") if name in present]
        if trained:
            cells.append(" / ".join(_cell(row.step_memory_mb, name, ".0f") for name in trained)
                         if row.step_memory_mb else "—")
            cells.append(_cell(row.memory_ratio_to_timm, "vitlab", ".2f", "×"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(models: list[str], settings: Settings, json_path: Path) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    peaks = {}
    for precision in settings.precisions:
        peaks[precision] = matmul_peak(settings.peak_size, max(settings.repeats, 3), settings.warmup,
                                       settings.target_s, settings.device,
                                       torch.bfloat16 if precision == "bf16" else torch.float32)
        print(f"{precision} matmul peak ({settings.peak_size}², {settings.device}, {settings.threads} threads): "
              f"{peaks[precision]:.1f} GFLOP/s", flush=True)
    rows: list[Row] = []
    models_info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vitlab-bench-") as folder:
        for key in models:
            for index, precision in enumerate(settings.precisions):
                # ONNX Runtime's int8 does not change with autocast: timed in the first pass only
                libraries = settings.libraries if index == 0 else tuple(
                    name for name in settings.libraries if name != "vitlab-int8")
                spec_rows, info = bench_model(
                    SPECS[key], dataclasses.replace(settings, bf16=precision == "bf16", libraries=libraries),
                    peaks[precision], Path(folder))
                models_info.setdefault(key, info)
                rows.extend(spec_rows)
    notes = sorted({note for info in models_info.values() for note in info["notes"]})
    notes += [("training step: zero_grad + forward + cross-entropy + backward + AdamW on the bare model (no vitlab "
               "Trainer); FLOPs from torch.utils.flop_counter at batch 1 × batch (matmuls, convolutions, attention), "
               "counted once, on timm's model, for every library that computes the same function"),
              ("step memory: the CUDA allocator's peak growth over two steps with a fresh AdamW, per library"
               if settings.device.type == "cuda" else
               "step memory: peak RSS growth over two steps in a fresh process per library (activations, gradients, "
               "AdamW state, workspace), measured sequentially after the timings")]
    if "bf16" in settings.precisions:
        units = f" (CPU has {cpu_bf16_units()})" if settings.device.type == "cpu" and cpu_bf16_units() else ""
        notes.append(f"bf16 rows: every PyTorch contender under bf16 autocast{units}; their % of peak is of the "
                     f"bf16 matmul peak of this run ({peaks['bf16']:.0f} GFLOP/s)")
    if settings.compile:
        notes.append("torch.compile on every PyTorch model")
    precision = "+".join(settings.precisions)
    result = {
        "date": datetime.date.today().isoformat(), "machine": machine(settings.threads, settings.device),
        "device": str(settings.device), "precision": precision, "compile": settings.compile,
        # what "fp32" means on a GPU: TF32 tensor cores in matmuls and convolutions, or not
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "repeats": settings.repeats,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul_peak_gflops": peaks[settings.precisions[0]], "matmul_peak_gflops_by_precision": peaks,
        "matmul_size": settings.peak_size, "wall_s": time.perf_counter() - started,
        "models": models_info, "notes": notes, "rows": [dataclasses.asdict(row) for row in rows]}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print()
    print(markdown(rows, settings.libraries))
    print()
    for note in notes:
        print(f"- {note}")
    for key, info in models_info.items():
        diffs = ", ".join(f"{name} {diff:.1e}" for name, diff in info["max_logit_diff_to_vitlab"].items())
        print(f"- {key}: max |logit - vitlab| {diffs}")
    print(f"- load average (1/5/15 min) before {tuple(round(v, 1) for v in load_before)}, after "
          f"{tuple(round(v, 1) for v in result['load_average_after'])}; {result['wall_s']:.0f} s in all; "
          f"JSON: {json_path}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=list(SPECS))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per contender and row (median)")
    parser.add_argument("--json", type=Path,
                        default=RESULTS / f"throughput-{datetime.date.today().isoformat()}.json")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, batches 1/2 and training batch 4, one call per timing: checks it runs")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch and ONNX Runtime threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the training-step memory subprocesses")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                        help="one pass per precision (default: fp32 and bf16 on a CPU with AMX-BF16 or "
                             "AVX512-BF16, else fp32)")
    parser.add_argument("--bf16", action="store_true", help="bf16 rows only (same as --precisions bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every PyTorch model")
    parser.add_argument("--memory-probe", nargs=3, metavar=("LIBRARY", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if args.bf16 and args.precisions:
        parser.error("--bf16 and --precisions: give one of them")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    return args


def run_precisions(args: argparse.Namespace) -> tuple[str, ...]:
    """The passes to run: as asked, else fp32 and bf16 on a CPU with bf16 matrix instructions, else fp32."""
    if args.precisions:
        return tuple(dict.fromkeys(args.precisions))
    if args.bf16:
        return ("bf16",)
    if args.device.type == "cpu" and cpu_bf16_units() is not None:
        return ("fp32", "bf16")
    return ("fp32",)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        library, key, batch = args.memory_probe
        print(json.dumps(memory_probe(library, key, int(batch), args.bf16)))
        return None
    keep_freed_memory()  # as the vitlab CLI does; one process, so every library's rows run with it
    precisions = run_precisions(args)
    target = {"threads": args.threads, "memory": not args.no_memory, "device": args.device,
              "bf16": precisions[0] == "bf16", "precisions": precisions, "compile": args.compile,
              # int8 is ONNX Runtime on the CPU: beside a GPU's rows it would time another machine
              "libraries": tuple(name for name in LIBRARIES if args.device.type == "cpu" or name != "vitlab-int8")}
    if args.quick:
        settings = Settings(repeats=1, warmup=1, target_s=0.0, infer_batches=(1, 2), train_batch=lambda spec: 4,
                            peak_size=256, **target)
    else:
        settings = Settings(repeats=args.repeats, warmup=2, target_s=1.0, infer_batches=(1, 32),
                            train_batch=lambda spec: spec.train_batch,
                            peak_size=2048 if args.device.type == "cpu" else 8192, **target)
    return run(args.models, settings, args.json)


if __name__ == "__main__":
    main()
