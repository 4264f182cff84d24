"""The benchmark names the host's CPU and its int8-relevant vector sets (loadtest/host.py)."""

from __future__ import annotations

from loadtest.host import CPUINFO, describe_cpu, host_cpu

AVX_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c hypervisor

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c hypervisor
"""

VNNI = """processor : 0
model name : Intel(R) Xeon(R) Platinum 8488C
flags : fpu sse avx avx2 avx512f avx512bw avx512_vnni avx_vnni amx_int8
"""


def test_a_cpu_without_avx2_says_so() -> None:
    assert describe_cpu(AVX_ONLY) == (
        "AMD EPYC; avx2 no, avx512f no, avx512_vnni no, avx_vnni no, amx_int8 no"
    )


def test_each_int8_flag_is_read_as_a_whole_word() -> None:
    # avx512f must not be found inside avx512fp16, nor avx2 inside an unrelated longer name.
    assert describe_cpu(VNNI) == (
        "Intel(R) Xeon(R) Platinum 8488C; avx2 yes, avx512f yes, avx512_vnni yes, avx_vnni yes, amx_int8 yes"
    )
    assert describe_cpu("model name : X\nflags : avx512fp16 avx2x amx_int8x\n") == (
        "X; avx2 no, avx512f no, avx512_vnni no, avx_vnni no, amx_int8 no"
    )


def test_a_cpuinfo_without_flags_gives_the_model_only() -> None:
    assert describe_cpu("processor : 0\nmodel name : ARMv8 Processor\n") == "ARMv8 Processor"
    assert describe_cpu("") == "unknown CPU"


def test_this_host_is_described_from_its_cpuinfo() -> None:
    if not CPUINFO.exists():
        assert host_cpu() == "unknown CPU (no /proc/cpuinfo)"
        return
    described = host_cpu()
    assert described == describe_cpu(CPUINFO.read_text())
    if "model name" in CPUINFO.read_text():
        assert not described.startswith("unknown")
