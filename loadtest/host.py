"""What a benchmark's figures depend on besides the code: the host's CPU model and the vector
instructions ONNX Runtime's INT8 kernels can use. The same build ran its INT8 encoder at half the
speed on session 14's host as on session 13's, which moves every ratio to the ceiling (README,
Benchmark); session 13's CPU was not recorded, so why is not known."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# x86 flags as Linux names them: 256-bit integer SIMD, 512-bit, the two int8 dot-product sets, and
# Intel's int8 matrix tiles.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def describe_cpu(cpuinfo: str) -> str:
    """'<model>; avx2 yes, avx512f no, ...' from the text of /proc/cpuinfo (its first CPU)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: they agree
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", "unknown CPU")
    if "flags" not in fields:
        return model
    flags = set(fields["flags"].split())
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in INT8_FLAGS)
    return f"{model}; {present}"


def host_cpu() -> str:
    try:
        return describe_cpu(CPUINFO.read_text())
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
