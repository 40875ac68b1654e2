"""Fusing into quantized bases (issue 21), gomerge next to its peers, each in a child process with its peak RSS.

- Q1: a rank-16 all-linear adapter fused into a TinyLlama-shaped NF4 folder (double quant, written by transformers'
  BitsAndBytesConfig save path from a bf16 base): gomerge `keep_format=True` and `dtype="bfloat16"` next to PEFT +
  bitsandbytes on CPU end to end (load the 4-bit model, load the adapter, `merge_and_unload`, `save_pretrained`).
- Q2: the same adapter shape fused into a Llama-7B-shaped FP8 blockwise folder (E4M3, 128 x 128 `weight_scale_inv`;
  synthetic bytes, no NaN codes), gomerge `keep_format=True` next to `cp -r` of the folder, with the target peak RSS
  <= 1 GiB.

Both run on the first `--layers` layers (2 by default, to keep `make bench` short; `--layers 22` / `--layers 32` for
the whole models). Inputs are made once and cached under benchmarks/.cache. Timings on a loaded machine are noisy.

Usage: python benchmarks/quant.py [--scenarios Q1,Q2] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

from common import LLAMA_LINEAR, llama, save_adapters  # noqa: E402

SHAPES = {
    "Q1": dict(vocab=32000, hidden=2048, intermediate=5632, heads=32, kv_heads=4),
    "Q2": dict(vocab=32000, hidden=4096, intermediate=11008, heads=32, kv_heads=32),
}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


_RSS = "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0] / 1024"


def child(code: str) -> dict:
    """Runs code in a child Python that leaves a dict `out`; returns it with the child's peak RSS (MiB)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(HERE), "python") + os.pathsep + HERE)
    os.sync()
    src = f"import json, os, time\n{code}\n{_RSS}\nout['peak_rss_mib'] = hwm\nprint(json.dumps(out))"
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _config(scenario: str, layers: int):
    from transformers import LlamaConfig

    s = SHAPES[scenario]
    return LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def _adapter(scenario: str, layers: int, root: str) -> str:
    s = SHAPES[scenario]
    path = os.path.join(root, "adapter")
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        small = llama(s["hidden"], s["intermediate"], layers, s["heads"], s["kv_heads"])
        os.replace(save_adapters(lambda: small, root, [16], LLAMA_LINEAR)[0], path)
    return path


def q1_inputs(layers: int) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    root = os.path.join(CACHE, f"q1-{layers}")
    nf4 = os.path.join(root, "nf4")
    if not os.path.exists(os.path.join(nf4, "config.json")):
        with torch.device("meta"):
            model = LlamaForCausalLM(_config("Q1", layers))
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.02)
        w16 = os.path.join(root, "w16")
        model.save_pretrained(w16)
        del model
        q = AutoModelForCausalLM.from_pretrained(
            w16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            device_map="cpu",
        )
        q.save_pretrained(nf4)
    return nf4, _adapter("Q1", layers, root)


def q2_inputs(layers: int) -> tuple[str, str]:
    """A Llama-7B-shaped FP8 block folder written directly: random E4M3 bytes (NaN codes 0x7f / 0xff excluded),
    weight_scale_inv of 128 x 128 blocks, bf16 embeddings and norms."""
    from safetensors.numpy import save_file

    root = os.path.join(CACHE, f"q2-{layers}")
    base = os.path.join(root, "fp8")
    if not os.path.exists(os.path.join(base, "config.json")):
        os.makedirs(base, exist_ok=True)
        s = SHAPES["Q2"]
        h, i, v = s["hidden"], s["intermediate"], s["vocab"]
        rng = np.random.default_rng(0)
        shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h)}
        shapes |= {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

        def bf16(shape: tuple[int, ...]) -> np.ndarray:  # bf16 bits (truncated float32), as uint16
            return ((rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)

        for layer in range(layers):
            t = {}
            for name, shape in shapes.items():
                part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                p = f"model.layers.{layer}.{part}.{name}"
                q = rng.integers(0, 0x7E, size=shape, dtype=np.uint8) | (
                    rng.integers(0, 2, size=shape, dtype=np.uint8) << 7
                )
                t[p + ".weight"] = q
                t[p + ".weight_scale_inv"] = rng.uniform(
                    1e-5, 1e-4, size=(-(-shape[0] // 128), -(-shape[1] // 128))
                ).astype(np.float32)
            t[f"model.layers.{layer}.input_layernorm.weight"] = bf16((h,))
            t[f"model.layers.{layer}.post_attention_layernorm.weight"] = bf16((h,))
            save_file(t, os.path.join(base, f"layer-{layer}.safetensors"))
        save_file(
            {
                "model.embed_tokens.weight": bf16((v, h)),
                "lm_head.weight": bf16((v, h)),
                "model.norm.weight": bf16((h,)),
            },
            os.path.join(base, "embed.safetensors"),
        )
        _retype(base)
        cfg = _config("Q2", layers).to_dict()
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
        json.dump(cfg, open(os.path.join(base, "config.json"), "w"))
    return base, _adapter("Q2", layers, root)


def _retype(base: str) -> None:
    """numpy's safetensors writer knows neither F8_E4M3 nor BF16: rewrite the dtypes in the headers (U8 weights ->
    F8_E4M3, U16 -> BF16; same sizes), and write the index."""
    weight_map = {}
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            for k, e in header.items():
                if k == "__metadata__":
                    continue
                weight_map[k] = name
                if e["dtype"] == "U8" and k.endswith(".weight"):
                    e["dtype"] = "F8_E4M3"
                elif e["dtype"] == "U16":
                    e["dtype"] = "BF16"
            data = json.dumps(header, separators=(",", ":")).encode()
            data += b" " * (-len(data) % 8)
            with open(path + ".tmp", "wb") as g:
                g.write(len(data).to_bytes(8, "little") + data)
                shutil.copyfileobj(f, g, 64 << 20)
        os.replace(path + ".tmp", path)
    total = sum(os.path.getsize(os.path.join(base, n)) for n in os.listdir(base))
    json.dump(
        {"metadata": {"total_size": total}, "weight_map": weight_map},
        open(os.path.join(base, "model.safetensors.index.json"), "w"),
    )


def q1(layers: int, tmp: str) -> dict:
    base, adapter = q1_inputs(layers)
    out = os.path.join(tmp, "q1")
    rows = {}
    for label, kw in (("gomerge keep_format", "keep_format=True"), ("gomerge bf16", "dtype='bfloat16'")):
        shutil.rmtree(out, ignore_errors=True)
        rows[label] = child(
            "import gomerge, warnings\nwarnings.simplefilter('ignore')\nt0 = time.perf_counter()\n"
            f"r = gomerge.fuse({base!r}, [{adapter!r}], output_dir={out!r}, {kw}, progress=False)\nos.sync()\n"
            "s = [t['survival'] for t in r.quantized['tensors']]\n"
            "out = dict(seconds=time.perf_counter() - t0, changed=len(r.changed), min_survival=min(s))"
        )
    shutil.rmtree(out, ignore_errors=True)
    rows["PEFT + bitsandbytes"] = child(
        "import torch, warnings\nwarnings.simplefilter('ignore')\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\nt0 = time.perf_counter()\n"
        f"m = AutoModelForCausalLM.from_pretrained({base!r}, device_map='cpu')\n"
        f"m = PeftModel.from_pretrained(m, {adapter!r}).merge_and_unload()\nnote = ''\n"
        f"try:\n    m.save_pretrained({out!r})\n"
        "except NotImplementedError:  # transformers 5.24: no reverse of its 4-bit conversion\n"
        "    from safetensors.torch import save_file\n"
        f"    os.makedirs({out!r}, exist_ok=True)\n"
        f"    save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {out!r} + '/model.safetensors')\n"
        "    note = 'save_pretrained raised NotImplementedError; its state_dict was saved with safetensors'\n"
        "os.sync()\nout = dict(seconds=time.perf_counter() - t0, note=note)"
    )
    return dict(scenario="Q1", layers=layers, base_bytes=dir_bytes(base), runs=rows)


def q2(layers: int, tmp: str) -> dict:
    base, adapter = q2_inputs(layers)
    out = os.path.join(tmp, "q2")
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", base, out], check=True)
    os.sync()
    copy = time.perf_counter() - t0
    shutil.rmtree(out)
    go = child(
        "import gomerge, warnings\nwarnings.simplefilter('ignore')\nt0 = time.perf_counter()\n"
        f"r = gomerge.fuse({base!r}, [{adapter!r}], output_dir={out!r}, keep_format=True, progress=False)\n"
        "os.sync()\nout = dict(seconds=time.perf_counter() - t0, changed=len(r.changed))"
    )
    shutil.rmtree(out, ignore_errors=True)
    return dict(
        scenario="Q2",
        layers=layers,
        base_bytes=dir_bytes(base),
        runs={"gomerge keep_format": go, "cp -r": dict(seconds=copy)},
    )


def table(results: list[dict]) -> str:
    lines = ["| scenario | contender | seconds | vs peer | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in results:
        peer = r["runs"].get("PEFT + bitsandbytes") or r["runs"].get("cp -r")
        for name, run in r["runs"].items():
            ratio = f"{peer['seconds'] / run['seconds']:.2f}x" if run is not peer else "-"
            rss = f"{run['peak_rss_mib']:.0f}" if "peak_rss_mib" in run else "-"
            what = f"{r['scenario']} ({r['layers']} layers, {r['base_bytes'] / 2**20:.0f} MiB)"
            lines.append(f"| {what} | {name} | {run['seconds']:.2f} | {ratio} | {rss} |")
    return "\n".join(lines)


def run(scenarios: set[str], layers: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "Q1" in scenarios:
            results.append(q1(layers, tmp))
        if "Q2" in scenarios:
            r = q2(layers, tmp)
            r["rss_ok"] = r["runs"]["gomerge keep_format"]["peak_rss_mib"] <= 1024
            results.append(r)
    notes = [f"{r['scenario']} {k}: {v['note']}" for r in results for k, v in r["runs"].items() if v.get("note")]
    md = table(results) + "\n\n" + "".join(n + "\n" for n in notes) + "Measured under load (other jobs share the CPUs)."
    print(md)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "quant.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, "quant.md"), "w") as f:
        f.write(md + "\n")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="Q1,Q2")
    ap.add_argument("--layers", type=int, default=2, help="layers of each model (TinyLlama has 22, Llama-7B 32)")
    args = ap.parse_args()
    run(set(args.scenarios.split(",")), args.layers)


if __name__ == "__main__":
    main()
