"""The targets of extraction and the SVD family at BLAS speed (E1, S2 ``ties_svd``, S3 ``svd``), checked against a
run's rows, and the note that says which machine each row comes from (machine.py records it in every row)."""

from __future__ import annotations

import re

# S2 ties_svd before the blocked matrix product (seconds, gomerge, the committed rows of the developers' machine:
# x86_64, 2 cores): the "2x faster than today" target compares with them
S2_TIES_SVD_BEFORE = {"4096x4096": 0.401, "11008x4096": 0.867}
# E1's worst module error may exceed mergekit's by at most this factor
E1_ERROR_RATIO = 1.001
# S3 svd: at most this many seconds per module
S3_SVD_PER_MODULE = 0.5
# E1's products: at least this fraction of the machine's peak float32 FMA rate
E1_PEAK_FRACTION = 0.5


def _shape(r: dict) -> str:
    return r["shapes"].split(",")[0].removeprefix("one ").removesuffix(" module")


def targets(rows: list) -> list[tuple[str, str, bool, str]]:
    """(target, measured, met, why) for each of these targets that the rows measure."""
    out = []
    for r in rows:
        if r["scenario"] == "E1":
            ratio = r["peft"] / r["gomerge"]
            out.append(
                (
                    f"E1 >= 10x mergekit-extract-lora with error <= {E1_ERROR_RATIO}x mergekit's on every module "
                    f"(worst {r['error_ratio_max']:.4f}x)",
                    f"{ratio:.1f}x",
                    ratio >= 10 and r["error_ratio_max"] <= E1_ERROR_RATIO,
                    "",
                )
            )
            peak, gemm = r.get("peak_fma32_gflops"), r.get("gemm32_gflops")
            if peak and gemm:
                out.append(
                    (
                        f"E1's products >= {E1_PEAK_FRACTION:.0%} of the peak float32 FMA rate "
                        f"({peak:.0f} GFLOP/s per core-second, all cores)",
                        f"{gemm:.0f} GFLOP/s = {gemm / peak:.0%} (end to end {r['gflops_per_s']:.0f} GFLOP/s wall)",
                        gemm >= E1_PEAK_FRACTION * peak,
                        "",
                    )
                )
        if r["scenario"] == "S2" and r["method"] == "ties_svd" and _shape(r) in S2_TIES_SVD_BEFORE:
            before = S2_TIES_SVD_BEFORE[_shape(r)]
            out.append(
                (
                    f"S2 ties_svd {_shape(r)} >= 2x faster than before ({before:.2f} s)",
                    f"{before / r['gomerge']:.1f}x",
                    r["gomerge"] <= before / 2,
                    "",
                )
            )
        if r["scenario"] == "S3" and r["method"] == "svd":
            layers = int(re.search(r"(\d+) layers", r["shapes"]).group(1))
            per = r["gomerge"] / (7 * layers)
            out.append((f"S3 svd <= {S3_SVD_PER_MODULE} s per module", f"{per:.2f} s", per <= S3_SVD_PER_MODULE, ""))
    return out


def machines_note(rows: list) -> list[str]:
    """Which machine each row's figures come from (rows from runs before machine.py have no record)."""
    by: dict[str, list[str]] = {}
    for r in rows:
        key = (
            f"{r['cpu']}, kernels {r['kernel_set']}, torch {r['torch_blas']}, peak FMA {r['peak_fma32_gflops']:.0f} "
            f"GFLOP/s float32 / {r['peak_fma64_gflops']:.0f} float64 (per core-second, all cores)"
            if r.get("cpu")
            else "not recorded (a run before the machine record)"
        )
        by.setdefault(key, []).append(f"{r['scenario']} {r['method']}")
    if len(by) <= 1 and not any(r.get("cpu") for r in rows):
        return []
    return ["", "Rows by machine:", *(f"- {k}: {', '.join(v)}" for k, v in by.items())]
