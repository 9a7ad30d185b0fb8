from types import SimpleNamespace

import pytest

import kvray
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import get_gpu, match_gpu


@pytest.mark.parametrize(
    ("nvml", "spec"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB-SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB-SXM"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB-PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA GeForce RTX 3090", "RTX-3090"),
        ("h100-sxm", "H100-SXM"),
        ("A100", "A100-40GB-SXM"),
    ],
)
def test_nvml_names_match_forgivingly(nvml, spec):
    assert match_gpu(nvml).name == spec


def test_unknown_gpu_lists_known_names():
    assert match_gpu("Tesla K80") is None
    with pytest.raises(KvrayInputError, match="known: A100-40GB-SXM"):
        get_gpu("Z100")


def test_check_oom_risk_levels_and_fields():
    low = kvray.check_oom_risk("facebook/opt-1.3b", concurrency=1, seq_len=512, gpu="H100-SXM")
    high = kvray.check_oom_risk("facebook/opt-1.3b", concurrency=64, seq_len=4096, gpu="L4")
    assert low.risk_level == "low" and high.risk_level == "high"
    for key in ("weights_gb", "kv_gb", "activation_gb", "total_estimated_gb", "available_gb", "max_concurrency"):
        assert key in high.to_dict()  # kvray check --json's keys
    assert high.available_gb == pytest.approx(23_034 / 1024)  # what nvidia-smi reports for an L4: 23,034 MiB
    # KV: 64 × 4096 tokens × 196,608 B = 48 GiB exactly.
    assert high.kv_gb == pytest.approx(48.0)
    assert 0 < high.max_concurrency < 64 and high.recommendations
    assert any("reduce concurrency" in r for r in high.recommendations)
    # max_concurrency really is the boundary: it fits below the medium line, one more does not.
    at_max = kvray.check_oom_risk("facebook/opt-1.3b", high.max_concurrency, 4096, gpu="L4")
    over = kvray.check_oom_risk("facebook/opt-1.3b", high.max_concurrency + 1, 4096, gpu="L4")
    assert at_max.fraction_of_available <= 0.9 < over.fraction_of_available


def test_memory_is_linear_in_concurrency():
    a = kvray.check_oom_risk("gpt2", 2, 1000, gpu="L4")
    b = kvray.check_oom_risk("gpt2", 4, 1000, gpu="L4")
    assert b.kv_gb == pytest.approx(2 * a.kv_gb)


def test_no_gpu_falls_back_to_ram(monkeypatch):
    import psutil

    from kvray.hardware import env
    from kvray.hardware.env import GpuInfo

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=12 * 2**30, total=16 * 2**30))
    monkeypatch.setattr(env, "nvml_gpus", lambda: ([], None, "no NVIDIA driver"))
    risk = kvray.check_oom_risk("gpt2", 1, 128)
    assert risk.device == "cpu"
    assert risk.available_gb == pytest.approx(12.0)  # free RAM, not total
    # With a GPU, its NVML total is what is available, whatever the RAM.
    l4 = GpuInfo(index=0, name="NVIDIA L4", memory_bytes=23_034 * 2**20)
    monkeypatch.setattr(env, "nvml_gpus", lambda: ([l4], "12.4", None))
    risk = kvray.check_oom_risk("gpt2", 1, 128)
    assert risk.device == "NVIDIA L4" and risk.available_gb == pytest.approx(23_034 / 1024)


# What nvidia-smi reports as memory.total (MiB): the datacenter Ada cards keep ECC on by default, which
# reserves 1/16 of GDDR6 (24,576 × 15/16 = 23,040; 49,152 × 15/16 = 46,080) and a few MiB more.
@pytest.mark.parametrize(
    ("gpu", "mib"),
    [
        ("L4", 23_034),
        ("L40S", 46_068),
        ("H100-SXM", 81_559),
        ("H200", 143_771),
        ("RTX-4090", 24_564),
        ("A100-80GB-SXM", 81_920),
        ("A100-40GB-SXM", 40_960),
    ],
)
def test_gpu_memory_is_what_the_driver_reports(gpu, mib):
    assert get_gpu(gpu).memory_bytes == mib * 2**20
