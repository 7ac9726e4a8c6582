"""Timing one Case: synthetic inputs already on the device, warm-up, timed steps with device
synchronisation, then one row of figures. A training step is zero_grad, forward, cross-entropy,
backward and an SGD step (timm's benchmark does the same, so figures compare)."""

import contextlib
import ctypes
import math
import resource
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from model import build_model, count_macs, count_parameters, fuse_for_inference

from .cases import NORMS, OURS, Case
from .peers import build_peer
from .tf32 import conv_tf32, matmul_tf32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_CLASSES = 1000


def build(case: Case) -> nn.Module:
    if case.subject == OURS:
        return build_model(
            case.model,
            group_size=case.group_size,
            expand_ratio=case.expand_ratio,
            num_classes=NUM_CLASSES,
            **NORMS[case.norm],
        )
    return build_peer(case.subject)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(case: Case):
    """Mixed precision the way users run it: fp32 weights, autocast to bf16/fp16 for compute."""
    if case.precision == "fp32" or case.device not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=case.device, dtype=DTYPES[case.precision])


def _proc_status_bytes(field: str) -> Optional[int]:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_peak(device: str) -> Optional[int]:
    """Restart the high-water mark and return the bytes in use now; None where this system cannot
    restart it (the CPU's needs Linux's /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def peak_since_start(device: str) -> Optional[int]:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM")


def resident_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view or a shared weight counts once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), so that a step's
    new tensors fault pages in, and show in the resident set, instead of reusing freed ones."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise may then be understated
        pass


def step_memory(step: Callable[[], None], device: str) -> Optional[int]:
    """Bytes one extra, untimed step rises above what is in use before it (None: unmeasurable).
    Measured apart from the timed steps: trimming the heap first makes the next step pay for
    page faults that a steady run does not."""
    if device != "cuda":
        _release_free_heap()
    start = start_peak(device)
    step()
    synchronize(device)
    peak = peak_since_start(device)
    return None if start is None or peak is None else max(peak - start, 0)


def peak_memory(device: str, resident: int, transient: Optional[int]) -> Dict[str, object]:
    """One case's peak, counted for that case alone though other cases stay resident between
    interleaved repeats: the tensors it keeps between steps (weights, buffers, gradients,
    optimiser state, inputs) plus what one step adds on top (``step_memory``; CUDA: the
    allocator's tensors, CPU: the resident set). Where that rise cannot be measured, the
    process's lifetime peak RSS, which every case shares (kind says which)."""
    if transient is not None:
        kind = "cuda-allocator" if device == "cuda" else "rss-per-case"
        return {"peak_mem_mb": round((max(resident, 0) + transient) / 2**20, 1), "peak_mem_kind": kind}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return {"peak_mem_mb": round(rss / scale, 1), "peak_mem_kind": "process-peak-rss"}


class _WithLoss(nn.Module):
    """Model + loss in one forward, the shape PopTorch's trainingModel wants (the loss marked
    with identity_loss so PopTorch knows which output to differentiate)."""

    def __init__(self, model: nn.Module, identity_loss):
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss()
        self.identity_loss = identity_loss

    def forward(self, images, targets):
        logits = self.model(images)
        return logits, self.identity_loss(self.loss(logits, targets), reduction="none")


def make_step(
    case: Case, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> Callable[[], None]:
    """A closure running one step of ``case.mode`` on the prepared inputs."""
    if case.device in ("ipu", "ipu-model"):
        return _poptorch_step(case, model, images, targets)
    runner = torch.compile(model) if case.compile else model
    if case.mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), autocast(case):
                runner(images)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    scaler = None
    if case.precision == "fp16" and case.device == "cuda":
        scaler = torch.cuda.amp.GradScaler()

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(case):
            loss = loss_fn(runner(images), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    train.optimizer = optimizer  # its state counts towards the case's memory
    return train


def _poptorch_step(case: Case, model: nn.Module, images, targets) -> Callable[[], None]:
    """ipu: real PopTorch (skipped when the SDK is absent); ipu-model: the emulator, whose rows
    are labelled emulated and only show that the path runs, never IPU speed."""
    import ipu_options

    if case.device == "ipu" and ipu_options.EMULATED:
        raise RuntimeError(
            f"PopTorch unavailable ({ipu_options.IMPORT_ERROR}); use --device "
            "ipu-model for the emulator or install the Poplar SDK"
        )
    poptorch = ipu_options.poptorch
    options = poptorch.Options()
    if case.precision != "fp32":
        model = model.half()
    if case.mode == "infer":
        executor = poptorch.inferenceModel(model.eval(), options)
        return lambda: executor(images)
    optimizer = poptorch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    executor = poptorch.trainingModel(_WithLoss(model.train(), poptorch.identity_loss), options, optimizer)

    def train() -> None:
        executor(images, targets)

    train.optimizer = optimizer
    return train


def prepare_inputs(case: Case):
    device = "cpu" if case.device in ("ipu", "ipu-model") else case.device
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(case.batch, 3, case.resolution, case.resolution, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (case.batch,), generator=generator)
    if case.device in ("ipu", "ipu-model") and case.precision != "fp32":
        images = images.half()
    images = images.to(device)
    if case.layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device)


def time_steps(step: Callable[[], None], device: str, warmup: int, steps: int) -> List[float]:
    """Seconds per step, each step synchronised so it is timed whole."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Prepared:
    """A case built once (model, inputs, step), so interleaved repeats reuse it."""

    def __init__(self, case: Case):
        self.case = case
        model = build(case)
        self.params = count_parameters(model)
        self.macs = count_macs(model, case.resolution)
        device = "cpu" if case.device in ("ipu", "ipu-model") else case.device
        model = model.to(device)
        if case.layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        if case.mode == "infer" and case.subject == OURS and not case.compile and device in ("cpu", "cuda"):
            model = fuse_for_inference(model)  # eager inference's explicit step (model/inference.py)
        self.images, self.targets = prepare_inputs(case)
        self.step = make_step(case, model, self.images, self.targets)
        self.model = model
        self.transient: Optional[int] = None  # bytes one step adds (run.py: step_memory)

    def resident(self) -> int:
        """Bytes this case keeps between steps, once a step has made gradients and optimiser state."""
        optimizer_state = getattr(getattr(self.step, "optimizer", None), "state", {})
        state = [t for s in optimizer_state.values() for t in s.values()]
        model = self.model
        return resident_bytes(
            [
                *model.parameters(),
                *(p.grad for p in model.parameters()),
                *model.buffers(),
                *state,
                self.images,
                self.targets,
            ]
        )


def summarise(
    case: Case, prepared: Prepared, times: List[float], peak_flops: Optional[float]
) -> Dict[str, object]:
    """Figures of one case from its step times. FLOPs = 2 × MACs; training = 3 × forward."""
    median = statistics.median(times)
    images_per_s = case.batch / median
    flops_per_image = 2 * prepared.macs * (3 if case.mode == "train" else 1)
    achieved = flops_per_image * images_per_s
    return {
        "steps": len(times),
        "step_ms_median": round(median * 1e3, 3),
        "step_ms_p90": round(percentile(times, 90) * 1e3, 3),
        "step_ms_mean": round(statistics.fmean(times) * 1e3, 3),
        "images_per_s": round(images_per_s, 2),
        "params": prepared.params,
        "gmacs": round(prepared.macs / 1e9, 4),
        "achieved_tflops": round(achieved / 1e12, 6),
        "peak_tflops": round(peak_flops / 1e12, 4) if peak_flops else None,
        "utilisation": round(achieved / peak_flops, 4) if peak_flops else None,
    }


def peak_uses_tf32(device: str, precision: str) -> bool:
    """An fp32 peak on CUDA runs its matmul in TF32 exactly when cuDNN's fp32 convolutions use
    TF32 (its default), so utilisation compares like with like; other precisions ignore TF32."""
    return device == "cuda" and precision == "fp32" and conv_tf32()


def measure_peak_flops(
    device: str, precision: str, size: Optional[int] = None, repeats: int = 3, tf32: Optional[bool] = None
) -> float:
    """The device's practical ceiling in ``precision``: best FLOP/s of a large square matmul.

    ``tf32``: run the matmul with cuBLAS TF32 on or off (default: ``peak_uses_tf32``); the flag
    is restored afterwards."""
    if device in ("ipu", "ipu-model"):
        return float("nan")
    if tf32 is None:
        tf32 = peak_uses_tf32(device, precision)
    size = size or (8192 if device == "cuda" else 1024)
    dtype = DTYPES[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with matmul_tf32(tf32):
        torch.matmul(a, b)
        synchronize(device)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
