"""``amp: auto``: bf16 autocast only where the hardware computes bf16 natively."""

import platform
from pathlib import Path

import pytest
import torch

from tntvision.errors import InputError
from tntvision.utils import amp


@pytest.mark.parametrize(
    ("flags", "vendor", "machine", "want"),
    [
        ({"avx2", "fma"}, "AuthenticAMD", "x86_64", "none"),  # an AVX2-only EPYC: bf16 is emulated there
        ({"avx512f", "avx512bw"}, "GenuineIntel", "x86_64", "none"),  # AVX-512 without bf16 units
        ({"avx512f", "avx512_bf16"}, "AuthenticAMD", "x86_64", "bfloat16"),  # Zen 4
        ({"avx512f", "avx512_bf16"}, "GenuineIntel", "x86_64", "none"),  # Cooper Lake, AMX hidden: slower
        ({"avx512f", "amx_bf16", "amx_tile"}, "GenuineIntel", "x86_64", "bfloat16"),  # Sapphire Rapids
        ({"asimd", "bf16"}, "", "aarch64", "bfloat16"),
        ({"asimd"}, "", "aarch64", "none"),
    ],
)
def test_auto_picks_bf16_only_where_it_is_faster(monkeypatch, flags, vendor, machine, want):
    monkeypatch.setattr(amp, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(amp, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(amp.platform, "machine", lambda: machine)
    assert amp.resolve_amp("auto", torch.device("cpu")) == want


def test_explicit_names_are_kept_and_unknown_ones_refused():
    assert amp.resolve_amp("bfloat16", torch.device("cpu")) == "bfloat16"
    assert amp.resolve_amp("none", torch.device("cpu")) == "none"
    with pytest.raises(InputError):
        amp.resolve_amp("fp8", torch.device("cpu"))


def test_this_machines_answer_matches_its_cpuinfo():
    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.exists():
        pytest.skip("checked against x86 /proc/cpuinfo flags")
    words = info.read_text().split()
    native = "amx_bf16" in words or ("avx512_bf16" in words and "AuthenticAMD" in words)
    assert amp.native_bf16(torch.device("cpu")) == native
