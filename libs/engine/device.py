"""Where the model runs and in what number format: ``--device`` and ``--dtype``, checked and resolved.

``device``: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``auto``, ``float32``, ``bfloat16`` or ``float16``. ``auto`` is bfloat16 on a GPU that
runs it (float16 on one that does not) and, on a CPU, whichever of bfloat16 and float32 was measured
faster on that machine (``libs.engine.dtypechoice``). A device or dtype that cannot run is an error
here, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_HELP = "auto | cpu | cuda | cuda:N"


class EngineConfigError(ValueError):
    """A device or dtype that this machine cannot run."""


@dataclass(frozen=True)
class Placement:
    """The resolved device and dtype of a model, and why they were chosen (for the startup line)."""

    device: torch.device
    dtype: torch.dtype
    why: str

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def describe(self) -> str:
        return f"{self.device_name} {self.dtype_name} ({self.why})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_device(spec: str) -> torch.device | None:
    """``spec`` as a torch device, None for ``auto``; an error for anything but cpu / cuda / cuda:N."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return None
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        return torch.device(spec if ":" in spec else "cuda:0")
    raise EngineConfigError(f"unknown device {spec!r}: expected {DEVICE_HELP}")


def parse_dtype(spec: str) -> torch.dtype | None:
    """``spec`` as a torch dtype, None for ``auto``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return None
    if spec not in DTYPES:
        raise EngineConfigError(f"unknown dtype {spec!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[spec]


def resolve_device(spec: str) -> tuple[torch.device, str]:
    """(the device, why): ``auto`` takes the first GPU torch sees, else the CPU."""
    device = parse_device(spec)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        if gpus:
            return torch.device("cuda:0"), f"device auto: torch sees {gpus} GPU(s), the first is {torch.cuda.get_device_name(0)}"
        return torch.device("cpu"), "device auto: torch sees no GPU"
    if device.type == "cuda":
        if not gpus:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " is a CPU-only build")
            raise EngineConfigError(f"--device {spec}: torch sees no GPU ({build})")
        if device.index >= gpus:
            raise EngineConfigError(f"--device {spec}: torch sees {gpus} GPU(s), numbered 0 to {gpus - 1}")
        return device, f"device {spec}: {torch.cuda.get_device_name(device.index)}"
    return device, "device cpu"


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``EngineConfigError`` when ``device`` cannot run matmuls in ``dtype``."""
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise EngineConfigError(f"{torch.cuda.get_device_name(device.index)} does not run bfloat16; "
                                    "use --dtype float16 or float32")
        return
    try:
        a = torch.ones((8, 8), dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise EngineConfigError(f"{device} cannot run {dtype_name(dtype)}: {e}") from None


def resolve(device_spec: str, dtype_spec: str,
            cpu_auto: Callable[[], tuple[torch.dtype, str]] | None = None) -> Placement:
    """The placement for ``--device device_spec --dtype dtype_spec``.

    ``cpu_auto`` answers the dtype ``auto`` on a CPU: (dtype, why), typically the measured choice
    (``libs.engine.dtypechoice``); without it, float32."""
    device, why_device = resolve_device(device_spec)
    dtype = parse_dtype(dtype_spec)
    if dtype is not None:
        why_dtype = f"dtype {dtype_name(dtype)} as configured"
    elif device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            dtype, why_dtype = torch.bfloat16, "dtype auto: bfloat16 on a GPU"
        else:
            dtype, why_dtype = torch.float16, "dtype auto: float16, this GPU does not run bfloat16"
    elif cpu_auto is not None:
        dtype, why_dtype = cpu_auto()
    else:
        dtype, why_dtype = torch.float32, "dtype auto: float32, nothing measured"
    check_dtype(device, dtype)
    return Placement(device, dtype, f"{why_device}; {why_dtype}")
