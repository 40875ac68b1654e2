"""The machine behind a benchmark run, recorded in every row: the CPU (vendor and model, from /proc/cpuinfo), the
engine's kernel set, torch's BLAS and LAPACK (threadpoolctl and ``torch.__config__``), and the machine's peak
fused multiply-add rate per kernel set (the engine's own microbenchmark), with the rate of the engine's float32
matrix product on E1's sketch shape next to it.

A ratio against a torch peer says as much about the CPU vendor and torch's BLAS as about gomerge (MKL is fast on
Intel and slow elsewhere); the peak rate is the absolute yardstick measured in the same run.

``python benchmarks/machine.py`` prints the description as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
from typing import Any

from gomerge import _native

# E1's sketch products: Y^T D with l = 64 + 20 sketch columns (extract.Oversample) and D of TinyLlama's MLP shape
# (5632 x 2048)
E1_GEMM = (84, 2048, 5632)


def cpu() -> dict[str, Any]:
    """The CPU's vendor, model, logical cores and vector features, from /proc/cpuinfo (or ``platform`` elsewhere)."""
    info: dict[str, Any] = {"vendor": "", "model": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info["vendor"] = fields.get("vendor_id") or fields.get("CPU implementer", "")
    info["model"] = fields.get("model name") or fields.get("CPU part", info["model"])
    flags = set((fields.get("flags") or fields.get("Features", "")).split())
    info["features"] = sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "asimd", "sve"})
    mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, flags=re.M)
    if mhz:
        info["mhz"] = float(mhz[0])
    return info


def torch_blas() -> dict[str, Any]:
    """torch's BLAS and LAPACK: the libraries threadpoolctl finds loaded (with their threads), and the BLAS, LAPACK
    and CPU capability lines of ``torch.__config__.show()``."""
    import torch
    from threadpoolctl import threadpool_info

    torch.ones(2, 2) @ torch.ones(2, 2)  # loads the BLAS
    config = torch.__config__.show()
    lines = [
        line.strip()
        for line in config.splitlines()
        if re.search(r"BLAS|LAPACK|CPU capability|MKL|OpenMP", line) and "Build settings" not in line
    ]
    settings = {k: v for k, v in re.findall(r"(BLAS_INFO|LAPACK_INFO|USE_MKL|USE_OPENMP)=(\w+)", config)}
    pools = [
        {k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads", "architecture", "filepath")}
        for p in threadpool_info()
    ]
    return {"config": lines, "settings": settings, "threadpools": pools}


def rates(seconds: float = 0.25) -> dict[str, Any]:
    """The engine's peak FMA rates and its float32 product's rate on E1's shape, for each kernel set this CPU runs
    (GFLOP/s; see gomerge._native.kernel_rates)."""
    return _native.kernel_rates(seconds=seconds, gemm=E1_GEMM)


def describe(seconds: float = 0.25) -> dict[str, Any]:
    """Everything a row records about the machine."""
    info = _native.kernel_info()
    return {"cpu": cpu(), "kernels": info["in_use"], "torch": torch_blas(), "rates": rates(seconds)}


def row_fields(m: dict[str, Any]) -> dict[str, Any]:
    """The fields added to each row of a run: CPU, kernel set, torch's BLAS/LAPACK, and the in-use set's peak
    float32 FMA rate on all cores and its product's rate (GFLOP/s per CPU-second of each thread, which does not
    depend on other jobs sharing the cores; the wall-clock figures are in the run's machine record)."""
    r = m["rates"]["sets"][m["kernels"]]
    blas = m["torch"]["settings"]
    return {
        "cpu": f"{m['cpu']['vendor']} {m['cpu']['model']}".strip(),
        "kernel_set": m["kernels"],
        "torch_blas": f"BLAS {blas.get('BLAS_INFO', '?')}, LAPACK {blas.get('LAPACK_INFO', '?')}",
        "peak_fma32_gflops": r["fma32_all_cores"]["cpu"],
        "peak_fma64_gflops": r["fma64_all_cores"]["cpu"],
        "gemm32_gflops": r.get("gemm32_all_cores", {}).get("cpu"),
    }


def _owner(path: str) -> str:
    """The package whose folder holds a loaded library (numpy's OpenBLAS is not torch's BLAS)."""
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".libs").split("-")[0]
    return os.path.basename(path)


def summary(m: dict[str, Any]) -> str:
    """One line for the results table: which machine the figures come from."""
    f = row_fields(m)
    pools = ", ".join(
        f"{_owner(p['filepath'])}'s {p['internal_api']} {p['version']}"
        for p in m["torch"]["threadpools"]
        if p.get("user_api") == "blas"
    )
    rest = f"; peak FMA {f['peak_fma32_gflops']:.0f} GFLOP/s float32, {f['peak_fma64_gflops']:.0f} float64"
    if f["gemm32_gflops"]:
        rest += f", gomerge's float32 product {f['gemm32_gflops']:.0f} GFLOP/s on E1's shape"
    return (
        f"CPU {f['cpu']} ({m['cpu']['cores']} logical cores), gomerge kernels {f['kernel_set']}, torch "
        f"{f['torch_blas']}{' (loaded BLAS: ' + pools + ')' if pools else ''}{rest} (per core-second, all cores)"
    )


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
