"""G1: `gomerge export --to gguf` next to llama.cpp's own `convert_lora_to_gguf.py`.

- Speed and memory: one rank-64 adapter on every linear module of a Llama-7B shape (32 layers x q/k/v/o/gate/up/down,
  float32, 640 MiB; synthetic, cached in benchmarks/.cache/g1) exported to GGUF f16 by both, each in a child process
  with its peak RSS (os.wait4), after an untimed run that puts the input in the page cache. The converter is the one
  in the llama-cpp-python source release pinned in tests/requirements-llama.txt (vendor/llama.cpp, fetched once with
  pip download into benchmarks/.cache); it reads the same config.json with torch and transformers.
- Same numbers: on the tiny llama of tests/gguf_tiny.py, both files loaded in llama-cpp-python give the same logits for
  a plain adapter; for each case where the converter writes another adapter (rsLoRA, rank_pattern / alpha_pattern from
  `energy:` rank control, a merge with patterns), the logit difference of each file from PEFT's model is reported.

Run alone: PYTHONPATH=python:benchmarks:tests .venv/bin/python benchmarks/gguf_export.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
MiB = 2**20
LAYERS, RANK = 32, 64
SHAPES = {  # module -> (in, out), Llama-7B
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 11008),
    "mlp.up_proj": (4096, 11008),
    "mlp.down_proj": (11008, 4096),
}
LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def llama_cpp_pin() -> str:
    for line in open(os.path.join(ROOT, "tests", "requirements-llama.txt")):
        if line.startswith("llama-cpp-python=="):
            return line.split("==")[1].split()[0]
    raise RuntimeError("tests/requirements-llama.txt pins no llama-cpp-python")


def converter() -> str:
    """convert_lora_to_gguf.py from the pinned llama-cpp-python source release (downloaded and unpacked once)."""
    version = llama_cpp_pin()
    root = os.path.join(CACHE, f"llama-cpp-python-{version}")
    script = os.path.join(root, f"llama_cpp_python-{version}", "vendor", "llama.cpp", "convert_lora_to_gguf.py")
    if not os.path.exists(script):
        os.makedirs(root, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", root]
            + [f"llama-cpp-python=={version}"],
            check=True,
        )
        with tarfile.open(os.path.join(root, f"llama_cpp_python-{version}.tar.gz")) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and not m.name.endswith("/")]
            keep = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "/conversion/", "/gguf-py/")
            tar.extractall(root, members=[m for m in members if any(k in m.name for k in keep)], filter="data")
    return script


def inputs() -> tuple[str, str]:
    """The cached rank-64 all-linear Llama-7B-shaped adapter (float32) and a folder with the base's config.json."""
    from safetensors.numpy import save_file

    root = os.path.join(CACHE, "g1")
    adapter, base = os.path.join(root, "adapter"), os.path.join(root, "base")
    if not os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        os.makedirs(adapter, exist_ok=True)
        os.makedirs(base, exist_ok=True)
        rng = np.random.default_rng(0)
        tensors = {}
        for layer in range(LAYERS):
            for mod, (fan_in, fan_out) in SHAPES.items():
                key = f"base_model.model.model.layers.{layer}.{mod}"
                tensors[key + ".lora_A.weight"] = rng.standard_normal((RANK, fan_in), dtype=np.float32) * 0.02
                tensors[key + ".lora_B.weight"] = rng.standard_normal((fan_out, RANK), dtype=np.float32) * 0.02
        save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK}
        cfg |= {"target_modules": [m.split(".")[1] for m in SHAPES], "base_model_name_or_path": base}
        json.dump(cfg, open(os.path.join(adapter, "adapter_config.json"), "w"))
        json.dump(LLAMA_7B, open(os.path.join(base, "config.json"), "w"))
    return adapter, base


def run_child(argv: list[str]) -> tuple[float, float]:
    """Runs argv; returns its wall time (s) and peak RSS (MiB, from wait4)."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def gomerge_argv(adapter: str, base: str, out: str, dtype: str) -> list[str]:
    return [sys.executable, "-m", "gomerge", "export", adapter, "--to", "gguf", "--base", base, "-o", out]


def convert_argv(adapter: str, base: str, out: str, dtype: str) -> list[str]:
    return [sys.executable, converter(), "--base", base, "--outtype", dtype, "--outfile", out, adapter]


def speed(root: str) -> dict:
    adapter, base = inputs()
    size = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
    res = {"read": size}
    for name, argv in (("gomerge", gomerge_argv), ("converter", convert_argv)):
        out = os.path.join(root, f"{name}.gguf")
        cmd = argv(adapter, base, out, "f16")
        if name == "gomerge":
            cmd += ["--dtype", "f16", "--overwrite", "-q"]
        run_child(cmd)  # warm-up: the input in the page cache, imports compiled
        runs = [run_child(cmd) for _ in range(2 if name == "gomerge" else 1)]
        res[name] = min(r[0] for r in runs)
        res[name + "_rss_mib"] = max(r[1] for r in runs)
        res[name + "_bytes"] = os.path.getsize(out)
    res["same_tensors"] = same_tensors(os.path.join(root, "gomerge.gguf"), os.path.join(root, "converter.gguf"), 2.0)
    return res


def same_tensors(ours: str, theirs: str, scale: float) -> bool:
    """Both files hold the same tensors: A equal, B equal once the converter's B is scaled by alpha / r (= `scale`),
    to one f16 rounding of each (2^-11 relative; below f16's normal range, its subnormal spacing 2^-24 absolute)."""
    import gguf

    a = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(theirs).tensors}
    if sorted(a) != sorted(b):
        return False
    for name, x in a.items():
        y = b[name] * (scale if name.endswith("lora_b") else 1.0)
        if not np.allclose(x, y, rtol=2.0**-10, atol=scale * 2.0**-24):
            return False
    return True


def logits(root: str) -> list[dict]:
    """On the tiny llama: each case's logit difference from PEFT for gomerge's file and the converter's."""
    if os.path.join(ROOT, "tests") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "tests"))  # gguf_tiny: the tests' tiny base and logits
    import torch
    from gguf_tiny import TINY, llama_gguf, llama_logits, make_adapter, peft_logits, rel
    from transformers import LlamaConfig, LlamaForCausalLM

    import gomerge

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    base = os.path.join(root, "tiny")
    model.save_pretrained(base)
    base_gguf = os.path.join(root, "tiny.gguf")
    llama_gguf(model, base_gguf)
    plain = make_adapter(model, os.path.join(root, "plain"), seed=1, r=8, lora_alpha=16)
    cases = {
        "plain (r=8, alpha=16)": plain,
        "rsLoRA (r=16, alpha=8)": make_adapter(
            model, os.path.join(root, "rs"), seed=2, r=16, lora_alpha=8, use_rslora=True
        ),
        "alpha_pattern (r=8, alpha=16, q_proj alpha=4)": make_adapter(
            model, os.path.join(root, "ap"), seed=3, r=8, lora_alpha=16, alpha_pattern={"q_proj": 4}
        ),
    }
    mixed = os.path.join(root, "e90")
    gomerge.resize(
        make_adapter(model, os.path.join(root, "r16"), seed=4, r=16, lora_alpha=32), energy=0.9, output_dir=mixed
    )
    cases["mixed ranks from energy:0.9 (rank_pattern + alpha_pattern)"] = mixed
    merged = os.path.join(root, "ties")
    other = make_adapter(model, os.path.join(root, "b"), seed=5, r=8, lora_alpha=8)
    gomerge.add_weighted_adapter([plain, other], [1.0, 0.7], "m", "svd", output_dir=merged, svd_rank="energy:0.95")
    cases["svd merge, svd_rank energy:0.95 (patterns)"] = merged
    rows = []
    for label, adapter in cases.items():
        ours, theirs = os.path.join(root, "ours.gguf"), os.path.join(root, "theirs.gguf")
        gomerge.export(adapter, "gguf", ours, base=base, dtype="f32", overwrite=True)
        run_child(convert_argv(adapter, base, theirs, "f32"))
        peft = peft_logits(model, adapter)
        lo, lt = llama_logits(base_gguf, ours), llama_logits(base_gguf, theirs)
        cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
        rows.append(
            {
                "case": label,
                "patterns": bool(cfg.get("rank_pattern") or cfg.get("alpha_pattern")),
                "rslora": bool(cfg.get("use_rslora")),
                "gomerge_vs_peft": rel(lo, peft),
                "converter_vs_peft": rel(lt, peft),
                "converter_vs_gomerge": rel(lt, lo),
                "adapter_effect": rel(peft, peft_logits(model, None)),
            }
        )
    return rows


def g1(root: str, bw: float, rows: list) -> dict:
    """Runs G1; appends its row to run.py's table and writes results/g1.json and results/g1.md."""
    s = speed(root)
    cases = logits(root)
    plain = cases[0]
    written = s["gomerge_bytes"]
    check = (
        f"same tensors as the converter's (B x alpha/r): {s['same_tensors']}; tiny logits vs converter (plain): "
        f"{plain['converter_vs_gomerge']:.1e}; converter RSS {s['converter_rss_mib']:.0f} MiB"
    )
    rows.append(
        {
            "scenario": "G1",
            "method": "export gguf f16",
            "shapes": f"r=64, {LAYERS} x 7 Llama-7B modules",
            "read": s["read"],
            "written": written,
            "floor": (s["read"] + written) / bw,
            "peft": s["converter"],
            "gomerge": s["gomerge"],
            "peak_rss_mib": s["gomerge_rss_mib"],
            "note": "PEFT call column: llama.cpp's convert_lora_to_gguf.py (child process, after a warm-up)",
            "check": check,
        }
    )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "g1.json"), "w") as f:
        json.dump({"speed": s, "logits": cases}, f, indent=2)
    with open(os.path.join(RESULTS, "g1.md"), "w") as f:
        f.write(report(s, cases) + "\n")
    return {"speed": s, "logits": cases}


def report(s: dict, cases: list[dict]) -> str:
    lines = [
        f"G1: rank-64 all-linear Llama-7B-shaped adapter ({s['read'] / MiB:.0f} MiB f32) to GGUF f16",
        "",
        "| tool | time | peak RSS | file |",
        "|---|---|---|---|",
        f"| gomerge export | {s['gomerge']:.2f} s | {s['gomerge_rss_mib']:.0f} MiB | "
        f"{s['gomerge_bytes'] / MiB:.0f} MiB |",
        f"| convert_lora_to_gguf.py | {s['converter']:.2f} s | {s['converter_rss_mib']:.0f} MiB | "
        f"{s['converter_bytes'] / MiB:.0f} MiB |",
        "",
        f"speed-up {s['converter'] / s['gomerge']:.1f}x, memory {s['converter_rss_mib'] / s['gomerge_rss_mib']:.1f}x "
        f"less; same tensors (the converter's B times alpha/r): {s['same_tensors']}",
        "",
        "Tiny llama in llama-cpp-python (f32, one thread): max |logits - PEFT's| / max |PEFT's|",
        "",
        "| case | gomerge's file | converter's file | converter vs gomerge | the adapter's own effect |",
        "|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['case']} | {c['gomerge_vs_peft']:.1e} | {c['converter_vs_peft']:.1e} | "
            f"{c['converter_vs_gomerge']:.1e} | {c['adapter_effect']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "tests")]
    with tempfile.TemporaryDirectory() as root:
        out = g1(root, float(os.environ.get("G1_BANDWIDTH", 10e9)), [])
    print(report(out["speed"], out["logits"]))
