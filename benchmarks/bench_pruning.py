"""PEFT vs gomerge for the pruning merges, timed in one run.

- `ties` at density 0.2, weights [2, 1, 1], on three rank-8 adapters of TinyLlama-1.1B's shapes (all linear
  modules of 22 layers): PEFT's `add_weighted_adapter` call alone against gomerge disk to disk and against the
  patched method (`gomerge.patch_peft()`) on the same loaded model.
- `ties_svd` at density 0.2 on one 4096 x 4096 and one 4096 x 11008 module, three rank-16 adapters: PEFT's call (a dense SVD) against
  gomerge disk to disk, and the reconstruction error of gomerge's factors against the optimal rank-k error (from
  the singular values of PEFT's own SVD of the same matrix).

Usage: python benchmarks/bench_pruning.py [--skip-tinyllama] [--skip-ties-svd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file

import gomerge
from common import LLAMA_LINEAR, Linear, load_peft, save_adapters, timer, tinyllama


def bench_ties_tinyllama(root: str) -> dict:
    dirs = save_adapters(tinyllama, root, [8, 8, 8], LLAMA_LINEAR)
    model = load_peft(tinyllama, dirs)
    t: dict = {}
    with timer(t, "peft"):
        model.add_weighted_adapter(["a0", "a1", "a2"], [2.0, 1.0, 1.0], "merged", "ties", density=0.2)
    with timer(t, "gomerge"):
        res = gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "merged", "ties", density=0.2,
                                           output_dir=os.path.join(root, "merged"), progress=False)
    layer = model.base_model.model.model.layers[10].mlp.down_proj
    peft_a = layer.lora_A["merged"].weight.detach().clone()
    # the drop-in on the same loaded model: PEFT's merged adapter removed, then the patched method
    model.delete_adapter("merged")
    with gomerge.patch_peft():
        with timer(t, "patched"):
            model.add_weighted_adapter(["a0", "a1", "a2"], [2.0, 1.0, 1.0], "merged", "ties", density=0.2)
    # agreement on one module
    ours = load_file(os.path.join(root, "merged", "adapter_model.safetensors"))
    key = "base_model.model.model.layers.10.mlp.down_proj.lora_A.weight"
    diff = float(np.abs(ours[key] - peft_a.numpy()).max())
    diff_patched = float((layer.lora_A["merged"].weight.detach() - peft_a).abs().max())
    return {"scenario": f"ties d=0.2, 3 x r8, TinyLlama shapes ({res.modules} modules)",
            "peft_s": t["peft"], "gomerge_s": t["gomerge"], "patched_s": t["patched"],
            "check": f"max |A'-A'_peft| = {diff:.1e} (files), {diff_patched:.1e} (patched)"}


def bench_ties_svd(root: str, fan_in: int, fan_out: int) -> dict:
    dirs = save_adapters(lambda: Linear(fan_in, fan_out), root, [16, 16, 16], ["proj"])
    model = load_peft(lambda: Linear(fan_in, fan_out), dirs)
    captured = {}
    original = torch.linalg.svd

    def svd(a, *args, **kwargs):
        u, s, vh = original(a, *args, **kwargs)
        captured["D"], captured["S"] = a.detach().clone(), s.detach().double().numpy()
        return u, s, vh

    t: dict = {}
    torch.linalg.svd = svd
    try:
        with timer(t, "peft"):
            model.add_weighted_adapter(["a0", "a1", "a2"], [2.0, 1.0, 1.0], "merged", "ties_svd", density=0.2)
    finally:
        torch.linalg.svd = original
    with timer(t, "gomerge"):
        gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "merged", "ties_svd", density=0.2,
                                     output_dir=os.path.join(root, "merged"), progress=False)
    ours = load_file(os.path.join(root, "merged", "adapter_model.safetensors"))
    a = torch.from_numpy(ours["base_model.model.proj.lora_A.weight"]).double()
    b = torch.from_numpy(ours["base_model.model.proj.lora_B.weight"]).double()
    k = a.shape[0]
    err = float(torch.linalg.norm(captured["D"].double() - b @ a))  # float64: a float32 norm is too coarse here
    optimal = float(np.sqrt(np.sum(captured["S"][k:] ** 2)))
    return {"scenario": f"ties_svd d=0.2, 3 x r16, one {fan_out}x{fan_in} module", "peft_s": t["peft"],
            "gomerge_s": t["gomerge"], "check": f"error/optimal - 1 = {err / optimal - 1:.1e}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tinyllama", action="store_true")
    ap.add_argument("--skip-ties-svd", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        if not args.skip_tinyllama:
            rows.append(bench_ties_tinyllama(os.path.join(root, "tiny")))
        if not args.skip_ties_svd:
            rows.append(bench_ties_svd(os.path.join(root, "svd4096"), 4096, 4096))
            rows.append(bench_ties_svd(os.path.join(root, "svd11008"), 11008, 4096))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'scenario':58s} {'PEFT call':>10s} {'gomerge':>9s} {'speedup':>8s} {'patched':>9s} {'speedup':>8s}  check")
    for r in rows:
        r["speedup"] = r["peft_s"] / r["gomerge_s"]
        patched = (f"{r['patched_s']:8.3f}s {r['peft_s'] / r['patched_s']:7.1f}x" if "patched_s" in r
                   else f"{'-':>9s} {'-':>8s}")
        print(f"{r['scenario']:58s} {r['peft_s']:9.3f}s {r['gomerge_s']:8.3f}s {r['speedup']:7.1f}x {patched}  "
              f"{r['check']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
