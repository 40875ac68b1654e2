"""gomerge against PEFT, side by side in one process, on the same inputs (`make bench`).

Scenarios (CPU, all cores):

- S1, the PEFT guide's example: three rank-8 adapters of TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632,
  22 layers, 32 heads, 4 KV heads, q/k/v/o/gate/up/down), weights [2, 1, 1]: `ties` (density 0.2), `svd`, `cat`,
  `linear`, `dare_ties`. Times: PEFT's `add_weighted_adapter` call alone (model and adapters loaded), PEFT end to
  end (load the base model from disk, load the adapters, merge, save), gomerge disk to disk, and the patched drop-in
  call. PEFT's dense `svd` takes minutes per layer here: it is timed on one layer and scaled by 22 (marked "est.").
  Then `ties` once per kernel set this CPU runs (portable, AVX2, AVX-512; each in a child process that forces the
  set with GOMERGE_KERNELS), against the same PEFT call.
- S2, big modules: three rank-16 adapters on Llama-7B-shaped modules (4096 x 4096 and 4096 x 11008): `svd` and
  `ties_svd` (density 0.2), per module.
- S3, scale: eight rank-64 adapters on every linear module of a Llama-7B shape (32 layers): `ties` (density 0.2)
  and `svd` (on 2 layers by default: its exact SVDs of rank-512 sums are compute-bound), gomerge only (in a child
  process, for its peak RSS), against the floor.
- S4, half precision: S1's `ties` with BF16 and F16 adapters against F32, gomerge only.
- R1, rank control: `gomerge.resize` of one of S3's rank-64 adapters (32 layers x 7 modules) to rank 16, against
  torch's dense truncation (B A formed, `torch.linalg.svd`, truncated), timed on one layer and scaled by 32.
- F1, fuse: one rank-16 all-linear adapter into a TinyLlama-shaped bf16 base (vocabulary 32000, 2.2 GB, one
  shard), gomerge's `fuse` next to PEFT end to end (load the base, load the adapter, `merge_and_unload`,
  `save_pretrained`) and `cp -r` of the base folder, each in a child process and each followed by `sync` (the
  writes are what the disk pays for), with its peak RSS. F2: the same on a Llama-7B-shaped base (13.5 GB, 3
  shards; `--scenarios F2`, not in the default set). The synthetic bases are made once and cached.
- M1, methods beyond PEFT: breadcrumbs, breadcrumbs_ties, della and della_linear on S2's shapes, gomerge (disk to
  disk, in a child process for its peak RSS, best of 2) next to mergekit's `merge_tensors` on the same dense
  updates; iso_c, tsv and iso_cts next to fusion-bench's definitions on dense updates (full SVDs, restated in
  tests/test_span_methods.py); knots_* and core_* next to KnOTS's and core-space-merging's code restated in torch
  (tests/test_knots_core_methods.py). The "PEFT call" column holds the peer's time. The dense-SVD peers (KnOTS,
  fusion-bench's) run only with SLOW (benchmarks/slow.py); other runs keep their last measured rows.
- E1, extraction: `gomerge.extract` at rank 64 from a TinyLlama-shaped bf16 fine-tune (synthetic, cached), next to
  mergekit-extract-lora on the same folders, with each module's error from both outputs (`--e1-layers`, 2 by default:
  mergekit's dense SVDs take about 3 minutes per TinyLlama layer here).

- G1, export to GGUF: a rank-64 all-linear Llama-7B-shaped adapter to GGUF f16 by `gomerge export --to gguf` and by
  llama.cpp's convert_lora_to_gguf.py (the "PEFT call" column), with peak RSS, and both files' logits on a tiny llama
  in llama-cpp-python (benchmarks/gguf_export.py; details in results/g1.md).

Every row states the bytes read and written and the floor: those bytes divided by the memory bandwidth measured at
the start of the run (a large memory copy). Rows also give this machine's measured lower bounds (benchmarks/floor):
reading the inputs plus writing the output, and a skeleton merge that streams them through one sum. Times follow
an untimed warm-up run and an os.sync(): the best of 5 runs for gomerge (about 25 ms each on S1), of 3 for PEFT's
call and the drop-in (0.1-0.5 s), a single run for PEFT end to end and for PEFT's dense SVDs. S3 runs gomerge in
a child process, for its peak RSS (the best of 2 runs for ties, one for svd), after reading the inputs once so
that both it and the floors find them in the page cache. Results go to benchmarks/results/ (JSON, Markdown table,
PNG chart), with the targets of the issue checked against the run.

- X1, mixture-of-experts adapters: benchmarks/moe.py (`--scenarios X1`, `--x1-layers N`).
- Q1, Q2: fusing into quantized bases (NF4 with PEFT + bitsandbytes, FP8 blockwise with `cp -r`), in
  benchmarks/quant.py (its own table: results/quant.md).

Usage: python benchmarks/run.py [--scenarios S1,S2,S3,S4,R1,M1,F1,F2,E1,X1,G1,Q1,Q2,SLOW] [--s3-layers N]
    [--s1-methods ties,svd,...] [--m1-methods knots_ties,core_tsv,...] [--e1-layers N] [--q-layers N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import dropin
import machine as machine_record
import numpy as np
import slow
import speed_targets
import torch
from common import LLAMA_LINEAR, Linear, llama, load_peft, save_adapters, tinyllama
from gguf_export import g1
from peft import PeftModel
from safetensors.numpy import save_file

import gomerge
import gomerge.peft as gp

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(HERE, ".cache")
# `make bench`'s scenarios; F2 (13.5 GB) and SLOW run on request
DEFAULT_SCENARIOS = ("S1", "S2", "S3", "S4", "R1", "M1", "F1", "E1", "X1", "G1", "Q1", "Q2")
MiB = 1 << 20


def bandwidth() -> float:
    """Bytes per second of a large memory copy (read + write counted), best of five."""
    src = np.ones(64 * MiB, dtype=np.float32)  # 256 MiB
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def warm_page_cache(*dirs: str) -> None:
    """Reads the files of `dirs` once, so that every contender that follows finds them in the page cache."""
    for d in dirs:
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    while f.read(64 << 20):
                        pass


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def timed(fn, *args, **kwargs) -> float:
    """Seconds of one call. Before it, untimed: a garbage collection, and os.sync() so that the call does not
    share the disk and the CPUs with the write-back of files written before it (the setup's base model and
    adapters, PEFT's unsynced saves)."""
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def best(n: int, fn, *args, before=None, after=None, **kwargs) -> float:
    """The best of n timed runs after an untimed warm-up run; before() and after() run around each, untimed."""
    times = []
    for i in range(n + 1):
        if before is not None:
            before()
        t = timed(fn, *args, **kwargs)
        if i > 0:
            times.append(t)
        if after is not None:
            after()
    return min(times)


def gomerge_best(n: int, out: str, *args, **kwargs) -> float:
    """The best of n disk-to-disk gomerge merges after an untimed warm-up merge, each into a new output directory
    (removing the last one, which costs the file system more than writing it, is not timed)."""
    return best(
        n,
        gomerge.add_weighted_adapter,
        *args,
        before=lambda: shutil.rmtree(out, ignore_errors=True),
        output_dir=out,
        progress=False,
        **kwargs,
    )


def floors(dirs: list[str], out_bytes: int, runs: int = 5) -> dict:
    """This machine's lower bounds for a merge of these adapters (benchmarks/floor, in Go): reading the inputs,
    writing the output (no fsync), and a skeleton merge that streams the inputs through the cheapest combination
    (one sum) into the output. No merge method can beat the skeleton."""
    exe = os.path.join(CACHE, "floor")
    if not os.path.exists(exe):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(["go", "build", "-o", exe, "./benchmarks/floor"], cwd=os.path.dirname(HERE), check=True)
    files = [os.path.join(d, "adapter_model.safetensors") for d in dirs]
    proc = subprocess.run(
        [exe, "-out", str(out_bytes), "-runs", str(runs), *files], capture_output=True, text=True, check=True
    )
    got = json.loads(proc.stdout)
    return dict(
        io_floor=got["read_s"] + got["write_s"], skeleton=got["skeleton_s"], skeleton_fsync=got["skeleton_fsync_s"]
    )


def gomerge_child(
    dirs: list[str], ctype: str, out: str, weights: list[float] | None = None, **kw
) -> tuple[float, float]:
    """Runs one gomerge merge in a child process (weights 1 unless given): (seconds, peak RSS in MiB)."""
    weights = weights or [1.0] * len(dirs)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent into the exec'd child
    code = (
        f"import gomerge, json; r = gomerge.add_weighted_adapter({dirs!r}, {weights!r}, "
        f"'m', {ctype!r}, output_dir={out!r}, overwrite=True, progress=False, **{kw!r}); "
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
        "print(json.dumps([r.seconds, hwm / 1024]))"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(HERE), "python"))
    os.sync()  # as in timed()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    seconds, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, peak


def gomerge_kernels_child(
    kernels: str, n: int, dirs: list[str], weights: list[float], ctype: str, out: str, **kw
) -> float:
    """The best of n disk-to-disk gomerge merges, after a warm-up, in a child process whose engine runs the given
    kernel set (GOMERGE_KERNELS; the set is chosen once per process)."""
    code = f"""
import gc, json, os, shutil, sys, time
sys.path.insert(0, {HERE!r})
import gomerge
assert gomerge.engine_kernels() == {kernels!r}, gomerge.engine_kernels()
times = []
for i in range({n} + 1):
    shutil.rmtree({out!r}, ignore_errors=True)
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    gomerge.add_weighted_adapter({dirs!r}, {weights!r}, "m", {ctype!r}, output_dir={out!r}, progress=False, **{kw!r})
    if i > 0:
        times.append(time.perf_counter() - t0)
print(json.dumps(min(times)))
"""
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(HERE), "python"), GOMERGE_KERNELS=kernels)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def s1(root: str, bw: float, rows: list, methods: set[str]) -> None:
    dirs = save_adapters(tinyllama, os.path.join(root, "s1"), [8, 8, 8], LLAMA_LINEAR)
    base_dir = os.path.join(root, "s1-base")
    tinyllama().save_pretrained(base_dir)
    in_bytes = sum(dir_bytes(d) for d in dirs)
    model = load_peft(tinyllama, dirs)
    names = ["a0", "a1", "a2"]
    weights = [2.0, 1.0, 1.0]
    one_layer = None
    for ctype, kw in (
        ("ties", {"density": 0.2}),
        ("svd", {}),
        ("cat", {}),
        ("linear", {}),
        ("dare_ties", {"density": 0.2}),
    ):
        if ctype not in methods:
            continue
        out = os.path.join(root, f"s1-{ctype}")
        t_go = gomerge_best(5, out, dirs, weights, "m", ctype, **kw)
        out_bytes = dir_bytes(out)
        lower = floors(dirs, out_bytes)
        t_patched = best(
            3,
            gp.add_weighted_adapter,
            model,
            names,
            weights,
            "g",
            ctype,
            progress=False,
            after=lambda: model.delete_adapter("g"),
            **kw,
        )
        t_skeleton = best(  # the floor of any drop-in (benchmarks/dropin.py)
            3,
            dropin.skeleton_add_weighted_adapter,
            model,
            names,
            weights,
            "k",
            ctype,
            after=lambda: model.delete_adapter("k"),
            **kw,
        )
        note = ""
        if ctype == "svd":  # PEFT's dense SVDs: one layer, scaled to 22
            if one_layer is None:
                one_dirs = save_adapters(
                    lambda: llama(2048, 5632, 1, 32, 4), os.path.join(root, "s1-one"), [8, 8, 8], LLAMA_LINEAR
                )
                one_layer = load_peft(lambda: llama(2048, 5632, 1, 32, 4), one_dirs)
            t_peft = 22 * timed(one_layer.add_weighted_adapter, names, weights, "p", ctype, **kw)
            t_e2e = t_peft  # the loads and the save are negligible next to the SVDs
            note = "PEFT est. (1 layer x 22)"
        else:
            t_peft = best(
                3, model.add_weighted_adapter, names, weights, "p", ctype, after=lambda: model.delete_adapter("p"), **kw
            )

            def e2e(ctype=ctype, kw=kw):
                from transformers import AutoModelForCausalLM

                m = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(base_dir), dirs[0], adapter_name="a0"
                )
                for i, d in enumerate(dirs[1:], 1):
                    m.load_adapter(d, adapter_name=f"a{i}")
                m.add_weighted_adapter(names, weights, "merge", ctype, **kw)
                m.save_pretrained(os.path.join(root, "s1-peft-e2e"), selected_adapters=["merge"])

            t_e2e = timed(e2e)
        rows.append(
            dict(
                scenario="S1",
                method=ctype,
                shapes="TinyLlama-1.1B, 3 x r8, 154 modules",
                read=in_bytes,
                written=out_bytes,
                floor=(in_bytes + out_bytes) / bw,
                peft=t_peft,
                peft_e2e=t_e2e,
                gomerge=t_go,
                patched=t_patched,
                skeleton_dropin=t_skeleton,
                note=note,
                **lower,
            )
        )
        print(rows[-1], flush=True)
    # S1 ties once per kernel set this CPU runs (each in a child process that forces the set), against the same
    # PEFT call
    ties = next((r for r in rows if r["scenario"] == "S1" and r["method"] == "ties"), None)
    if ties is None:
        return
    for kernels in gomerge._native.kernel_info()["runnable"]:
        out = os.path.join(root, f"s1-ties-{kernels}")
        t_go = gomerge_kernels_child(kernels, 5, dirs, weights, "ties", out, density=0.2)
        rows.append(
            dict(
                {k: ties[k] for k in ("scenario", "shapes", "read", "written", "floor", "peft")},
                method=f"ties, {kernels} kernels",
                kernels=kernels,
                gomerge=t_go,
            )
        )
        print(rows[-1], flush=True)
    # the in-process merge again, right after the children: the first one ran just after S1's setup (a 4.4 GB base
    # written and synced), the children at the end; both in-process figures are kept (benchmarks/dropin.py)
    ties["gomerge_late"] = gomerge_best(5, os.path.join(root, "s1-ties"), dirs, weights, "m", "ties", density=0.2)
    print({"S1 ties in process, after the children": ties["gomerge_late"]}, flush=True)


def s2(root: str, bw: float, rows: list) -> None:
    captured = {}
    original = torch.linalg.svd

    def svd(a, *args, **kwargs):
        u, s, vh = original(a, *args, **kwargs)
        captured["D"], captured["S"] = a.detach().double(), s.detach().double()
        return u, s, vh

    for fan_in, fan_out in ((4096, 4096), (11008, 4096)):
        make = functools.partial(Linear, fan_in, fan_out)
        dirs = save_adapters(make, os.path.join(root, f"s2-{fan_in}"), [16, 16, 16], ["proj"])
        in_bytes = sum(dir_bytes(d) for d in dirs)
        model = load_peft(make, dirs)
        for ctype, kw in (("svd", {}), ("ties_svd", {"density": 0.2})):
            captured.clear()
            torch.linalg.svd = svd
            try:
                t_peft = timed(model.add_weighted_adapter, ["a0", "a1", "a2"], [2.0, 1.0, 1.0], "p", ctype, **kw)
            finally:
                torch.linalg.svd = original
            out = os.path.join(root, f"s2-{fan_in}-{ctype}")
            t_go = gomerge_best(2, out, dirs, [2.0, 1.0, 1.0], "m", ctype, **kw)
            from safetensors.torch import load_file

            t = load_file(os.path.join(out, "adapter_model.safetensors"))
            ba = t["base_model.model.proj.lora_B.weight"].double() @ t["base_model.model.proj.lora_A.weight"].double()
            layer = model.base_model.model.proj
            peft_ba = layer.lora_B["p"].weight.detach().double() @ layer.lora_A["p"].weight.detach().double()
            rank = t["base_model.model.proj.lora_A.weight"].shape[0]
            if ctype == "svd":
                rel = float(torch.linalg.norm(ba - peft_ba) / torch.linalg.norm(peft_ba))
                check, ok = f"B'A' vs PEFT: rel. Frobenius diff {rel:.1e}", rel <= 1e-5
            else:
                err = float(torch.linalg.norm(captured["D"] - ba))
                optimal = float(torch.sqrt(torch.sum(captured["S"][rank:] ** 2)))
                check, ok = f"error/optimal - 1 = {err / optimal - 1:.1e}", err / optimal - 1 <= 0.01
            model.delete_adapter("p")
            out_bytes = dir_bytes(out)
            rows.append(
                dict(
                    scenario="S2",
                    method=ctype,
                    shapes=f"one {fan_out}x{fan_in} module, 3 x r16",
                    read=in_bytes,
                    written=out_bytes,
                    floor=(in_bytes + out_bytes) / bw,
                    peft=t_peft,
                    gomerge=t_go,
                    check=check,
                    ok=ok,
                )
            )
            print(rows[-1], flush=True)
        del model
        gc.collect()


# M1's peers: for each of gomerge's methods beyond PEFT, the reference implementation on the same dense updates
# (s_t B_t A_t), with its parameters. mergekit's are its own merge_tensors (a zero base: the deltas are the task
# vectors); it merges dense tensors and does not factorise, so gomerge, which also factorises the result to rank
# 16, does more work than its peer.
M1_METHODS = {
    "breadcrumbs": ("mergekit", {"density": 0.2, "gamma": 0.01}),
    "breadcrumbs_ties": ("mergekit", {"density": 0.2, "gamma": 0.01}),
    "della": ("mergekit", {"density": 0.4, "epsilon": 0.15}),
    "della_linear": ("mergekit", {"density": 0.4, "epsilon": 0.15}),
    # fusion-bench's iso_c, TSV-M and iso_cts on dense updates (full SVDs), as tests/test_span_methods.py restates
    # them (restricted to the span, which costs them nothing: the dense SVDs are the work)
    "iso_c": ("fusion-bench (dense torch)", {}),
    "tsv": ("fusion-bench (dense torch)", {}),
    "iso_cts": ("fusion-bench (dense torch)", {}),
    # KnOTS and Core Space from their authors' code, restated in torch (tests/test_knots_core_methods.py): KnOTS
    # runs a dense SVD of the concatenated updates (m x T n), Core Space SVDs of the stacked factors and dense
    # m x n products
    "knots_ties": ("KnOTS (dense torch)", {"density": 0.2}),
    "knots_dare_ties": ("KnOTS (dense torch)", {"density": 0.2}),
    "knots_linear": ("KnOTS (dense torch)", {"density": 0.2}),
    "core_ties": ("core-space-merging (torch)", {"density": 0.2}),
    "core_dare_ties": ("core-space-merging (torch)", {"density": 0.2}),
    "core_tsv": ("core-space-merging (torch)", {}),
    "core_iso_c": ("core-space-merging (torch)", {}),
}


def m1_reference(peer: str, method: str, dws: list, factors: list, weights: list[float], params: dict):
    """The peer's merge of the dense updates dws (or, for KnOTS and Core Space, of the factors (A, B, scaling))."""
    if peer == "mergekit":
        from mergekit.merge_methods.api import merge_tensors

        return merge_tensors(
            [torch.zeros_like(dws[0]), *dws], method, parameters={"weight": weights, **params}, base_index=0
        )
    if peer.startswith("fusion-bench"):
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        from test_span_methods import REFERENCES

        return REFERENCES[method]([w * dw for w, dw in zip(weights, dws)], **params)
    if peer.startswith(("KnOTS", "core-space")):
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        from test_knots_core_methods import FACTOR_REFERENCES

        tasks = [(a.double(), b.double(), w, s) for (a, b, s), w in zip(factors, weights)]
        return FACTOR_REFERENCES[method](tasks, **params)
    raise ValueError(peer)


def m1_method(name: str) -> dict:
    """The engine's method table row of a method."""
    return next(m for m in gomerge.methods() if m["name"] == name)


def m1(root: str, bw: float, rows: list, methods: set[str] | None = None) -> None:
    """M1: gomerge's methods beyond PEFT on S2's shapes (three rank-16 adapters on one 4096 x 4096 and one
    4096 x 11008 module), next to their reference implementations on the same inputs (methods: a subset of
    M1_METHODS, all of them when None)."""
    from safetensors.torch import load_file

    weights = [2.0, 1.0, 1.0]
    available = {m["name"] for m in gomerge.methods()}
    for fan_in, fan_out in ((4096, 4096), (11008, 4096)):
        make = functools.partial(Linear, fan_in, fan_out)
        dirs = save_adapters(make, os.path.join(root, f"m1-{fan_in}"), [16, 16, 16], ["proj"])
        in_bytes = sum(dir_bytes(d) for d in dirs)
        dws, factors = [], []
        for d in dirs:
            t = load_file(os.path.join(d, "adapter_model.safetensors"))
            cfg = json.load(open(os.path.join(d, "adapter_config.json")))
            a, b = t["base_model.model.proj.lora_A.weight"], t["base_model.model.proj.lora_B.weight"]
            factors.append((a, b, cfg["lora_alpha"] / cfg["r"]))
            dws.append(b @ a * (cfg["lora_alpha"] / cfg["r"]))
        for method, (peer, params) in M1_METHODS.items():
            if method not in available or (methods is not None and method not in methods):
                continue
            t_ref = timed(m1_reference, peer, method, dws, factors, weights, params)
            out = os.path.join(root, f"m1-{fan_in}-{method}")
            seed = {"seed": 1} if m1_method(method)["random"] else {}
            runs = [gomerge_child(dirs, method, out, weights, **seed, **params) for _ in range(2)]
            t_go, peak = min(t for t, _ in runs), max(p for _, p in runs)
            out_bytes = dir_bytes(out)
            rows.append(
                dict(
                    scenario="M1",
                    method=method,
                    shapes=f"one {fan_out}x{fan_in} module, 3 x r16",
                    read=in_bytes,
                    written=out_bytes,
                    floor=(in_bytes + out_bytes) / bw,
                    peft=t_ref,
                    gomerge=t_go,
                    peak_rss_mib=peak,
                    peer=peer,
                    check=f"vs {peer} (dense, no factorisation); gomerge factorises to rank 16"
                    if peer == "mergekit"
                    else f"vs {peer}",
                )
            )
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
        del dws
        gc.collect()


def s3_adapters(layers: int, count: int = 8) -> list[str]:
    """count (eight) rank-64 adapters on every linear module of a Llama-7B shape, written in PEFT's format
    (cached)."""
    root = os.path.join(CACHE, f"s3-{layers}" if count == 8 else f"s3-{layers}-{count}")
    dirs = [os.path.join(root, f"adapter{i}") for i in range(count)]
    if all(os.path.exists(os.path.join(d, "adapter_model.safetensors")) for d in dirs):
        return dirs
    shapes = {
        "self_attn.q_proj": (4096, 4096),
        "self_attn.k_proj": (4096, 4096),
        "self_attn.v_proj": (4096, 4096),
        "self_attn.o_proj": (4096, 4096),
        "mlp.gate_proj": (4096, 11008),
        "mlp.up_proj": (4096, 11008),
        "mlp.down_proj": (11008, 4096),
    }
    rng = np.random.default_rng(0)
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for layer in range(layers):
            for mod, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{mod}"
                tensors[key + ".lora_A.weight"] = rng.standard_normal((64, fan_in), dtype=np.float32) * 0.02
                tensors[key + ".lora_B.weight"] = rng.standard_normal((fan_out, 64), dtype=np.float32) * 0.02
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": 64,
                    "lora_alpha": 128,
                    "target_modules": LLAMA_LINEAR,
                    "base_model_name_or_path": "llama-7b-shaped",
                },
                f,
            )
    return dirs


def s3(root: str, bw: float, rows: list, layers: int, svd_layers: int) -> None:
    for ctype, kw, n_layers in (("ties", {"density": 0.2}, layers), ("svd", {}, svd_layers)):
        dirs = s3_adapters(n_layers)
        in_bytes = sum(dir_bytes(d) for d in dirs)
        warm_page_cache(*dirs)  # as for every other scenario (whose inputs were just written)
        out = os.path.join(root, f"s3-{ctype}")
        runs = [gomerge_child(dirs, ctype, out, **kw) for _ in range(2 if ctype == "ties" else 1)]
        t_go, peak = min(t for t, _ in runs), max(p for _, p in runs)
        out_bytes = dir_bytes(out)
        rows.append(
            dict(
                scenario="S3",
                method=ctype,
                shapes=f"Llama-7B, {n_layers} layers, 8 x r64",
                read=in_bytes,
                written=out_bytes,
                floor=(in_bytes + out_bytes) / bw,
                gomerge=t_go,
                peak_rss_mib=peak,
                rss_budget_mib=(in_bytes + out_bytes) / MiB + 256,
                **floors(dirs, out_bytes, runs=3),
            )
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)


def r1(root: str, bw: float, rows: list, layers: int) -> None:
    """R1: resize one rank-64 all-linear Llama-7B-shaped adapter (32 layers x 7 modules) to rank 16: gomerge's exact
    factored SVD against torch's dense truncation (B A formed, torch.linalg.svd, truncated), which is timed on one
    layer and scaled by the number of layers. The check: each module's truncation error ||D - B'A'|| against the
    optimal one, sqrt(sum_{i>16} s_i^2) from torch's SVD (B'A' itself is ill-conditioned where s_16 ~ s_17, as for
    these random factors)."""
    src = s3_adapters(layers, count=1)[0]
    in_bytes = dir_bytes(src)
    out = os.path.join(root, "r1")
    t_go = best(
        2,
        gomerge.resize,
        src,
        rank=16,
        output_dir=out,
        progress=False,
        before=lambda: shutil.rmtree(out, ignore_errors=True),
    )
    from safetensors import safe_open

    worst = 0.0

    def torch_layer(check: bool) -> None:
        nonlocal worst
        with safe_open(os.path.join(src, "adapter_model.safetensors"), "pt") as f:
            keys = sorted(k for k in f.keys() if ".layers.0." in k and k.endswith("lora_A.weight"))
            with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as g:
                for ka in keys:
                    a, b = f.get_tensor(ka), f.get_tensor(ka.replace("lora_A", "lora_B"))
                    d = (b @ a) * 2.0  # scaling 128 / 64
                    u, sv, vh = torch.linalg.svd(d, full_matrices=False)
                    best16 = (u[:, :16] * sv[:16]) @ vh[:16]
                    if check:  # the truncation error against the optimal one (s_17.. of torch's SVD)
                        ours = g.get_tensor(ka.replace("lora_A", "lora_B")) @ g.get_tensor(ka)
                        optimal = float(sv[16:].double().square().sum().sqrt())
                        err = float(torch.linalg.norm((d - ours).double()))
                        worst = max(
                            worst, abs(err / optimal - 1), float(torch.linalg.norm((best16 - d).double())) / optimal - 1
                        )

    t_torch = layers * timed(torch_layer, True)
    out_bytes = dir_bytes(out)
    rows.append(
        dict(
            scenario="R1",
            method="resize r64 -> r16",
            shapes=f"Llama-7B, {layers} layers x 7 modules, 1 x r64",
            read=in_bytes,
            written=out_bytes,
            floor=(in_bytes + out_bytes) / bw,
            peft=t_torch,
            gomerge=t_go,
            note=f"torch est. (1 layer x {layers})",
            check=f"error/optimal - 1 (layer 0): {worst:.1e}",
            ok=worst < 1e-4,
        )
    )
    print(rows[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)


E1_RANK = 64


def e1_models(layers: int) -> tuple[str, str]:
    """A TinyLlama-shaped base (bf16, random N(0, 0.02) weights, unit norms) and a synthetic fine-tune of it: every
    linear module changed by dW = a rank-128 part with decaying singular values (70% of its energy) plus full-rank
    noise (30%), ||dW|| = 3% of ||W||; embeddings, lm_head and norms unchanged. Made once and cached."""
    root = os.path.join(CACHE, f"e1-{layers}")
    base, ft = os.path.join(root, "base"), os.path.join(root, "finetuned")
    if os.path.exists(os.path.join(ft, "model.safetensors")):
        return base, ft
    from safetensors.torch import save_file as save_torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base_sd, ft_sd = {}, {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 1:
            base_sd[name] = ft_sd[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        w = torch.randn(shape, generator=g) * 0.02
        base_sd[name] = w.bfloat16()
        if "embed_tokens" in name or "lm_head" in name:
            ft_sd[name] = base_sd[name]
            continue
        m, n = shape
        energy = (0.03 * float(w.norm())) ** 2
        s = 1.0 / (1.0 + torch.arange(128, dtype=torch.float32) / 8)
        s *= (0.7 * energy / float(s.square().sum())) ** 0.5
        u, _ = torch.linalg.qr(torch.randn(m, 128, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, 128, generator=g))
        dw = (u * s) @ v.T + torch.randn(shape, generator=g) * (0.3 * energy / (m * n)) ** 0.5
        ft_sd[name] = (base_sd[name].float() + dw).bfloat16()
    for folder, sd in ((base, base_sd), (ft, ft_sd)):
        os.makedirs(folder, exist_ok=True)
        cfg.save_pretrained(folder)
        save_torch(sd, os.path.join(folder, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.rename(os.path.join(base, "model.safetensors.tmp"), os.path.join(base, "model.safetensors"))
    os.rename(os.path.join(ft, "model.safetensors.tmp"), os.path.join(ft, "model.safetensors"))
    return base, ft


def child_peak(code: str) -> tuple[float, float]:
    """Runs Python code that prints its timed seconds as the last line's JSON, in a child process: (seconds, peak
    RSS in MiB, from VmHWM)."""
    code += (
        "\nhwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"
        "\nprint(json.dumps([seconds, hwm / 1024]))"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(HERE), "python"))
    os.sync()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    seconds, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, peak


def e1_errors(base: str, ft: str, adapter: str) -> dict[str, float]:
    """Each LoRA module's relative error ||dW - B A|| / ||dW|| (float64 from the stored tensors)."""
    from safetensors import safe_open

    errs = {}
    with (
        safe_open(os.path.join(base, "model.safetensors"), "pt") as fb,
        safe_open(os.path.join(ft, "model.safetensors"), "pt") as ff,
        safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as fa,
    ):
        for k in fa.keys():
            if not k.endswith(".lora_A.weight"):
                continue
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            dw = ff.get_tensor(module + ".weight").double() - fb.get_tensor(module + ".weight").double()
            ba = fa.get_tensor(k.replace("lora_A", "lora_B")).double() @ fa.get_tensor(k).double()
            errs[module] = float(torch.linalg.norm(dw - ba) / torch.linalg.norm(dw))
    return errs


def e1(root: str, bw: float, rows: list, layers: int) -> None:
    """E1: extract a rank-64 adapter from a TinyLlama-shaped bf16 fine-tune (e1_models), gomerge next to
    mergekit-extract-lora (CPU, torch.linalg.svd of each dW) on the same folders, each in a child process for its
    peak RSS, each timed around its call with a final os.sync(). mergekit runs with --skip-undecomposable and
    without the embeddings (-e embed_tokens -e lm_head) so that both write only the LoRA factors (bf16, as mergekit
    writes the model's dtype); each module's error ||dW - B A|| / ||dW|| is computed from both outputs."""
    base, ft = e1_models(layers)
    ours, theirs = os.path.join(root, "e1-gomerge"), os.path.join(root, "e1-mergekit")
    warm_page_cache(base, ft)  # gomerge runs first: without this, only mergekit would find them there
    t_go, peak_go = child_peak(
        "import gomerge, json, os, time\nt0 = time.perf_counter()\n"
        f"r = gomerge.extract({base!r}, {ft!r}, {ours!r}, rank={E1_RANK}, dtype='bfloat16', progress=False)\n"
        "os.sync()\nseconds = time.perf_counter() - t0"
    )
    argv = ["mergekit-extract-lora", "--model", ft, "--base-model", base, "--out-path", theirs]
    argv += ["--max-rank", str(E1_RANK), "--device", "cpu", "--skip-undecomposable", "-e", "embed_tokens", "-e"]
    argv += ["lm_head"]
    t_mk, peak_mk = child_peak(
        "import json, os, sys, time\nfrom mergekit.scripts.extract_lora import main\n"
        f"sys.argv = {argv!r}\nt0 = time.perf_counter()\nmain(standalone_mode=False)\n"
        "os.sync()\nseconds = time.perf_counter() - t0"
    )
    e_go, e_mk = e1_errors(base, ft, ours), e1_errors(base, ft, theirs)
    common = sorted(set(e_go) & set(e_mk))
    ratio = max(e_go[m] / e_mk[m] for m in common)
    mean_go, mean_mk = (sum(e[m] for m in common) / len(common) for e in (e_go, e_mk))
    # the randomized SVD's work: (2q + 2) * 2mnl flops per sketched module (l = k + 20, q = 3 power iterations);
    # modules with a short side (k_proj, v_proj: 256 x 2048) get an exact SVD instead, ~4 max(m, n) min(m, n)^2
    from safetensors import safe_open

    flops, sketch, q = 0.0, E1_RANK + 20, 3
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
        for m in common:
            rows_, cols = f.get_slice(m + ".weight").get_shape()
            short, long_ = min(rows_, cols), max(rows_, cols)
            flops += (2 * q + 2) * 2 * rows_ * cols * sketch if short > (2 * q + 2) * sketch else 4 * long_ * short**2
    in_bytes = dir_bytes(base) + dir_bytes(ft)
    out_bytes = dir_bytes(ours)
    rows.append(
        dict(
            scenario="E1",
            method=f"extract r{E1_RANK}",
            shapes=f"TinyLlama, {layers} layers x 7 modules, bf16",
            read=in_bytes,
            written=out_bytes,
            floor=(in_bytes + out_bytes) / bw,
            peft=t_mk,
            gomerge=t_go,
            peak_rss_mib=peak_go,
            peer="mergekit-extract-lora",
            mergekit_peak_rss_mib=peak_mk,
            error_mean_gomerge=mean_go,
            error_mean_mergekit=mean_mk,
            error_ratio_max=ratio,
            gflop=flops / 1e9,
            gflops_per_s=flops / 1e9 / t_go,
            check=f"vs mergekit-extract-lora (peak RSS {peak_mk:.0f} MiB): mean error {mean_go:.5f} vs "
            f"{mean_mk:.5f}, worst module ratio {ratio:.5f}; {flops / 1e9:.0f} GFLOP at {flops / 1e9 / t_go:.1f} "
            "GFLOP/s",
        )
    )
    print(rows[-1], flush=True)
    shutil.rmtree(ours, ignore_errors=True)
    shutil.rmtree(theirs, ignore_errors=True)


def s4(root: str, bw: float, rows: list) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        dirs = save_adapters(tinyllama, os.path.join(root, f"s4-{name}"), [8, 8, 8], LLAMA_LINEAR, dtype=dtype)
        in_bytes = sum(dir_bytes(d) for d in dirs)
        out = os.path.join(root, f"s4-{name}-out")
        t_go = gomerge_best(5, out, dirs, [2.0, 1.0, 1.0], "m", "ties", density=0.2)
        out_bytes = dir_bytes(out)
        rows.append(
            dict(
                scenario="S4",
                method=f"ties {name}",
                shapes="TinyLlama-1.1B, 3 x r8",
                read=in_bytes,
                written=out_bytes,
                floor=(in_bytes + out_bytes) / bw,
                gomerge=t_go,
            )
        )
        print(rows[-1], flush=True)


FUSE_SHAPES = {
    "F1": dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, shards="5GB"),
    # F2 also runs both in a memory cgroup of 4 GiB (page cache included), under a third of the model's size
    "F2": dict(
        vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, shards="5GB", memory_cap=4 << 30
    ),
}


def fuse_inputs(scenario: str) -> tuple[str, str]:
    """The synthetic bf16 base model folder (random weights, saved by transformers) and a rank-16 all-linear PEFT
    adapter for it, made once and cached under benchmarks/.cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = FUSE_SHAPES[scenario]
    root = os.path.join(CACHE, scenario.lower())
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    if os.path.exists(os.path.join(base, "config.json")) and os.path.exists(
        os.path.join(adapter, "adapter_config.json")
    ):
        return base, adapter
    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.02)
    model.save_pretrained(base, max_shard_size=shape["shards"])
    # the adapter: on a model of the same linear shapes with a small vocabulary (its embeddings are not adapted)
    small = llama(shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"], shape["kv_heads"])
    del model
    gc.collect()
    tmp = save_adapters(lambda: small, root, [16], LLAMA_LINEAR)[0]
    os.replace(tmp, adapter)
    return base, adapter


def later_run_machine(saved: str, ran: str, machine: str) -> str:
    """The machine line after a run of some scenarios (`ran`, e.g. "F1" or "F1, F2") replaced their rows: the saved
    line, less what an earlier run of the same scenarios appended (its rows are gone), plus "`ran` from a later run
    on: `machine`"."""
    parts = re.split(r"; (?=[A-Z][A-Z0-9]*(?:, [A-Z][A-Z0-9]*)* from a later run on: )", saved)
    later = [p for p in parts[1:] if not p.startswith(f"{ran} from a later run on: ")]
    return "; ".join([parts[0], *later, f"{ran} from a later run on: {machine}"])


_RSS = "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0] / 1024"


def child(code: str, memory_limit: int | None = None) -> dict:
    """Runs Python code in a child process that prints a JSON dict last; adds its peak RSS (VmHWM, MiB). With
    memory_limit (bytes), the child runs in a memory cgroup of that limit (memory_cgroup) and a child killed for
    memory gives {"killed": "out of memory"}."""
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(HERE), "python") + os.pathsep + HERE)
    gc.collect()
    os.sync()
    with memory_cgroup(memory_limit) as enter:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import json, os, time\n{code}\n{_RSS}\nout['peak_rss_mib'] = hwm\nprint(json.dumps(out))",
            ],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=enter,
        )
    if memory_limit is not None and proc.returncode in (-signal.SIGKILL, 137):
        return {"killed": "out of memory", "seconds": None, "peak_rss_mib": None}
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cgroup_memory_root() -> str | None:
    """The writable memory cgroup of this process (cgroup v1's memory controller or cgroup v2), or None."""
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.strip().split(":", 2)
        for base, ok in (
            ("/sys/fs/cgroup/memory", "memory" in controllers.split(",")),
            ("/sys/fs/cgroup", not controllers),
        ):
            d = base + path
            if ok and os.access(d, os.W_OK) and os.path.exists(os.path.join(d, "cgroup.procs")):
                return d
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int | None):
    """A child memory cgroup of `limit` bytes (page cache included, as the kernel counts it) for a subprocess: yields
    the preexec function that moves the child into it (None without a limit)."""
    if limit is None:
        yield None
        return
    root = cgroup_memory_root()
    if root is None:
        raise RuntimeError("no writable memory cgroup here: the memory-capped runs need one")
    d = os.path.join(root, f"gomerge-bench-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    v1 = os.path.exists(os.path.join(d, "memory.limit_in_bytes"))
    with open(os.path.join(d, "memory.limit_in_bytes" if v1 else "memory.max"), "w") as f:
        f.write(str(limit))
    if v1 and os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
        with open(os.path.join(d, "memory.memsw.limit_in_bytes"), "w") as f:  # no swap either
            f.write(str(limit))

    def enter() -> None:
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    try:
        yield enter
    finally:
        for _ in range(50):  # the group empties once its last process has exited
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.1)


def fuse_contenders(base: str, adapter: str, out: str, memory_cap: int | None = None) -> dict:
    """Fuses `adapter` into `base` at `out` by `cp -r` (the copy floor) and gomerge, in turn, best of 2 each, and by
    PEFT end to end, each in a child process from a warm page cache and followed by a sync; with `memory_cap`, gomerge
    and PEFT again with the memory (page cache included) capped. F1, F2 and X1 (benchmarks/moe.py) time their fuse
    here."""
    size = dir_bytes(base)
    warm_page_cache(base)

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        os.sync()

    def copy_floor() -> float:
        fresh()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", base, out], check=True)
        os.sync()
        seconds = time.perf_counter() - t0
        fresh()
        return seconds

    go_code = (
        "import gomerge\nt0 = time.perf_counter()\n"
        f"r = gomerge.fuse({base!r}, [{adapter!r}], output_dir={out!r}, overwrite=True, progress=False)\n"
        "os.sync()\nout = dict(seconds=time.perf_counter() - t0, changed=len(r.changed), shards=len(r.shards))"
    )
    # the copy and gomerge alternate, best of 2 each: the disk's writeback speed drifts between runs (the copy
    # alone varied 3x from one run to the next on the developers' machine), and both meet the same drift
    copies, go_runs = [], []
    for _ in range(2):
        copies.append(copy_floor())
        go_runs.append(child(go_code))
    t_copy = min(copies)
    go = min(go_runs, key=lambda r: r["seconds"])
    written = dir_bytes(out)
    fresh()
    peft_code = (
        "import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\nout = {}\n"
        "t0 = time.perf_counter()\n"
        f"m = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)\n"
        "t1 = time.perf_counter()\n"
        f"m = PeftModel.from_pretrained(m, {adapter!r})\n"
        "t2 = time.perf_counter()\nm = m.merge_and_unload()\nt3 = time.perf_counter()\n"
        f"m.save_pretrained({out!r})\nt4 = time.perf_counter()\nos.sync()\nt5 = time.perf_counter()\n"
        "out = dict(seconds=t5 - t0, load=t1 - t0, adapter=t2 - t1, merge=t3 - t2, save=t4 - t3, sync=t5 - t4)"
    )
    peft = child(peft_code)
    fresh()
    capped = {}
    if memory_cap and cgroup_memory_root():
        # the same fuse with the memory (page cache included) capped below the model's size: PEFT's path needs the
        # whole model in memory, gomerge's one tensor per core
        capped["limit_mib"] = memory_cap / 2**20
        capped["gomerge"] = child(go_code, memory_limit=memory_cap)
        capped["gomerge_ok"] = capped["gomerge"].get("changed") == go["changed"]
        fresh()
        capped["peft"] = child(peft_code, memory_limit=memory_cap)
        fresh()
    return dict(
        size=size, copy=t_copy, copies=copies, go=go, go_runs=go_runs, written=written, peft=peft, capped=capped
    )


def fuse_scenario(scenario: str, root: str, bw: float, rows: list) -> None:
    base, adapter = fuse_inputs(scenario)
    s = FUSE_SHAPES[scenario]
    c = fuse_contenders(base, adapter, os.path.join(root, f"{scenario}-out"), s.get("memory_cap"))
    size, t_copy, copies, go, go_runs, written, peft, capped = (
        c[k] for k in ("size", "copy", "copies", "go", "go_runs", "written", "peft", "capped")
    )
    rows.append(
        dict(
            scenario=scenario,
            method="fuse r16 all-linear",
            shapes=f"Llama {s['hidden']}/{s['intermediate']} x {s['layers']}, bf16, {go['shards']} shard(s)",
            read=size + dir_bytes(adapter),
            written=written,
            floor=(size + written) / bw,
            gomerge=go["seconds"],
            gomerge_runs=[r["seconds"] for r in go_runs],
            peft_e2e=peft["seconds"],
            peft_phases={k: peft[k] for k in ("load", "adapter", "merge", "save", "sync")},
            copy=t_copy,
            copy_runs=copies,
            peak_rss_mib=go["peak_rss_mib"],
            peft_peak_rss_mib=peft["peak_rss_mib"],
            check=f"cp -r + sync {fmt_s(t_copy)}; PEFT peak RSS {peft['peak_rss_mib']:.0f} MiB"
            + (capped_note(capped) if capped else ""),
            capped=capped or None,
        )
    )
    print(rows[-1], flush=True)


def capped_note(capped: dict) -> str:
    """The check column's words on the memory-capped runs."""
    lim, g, p = capped["limit_mib"], capped["gomerge"], capped["peft"]
    ours = "killed (out of memory)" if g.get("killed") else f"{fmt_s(g['seconds'])} at {g['peak_rss_mib']:.0f} MiB"
    theirs = "killed (out of memory)" if p.get("killed") else f"{fmt_s(p['seconds'])}"
    return f"; in a {lim / 1024:.0f} GiB memory cgroup: gomerge {ours}, PEFT {theirs}"


def fmt_s(x) -> str:
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")


def fmt_ms(x: float) -> str:
    """Milliseconds with one decimal, for comparisons of close times."""
    return f"{x * 1000:.1f} ms"


def table(rows: list, machine: str) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| scenario | method | shapes | read | written | floor | I/O floor | skeleton | PEFT call | PEFT end to end | "
        "gomerge | patched | skeleton drop-in | vs PEFT call | vs PEFT e2e | x floor | peak RSS | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peft, e2e, go = r.get("peft"), r.get("peft_e2e"), r["gomerge"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["scenario"],
                    slow.label(r),
                    r["shapes"],
                    f"{r['read'] / MiB:.0f} MiB",
                    f"{r['written'] / MiB:.0f} MiB",
                    fmt_s(r["floor"]),
                    fmt_s(r.get("io_floor")),
                    fmt_s(r.get("skeleton")),
                    fmt_s(peft) + (" (est.)" if "est." in r.get("note", "") else ""),
                    fmt_s(e2e),
                    fmt_s(go),
                    fmt_s(r.get("patched")),
                    fmt_s(r.get("skeleton_dropin")),
                    f"{peft / go:.1f}x" if peft else "-",
                    f"{e2e / go:.0f}x" if e2e else "-",
                    f"{go / r['floor']:.1f}",
                    (
                        f"{r['peak_rss_mib']:.0f} MiB"
                        + (f" (budget {r['rss_budget_mib']:.0f})" if "rss_budget_mib" in r else "")
                        if "peak_rss_mib" in r
                        else "-"
                    ),
                    r.get("check", ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines + speed_targets.machines_note(rows) + ["", *targets(rows)])


def targets(rows: list) -> list[str]:
    """The issue's targets, each checked against this run's rows. A floor target that even the skeleton merge
    misses (see floors()) cannot be reached on this machine by any merge."""
    out = ["| target | measured | status |", "|---|---|---|"]

    def row(scenario, method):
        return next((r for r in rows if r["scenario"] == scenario and r["method"] == method), None)

    def add(name, measured, ok, why=""):
        out.append(f"| {name} | {measured} | {'met' if ok else 'NOT met' + (f' ({why})' if why else '')} |")

    def floor_target(name, r):
        limit = 3 * r["floor"]
        why = ""
        if r.get("skeleton"):
            why = (
                f"even the skeleton merge takes {fmt_ms(r['skeleton'])} > 3x floor {fmt_ms(limit)}: unreachable here"
                if r["skeleton"] > limit
                else f"the skeleton merge alone takes {fmt_ms(r['skeleton'])} of the {fmt_ms(limit)} allowed"
            )
        add(name, f"{r['gomerge'] / r['floor']:.1f}x floor", r["gomerge"] <= limit, why)

    if r := row("S1", "ties"):
        dropin.in_process_target(r, add, fmt_ms)
        e2e_limit = r["peft_e2e"] / 100
        why = (
            f"the skeleton merge alone takes {fmt_ms(r['skeleton_fsync'])} with the fsync that gomerge does "
            f"before publishing its output ({fmt_ms(r['skeleton'])} without) of the {fmt_ms(e2e_limit)} allowed"
            if r.get("skeleton")
            else ""
        )
        add(
            "S1 ties >= 100x PEFT end to end",
            f"{r['peft_e2e'] / r['gomerge']:.0f}x",
            r["peft_e2e"] >= 100 * r["gomerge"],
            why,
        )
        floor_target("S1 ties within 3x floor", r)
    dropin.targets(rows, add, fmt_ms)
    for r in rows:
        if r.get("kernels"):
            ratio = r["peft"] / r["gomerge"]
            add(f"S1 ties >= 20x PEFT call, {r['kernels']} kernels", f"{ratio:.1f}x", ratio >= 20)
    for r in rows:
        if r["scenario"] == "S2":
            name = f"S2 {r['method']} {r['shapes'].split(',')[0].removeprefix('one ').removesuffix(' module')}"
            need = 100 if r["method"] == "svd" else 20
            add(
                f"{name} >= {need}x PEFT, {r.get('check', '')}",
                f"{r['peft'] / r['gomerge']:.0f}x",
                r["peft"] >= need * r["gomerge"] and r.get("ok", True),
            )
    for r in rows:
        if r["scenario"] == "S3":
            floor_target(f"S3 {r['method']} within 3x floor", r)
            add(
                f"S3 {r['method']} peak RSS <= inputs + output + 256 MiB",
                f"{r['peak_rss_mib']:.0f} MiB",
                r["peak_rss_mib"] <= r["rss_budget_mib"],
            )
    if r := row("R1", "resize r64 -> r16"):
        add(
            f"R1 resize vs torch dense truncation, {r['check']}",
            f"{r['peft'] / r['gomerge']:.0f}x",
            r["peft"] > r["gomerge"] and r["ok"],
        )
    for r in rows:
        if r["scenario"] == "M1":
            name = f"M1 {slow.label(r)} {r['shapes'].split(',')[0].removeprefix('one ').removesuffix(' module')}"
            need = 10 if r["peer"] == "mergekit" else 100
            ratio = r["peft"] / r["gomerge"]
            add(f"{name} >= {need}x {r['peer']}", f"{ratio:.1f}x", ratio >= need)
    for name, measured, ok, why in speed_targets.targets(rows):
        add(name, measured, ok, why)
    for r in rows:
        if r["scenario"] in ("F1", "F2"):
            n = r["scenario"]
            need, near = {"F1": (3, 1.3), "F2": (4, 1.5)}[n]  # issue 19's targets: x PEFT end to end, x cp -r + sync
            ratio = r["peft_e2e"] / r["gomerge"]
            add(f"{n} >= {need}x PEFT end to end", f"{ratio:.1f}x", ratio >= need)
            copy = r["gomerge"] / r["copy"]
            add(f"{n} within {near}x of cp -r + sync", f"{copy:.2f}x", copy <= near)
            if n == "F2":
                add("F2 peak RSS <= 1 GiB", f"{r['peak_rss_mib']:.0f} MiB", r["peak_rss_mib"] <= 1024)
    f32 = row("S4", "ties float32")
    for half in ("bfloat16", "float16"):
        if f32 and (r := row("S4", f"ties {half}")):
            add(
                f"S4 {half} <= 1.5x float32",
                f"{r['gomerge'] / f32['gomerge']:.2f}x",
                r["gomerge"] <= 1.5 * f32["gomerge"],
            )
    return out


def chart(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r):
        extra = (
            " " + r["shapes"].split(",")[0].removeprefix("one ").removesuffix(" module")
            if r["scenario"] == "S2"
            else ""
        )
        return f"{r['scenario']} {r['method']}{extra}"

    bars = [
        (label(r), r["peft"] / r["gomerge"], r.get("peft_e2e", 0) / r["gomerge"])
        for r in rows
        if r.get("peft") and not r.get("kernels") and r["scenario"] not in ("R1", "M1", "F1", "F2", "E1", "G1")
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(bars))
    ax.bar(x - 0.2, [b[1] for b in bars], 0.4, label="vs PEFT's add_weighted_adapter call")
    ax.bar(x + 0.2, [b[2] or np.nan for b in bars], 0.4, label="vs PEFT end to end (load, merge, save)")
    ax.set_yscale("log")
    ax.set_xticks(x, [b[0] for b in bars], rotation=30, ha="right")
    ax.set_ylabel("speedup of gomerge (disk to disk)")
    ax.axhline(1, color="gray", lw=0.8)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.95)
    ax.set_title("gomerge vs PEFT, same inputs, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated; on request: F2 (13.5 GB) and SLOW (M1's dense-SVD peers, benchmarks/slow.py)",
    )
    ap.add_argument("--q-layers", type=int, default=2, help="layers of Q1's and Q2's models (benchmarks/quant.py)")
    ap.add_argument("--chart-only", action="store_true", help="redraw the chart and table from results/latest.json")
    ap.add_argument("--s3-layers", type=int, default=32)
    ap.add_argument("--s1-methods", default="ties,svd,cat,linear,dare_ties", help="S1's methods (comma-separated)")
    ap.add_argument("--m1-methods", default="", help="M1's methods (comma-separated; default: all)")
    ap.add_argument(
        "--s3-svd-layers",
        type=int,
        default=2,
        help="layers for S3's svd (exact SVDs of rank-512 sums are compute-bound: ~seconds per module)",
    )
    ap.add_argument(
        "--e1-layers",
        type=int,
        default=2,
        help="E1's layers, of TinyLlama's shapes (it has 22; mergekit-extract-lora takes ~3 min per layer here)",
    )
    ap.add_argument("--x1-layers", type=int, default=2, help="X1's layers of Qwen3-30B-A3B's expert shapes")
    args = ap.parse_args()
    if args.chart_only:
        saved = json.load(open(os.path.join(RESULTS, "latest.json")))
        chart(saved["rows"], os.path.join(RESULTS, "speedups.png"))
        with open(os.path.join(RESULTS, "latest.md"), "w") as f:
            f.write(table(saved["rows"], saved["machine"]) + "\n")
        return
    todo = set(args.scenarios.split(","))
    m1_methods = slow.m1_methods(set(args.m1_methods.split(",")) if args.m1_methods else None, M1_METHODS, todo)
    if "SLOW" in todo:
        todo.add("M1")
    run_start = time.perf_counter()
    bw = bandwidth()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), PEFT {__import__('peft').__version__}, "
        f"memory copy {bw / 1e9:.1f} GB/s"
    )
    record = machine_record.describe()
    machine += "; " + machine_record.summary(record)
    print(machine, flush=True)
    rows: list = []
    with tempfile.TemporaryDirectory() as root:
        # S3 first: its child processes and its 5 GB of inputs in the page cache then share the machine with no
        # PEFT model held in this process's memory (after S1 and S2 they ran up to 2x slower)
        if "S3" in todo:
            s3(root, bw, rows, args.s3_layers, args.s3_svd_layers)
        if "S1" in todo:
            s1(root, bw, rows, set(args.s1_methods.split(",")))
        if "S2" in todo:
            s2(root, bw, rows)
        if "S4" in todo:
            s4(root, bw, rows)
        if "R1" in todo:
            r1(root, bw, rows, args.s3_layers)
        if "M1" in todo:
            m1(root, bw, rows, m1_methods)
        if "E1" in todo:
            e1(root, bw, rows, args.e1_layers)
        if "G1" in todo:
            g1(root, bw, rows)
        for scenario in ("F1", "F2"):
            if scenario in todo:
                fuse_scenario(scenario, root, bw, rows)
        if todo & {"Q1", "Q2"}:  # quantized bases: benchmarks/quant.py (its own table, results/quant.md)
            __import__("quant").run(todo & {"Q1", "Q2"}, args.q_layers)
        if "X1" in todo:
            import moe

            moe.x1(root, bw, rows, args.x1_layers, child, dir_bytes, fuse_contenders)
        for r in rows:
            r["measured"] = slow.today()
            r.update(machine_record.row_fields(record))
        order = {"S1": 0, "S2": 1, "S3": 2, "S4": 3, "R1": 4, "M1": 5, "F1": 6, "F2": 7, "E1": 8, "X1": 9, "G1": 10}
        # a run of some scenarios replaces their rows in the saved results and keeps the others'
        saved_path = os.path.join(RESULTS, "latest.json")
        if os.path.exists(saved_path):
            saved = json.load(open(saved_path))
            kept = [
                dict(r, last_measured=True)
                for r in saved["rows"]
                if r["scenario"] not in todo or (r["scenario"] == "M1" and r["method"] not in m1_methods)
            ]
            if kept and not set(DEFAULT_SCENARIOS) <= todo:
                ran = ", ".join(sorted({r["scenario"] for r in rows}))
                machine = later_run_machine(saved["machine"], ran, machine)
            elif kept:  # a whole default run: only the opt-in rows (SLOW, F2) are older, and they say so
                older = ", ".join(f"{r['scenario']} {r['method']}" for r in kept)
                machine = f"{machine}; rows kept from earlier runs (see the rows by machine below): {older}"
            rows = kept + rows
        rows.sort(key=lambda r: order[r["scenario"]])  # stable: each scenario's rows keep their order
    os.makedirs(RESULTS, exist_ok=True)
    md = table(rows, machine)
    print(md)
    print(f"run time: {(time.perf_counter() - run_start) / 60:.1f} minutes", flush=True)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        minutes = (time.perf_counter() - run_start) / 60
        json.dump({"machine": machine, "bandwidth_bytes_per_s": bw, "run_minutes": minutes, "rows": rows}, f, indent=2)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(md + "\n")
    if any(r.get("peft") for r in rows):
        chart(rows, os.path.join(RESULTS, "speedups.png"))


if __name__ == "__main__":
    main()
