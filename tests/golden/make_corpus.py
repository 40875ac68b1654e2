"""The golden corpus: SHA-256 hashes of every output of the engine on fixed inputs and seeds.

The corpus (`corpus.json` beside this file, `{case_id: sha256}`) guards byte-identity: a change of the engine that
is not meant to change any number (a refactoring, a redesign) must leave every hash as it is. `tests/test_golden.py`
recomputes it under every kernel set this CPU runs (`GOMERGE_KERNELS=go`, `avx2`, `avx512`), one subprocess each.

    .venv/bin/python tests/golden/make_corpus.py --check    # recompute (kernel set of GOMERGE_KERNELS) and compare
    .venv/bin/python tests/golden/make_corpus.py --write    # regenerate corpus.json (every runnable kernel set)

Regenerate only when a change is meant to alter the numbers, and say why in the commit.

The inputs are built here, deterministically, by PEFT on tiny models made from configs (`tests/peft_cases.py`):
LoRA factors from seeded torch generators, base models from `torch.manual_seed`. Their own hashes are cases too
(`input/...`), so that a change of torch, PEFT or transformers that alters the inputs shows as such, not as an
engine change.

What a case hashes (`hash_folder`): every tensor of the output's safetensors files, in sorted name order, as its
name, dtype, shape and raw bytes (not the files' layout, header order or `__metadata__`); each JSON file's content
(`adapter_config.json`, `config.json`, `generation_config.json`, `model.safetensors.index.json`) with its keys sorted
and without the fields that carry paths or the versions of the libraries that made the inputs (`VOLATILE`); the
names of the files written; and the engine's own figures in its result (rank, per-module ranks and relative errors,
dtype, changed tensors). Never the model card (`README.md`), timings, or warnings (they name temporary paths).
The drop-in cases hash the merged adapter's `lora_A` / `lora_B` tensors on the live model (float32 bytes, in sorted
module order) and its config's rank, alpha and target modules (torch.manual_seed(2024) before each call: PEFT's
DARE masks come from torch's generator).

Every kernel set gave the same bytes for every case when the corpus was written (no `case@kernels` keys); the
outputs do not depend on the number of workers either (checked with workers=1 and 7).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
CORPUS = os.path.join(HERE, "corpus.json")
KERNELS_ENV = "GOMERGE_KERNELS"

for _p in (os.path.join(ROOT, "python"), TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# JSON fields that carry paths, or the versions of the libraries that wrote the inputs (copied through by the engine)
VOLATILE = {"base_model_name_or_path", "_name_or_path", "peft_version", "transformers_version"}
# files that are not hashed: the model card (sources' paths, timings, versions)
UNHASHED = {"README.md"}

# fixed values of the methods' parameters (by the names of `gomerge.methods()[i]["params"]`); every method gets those
# it reads, except the rank options (their own cases below)
PARAMS = {
    "density": 0.5,
    "majority_sign_method": "total",
    "lambda": 0.8,
    "gamma": 0.05,
    "epsilon": 0.1,
    "scaling": 1.25,
    "common_fraction": 0.7,
}
SEED = 7


# ---------------------------------------------------------------------------------------------------- hashing


def _safetensors(path: str) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), read from the file itself (no framework: bf16 stays bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], list(info["shape"]), data[base + start : base + end])
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _update_tensor(h, name: str, dtype: str, shape: list[int], raw: bytes) -> None:
    h.update(f"tensor {name} {dtype} {shape} {len(raw)}\n".encode())
    h.update(raw)


def hash_folder(folder: str, result: dict | None = None) -> str:
    """SHA-256 of an output folder's tensors, JSON files and file names, and of the engine's figures `result`."""
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(folder) if f not in UNHASHED)
    h.update(f"files {files}\n".encode())
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for f in files:
        path = os.path.join(folder, f)
        if f.endswith(".safetensors"):
            for name, t in _safetensors(path).items():
                assert name not in tensors, f"{name} in two files of {folder}"
                tensors[name] = t
        elif f.endswith(".json"):
            with open(path) as fh:
                content = _clean(json.load(fh))
            h.update(f"json {f} {json.dumps(content, sort_keys=True)}\n".encode())
        else:
            raise AssertionError(f"unexpected file {f} in {folder}: hash it or list it in UNHASHED")
    for name in sorted(tensors):
        _update_tensor(h, name, *tensors[name])
    if result is not None:
        h.update(f"result {json.dumps(result, sort_keys=True)}\n".encode())
    return h.hexdigest()


def _merge_figures(res) -> dict:
    return {
        "rank": res.rank,
        "modules": res.modules,
        "dtype": res.dtype,
        "seed": res.seed,
        "module_ranks": res.module_ranks,
        "module_errors": {k: float(v).hex() for k, v in res.module_errors.items()},
    }


# ---------------------------------------------------------------------------------------------------- inputs


def _adapter_sets() -> dict[str, tuple[str, list, list]]:
    """name -> (model kind, AdapterSpecs, merge weights)."""
    import torch
    from peft_cases import LLAMA_ALL, AdapterSpec

    def spec(seed, dtype=torch.float32, **lora):
        return AdapterSpec(lora, seed, dtype)

    qv = ["q_proj", "v_proj", "down_proj"]
    return {
        "llama3": (
            "llama",
            [
                spec(1, r=8, lora_alpha=16, target_modules=LLAMA_ALL),
                spec(2, r=8, lora_alpha=8, target_modules=LLAMA_ALL),
                spec(3, r=8, lora_alpha=32, target_modules=LLAMA_ALL),
            ],
            [2.0, 1.0, 1.0],
        ),
        "llama3-bf16": (
            "llama",
            [
                spec(23, torch.bfloat16, r=8, lora_alpha=16, target_modules=LLAMA_ALL),
                spec(24, torch.bfloat16, r=8, lora_alpha=8, target_modules=LLAMA_ALL),
                spec(25, torch.bfloat16, r=8, lora_alpha=16, target_modules=LLAMA_ALL),
            ],
            [2.0, 1.0, 1.0],
        ),
        "llama2-f16": (
            "llama",
            [
                spec(26, torch.float16, r=8, lora_alpha=16, target_modules=LLAMA_ALL),
                spec(27, torch.float16, r=8, lora_alpha=8, target_modules=LLAMA_ALL),
            ],
            [1.0, 1.0],
        ),
        "mixed-targets-negative": (
            "llama",
            [
                spec(4, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                spec(5, r=8, lora_alpha=12, target_modules=["k_proj", "v_proj", "o_proj"]),
                spec(6, r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"]),
            ],
            [1.0, -0.5, 0.7],
        ),
        "different-ranks": (
            "llama",
            [
                spec(19, r=4, lora_alpha=8, target_modules=LLAMA_ALL),
                spec(20, r=8, lora_alpha=8, target_modules=LLAMA_ALL),
                spec(21, r=16, lora_alpha=8, target_modules=LLAMA_ALL),
            ],
            [1.0, 1.0, 1.0],
        ),
        "rslora-patterns": (
            "llama",
            [
                spec(15, r=8, lora_alpha=16, use_rslora=True, target_modules=qv, rank_pattern={"v_proj": 4}),
                spec(16, r=8, lora_alpha=24, use_rslora=True, target_modules=qv, alpha_pattern={"down_proj": 3.0}),
            ],
            [0.6, 1.1],
        ),
        "embedding": (
            "llama",
            [
                spec(7, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]),
                spec(8, r=4, lora_alpha=4, target_modules=["embed_tokens", "v_proj"]),
            ],
            [1.0, 0.5],
        ),
        "conv2d": (
            "conv",
            [
                spec(9, r=4, lora_alpha=8, target_modules=["conv1", "conv2", "head"]),
                spec(10, r=4, lora_alpha=2, target_modules=["conv1", "conv2", "head"]),
            ],
            [0.7, 1.3],
        ),
        "gpt2-fan-in-fan-out": (
            "gpt2",
            [
                spec(11, r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                spec(12, r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
            ],
            [1.0, 1.0],
        ),
        # 384 x 640 layers: the randomized SVD rather than the exact small-matrix path
        "wide": (
            "wide",
            [
                spec(31, r=8, lora_alpha=16, target_modules=["up", "down"]),
                spec(32, r=8, lora_alpha=8, target_modules=["up", "down"]),
            ],
            [1.0, 0.8],
        ),
    }


def _fuse_adapter(kind: str, path: str, seed: int, **lora) -> str:
    """A PEFT adapter with random factors, DoRA magnitudes and modules_to_save copies (as tests/test_fuse.py)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft_cases import MODELS

    model = get_peft_model(MODELS[kind](0), LoraConfig(init_lora_weights=False, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                noise = torch.randn(p.shape, generator=g) * 0.05
                p.copy_(p + noise if "magnitude" in name else noise)
    model.save_pretrained(path)
    return path


def _fine_tune(path: str, seed: int, noise: float) -> str:
    """peft_cases.llama(0) plus a seeded low-rank change (ranks 2, 4, 3) of q_proj, v_proj and down_proj, noise,
    and a changed final norm."""
    import torch
    from peft_cases import llama

    gen = torch.Generator().manual_seed(seed)
    model = llama(0)
    sd = model.state_dict()
    with torch.no_grad():
        for layer in range(2):
            for mod, r in (("self_attn.q_proj", 2), ("self_attn.v_proj", 4), ("mlp.down_proj", 3)):
                w = sd[f"model.layers.{layer}.{mod}.weight"]
                u, _ = torch.linalg.qr(torch.randn(w.shape[0], r, generator=gen))
                v, _ = torch.linalg.qr(torch.randn(w.shape[1], r, generator=gen))
                s = float(w.norm()) * 0.5 * 0.7 ** torch.arange(r, dtype=torch.float32)
                w += (u * s) @ v.T + noise * float(w.std()) * torch.randn(w.shape, generator=gen)
        sd["model.norm.weight"] += 0.1 * torch.randn(sd["model.norm.weight"].shape, generator=gen)
    model.save_pretrained(path)
    return path


def _sort_target_modules(adapter: str) -> None:
    """PEFT writes `target_modules` in the order of a Python set (it varies with PYTHONHASHSEED): sorted, the
    inputs are the same bytes in every process."""
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    if isinstance(cfg.get("modules_to_save"), list):
        cfg["modules_to_save"] = sorted(cfg["modules_to_save"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def build_inputs(root: str) -> dict[str, Any]:
    """Builds every input under `root` (adapters, base models, fine-tunes) and returns their paths; a second call
    on the same `root` reuses them (`inputs.json`)."""
    index = os.path.join(root, "inputs.json")
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)
    import torch
    from peft_cases import LLAMA_ALL, gpt2, llama, make_adapter

    os.makedirs(root, exist_ok=True)
    paths: dict[str, Any] = {"sets": {}, "weights": {}, "kinds": {}}
    for name, (kind, specs, weights) in _adapter_sets().items():
        paths["sets"][name] = [make_adapter(kind, s, os.path.join(root, f"{name}-{i}")) for i, s in enumerate(specs)]
        paths["weights"][name] = weights
        paths["kinds"][name] = kind
    bases = {
        "llama-f32": (llama(0), torch.float32),
        "llama-bf16": (llama(0), torch.bfloat16),
        "gpt2-f32": (gpt2(0), torch.float32),
        "tied-f32": (llama(0, tie_word_embeddings=True), torch.float32),
    }
    for name, (model, dtype) in bases.items():
        paths[f"base/{name}"] = os.path.join(root, f"base-{name}")
        model.to(dtype).save_pretrained(paths[f"base/{name}"])
    paths["base/llama-sharded"] = os.path.join(root, "base-llama-sharded")
    llama(0).save_pretrained(paths["base/llama-sharded"], max_shard_size="100KB")
    fa = {
        "plain": ("llama", 41, dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL)),
        "dora-save": (
            "llama",
            42,
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"]),
        ),
        "gpt2-bias": (
            "gpt2",
            43,
            dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True),
        ),
        "tied-embedding": ("tied", 44, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
        "qv": ("llama", 45, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        "vo": ("llama", 46, dict(r=8, lora_alpha=4, target_modules=["v_proj", "o_proj"])),
    }
    for name, (kind, seed, lora) in fa.items():
        if kind == "tied":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(llama(0, tie_word_embeddings=True), LoraConfig(init_lora_weights=False, **lora))
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "lora_" in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            paths[f"fuse/{name}"] = os.path.join(root, f"fuse-{name}")
            model.save_pretrained(paths[f"fuse/{name}"])
        else:
            paths[f"fuse/{name}"] = _fuse_adapter(kind, os.path.join(root, f"fuse-{name}"), seed, **lora)
    paths["finetuned/exact"] = _fine_tune(os.path.join(root, "ft-exact"), 51, 0.0)
    paths["finetuned/noisy"] = _fine_tune(os.path.join(root, "ft-noisy"), 52, 0.02)
    for d in [*(d for dirs in paths["sets"].values() for d in dirs), *(paths[k] for k in paths if k[:5] == "fuse/")]:
        _sort_target_modules(d)
    with open(index, "w") as f:
        json.dump(paths, f)
    return paths


# ---------------------------------------------------------------------------------------------------- cases


def method_kwargs(method: dict) -> dict:
    """The fixed parameters of a method of `gomerge.methods()` (and the seed, for the random ones)."""
    kw = {("lambda_" if p == "lambda" else p): PARAMS[p] for p in method["params"] if p in PARAMS}
    if method["random"]:
        kw["seed"] = SEED
    return kw


def _methods() -> dict[str, dict]:
    import gomerge

    return {m["name"]: m for m in gomerge.methods()}


HALF_METHODS = ("svd", "linear", "cat", "ties", "dare_linear", "task_arithmetic", "della", "iso_c", "knots_ties")


def cases() -> dict[str, Callable[[dict, str], str]]:
    """case id -> function(inputs, output folder) -> sha256."""
    import gomerge

    methods = _methods()
    out: dict[str, Callable[[dict, str], str]] = {}

    def merge(name: str, method: str, weights=None, **extra) -> Callable[[dict, str], str]:
        def run(inp: dict, dest: str) -> str:
            kw = {**method_kwargs(methods[method]), **extra}
            res = gomerge.add_weighted_adapter(
                inp["sets"][name], weights or inp["weights"][name], "merged", method, output_dir=dest, **kw
            )
            return hash_folder(dest, _merge_figures(res))

        return run

    # every method on the 3-adapter llama case, then in bf16 and f16 for a few
    for m in methods:
        out[f"merge/llama3/{m}"] = merge("llama3", m)
    for m in HALF_METHODS:
        out[f"merge/llama3-bf16/{m}"] = merge("llama3-bf16", m)
    for m in ("svd", "cat", "ties_svd", "dare_ties", "tsv"):
        out[f"merge/llama2-f16/{m}"] = merge("llama2-f16", m)
    # rank control, clamping, options
    out["merge/llama3/svd-rank4"] = merge("llama3", "svd", svd_rank=4)
    out["merge/llama3/svd-rank12-clamp0.9"] = merge("llama3", "svd", svd_rank=12, svd_clamp=0.9)
    out["merge/llama3/svd-energy0.9-max6"] = merge("llama3", "svd", svd_rank="energy:0.9", max_rank=6)
    out["merge/llama3/task_arithmetic-energy0.95"] = merge("llama3", "task_arithmetic", svd_rank="energy:0.95")
    out["merge/llama3/task_arithmetic-rank10-max6"] = merge("llama3", "task_arithmetic", svd_rank=10, max_rank=6)
    out["merge/llama3/ties_svd-rank5-clamp0.95"] = merge("llama3", "ties_svd", svd_rank=5, svd_clamp=0.95)
    out["merge/llama3/iso_c-energy0.8"] = merge("llama3", "iso_c", svd_rank="energy:0.8")
    out["merge/llama3/knots_ties-rank6"] = merge("llama3", "knots_ties", svd_rank=6)
    out["merge/llama3/breadcrumbs-rank6"] = merge("llama3", "breadcrumbs", svd_rank=6)
    out["merge/llama3/ties-frequency"] = merge("llama3", "ties", majority_sign_method="frequency")
    out["merge/llama3/dare_ties_svd-seed99"] = merge("llama3", "dare_ties_svd", seed=99)
    out["merge/llama3/cat-dtype-bf16"] = merge("llama3", "cat", dtype="bfloat16")
    out["merge/llama3/svd-dtype-f16"] = merge("llama3", "svd", dtype="float16")
    out["merge/llama3/task_arithmetic-module-weights"] = merge(
        "llama3",
        "task_arithmetic",
        weights=[{r"self_attn\..*": 1.0, r"mlp\..*": 0.0}, {r".*q_proj": -0.5, ".*": 0.5}, 1.0],
    )
    out["merge/llama3/svd-layer-gradient"] = merge("llama3", "svd", weights=[[1.0, 0.0], [0.0, 1.0], 0.5])
    # other adapter shapes
    for name, ms in {
        "mixed-targets-negative": ("svd", "cat", "linear", "task_arithmetic", "ties_svd", "iso_c"),
        "different-ranks": (
            "svd",
            "cat",
            "task_arithmetic",
            "iso_cts",
            "tsv",
            "core_tsv",  # on llama3, core_tsv and tsv keep the same triplets (the same bytes); not here
            "core_ties",
            "knots_linear",
            "della_linear",
        ),
        "rslora-patterns": ("svd", "cat", "task_arithmetic", "tsv", "magnitude_prune_svd"),
        "embedding": ("svd", "cat", "linear", "task_arithmetic", "ties"),
        "conv2d": ("svd", "cat", "linear", "task_arithmetic", "magnitude_prune_svd"),
        "gpt2-fan-in-fan-out": ("svd", "cat", "linear", "task_arithmetic", "dare_linear"),
        "wide": (
            "svd",
            "ties_svd",
            "dare_linear_svd",
            "magnitude_prune_svd",
            "breadcrumbs_ties",
            "della",
            "core_dare_ties",
            "knots_dare_ties",
        ),
    }.items():
        for m in ms:
            out[f"merge/{name}/{m}"] = merge(name, m)
    out["merge/wide/svd-rank4"] = merge("wide", "svd", svd_rank=4)
    out["merge/wide/ties_svd-rank3"] = merge("wide", "ties_svd", svd_rank=3)
    out["merge/single/svd-as-linear"] = lambda inp, dest: hash_folder(
        dest,
        _merge_figures(
            gomerge.add_weighted_adapter([inp["sets"]["llama3"][0]], [1.5], "merged", "svd", output_dir=dest)
        ),
    )

    # resize
    def resize(name: str, i: int, **kw) -> Callable[[dict, str], str]:
        def run(inp: dict, dest: str) -> str:
            res = gomerge.resize(inp["sets"][name][i], output_dir=dest, **kw)
            return hash_folder(dest, _merge_figures(res))

        return run

    out["resize/llama3-0/rank4"] = resize("llama3", 0, rank=4)
    out["resize/llama3-1/energy0.9-max6"] = resize("llama3", 1, energy=0.9, max_rank=6)
    out["resize/different-ranks-2/rank12"] = resize("different-ranks", 2, rank=12)
    out["resize/llama3-bf16-0/rank3"] = resize("llama3-bf16", 0, rank=3)
    out["resize/wide-0/rank5-f16"] = resize("wide", 0, rank=5, dtype="float16")

    # fuse
    def fuse(base: str, adapters: list[str], **kw) -> Callable[[dict, str], str]:
        def run(inp: dict, dest: str) -> str:
            res = gomerge.fuse(inp[f"base/{base}"], [inp[f"fuse/{a}"] for a in adapters], output_dir=dest, **kw)
            figures = {
                "tensors": res.tensors,
                "changed": sorted(
                    json.dumps({**c, "adapters": [os.path.basename(a) for a in c.get("adapters", [])]}, sort_keys=True)
                    for c in res.changed
                ),
                "total_size": res.total_size,
                "untied": res.untied,
                "combination_type": res.combination_type,
                "shards": sorted(os.path.basename(s) for s in res.shards),
            }
            return hash_folder(dest, figures)

        return run

    out["fuse/llama-f32/plain"] = fuse("llama-f32", ["plain"])
    out["fuse/llama-bf16/plain"] = fuse("llama-bf16", ["plain"])
    out["fuse/llama-f32/plain-to-bf16"] = fuse("llama-f32", ["plain"], dtype="bfloat16")
    out["fuse/llama-bf16/dora-save"] = fuse("llama-bf16", ["dora-save"])
    out["fuse/llama-f32/dora-save"] = fuse("llama-f32", ["dora-save"])
    out["fuse/gpt2-f32/lora-bias"] = fuse("gpt2-f32", ["gpt2-bias"])
    out["fuse/tied-f32/embedding-untie"] = fuse("tied-f32", ["tied-embedding"])
    out["fuse/llama-sharded/plain-reshard"] = fuse("llama-sharded", ["plain"], max_shard_size=60_000)
    out["fuse/llama-f32/cat-weights"] = fuse("llama-f32", ["qv", "vo"], weights=[0.7, -0.4])
    out["fuse/llama-f32/stack"] = fuse("llama-f32", ["qv", "vo"], weights=[0.7, -0.4], stack=True)
    out["fuse/llama-bf16/ties3"] = fuse("llama-bf16", ["plain", "qv", "vo"], combination_type="ties_svd", density=0.5)
    out["fuse/llama-f32/svd-rank2"] = fuse("llama-f32", ["qv", "vo"], combination_type="svd", svd_rank=2)
    out["fuse/llama-f32/dare_linear_svd"] = fuse(
        "llama-f32", ["qv", "vo"], combination_type="dare_linear_svd", density=0.5, seed=SEED
    )

    # extract
    def extract(ft: str, **kw) -> Callable[[dict, str], str]:
        def run(inp: dict, dest: str) -> str:
            res = gomerge.extract(inp["base/llama-f32"], inp[f"finetuned/{ft}"], dest, **kw)
            figures = {
                "rank": res.rank,
                "module_ranks": res.module_ranks,
                "module_errors": {k: float(v).hex() for k, v in res.module_errors.items()},
                "unchanged": sorted(res.unchanged),
                "modules_to_save": sorted(res.modules_to_save),
                "dtype": res.dtype,
                "seed": res.seed,
            }
            return hash_folder(dest, figures)

        return run

    out["extract/exact/rank4"] = extract("exact", rank=4)
    out["extract/noisy/rank6-seed0"] = extract("noisy", rank=6)
    out["extract/noisy/rank6-seed3"] = extract("noisy", rank=6, seed=3)
    out["extract/noisy/energy0.9-max8"] = extract("noisy", energy=0.9, max_rank=8)
    out["extract/noisy/rank4-bf16-save"] = extract("noisy", rank=4, dtype="bfloat16", modules_to_save=True)

    # the drop-in on a live PeftModel
    from peft_cases import PEFT_TYPES

    for t in PEFT_TYPES:
        out[f"dropin/llama3/{t}"] = _dropin(t)
    out["dropin/mixed-targets-negative/cat"] = _dropin("cat", "mixed-targets-negative")
    out["dropin/mixed-targets-negative/svd"] = _dropin("svd", "mixed-targets-negative")
    return out


_LIVE: dict[str, Any] = {}


def _live_model(inp: dict, name: str):
    """The set's adapters loaded as a0, a1, ... into one PeftModel, built once per process."""
    if name not in _LIVE:
        from peft import PeftModel
        from peft_cases import MODELS

        dirs = inp["sets"][name]
        model = PeftModel.from_pretrained(MODELS[inp["kinds"][name]](0), dirs[0], adapter_name="a0")
        for i, d in enumerate(dirs[1:], start=1):
            model.load_adapter(d, adapter_name=f"a{i}")
        _LIVE[name] = model.eval()
    return _LIVE[name]


def _dropin(ctype: str, name: str = "llama3") -> Callable[[dict, str], str]:
    def run(inp: dict, dest: str) -> str:
        import torch
        from peft.tuners.lora import LoraLayer

        import gomerge.peft as gp

        model = _live_model(inp, name)
        names = [f"a{i}" for i in range(len(inp["sets"][name]))]
        kw = {} if ctype in ("svd", "linear", "cat") else {"density": 0.4}
        torch.manual_seed(2024)
        gp.add_weighted_adapter(model, names, inp["weights"][name], "merged", combination_type=ctype, **kw)
        try:
            h = hashlib.sha256()
            for mod_name, mod in sorted(model.named_modules(), key=lambda x: x[0]):
                if isinstance(mod, LoraLayer) and "merged" in mod.lora_A:
                    for part, t in (("lora_A", mod.lora_A["merged"].weight), ("lora_B", mod.lora_B["merged"].weight)):
                        arr = t.detach().float().contiguous().numpy()
                        _update_tensor(h, f"{mod_name}.{part}", "F32", list(arr.shape), arr.tobytes())
            cfg = model.peft_config["merged"]
            h.update(f"config r={cfg.r} alpha={cfg.lora_alpha} targets={sorted(cfg.target_modules)}\n".encode())
            return h.hexdigest()
        finally:
            model.delete_adapter("merged")

    return run


def input_hashes(inp: dict) -> dict[str, str]:
    out = {}
    for name, dirs in inp["sets"].items():
        for i, d in enumerate(dirs):
            out[f"input/{name}-{i}"] = hash_folder(d)
    for key, path in inp.items():
        if isinstance(path, str):
            out[f"input/{key}"] = hash_folder(path)
    return out


def compute(root: str, only: set[str] | None = None) -> dict[str, str]:
    """Every case's hash (or those in `only`), with the inputs under `root/inputs` (built if absent)."""
    import warnings

    inp = build_inputs(os.path.join(root, "inputs"))
    hashes = {k: v for k, v in input_hashes(inp).items() if only is None or k in only}
    outputs = tempfile.mkdtemp(prefix="out-", dir=root)
    for i, (case_id, run) in enumerate(cases().items()):
        if only is not None and case_id not in only:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                hashes[case_id] = run(inp, os.path.join(outputs, f"{i:03d}"))
            except Exception as exc:
                raise RuntimeError(f"golden case {case_id}: {type(exc).__name__}: {exc}") from exc
    return hashes


def kernel_sets() -> list[str]:
    """The kernel sets this CPU (and this build) runs."""
    from gomerge import _native

    return list(_native.kernel_info()["runnable"])


def in_subprocess(kernels: str, root: str) -> dict[str, str]:
    """`compute` in a fresh Python with GOMERGE_KERNELS=kernels (the engine reads it at import)."""
    out = os.path.join(root, f"hashes-{kernels}.json")
    env = {**os.environ, KERNELS_ENV: kernels}
    cmd = [sys.executable, os.path.abspath(__file__), "--root", root, "--json", out, "--expect-kernels", kernels]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (GOMERGE_KERNELS={kernels}) failed:\n{proc.stdout}\n{proc.stderr}")
    with open(out) as f:
        return json.load(f)


def load_corpus() -> dict[str, str]:
    with open(CORPUS) as f:
        return json.load(f)


def expected(corpus: dict[str, str], case_id: str, kernels: str) -> str | None:
    """The committed hash of a case under a kernel set: `case@kernels` where the sets differ, else `case`."""
    return corpus.get(f"{case_id}@{kernels}", corpus.get(case_id))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate corpus.json under every runnable kernel set")
    mode.add_argument("--check", action="store_true", help="recompute (GOMERGE_KERNELS' set) and compare")
    mode.add_argument("--json", metavar="FILE", help="write the hashes (GOMERGE_KERNELS' set) to FILE")
    ap.add_argument("--root", help="work folder (inputs are built once there); default: a temporary one")
    ap.add_argument("--expect-kernels", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gomerge-golden-") as tmp:
        root = args.root or tmp
        if args.expect_kernels:
            from gomerge import engine_kernels

            assert engine_kernels() == args.expect_kernels, (engine_kernels(), args.expect_kernels)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(compute(root), f, indent=1, sort_keys=True)
            return 0
        if args.check:
            from gomerge import engine_kernels

            corpus, ks = load_corpus(), engine_kernels()
            got = compute(root)
            bad = [
                c for c in sorted(set(got) | {k.split("@")[0] for k in corpus}) if got.get(c) != expected(corpus, c, ks)
            ]
            for c in bad:
                print(f"MISMATCH {c} ({ks}): corpus {expected(corpus, c, ks)}, now {got.get(c)}")
            print(f"{len(got) - len(bad)}/{len(got)} cases as in the corpus (kernels {ks})")
            return 1 if bad else 0
        build_inputs(os.path.join(root, "inputs"))
        per_kernel = {k: in_subprocess(k, root) for k in kernel_sets()}
        first = next(iter(per_kernel.values()))
        assert all(sorted(h) == sorted(first) for h in per_kernel.values()), "kernel sets computed different cases"
        corpus = {}
        for case_id in sorted(first):
            values = {k: h[case_id] for k, h in per_kernel.items()}
            if len(set(values.values())) == 1:
                corpus[case_id] = first[case_id]
            else:
                print(f"kernel sets differ on {case_id}: {values}")
                corpus.update({f"{case_id}@{k}": v for k, v in values.items()})
        with open(CORPUS, "w") as f:
            json.dump(corpus, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {len(corpus)} hashes to {CORPUS} (kernel sets {', '.join(per_kernel)})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
