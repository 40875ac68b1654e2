"""gomerge.fuse against PEFT's merge_and_unload() + save_pretrained, on small models built from transformers configs.

Every case builds a base model folder with `save_pretrained` and a real adapter with PEFT, fuses them with gomerge and
compares the output folder with PEFT's merged model saved the same way: the same tensor names and shapes, float32
tensors within 1e-6 relative, bf16 tensors at most 1 ulp from the exact sum (float64), and the reloaded fused model's
logits equal to those of PEFT's model.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft_cases import LLAMA_ALL, ConvNet, gpt2, llama, logits, model_input
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import gomerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tied_llama(seed: int = 0) -> nn.Module:
    """peft_cases.llama with lm_head tied to embed_tokens."""
    return llama(seed, tie_word_embeddings=True)


MODELS = {"llama": llama, "gpt2": gpt2, "tied": tied_llama}


def save_base(kind: str, path: str, dtype: torch.dtype = torch.float32, **save_kwargs) -> str:
    MODELS[kind](0).to(dtype).save_pretrained(path, **save_kwargs)
    return path


def make_adapter(kind: str, path: str, seed: int = 1, std: float = 0.05, **lora) -> str:
    """A PEFT adapter with random factors (and random modules_to_save copies, so that they differ from the base)."""
    model = get_peft_model(MODELS[kind](0), LoraConfig(init_lora_weights=False, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(
                    p + torch.randn(p.shape, generator=g) * std
                    if "magnitude" in name
                    else torch.randn(p.shape, generator=g) * std
                )
    model.save_pretrained(path)
    return path


def peft_model(kind: str, adapters: list[str], dtype: torch.dtype = torch.float32) -> PeftModel:
    model = PeftModel.from_pretrained(MODELS[kind](0).to(dtype), adapters[0], adapter_name="a0")
    for i, d in enumerate(adapters[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model.eval()


def peft_fused(kind: str, adapters: list[str], path: str, dtype: torch.dtype = torch.float32, **save_kwargs):
    """PEFT end to end: load, merge_and_unload (every adapter when several), save_pretrained."""
    model = peft_model(kind, adapters, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    merged = model.merge_and_unload(adapter_names=names)
    merged.save_pretrained(path, **save_kwargs)
    return merged


def tensors(folder: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    o, t = ours.double(), theirs.double()
    return float((o - t).abs().max() / max(float(t.abs().max()), 1e-30))


def no_temp(parent) -> bool:
    return not [p for p in os.listdir(parent) if p.startswith(".gomerge-tmp")]


def assert_same_folder(ours: str, theirs: str, rtol: float = 1e-6) -> float:
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in b:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == b[k].dtype, k
        worst = max(worst, rel(a[k], b[k]))
    assert worst <= rtol, worst
    return worst


def reload_logits(folder: str, kind: str) -> np.ndarray:
    return logits(AutoModelForCausalLM.from_pretrained(folder).eval(), kind)


CASES = {
    "llama all-linear": ("llama", [dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL)]),
    "llama rslora + rank/alpha patterns": (
        "llama",
        [
            dict(
                r=8,
                lora_alpha=16,
                use_rslora=True,
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"v_proj": 4},
                alpha_pattern={"down_proj": 3.0},
            )
        ],
    ),
    "gpt2 fan_in_fan_out c_attn": (
        "gpt2",
        [dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)],
    ),
    "gpt2 lora_bias": (
        "gpt2",
        [dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)],
    ),
    "llama embedding": ("llama", [dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])]),
    "llama DoRA": (
        "llama",
        [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)],
    ),
    "gpt2 DoRA fan_in_fan_out": (
        "gpt2",
        [dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)],
    ),
    "llama modules_to_save": (
        "llama",
        [dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head", "input_layernorm"])],
    ),
    "llama two adapters": (
        "llama",
        [
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            dict(r=8, lora_alpha=4, target_modules=["v_proj", "o_proj"]),
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fuse_matches_peft_merge_and_unload(tmp_path, case, record_parity):
    kind, loras = CASES[case]
    base = save_base(kind, str(tmp_path / "base"))
    dirs = [make_adapter(kind, str(tmp_path / f"a{i}"), seed=i + 1, **lora) for i, lora in enumerate(loras)]
    stack = len(dirs) > 1
    res = gomerge.fuse(base, dirs, output_dir=str(tmp_path / "ours"), stack=stack)
    merged = peft_fused(kind, dirs, str(tmp_path / "peft"))
    worst = assert_same_folder(str(tmp_path / "ours"), str(tmp_path / "peft"))
    record_parity(f"fuse {case}", worst, "largest relative difference of fused weights from PEFT's merge_and_unload")
    assert res.changed and not res.untied
    np.testing.assert_allclose(reload_logits(str(tmp_path / "ours"), kind), logits(merged, kind), rtol=1e-4, atol=1e-5)
    for f in os.listdir(tmp_path / "base"):
        if not f.endswith(".safetensors") and f != "config.json":
            assert (tmp_path / "ours" / f).exists(), f
    card = (tmp_path / "ours" / "README.md").read_text()
    assert base in card and all(d in card for d in dirs)


def test_several_adapters_merged_first_equal_the_weighted_sum(tmp_path):
    base = save_base("llama", str(tmp_path / "base"))
    dirs = [
        make_adapter("llama", str(tmp_path / "a0"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_adapter("llama", str(tmp_path / "a1"), seed=2, r=8, lora_alpha=4, target_modules=["v_proj", "o_proj"]),
    ]
    weights = [0.7, -0.4]
    merged = gomerge.fuse(base, dirs, weights, output_dir=str(tmp_path / "cat"))
    assert merged.combination_type == "cat"
    stacked = gomerge.fuse(base, dirs, weights, output_dir=str(tmp_path / "stack"), stack=True)
    assert stacked.combination_type == ""
    model = peft_model("llama", dirs)
    model.add_weighted_adapter(["a0", "a1"], weights, "m", combination_type="cat")
    model.set_adapter("m")
    peft_cat = model.merge_and_unload(adapter_names=["m"])
    expect = {k: v for k, v in peft_cat.state_dict().items()}
    for out in ("cat", "stack"):
        got = tensors(str(tmp_path / out))
        assert sorted(got) == sorted(expect)
        for k in expect:
            assert rel(got[k], expect[k]) <= 1e-6, (out, k)
    # any merge method runs before fusing: svd at a lower rank differs from the exact sum
    svd = gomerge.fuse(base, dirs, weights, combination_type="svd", svd_rank=2, output_dir=str(tmp_path / "svd"))
    assert svd.combination_type == "svd"
    assert (
        rel(
            tensors(str(tmp_path / "svd"))["model.layers.0.self_attn.v_proj.weight"],
            expect["model.layers.0.self_attn.v_proj.weight"],
        )
        > 1e-6
    )
    with pytest.raises(ValueError, match="stack"):
        gomerge.fuse(base, dirs, combination_type="ties", density=0.5, stack=True, output_dir=str(tmp_path / "x"))


def test_tied_embeddings_are_untied_when_the_adapter_changes_one(tmp_path):
    base = save_base("tied", str(tmp_path / "base"))
    assert "lm_head.weight" not in tensors(base)
    ad = make_adapter("tied", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    res = gomerge.fuse(base, [ad], output_dir=str(tmp_path / "ours"))
    assert res.untied
    ours = tensors(str(tmp_path / "ours"))
    base_t = tensors(base)
    assert "lm_head.weight" in ours
    assert torch.equal(ours["lm_head.weight"], base_t["model.embed_tokens.weight"])  # lm_head keeps the base matrix
    assert json.load(open(tmp_path / "ours" / "config.json"))["tie_word_embeddings"] is False
    merged = peft_fused("tied", [ad], str(tmp_path / "peft"))
    theirs = tensors(str(tmp_path / "peft"))
    assert rel(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"]) <= 1e-6
    # PEFT's merge changes the shared matrix, so its merged model's lm_head moves too: the fused model reloads as the
    # adapter ran before merging (the input embedding adapted, the output projection not)
    unmerged = peft_model("tied", [ad])
    np.testing.assert_allclose(
        reload_logits(str(tmp_path / "ours"), "llama"), logits(unmerged, "llama"), rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(logits(merged, "llama"), logits(unmerged, "llama"), rtol=1e-4, atol=1e-5)


def test_tied_lm_head_adapter_unties_and_writes_both(tmp_path):
    base = save_base("tied", str(tmp_path / "base"))
    ad = make_adapter("tied", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["lm_head"])
    res = gomerge.fuse(base, [ad], output_dir=str(tmp_path / "ours"))
    assert res.untied
    ours, base_t = tensors(str(tmp_path / "ours")), tensors(base)
    assert torch.equal(ours["model.embed_tokens.weight"], base_t["model.embed_tokens.weight"])
    unmerged = peft_model("tied", [ad])
    np.testing.assert_allclose(
        reload_logits(str(tmp_path / "ours"), "llama"), logits(unmerged, "llama"), rtol=1e-4, atol=1e-5
    )


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    _, e = np.frexp(np.abs(x))
    return np.ldexp(1.0, np.maximum(e - 8, -133))


def test_bf16_is_rounded_once_from_the_exact_sum(tmp_path, record_parity):
    base = save_base("llama", str(tmp_path / "base"), dtype=torch.bfloat16)
    ad = make_adapter("llama", str(tmp_path / "a"), r=8, lora_alpha=16, std=0.2, target_modules=LLAMA_ALL)
    gomerge.fuse(base, [ad], output_dir=str(tmp_path / "ours"))
    peft_fused("llama", [ad], str(tmp_path / "peft"), dtype=torch.bfloat16)
    ours, theirs, base_t, factors = (
        tensors(str(tmp_path / "ours")),
        tensors(str(tmp_path / "peft")),
        tensors(base),
        load_file(os.path.join(ad, "adapter_model.safetensors")),
    )
    assert sorted(ours) == sorted(theirs)
    cfg = json.load(open(os.path.join(ad, "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"]
    worst_ours = worst_peft = 0.0
    exact_rounding = total = 0
    for k, w in base_t.items():
        assert ours[k].dtype == torch.bfloat16
        mod = k.removesuffix(".weight")
        a = factors.get(f"base_model.model.{mod}.lora_A.weight")
        if a is None:
            assert torch.equal(ours[k], w), k
            continue
        b = factors[f"base_model.model.{mod}.lora_B.weight"]
        exact = w.double().numpy() + s * (b.double() @ a.double()).numpy()
        ulp = _bf16_ulp(exact)
        err = np.abs(ours[k].double().numpy() - exact) / ulp
        worst_ours = max(worst_ours, float(err.max()))
        worst_peft = max(worst_peft, float((np.abs(theirs[k].double().numpy() - exact) / ulp).max()))
        nearest = torch.from_numpy(exact).to(torch.float32).to(torch.bfloat16)  # exact -> f32 is exact enough here
        exact_rounding += int((ours[k] == nearest).sum())
        total += exact.size
    record_parity("fuse bf16: ours, largest error in ulps of the exact sum", worst_ours, "bf16 fused weights (ulps)")
    record_parity("fuse bf16: PEFT merge_and_unload, largest error in ulps", worst_peft, "bf16 fused weights (ulps)")
    assert worst_ours <= 1.0
    assert exact_rounding / total > 0.999


def test_sharded_base_keeps_its_layout_or_is_resplit(tmp_path):
    base = save_base("llama", str(tmp_path / "base"), max_shard_size="100KB")
    index = json.load(open(tmp_path / "base" / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    res = gomerge.fuse(base, [ad], output_dir=str(tmp_path / "ours"))
    assert sorted(res.shards) == shards
    ours_index = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))
    assert ours_index["weight_map"] == index["weight_map"]
    assert ours_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(base).values())
    merged = peft_fused("llama", [ad], str(tmp_path / "peft"), max_shard_size="100KB")
    assert_same_folder(str(tmp_path / "ours"), str(tmp_path / "peft"))
    np.testing.assert_allclose(
        reload_logits(str(tmp_path / "ours"), "llama"), logits(merged, "llama"), rtol=1e-4, atol=1e-5
    )
    # one file, then a new split
    one = gomerge.fuse(base, [ad], output_dir=str(tmp_path / "one"), max_shard_size="1GB")
    assert one.shards == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert_same_folder(str(tmp_path / "one"), str(tmp_path / "peft"))
    many = gomerge.fuse(base, [ad], output_dir=str(tmp_path / "many"), max_shard_size=60_000, dtype="bfloat16")
    assert len(many.shards) > 2
    for f in many.shards:
        assert os.path.getsize(tmp_path / "many" / f) < 60_000 + 4096 or len(load_file(str(tmp_path / "many" / f))) == 1
    assert all(t.dtype == torch.bfloat16 for t in tensors(str(tmp_path / "many")).values())
    assert json.load(open(tmp_path / "many" / "config.json"))["dtype"] == "bfloat16"
    reload_logits(str(tmp_path / "many"), "llama")


def test_conv2d_matches_peft(tmp_path):
    torch.manual_seed(0)
    base_model = ConvNet().eval()
    os.makedirs(tmp_path / "base")
    save_file(base_model.state_dict(), str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "base" / "config.json").write_text("{}")
    torch.manual_seed(0)
    peft = get_peft_model(
        ConvNet().eval(),
        LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["conv1", "conv2", "head"]),
    )
    peft.save_pretrained(str(tmp_path / "a"))
    gomerge.fuse(str(tmp_path / "base"), [str(tmp_path / "a")], output_dir=str(tmp_path / "ours"))
    expect = peft.merge_and_unload().state_dict()
    got = tensors(str(tmp_path / "ours"))
    assert sorted(got) == sorted(expect)
    for k in expect:
        assert rel(got[k], expect[k]) <= 1e-6, k
    fused = ConvNet()
    fused.load_state_dict(got)
    np.testing.assert_allclose(logits(fused.eval(), "conv"), logits(peft, "conv"), rtol=1e-4, atol=1e-5)
    assert model_input("conv").shape[1] == 3


def test_dry_run_lists_changes_and_writes_nothing(tmp_path):
    base = save_base("gpt2", str(tmp_path / "base"))
    ad = make_adapter(
        "gpt2", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True
    )
    res = gomerge.fuse(base, [ad], output_dir=str(tmp_path / "out"), dry_run=True)
    assert res.dry_run and not (tmp_path / "out").exists() and no_temp(tmp_path)
    by_name = {c["tensor"]: c for c in res.changed}
    assert by_name["transformer.h.0.attn.c_attn.weight"]["ops"] == ["lora"]
    assert by_name["transformer.h.0.attn.c_attn.weight"]["shape"] == [64, 192]
    assert by_name["transformer.h.1.attn.c_attn.bias"]["ops"] == ["bias"]
    assert by_name["transformer.h.1.attn.c_attn.bias"]["adapters"] == [ad]
    assert len(res.changed) == 4
    out = subprocess.run(
        [sys.executable, "-m", "gomerge", "fuse", base, ad, "--dry-run"],
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "transformer.h.0.attn.c_attn.weight" in out.stdout and "nothing was written" in out.stdout


def test_cli_fuses_and_reports(tmp_path):
    base = save_base("llama", str(tmp_path / "base"))
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"])
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    # relative paths, as typed in a shell
    cmd = [sys.executable, "-m", "gomerge", "fuse", "base", "a", "-o", "out", "--weights", "0.5", "--json"]
    run = functools.partial(subprocess.run, cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    res = json.loads(run(check=True).stdout)
    assert len(res["changed"]) == 2 and res["shards"] == ["model.safetensors"]
    again = run()
    assert again.returncode == 1 and "already exists" in again.stderr
    got = tensors(str(tmp_path / "out"))["model.layers.0.self_attn.q_proj.weight"]
    f = load_file(os.path.join(ad, "adapter_model.safetensors"))
    a, b = (f[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight"] for x in "AB")
    want = tensors(base)["model.layers.0.self_attn.q_proj.weight"] + 0.5 * 2.0 * (b @ a)
    assert rel(got, want) <= 1e-6


# ---- hostile folders: the right exception naming the culprit, and no output -------------------------------------


def _sharded(root) -> str:
    return save_base("llama", str(root / "base"), max_shard_size="100KB")


def _index(d: str) -> dict:
    return json.load(open(os.path.join(d, "model.safetensors.index.json")))


def _write_index(d: str, idx: dict) -> None:
    json.dump(idx, open(os.path.join(d, "model.safetensors.index.json"), "w"))


def _first_shard(d: str) -> str:
    return sorted(set(_index(d)["weight_map"].values()))[0]


def _dotdot(root, d, ad):
    idx = _index(d)
    shard = _first_shard(d)
    shutil.copy(os.path.join(d, shard), root / "x.safetensors")
    idx["weight_map"] = {k: ("../x.safetensors" if v == shard else v) for k, v in idx["weight_map"].items()}
    _write_index(d, idx)
    return ValueError, "../x.safetensors"


def _absolute(root, d, ad):
    idx = _index(d)
    shard = _first_shard(d)
    shutil.copy(os.path.join(d, shard), root / "x.safetensors")
    idx["weight_map"] = {k: (str(root / "x.safetensors") if v == shard else v) for k, v in idx["weight_map"].items()}
    _write_index(d, idx)
    return ValueError, "outside the model folder"


def _symlink_out(root, d, ad):
    shard = _first_shard(d)
    shutil.move(os.path.join(d, shard), root / "x.safetensors")
    os.symlink(root / "x.safetensors", os.path.join(d, shard))
    return ValueError, "symlink"


def _missing_shard(root, d, ad):
    shard = _first_shard(d)
    os.remove(os.path.join(d, shard))
    return FileNotFoundError, shard


def _two_shards(root, d, ad):
    idx = _index(d)
    name = sorted(k for k, v in idx["weight_map"].items() if v == _first_shard(d))[0]
    last = sorted(set(idx["weight_map"].values()))[-1]
    t = load_file(os.path.join(d, last))
    t[name] = load_file(os.path.join(d, _first_shard(d)))[name]
    save_file(t, os.path.join(d, last), metadata={"format": "pt"})
    return ValueError, name


def _no_base_tensor(root, d, ad):
    f = os.path.join(ad, "adapter_model.safetensors")
    t = load_file(f)
    t = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in t.items()}
    save_file(t, f, metadata={"format": "pt"})
    return ValueError, "model.layers.7.self_attn.q_proj"


def _shape_mismatch(root, d, ad):
    f = os.path.join(ad, "adapter_model.safetensors")
    t = load_file(f)
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    t[k + ".lora_A.weight"] = torch.zeros(4, 32)
    save_file(t, f, metadata={"format": "pt"})
    return ValueError, "model.layers.0.self_attn.q_proj"


def _int_target(root, d, ad):
    idx = _index(d)
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = idx["weight_map"][name]
    t = load_file(os.path.join(d, shard))
    t[name] = (t[name] * 100).to(torch.int8)
    save_file(t, os.path.join(d, shard), metadata={"format": "pt"})
    return ValueError, "I8"


HOSTILE = {
    "index ../": _dotdot,
    "index absolute path": _absolute,
    "shard symlinked out": _symlink_out,
    "missing shard": _missing_shard,
    "tensor in two shards": _two_shards,
    "module without base tensor": _no_base_tensor,
    "shape mismatch": _shape_mismatch,
    "int8 tensor targeted": _int_target,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_raise_and_write_nothing(tmp_path, case):
    d = _sharded(tmp_path)
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"])
    exc, text = HOSTILE[case](tmp_path, d, ad)
    out = tmp_path / "out"
    with pytest.raises(exc, match=__import__("re").escape(text)):
        gomerge.fuse(d, [ad], output_dir=str(out))
    with pytest.raises(exc):
        gomerge.fuse(d, [ad], output_dir=str(out), dry_run=True)
    assert not out.exists() and no_temp(tmp_path)


def test_existing_output_is_refused_or_replaced_only_when_asked(tmp_path):
    base = save_base("llama", str(tmp_path / "base"))
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        gomerge.fuse(base, [ad], output_dir=str(out))
    with pytest.raises(FileExistsError, match="not a model folder"):
        gomerge.fuse(base, [ad], output_dir=str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="also an input"):
        gomerge.fuse(base, [ad], output_dir=base)
    shutil.rmtree(out)
    gomerge.fuse(base, [ad], output_dir=str(out))
    gomerge.fuse(base, [ad], [2.0], output_dir=str(out), overwrite=True)
    assert no_temp(tmp_path)


def test_sigkill_leaves_the_old_output_or_the_whole_new_one(tmp_path):
    base = _sharded(tmp_path)
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    out = tmp_path / "out"
    gomerge.fuse(base, [ad], [0.5], output_dir=str(out))
    old = tensors(str(out))
    gomerge.fuse(base, [ad], output_dir=str(tmp_path / "new"))
    new = tensors(str(tmp_path / "new"))
    # 21 tensors at 200 ms each on at most 2 workers: the run takes over 2 s after start-up, killed in the middle
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), GOMERGE_TEST_FUSE_DELAY_MS="200")
    cmd = [sys.executable, "-m", "gomerge", "fuse", base, ad, "-o", str(out), "--overwrite", "-q"]

    def kill_mid_run() -> None:
        proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 30
        while no_temp(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert proc.poll() is None and not no_temp(tmp_path), "the kill was not mid-run"
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    for _ in range(2):
        kill_mid_run()
        got = tensors(str(out))
        assert sorted(got) == sorted(old)
        assert all(torch.equal(got[k], old[k]) for k in old), "the old output changed"
    shutil.rmtree(out)
    kill_mid_run()
    assert not out.exists()
    # the next run removes what the killed ones left behind, and writes the whole new output
    subprocess.run(cmd, env=dict(env, GOMERGE_TEST_FUSE_DELAY_MS="0"), check=True)
    assert no_temp(tmp_path)
    got = tensors(str(out))
    assert sorted(got) == sorted(new) and all(torch.equal(got[k], new[k]) for k in new)


def test_fuse_recipe(tmp_path):
    base = save_base("llama", str(tmp_path / "base"))
    make_adapter("llama", str(tmp_path / "a"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    make_adapter("llama", str(tmp_path / "b"), seed=2, r=4, lora_alpha=8, target_modules=["v_proj"])
    recipe = tmp_path / "fuse.yaml"
    recipe.write_text(
        "base: base\nadapters:\n  - source: a\n  - source: b\n    weight: 0.5\nstack: true\n"
        "max_shard_size: 200KB\noutput_dir: fused\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    res = json.loads(
        subprocess.run(
            [sys.executable, "-m", "gomerge", "fuse", "--recipe", str(recipe), "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert res["stack"] and len(res["shards"]) > 1 and len(res["changed"]) == 4
    direct = gomerge.fuse(base, [str(tmp_path / "a"), str(tmp_path / "b")], [1, 0.5], output_dir=str(tmp_path / "d"))
    got, want = tensors(str(tmp_path / "fused")), tensors(str(tmp_path / "d"))
    assert sorted(got) == sorted(want) and all(rel(got[k], want[k]) <= 1e-6 for k in want)
    assert direct.combination_type == "cat"
    # a merge recipe refuses the fuse keys, and a fuse recipe needs its base
    bad = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", "--recipe", str(recipe)], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "gomerge fuse --recipe" in bad.stderr
    recipe.write_text("adapters: [a]\noutput_dir: x\n")
    bad = subprocess.run(
        [sys.executable, "-m", "gomerge", "fuse", "--recipe", str(recipe)], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "'base' is missing" in bad.stderr


def test_output_inside_an_input_is_refused(tmp_path):
    base = save_base("llama", str(tmp_path / "base"))
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"])
    for out in (os.path.join(base, "fused"), str(tmp_path)):
        with pytest.raises(ValueError, match="one inside the other"):
            gomerge.fuse(base, [ad], output_dir=out, overwrite=True)
    assert sorted(os.listdir(base)) == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.warns(UserWarning, match="not used"):
        gomerge.fuse(base, [ad], combination_type="ties", density=0.5, output_dir=str(tmp_path / "o"))


def test_ctrl_c_cancels_and_writes_nothing(tmp_path):
    base = _sharded(tmp_path)
    ad = make_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), GOMERGE_TEST_FUSE_DELAY_MS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gomerge", "fuse", base, ad, "-o", str(out), "-q"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while no_temp(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert not out.exists() and no_temp(tmp_path)
