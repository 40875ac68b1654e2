"""PEFT vs gomerge on one `svd` merge: three rank-16 adapters on a 4096 x 4096 module, timed in one run.

PEFT is timed on its `add_weighted_adapter` call alone (model and adapters already loaded); gomerge disk to disk
(read the three adapter directories, merge, write the merged adapter). Both results are compared through B'A'.

Usage: python benchmarks/bench_svd.py [--size 4096] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import gomerge


class OneLinear(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(size, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_adapters(root: str, size: int, rank: int, n: int = 3) -> list[str]:
    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(OneLinear(size), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"],
                                                           init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        d = os.path.join(root, f"adapter{i}")
        model.save_pretrained(d)
        dirs.append(d)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    weights = [2.0, 1.0, 1.0]
    with tempfile.TemporaryDirectory() as root:
        dirs = make_adapters(root, args.size, args.rank)

        model = PeftModel.from_pretrained(OneLinear(args.size), dirs[0], adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            model.load_adapter(d, adapter_name=f"a{i}")
        t0 = time.perf_counter()
        model.add_weighted_adapter(["a0", "a1", "a2"], weights, "merged", combination_type="svd")
        t_peft = time.perf_counter() - t0
        layer = model.base_model.model.proj
        d_peft = (layer.lora_B["merged"].weight @ layer.lora_A["merged"].weight).detach().double().numpy()

        out = os.path.join(root, "merged")
        t0 = time.perf_counter()
        gomerge.add_weighted_adapter(dirs, weights, "merged", "svd", output_dir=out)
        t_go = time.perf_counter() - t0
        from safetensors.numpy import load_file

        t = load_file(os.path.join(out, "adapter_model.safetensors"))
        a = t["base_model.model.proj.lora_A.weight"].astype(np.float64)
        b = t["base_model.model.proj.lora_B.weight"].astype(np.float64)
        rel = float(np.abs(b @ a - d_peft).max() / np.abs(d_peft).max())

    row = {
        "scenario": f"svd, 3 x rank {args.rank}, {args.size}x{args.size}",
        "peft_call_s": round(t_peft, 4),
        "gomerge_disk_to_disk_s": round(t_go, 4),
        "speedup": round(t_peft / t_go, 1),
        "max_rel_diff_BA": rel,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} threads "
                   f"{torch.get_num_threads()}",
    }
    print(f"{'scenario':40s} {'PEFT call':>10s} {'gomerge':>10s} {'speedup':>8s} {'rel diff':>10s}")
    print(f"{row['scenario']:40s} {t_peft:9.3f}s {t_go:9.3f}s {t_peft / t_go:7.1f}x {rel:10.2e}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
