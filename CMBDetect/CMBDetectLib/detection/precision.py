"""Which numeric precision runs the U-Net, and on what: `--precision auto|fp32|bf16|int8`.

| precision | engine (device)                 | how                                                                    |
|-----------|---------------------------------|------------------------------------------------------------------------|
| fp32      | onnxruntime (CPU), torch (CPU, CUDA) | the reference                                                     |
| bf16      | torch (CPU, CUDA)               | torch.autocast(bfloat16); on CPU oneDNN's bf16 kernels (ONNX Runtime's CPU provider has no bf16 Conv) |
| int8      | onnxruntime (CPU)               | static quantisation, QDQ, int8 weights per output channel, int8 activations with the ranges calibrated when the model was built (`cmbdetect quantize`) |
| fp16      | torch (CUDA)                    | torch.autocast(float16)                                                |

`auto`: on CUDA fp16; on CPU bf16 where the CPU has native bf16 (avx512_bf16 or amx_bf16 in
its flags), else fp32. int8 is used only when asked: it changes the network's numbers more
than bf16 does, and its speed-up was not measured on a CPU with VNNI. Asked for on a CPU
without the instructions (bf16 without avx512_bf16/amx_bf16, int8 without a VNNI or AMX int8
flag), it runs, but emulated and likely slower than fp32 (bf16 was ~140x slower on an AVX2-only
EPYC): the resolution says so, for the caller to warn once.

The CPU's flags come from /proc/cpuinfo (Linux). Elsewhere (macOS, Windows) no portable
source names bf16 support (torch.backends.cpu.get_cpu_capability() says AVX2/AVX512, not
bf16), so `auto` is fp32 there unless CMBDETECT_CPU_FLAGS names the flags. That variable
(space-separated flags) replaces the CPU's own everywhere: to pin a cluster of mixed CPUs to
one precision's decision, or to test. Torch-free: a process served by ONNX Runtime never
imports torch to decide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
CPU_FLAGS_ENV = "CMBDETECT_CPU_FLAGS"
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# On each device, the engines that have kernels for each precision (the table above).
ENGINES_FOR = {
    ("cpu", "fp32"): ("onnxruntime", "torch"),
    ("cpu", "bf16"): ("torch",),
    ("cpu", "int8"): ("onnxruntime",),
    ("cuda", "fp32"): ("torch",),
    ("cuda", "bf16"): ("torch",),
    ("cuda", "fp16"): ("torch",),
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags: CMBDETECT_CPU_FLAGS if set, else /proc/cpuinfo's first flags line; empty where neither exists."""
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(override.replace(",", " ").lower().split())
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, ARM
                    return frozenset(value.lower().split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what runs (`name`), what was asked, and whether it is emulated."""

    name: str
    asked: str
    emulated: bool = False
    reason: str = ""

    @property
    def warning(self) -> str:
        """One line for the user when the CPU lacks the instructions; empty otherwise."""
        if not self.emulated:
            return ""
        return (f"--precision {self.name}: this CPU has no native {self.name} instructions ({self.reason}); "
                "it runs emulated, likely slower than fp32")  # fmt: skip


def resolve_precision(asked: str, device_type: str, flags: frozenset[str] | None = None) -> Precision:
    """The precision `asked` for on `device_type` ("cpu" or "cuda"); ValueError where none runs it."""
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS[:4])}, not {asked!r}")
    if device_type == "cuda":
        name = "fp16" if asked == "auto" else asked
        if name == "int8":
            raise ValueError("int8 runs on the CPU here (ONNX Runtime); on CUDA use --precision auto (fp16), bf16 or fp32")
        return Precision(name, asked, reason="CUDA")
    if asked == "fp16":
        raise ValueError("fp16 runs on CUDA only; on the CPU use --precision auto, fp32, bf16 or int8")
    flags = cpu_flags() if flags is None else flags
    has_bf16 = sorted(flags & BF16_FLAGS)
    if asked == "auto":
        if has_bf16:
            return Precision("bf16", asked, reason=f"auto: the CPU has {', '.join(has_bf16)}")
        return Precision("fp32", asked, reason="auto: the CPU has neither avx512_bf16 nor amx_bf16")
    if asked == "bf16" and not has_bf16:
        return Precision("bf16", asked, True, "no avx512_bf16 or amx_bf16")
    if asked == "int8" and not flags & INT8_FLAGS:
        return Precision("int8", asked, True, "no avx512_vnni, avx_vnni or amx_int8")
    return Precision(asked, asked, reason="asked")


def engine_for(engine: str, device_type: str, precision: str) -> str:
    """The engine that runs `precision` on `device_type`: `auto` takes the first of the table's; a
    named engine without kernels for it is a ValueError saying which would."""
    able = ENGINES_FOR.get((device_type, precision))
    if not able:
        raise ValueError(f"no engine runs {precision} on {device_type}")
    if engine == "auto":
        return able[0]
    if engine not in able:
        raise ValueError(f"--engine {engine} has no {precision} kernels on {device_type}; use --engine {able[0]} (or auto)")
    return engine
