"""`gomerge export --to gguf` against a real llama.cpp: llama-cpp-python (built from its source release by the
Makefile, tests/requirements-llama.txt) loads a tiny base written here with the `gguf` package, then the exported
adapter; its logits must equal PEFT's model with the adapter.

Tolerance: 1e-4 of the largest logit, in float32 with one thread and an f32 KV cache (measured 4e-7 for the base
alone against transformers; the adapter moves the logits by about 1, four orders above it). Every case also checks
that the adapter moves the logits by far more than the tolerance, so that a file llama.cpp silently ignored fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf  # tests/requirements-llama.txt (with llama-cpp-python, compiled by `make test-python`)
import numpy as np
import pytest
import torch
from gguf_tiny import (
    TINY,
    gemma2_gguf,
    gpt2_gguf,
    llama_gguf,
    llama_logits,
    make_adapter,
    peft_logits,
    permute,
    phi3_gguf,
    rel,
)
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import gomerge

RTOL = 1e-4


# --- the tiny base ---


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny llama: (transformers model, its folder with config.json, its GGUF)."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    folder = str(root / "llama")
    model.save_pretrained(folder)
    path = str(root / "llama.gguf")
    llama_gguf(model, path)
    return model, folder, path


def check_case(base, adapter: str, out: str, record_parity, label: str, **export) -> float:
    """Exports adapter, loads it in llama.cpp and compares with PEFT; returns the relative difference."""
    model, folder, gguf_path = base
    gomerge.export(adapter, "gguf", out, base=folder, dtype="f32", **export)
    ours = llama_logits(gguf_path, out)
    theirs = peft_logits(model, adapter)
    plain = peft_logits(model, None)
    d = rel(ours, theirs)
    record_parity(f"gguf {label}", d, kind="llama.cpp logits vs PEFT (max |diff| / max |PEFT|)")
    assert rel(theirs, plain) > 100 * RTOL, "the adapter must move the logits well above the tolerance"
    assert d < RTOL, f"{label}: llama.cpp's logits differ from PEFT's by {d:.2e}"
    return d


# --- the cases ---


def test_plain_adapter_matches_peft_and_scale_zero_gives_the_base(base, tmp_path, record_parity):
    model, folder, gguf_path = base
    ad = make_adapter(model, str(tmp_path / "plain"), seed=1)
    out = str(tmp_path / "plain.gguf")
    check_case(base, ad, out, record_parity, "plain r=8 alpha=16")
    assert rel(llama_logits(gguf_path), peft_logits(model, None)) < RTOL
    np.testing.assert_array_equal(llama_logits(gguf_path, out, scale=0.0), llama_logits(gguf_path))
    # --lora-scaled 0.5 is half of PEFT's update (llama.cpp: user_scale alone, since alpha = 0)
    half = llama_logits(gguf_path, out, scale=0.5)
    assert np.isfinite(half).all() and rel(half, llama_logits(gguf_path, out)) > 100 * RTOL


def test_metadata_and_tensor_layout(base, tmp_path):
    model, folder, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=2, targets=["q_proj", "k_proj", "down_proj"], r=4)
    out = str(tmp_path / "a.gguf")
    res = gomerge.export(ad, "gguf", out, base=folder, dtype="f32")
    assert (res.architecture, res.modules, res.tensors, res.dtype) == ("llama", 6, 12, "f32")
    assert res.size == os.path.getsize(out) and res.dropped == [] and res.ranks == {"4": 6}
    r = gguf.GGUFReader(out)
    kv = {f.name: f for f in r.fields.values()}

    def value(key):
        return kv[key].contents()

    assert value("general.type") == "adapter" and value("adapter.type") == "lora"
    assert value("general.architecture") == "llama" and value("adapter.lora.alpha") == 0.0
    t = {x.name: x for x in r.tensors}
    assert set(t) == {
        f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in ("attn_q", "attn_k", "ffn_down") for ab in "ab"
    }
    sd = {k: v.float().numpy() for k, v in _safetensors(ad).items()}
    cfg = json.load(open(os.path.join(ad, "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"]
    pre = "base_model.model.model.layers.1."
    a_q = t["blk.1.attn_q.weight.lora_a"].data.reshape(4, 64)
    b_q = t["blk.1.attn_q.weight.lora_b"].data.reshape(64, 4)
    b_k = t["blk.1.attn_k.weight.lora_b"].data.reshape(32, 4)
    b_d = t["blk.1.ffn_down.weight.lora_b"].data.reshape(64, 4)
    np.testing.assert_array_equal(a_q, sd[pre + "self_attn.q_proj.lora_A.weight"])
    np.testing.assert_array_equal(b_q, permute(np.float32(s) * sd[pre + "self_attn.q_proj.lora_B.weight"], 4))
    np.testing.assert_array_equal(b_k, permute(np.float32(s) * sd[pre + "self_attn.k_proj.lora_B.weight"], 2))
    np.testing.assert_array_equal(b_d, np.float32(s) * sd[pre + "mlp.down_proj.lora_B.weight"])


def _safetensors(adapter: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(adapter, "adapter_model.safetensors"))


def test_alpha_zero_baked_file_equals_an_alpha_r_file(base, tmp_path):
    """llama.cpp's rule: scale = alpha ? user_scale * alpha / r : user_scale, r from B's shape. A plain adapter with
    lora_alpha = r (PEFT scale 1) written with alpha = 0 and the same file with adapter.lora.alpha = r load alike."""
    model, folder, gguf_path = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=3, r=8, lora_alpha=8)
    ours = str(tmp_path / "alpha0.gguf")
    gomerge.export(ad, "gguf", ours, base=folder, dtype="f32")
    reader = gguf.GGUFReader(ours)
    w = gguf.GGUFWriter(str(tmp_path / "alpha_r.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a, b = llama_logits(gguf_path, ours), llama_logits(gguf_path, str(tmp_path / "alpha_r.gguf"))
    assert rel(a, llama_logits(gguf_path)) > 100 * RTOL
    np.testing.assert_array_equal(a, b)  # the same products, scaled by 1.0f either way


def test_rslora_matches_peft(base, tmp_path, record_parity):
    model, _, _ = base
    ad = make_adapter(model, str(tmp_path / "rs"), seed=4, r=16, lora_alpha=8, use_rslora=True)
    check_case(base, ad, str(tmp_path / "rs.gguf"), record_parity, "rsLoRA r=16 alpha=8")


def test_mixed_ranks_from_energy_match_peft(base, tmp_path, record_parity):
    model, _, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=5, r=16, lora_alpha=32)
    res = gomerge.resize(ad, energy=0.9, output_dir=str(tmp_path / "e90"))
    cfg = json.load(open(tmp_path / "e90" / "adapter_config.json"))
    assert len(set(res.module_ranks.values())) > 1 and cfg["rank_pattern"] and cfg["alpha_pattern"]
    check_case(base, str(tmp_path / "e90"), str(tmp_path / "e90.gguf"), record_parity, "mixed ranks energy:0.9")


def test_ties_merge_matches_peft_in_one_step(base, tmp_path, record_parity):
    model, folder, gguf_path = base
    a = make_adapter(model, str(tmp_path / "a"), seed=6)
    b = make_adapter(model, str(tmp_path / "b"), seed=7, r=8, lora_alpha=8)
    merged = str(tmp_path / "merged")
    gomerge.add_weighted_adapter([a, b], [1.0, 0.7], "m", "ties", density=0.5, output_dir=merged)
    check_case(base, merged, str(tmp_path / "ties.gguf"), record_parity, "ties merge of two adapters")
    one_step = str(tmp_path / "one-step.gguf")
    cli = [sys.executable, "-m", "gomerge", "merge", a, b, "-w", "1", "0.7", "--method", "ties", "--density", "0.5"]
    run = subprocess.run(cli + ["--to", "gguf", "--base", folder, "--dtype", "float32", "-o", one_step], **_SUB)
    assert run.returncode == 0, run.stderr
    assert "GGUF LoRA adapter for llama.cpp's llama" in run.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(["a", "b", "merged", "ties.gguf", "one-step.gguf"])
    assert rel(llama_logits(gguf_path, one_step), peft_logits(model, merged)) < RTOL


def test_resize_to_gguf_in_one_step(base, tmp_path):
    model, folder, gguf_path = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=8)
    out = str(tmp_path / "r4.gguf")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gomerge",
            "resize",
            ad,
            "--rank",
            "4",
            "--to",
            "gguf",
            "--base",
            folder,
            "-o",
            out,
            "--json",
        ],
        **_SUB,
    )
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert res["export"]["ranks"] == {"4": 14} and res["export"]["output"] == out
    gomerge.resize(ad, rank=4, output_dir=str(tmp_path / "r4"))
    assert rel(llama_logits(gguf_path, out), peft_logits(model, str(tmp_path / "r4"))) < RTOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_name_maps_match_peft(tmp_path, arch, record_parity):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms): llama.cpp names their tensors as llama's but its converter does
    not permute Wq/Wk (NeoX RoPE), so neither does the export."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16)).eval()
    folder, path = str(tmp_path / arch), str(tmp_path / f"{arch}.gguf")
    model.save_pretrained(folder)
    llama_gguf(model, path, arch)
    assert rel(llama_logits(path), peft_logits(model, None)) < RTOL
    ad = make_adapter(model, str(tmp_path / "a"), seed=20)
    check_case((model, folder, path), ad, str(tmp_path / "a.gguf"), record_parity, f"{arch} all-linear")


def test_phi3_fused_modules_match_peft(tmp_path, record_parity):
    """Phi-3's fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up, row for row."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**{**TINY, "num_key_value_heads": 4}, pad_token_id=0, eos_token_id=0)).eval()
    folder, path = str(tmp_path / "phi3"), str(tmp_path / "phi3.gguf")
    model.save_pretrained(folder)
    phi3_gguf(model, path)
    assert rel(llama_logits(path), peft_logits(model, None)) < RTOL
    ad = make_adapter(model, str(tmp_path / "a"), seed=21, targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    check_case((model, folder, path), ad, str(tmp_path / "a.gguf"), record_parity, "phi3 qkv_proj + gate_up_proj")


def test_gemma2_matches_the_fused_model_in_llama_cpp(tmp_path, record_parity):
    """Gemma 2 (tied embeddings, four norms per block, soft-capping). llama.cpp's GELU reads a float16 table
    (GGML_GELU_FP16), which puts its logits 1e-3 from transformers' on this model with or without an adapter; so the
    adapter is checked against PEFT's own fused model (merge_and_unload) run in the same llama.cpp: the two differ
    by where W x + s B (A x) and (W + s B A) x round, and by the GELU table where that moves an input across a
    float16 rounding boundary (one float16 rounding, 2^-11 relative)."""
    import copy

    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = {**TINY, "tie_word_embeddings": True, "head_dim": 16, "query_pre_attn_scalar": 16}
    model = Gemma2ForCausalLM(Gemma2Config(**cfg, pad_token_id=0, eos_token_id=1, bos_token_id=2)).eval()
    folder, path = str(tmp_path / "gemma2"), str(tmp_path / "gemma2.gguf")
    model.save_pretrained(folder)
    gemma2_gguf(model, path)
    ad = make_adapter(model, str(tmp_path / "a"), seed=22)
    out = str(tmp_path / "a.gguf")
    assert gomerge.export(ad, "gguf", out, base=folder, dtype="f32").architecture == "gemma2"
    fused = PeftModel.from_pretrained(copy.deepcopy(model), ad).merge_and_unload()
    gemma2_gguf(fused, str(tmp_path / "fused.gguf"))
    ours, reference = llama_logits(path, out), llama_logits(str(tmp_path / "fused.gguf"))
    assert rel(reference, llama_logits(path)) > 100 * 2.0**-11  # the adapter moves the logits
    d = rel(ours, reference)
    record_parity("gguf gemma2 vs fused in llama.cpp", d, kind="llama.cpp logits vs PEFT (max |diff| / max |PEFT|)")
    assert d < 2.0**-11


def test_embeddings_and_lm_head_match_peft(base, tmp_path, record_parity):
    model, _, _ = base
    ad = make_adapter(model, str(tmp_path / "emb"), seed=9, targets=["embed_tokens", "lm_head", "v_proj"], r=4)
    keys = _safetensors(ad)
    assert any("lora_embedding_A" in k for k in keys)
    check_case(base, ad, str(tmp_path / "emb.gguf"), record_parity, "embed_tokens + lm_head + v_proj")


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_types_are_gguf_py_bit_for_bit_and_load(base, tmp_path, dtype):
    """Each f16 / bf16 / q8_0 tensor is, byte for byte, what gguf-py (llama.cpp's converters' writer) makes of the
    f32 export's values; with r = 8, B's rows (ne[0] = r) are not a multiple of 32, so under q8_0 B is f16, as
    llama.cpp's converter falls back. Then llama.cpp loads the file and applies the adapter: its logits move from the
    base's by at least half the adapter's effect and lie closer to PEFT's than to the base's. How close depends on
    llama.cpp's rounding of the activations to the weights' type, which this tiny random model amplifies (measured:
    f16 0.7%, bf16 8%, q8_0 40% of the adapter's effect); the f32 cases above check the numbers."""
    model, folder, gguf_path = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=10, r=8)
    out, f32 = str(tmp_path / f"a-{dtype}.gguf"), str(tmp_path / "a-f32.gguf")
    res = gomerge.export(ad, "gguf", out, base=folder, dtype=dtype)
    gomerge.export(ad, "gguf", f32, base=folder, dtype="f32")
    assert res.dtype == dtype
    ref = {t.name: np.array(t.data) for t in gguf.GGUFReader(f32).tensors}
    fallback = []
    for t in gguf.GGUFReader(out).tensors:
        want = ref[t.name].reshape(-1, int(t.shape[0]))
        qtype = gguf.GGMLQuantizationType[dtype.upper()]
        if dtype == "q8_0" and want.shape[1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
            fallback.append(t.name)
        assert t.tensor_type == qtype, t.name
        assert np.array(t.data).tobytes() == gguf.quants.quantize(want, qtype).tobytes(), t.name
    assert sorted(res.f16_fallback) == sorted(fallback)
    assert (len(fallback) == res.modules) == (dtype == "q8_0")  # every B (ne[0] = r = 8); every A is Q8_0
    ours, theirs, plain = llama_logits(gguf_path, out), peft_logits(model, ad), peft_logits(model, None)
    moved, off = np.abs(ours - plain).max(), np.abs(ours - theirs).max()
    assert moved > 0.5 * np.abs(theirs - plain).max() and off < moved


def test_gpt2_fan_in_fan_out(tmp_path, record_parity):
    """GPT-2's Conv1D layers (fan_in_fan_out): PEFT keeps A (r, in) and B (out, r) as for nn.Linear, and llama.cpp
    stores the transposed (out, in) weights, so the factors go as they are. llama.cpp's GPT-2 GELU reads a float16
    table of the activation (GGML_GELU_FP16): each GELU input is rounded to 2^-11 relative, so the comparison with
    PEFT allows 2^-11 of the largest logit, and the base without adapter is held to the same bound."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=128)).eval()
    folder = str(tmp_path / "gpt2")
    model.save_pretrained(folder)
    path = str(tmp_path / "gpt2.gguf")
    gpt2_gguf(model, path)
    ad = make_adapter(model, str(tmp_path / "a"), seed=12, targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    out = str(tmp_path / "a.gguf")
    gomerge.export(ad, "gguf", out, base=folder, dtype="f32")
    tol = 2.0**-11
    plain, theirs = peft_logits(model, None), peft_logits(model, ad)
    assert rel(llama_logits(path), plain) < tol
    assert rel(theirs, plain) > 100 * tol
    d = rel(llama_logits(path, out), theirs)
    record_parity("gguf gpt2 fan_in_fan_out", d, kind="llama.cpp logits vs PEFT (max |diff| / max |PEFT|)")
    assert d < tol


# --- what llama.cpp cannot represent: clear errors, or drop= ---

_SUB = dict(
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "python")},
)


def _edit_config(adapter: str, **changes) -> None:
    p = os.path.join(adapter, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def _add_tensor(adapter: str, name: str, shape: tuple[int, ...]) -> None:
    from safetensors.torch import save_file

    sd = _safetensors(adapter)
    sd[name] = torch.ones(shape)
    save_file(sd, os.path.join(adapter, "adapter_model.safetensors"))


def test_modules_to_save_is_refused_or_dropped_and_listed(base, tmp_path):
    model, folder, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=13, targets=["q_proj"])
    _add_tensor(ad, "base_model.model.model.norm.weight", (64,))
    with pytest.raises(ValueError, match=r"model\.norm\.weight is a full tensor \(modules_to_save\)"):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=folder)
    assert not os.path.exists(tmp_path / "x.gguf") and not [f for f in os.listdir(tmp_path) if f.startswith(".gomerge")]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gomerge",
            "export",
            ad,
            "--to",
            "gguf",
            "--base",
            folder,
            "-o",
            str(tmp_path / "x.gguf"),
            "--drop",
            "modules_to_save",
        ],
        **_SUB,
    )
    assert run.returncode == 0, run.stderr
    assert "dropped: base_model.model.model.norm.weight (modules_to_save)" in run.stdout


def test_dora_and_lora_bias_are_refused(base, tmp_path):
    model, folder, _ = base
    dora = make_adapter(model, str(tmp_path / "dora"), seed=14, targets=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        gomerge.export(
            dora, "gguf", str(tmp_path / "d.gguf"), base=folder, drop=["modules_to_save", "lora_bias", "lm_head"]
        )
    bias = make_adapter(model, str(tmp_path / "bias"), seed=15, targets=["q_proj"], lora_bias=True)
    with pytest.raises(ValueError, match=r"q_proj has a LoRA bias \(lora_bias\)"):
        gomerge.export(bias, "gguf", str(tmp_path / "b.gguf"), base=folder)
    res = gomerge.export(bias, "gguf", str(tmp_path / "b.gguf"), base=folder, drop=["lora_bias"])
    assert len(res.dropped) == 2 and all(d.endswith("(lora_bias)") for d in res.dropped)


def test_lm_head_on_a_tied_base_is_refused_or_dropped(base, tmp_path):
    model, folder, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=16, targets=["lm_head", "q_proj"])
    tied = tmp_path / "tied"
    tied.mkdir()
    cfg = json.load(open(os.path.join(folder, "config.json")))
    json.dump({**cfg, "tie_word_embeddings": True}, open(tied / "config.json", "w"))
    with pytest.raises(ValueError, match="lm_head is tied to its embeddings"):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=str(tied))
    res = gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=str(tied / "config.json"), drop=["lm_head"])
    assert res.dropped == ["lm_head (lm_head LoRA on a tied base)"] and res.modules == 2


def test_unknown_architecture_and_bad_arguments(base, tmp_path):
    model, folder, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=17, targets=["q_proj"])
    other = tmp_path / "falcon"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r'architecture "FalconForCausalLM" .* is not supported .*LlamaForCausalLM'):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=str(other))
    with pytest.raises(ValueError, match="to: unknown export format 'onnx'"):
        gomerge.export(ad, "onnx", str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match='dtype: "q4_k" is not a GGUF adapter type'):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=folder, dtype="q4_k")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=str(tmp_path))
    # the adapter's base_model_name_or_path is the default base
    _edit_config(ad, base_model_name_or_path=folder)
    assert gomerge.export(ad, "gguf", str(tmp_path / "x.gguf")).architecture == "llama"
    # an existing file: replaced only with overwrite, and only a GGUF file
    with pytest.raises(FileExistsError, match="already exists"):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"))
    gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), overwrite=True)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a GGUF file"):
        gomerge.export(ad, "gguf", str(tmp_path / "notes.txt"), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    # the output inside the adapter directory is refused
    with pytest.raises(ValueError, match="lie one inside the other"):
        gomerge.export(ad, "gguf", os.path.join(ad, "x.gguf"))


def test_gemma_embedding_lora_is_refused(base, tmp_path):
    """Gemma scales its embeddings inside the embedding module: PEFT's embedding LoRA is added unscaled, llama.cpp's
    scaled, so the export refuses it instead of writing a file with other numbers."""
    model, _, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=18, targets=["embed_tokens"])
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(
        json.dumps({"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4})
    )
    with pytest.raises(ValueError, match="Gemma3ForCausalLM scales its embeddings"):
        gomerge.export(ad, "gguf", str(tmp_path / "x.gguf"), base=str(gemma))


def test_keys_python_sends_and_reads_equal_the_engines(base, tmp_path, monkeypatch):
    from gomerge import _native

    model, folder, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=19, targets=["q_proj"])
    seen = {}
    real = _native.gguf_export_start

    def spy(request):
        seen.update(request)
        return real(request)

    monkeypatch.setattr(_native, "gguf_export_start", spy)
    res = gomerge.export(ad, "gguf", str(tmp_path / "a.gguf"), base=folder)
    keys = _native.request_keys()
    assert sorted(seen) == sorted(keys["gguf"])
    assert sorted(res.__dict__) == sorted(keys["gguf_result"])


def test_one_export_command_for_every_format(base, tmp_path):
    """`gomerge export --to` takes gguf and the serving targets; each family's options are refused on the other, and
    --drop-modules-to-save means --drop modules_to_save for gguf."""
    model, folder, _ = base
    ad = make_adapter(model, str(tmp_path / "a"), seed=23, targets=["q_proj"])
    _add_tensor(ad, "base_model.model.model.norm.weight", (64,))
    cli = [sys.executable, "-m", "gomerge", "export", ad]
    run = subprocess.run(cli + ["--to", "vllm", "--base", folder, "-o", str(tmp_path / "v")], **_SUB)
    assert run.returncode == 2 and "--base and --drop are options of --to gguf" in run.stderr
    run = subprocess.run(cli + ["--to", "gguf", "--max-rank", "8", "-o", str(tmp_path / "x.gguf")], **_SUB)
    assert run.returncode == 2 and "--max-rank is an option of the serving targets" in run.stderr
    out = str(tmp_path / "x.gguf")
    run = subprocess.run(
        cli + ["--to", "gguf", "--base", folder, "--drop-modules-to-save", "-o", out, "--json"], **_SUB
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["dropped"] == ["base_model.model.model.norm.weight (modules_to_save)"]
    run = subprocess.run(cli + ["--to", "portable", "--drop-modules-to-save", "-o", str(tmp_path / "p")], **_SUB)
    assert run.returncode == 0, run.stderr
    assert os.path.exists(tmp_path / "p" / "adapter_config.json")
    res = gomerge.export(ad, "sglang", str(tmp_path / "s"), drop_modules_to_save=True)
    assert isinstance(res, gomerge.ProfileResult) and res.target == "sglang"


def test_expert_adapters_are_refused_by_name(base, tmp_path):
    """An adapter on expert parameters (target_parameters) holds rank x experts rows: refused, never written as if
    it were one module."""
    import moe_cases

    _, folder, _ = base
    moe = moe_cases.make_adapter("mixtral", moe_cases.MoeSpec(seed=2), str(tmp_path / "moe"))
    out = tmp_path / "moe.gguf"
    with pytest.raises(ValueError, match=r"adapts the expert parameter .*experts.* \(target_parameters\)"):
        gomerge.export(moe, "gguf", str(out), base=folder)
    assert not out.exists()
