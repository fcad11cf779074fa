"""Where the model runs: `--device auto|cpu|cuda[:N]` and `--dtype auto|float32|bfloat16|float16`, resolved once.

Usage::

    device = resolve_device("auto")            # cuda:0 when a GPU is visible, else cpu
    dtype = resolve_dtype("auto", device)      # bfloat16 on CUDA, float32 on the CPU (no bf16 units here)
    base = load_base_model(name, dtype=dtype); base.model.to(device)
    rm = RoutedModel(base, experts, router)   # routed buffers follow the base layers' device and dtype;
    rm.base.model.to(other)                   # ... and move with the model after attach

Everything routed (the stacks, prototypes, routing state, trace capture) lives on the base layers' device;
the trace is copied to the CPU once, when assembled. Tests honour LORA_EXPLORER_TEST_DEVICE (see `device_for_tests()`),
so `bench/gpu_check.sh` runs the unit tests on a GPU without changing them.
"""
from __future__ import annotations

import os

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TEST_DEVICE_ENV = "LORA_EXPLORER_TEST_DEVICE"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" -> a torch.device; a clear error for
    a GPU that is not there, instead of a failure deep inside the first matmul."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"Unknown device {name!r}: use {DEVICE_CHOICES}.") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"Unsupported device {name!r}: use {DEVICE_CHOICES}.")
    if not torch.cuda.is_available():
        raise ValueError(f"Device {name!r} asked for, but torch sees no CUDA GPU here (torch {torch.__version__}); "
                         "use --device cpu or auto.")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"Device {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible.")
    return torch.device("cuda", index)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (half the memory and the GPU's fast path), float32 on the CPU, where bf16 is slower
    on CPUs without bf16 units and rounding can flip near-ties in the top-k."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" (see `default_dtype`), "float32", "bfloat16" or "float16" (short forms fp32/bf16/fp16 too)."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use auto, float32, bfloat16 or float16.")
    return DTYPES[name]


def add_device_arguments(parser, default: str = "auto") -> None:
    """--device and --dtype, the same in every entry point (argparse)."""
    parser.add_argument("--device", default=default,
                        help=f"where the model runs: {DEVICE_CHOICES} (auto: a CUDA GPU when present). "
                             "Default: %(default)s")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16. "
                             "Default: %(default)s")


def device_for_tests() -> torch.device:
    """The device unit tests run on: $LORA_EXPLORER_TEST_DEVICE (e.g. cuda), else the CPU."""
    return resolve_device(os.environ.get(TEST_DEVICE_ENV, "cpu"))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (before reading a clock); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
