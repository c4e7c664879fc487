from pathlib import Path

import torch

from service import hardware


def test_engine_dtype_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(hardware, "bf16_native", lambda gpu: False)
    assert hardware.engine_dtype(None) == "float32"
    monkeypatch.setattr(hardware, "bf16_native", lambda gpu: True)
    assert hardware.engine_dtype(None) == "bfloat16"
    assert hardware.engine_dtype("float16") == "float16"  # a configured dtype wins


def test_cpu_bf16_read_from_the_cpu_flags(monkeypatch, tmp_path):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    real_path = Path

    def fake_path(name):
        return cpuinfo if name == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(hardware, "Path", fake_path)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert hardware.bf16_native(gpu=False) is False
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert hardware.bf16_native(gpu=False) is True
