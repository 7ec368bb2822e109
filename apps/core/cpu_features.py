"""What the processor computes natively, read from its flags without starting
TensorFlow: whether bfloat16 arithmetic runs in hardware, which decides
`--mixed-precision auto` on a CPU (`engine.choose_precision`).

oneDNN, which TensorFlow runs on x86 CPUs, computes matmuls and convolutions
in bfloat16 with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later) or AMX
(Intel Sapphire Rapids and later). There, mixed_bfloat16 trained ResNet-50
1.49x faster than float32 and `classify train --model resnet50` 1.53x (issue
28, on an AMD EPYC with avx512_bf16); without them bfloat16 is emulated and
slower than float32.
"""

import dataclasses
import os

# Linux lists each logical processor's flags there; macOS and Windows have no such file.
# DLSUITE_CPUINFO names another file: the test suite pins float32 with one, so that its
# float32-measured thresholds hold on every CI machine (bfloat16 has tests of its own).
CPUINFO = os.environ.get("DLSUITE_CPUINFO", "/proc/cpuinfo")
# The /proc/cpuinfo flags under which oneDNN computes bfloat16 in hardware:
# AVX512-BF16's dot products, and AMX's bfloat16 tile multiply (amx_tile names only the tile
# registers; Sapphire Rapids lists avx512_bf16 as well).
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Bfloat16:
    """Whether this CPU computes bfloat16 natively, and why we think so.

    Attributes:
        native: True, False, or None where the processor's flags cannot be read.
        why: the evidence, for people and config.json: "this CPU computes
            bfloat16 natively (avx512_bf16)".
    """

    native: bool | None
    why: str


def flags(cpuinfo=None):
    """The flags every processor of /proc/cpuinfo lists (x86 "flags", Arm
    "Features"), as a frozenset.

    Args:
        cpuinfo: the file to read (tests pass a fake one); default CPUINFO.

    Raises:
        OSError: the file cannot be read (not Linux, or /proc not mounted).
    """
    lists = []
    with open(cpuinfo or CPUINFO, encoding="utf-8", errors="replace") as file:
        for line in file:
            key, colon, value = line.partition(":")
            if colon and key.strip() in ("flags", "Features"):
                lists.append(set(value.split()))
    # A flag counts only if every processor has it: a thread scheduled on one without would emulate.
    return frozenset(set.intersection(*lists)) if lists else frozenset()


def bfloat16(cpuinfo=None):
    """Whether this CPU computes bfloat16 natively, from its flags (BFLOAT16_FLAGS).

    Args:
        cpuinfo: the file to read instead of /proc/cpuinfo (tests).

    Returns:
        A `Bfloat16`; `native` is None where the flags cannot be read (macOS,
        Windows, a container without /proc): a caller then keeps float32.
    """
    path = cpuinfo or CPUINFO
    try:
        found = flags(path)
    except OSError as error:
        return Bfloat16(None, f"whether this CPU computes bfloat16 natively is unknown ({path}: "
                              f"{error.strerror or error})")
    if not found:
        return Bfloat16(None, f"whether this CPU computes bfloat16 natively is unknown (no flags in {path})")
    native = [flag for flag in BFLOAT16_FLAGS if flag in found]
    if native:
        return Bfloat16(True, f"this CPU computes bfloat16 natively ({', '.join(native)})")
    return Bfloat16(False, f"this CPU has no native bfloat16 (no {' or '.join(BFLOAT16_FLAGS)} flag)")
