"""X1, mixture-of-experts adapters (issue 20): rank-16 LoRA on the experts of a Qwen3-MoE-30B-A3B-shaped layer stack
(synthetic: hidden 2048, 128 experts of intermediate 768, `--x1-layers` layers, 2 by default; vocabulary 32000 in
place of 151936 to keep the base small), PEFT's `target_parameters` layout.

- Merges of three adapters with `ties` (density 0.2) and `svd` (rank 16), each expert merged as a module of its own:
  gomerge only, disk to disk, in a child process for its peak RSS. No peer exists: PEFT's `add_weighted_adapter`
  refuses adapters on nn.Parameters, and mergekit merges full models, not LoRA adapters.
- Fuse of one adapter into the bf16 base (saved by transformers in the per-expert layout): gomerge's `fuse` next to
  PEFT end to end (load the base, load the adapter, `merge_and_unload`, `save_pretrained`) and `cp -r` of the base,
  each followed by `sync`, with its peak RSS.

Registered in run.py (`--scenarios X1`).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")

QWEN3_30B_A3B = dict(hidden=2048, moe_intermediate=768, experts=128, heads=32, kv_heads=4, head_dim=128, vocab=32000)
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def x1_base(layers: int) -> str:
    """The synthetic bf16 base (random weights, saved by transformers), made once and cached."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    s = QWEN3_30B_A3B
    path = os.path.join(CACHE, f"x1-{layers}", "base")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    cfg = Qwen3MoeConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=6144,
        moe_intermediate_size=s["moe_intermediate"],
        num_experts=s["experts"],
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.02)
    model.save_pretrained(path)
    return path


def x1_adapter(layers: int, seed: int, r: int = 16) -> str:
    """A rank-16 (per expert) float32 adapter on both expert parameters of every layer, written in PEFT's layout
    (gate_up_proj nested through base_layer), made once and cached."""
    s = QWEN3_30B_A3B
    path = os.path.join(CACHE, f"x1-{layers}", f"adapter{seed}")
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return path
    rng = np.random.default_rng(seed)
    e, h, i = s["experts"], s["hidden"], s["moe_intermediate"]
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts"
        for key, (out, inp) in ((prefix + ".base_layer", (2 * i, h)), (prefix, (h, i))):
            tensors[key + ".lora_A.weight"] = (
                rng.standard_normal((r * e, inp), dtype=np.float32) / np.sqrt(inp)
            ).astype(np.float32)
            tensors[key + ".lora_B.weight"] = (rng.standard_normal((out, r * e), dtype=np.float32) * 0.01).astype(
                np.float32
            )
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=2 * r,
        target_modules=[],
        target_parameters=PARAMS,
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        use_dora=False,
        fan_in_fan_out=False,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=None,
    )
    json.dump(cfg, open(os.path.join(path, "adapter_config.json"), "w"), indent=2)
    return path


def x1(root: str, bw: float, rows: list, layers: int, child, dir_bytes, fuse_contenders) -> None:
    """The X1 rows (see the module's docstring); `child`, `dir_bytes` and `fuse_contenders` are run.py's."""
    s = QWEN3_30B_A3B
    shapes = (
        f"Qwen3-30B-A3B experts {s['experts']} x ({2 * s['moe_intermediate']}x{s['hidden']}, "
        f"{s['hidden']}x{s['moe_intermediate']}) x {layers} layers"
    )
    adapters = [x1_adapter(layers, seed) for seed in (1, 2, 3)]
    read = sum(dir_bytes(a) for a in adapters)
    for method, kw in (("ties", dict(density=0.2)), ("svd", dict(svd_rank=16))):
        out = os.path.join(root, f"x1-{method}")
        code = (
            "import gomerge\nt0 = time.perf_counter()\n"
            f"r = gomerge.add_weighted_adapter({adapters!r}, [1.0, 0.7, 0.5], 'x1', combination_type={method!r}, "
            f"output_dir={out!r}, overwrite=True, progress=False, **{kw!r})\n"
            "out = dict(seconds=time.perf_counter() - t0, modules=r.modules)"
        )
        runs = [child(code) for _ in range(2)]
        go = min(runs, key=lambda r: r["seconds"])
        written = dir_bytes(out)
        rows.append(
            dict(
                scenario="X1",
                method=f"{method} of 3 r16 expert adapters",
                shapes=shapes,
                read=read,
                written=written,
                floor=(read + written) / bw,
                gomerge=go["seconds"],
                gomerge_runs=[r["seconds"] for r in runs],
                peak_rss_mib=go["peak_rss_mib"],
                check="no peer: PEFT's add_weighted_adapter refuses target_parameters adapters; mergekit merges no "
                "LoRA adapters",
            )
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)

    base, adapter = x1_base(layers), adapters[0]
    c = fuse_contenders(base, adapter, os.path.join(root, "x1-fuse"))
    size, t_copy, go, go_runs, written, peft = (c[k] for k in ("size", "copy", "go", "go_runs", "written", "peft"))
    rows.append(
        dict(
            scenario="X1",
            method="fuse r16 expert adapter",
            shapes=shapes + f", bf16 base {size / 2**30:.1f} GiB (per-expert layout)",
            read=size + dir_bytes(adapter),
            written=written,
            floor=(size + written) / bw,
            gomerge=go["seconds"],
            gomerge_runs=[r["seconds"] for r in go_runs],
            peft_e2e=peft["seconds"],
            peft_phases={k: peft[k] for k in ("load", "adapter", "merge", "save", "sync")},
            copy=t_copy,
            peak_rss_mib=go["peak_rss_mib"],
            peft_peak_rss_mib=peft["peak_rss_mib"],
            check=f"{go['changed']} tensors changed; cp -r + sync {t_copy:.2f} s; PEFT peak RSS "
            f"{peft['peak_rss_mib']:.0f} MiB",
        )
    )
    print(rows[-1], flush=True)
