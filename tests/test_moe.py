"""Mixture-of-experts adapters (issue 20): LoRA on expert parameters through PEFT's `target_parameters`
(lora.ParamWrapper), read, merged, written, as PEFT defines them.

The oracle of an adapter is PEFT's own `get_delta_weight` per expert in float64 (moe_cases.merged_deltas). The oracle
of a merge is PEFT's `add_weighted_adapter` applied per expert: every expert becomes an nn.Linear of its own
(moe_cases.unrolled_merge), which is what gomerge's per-expert merge means. Tolerances: the factor types and the SVD
types at a rank that truncates nothing are exact up to float32 rounding of sums of a few products of O(1) factors:
rtol 1e-5 of the largest entry.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from moe_cases import (
    EXPERT_PARAMS,
    MoeSpec,
    load_peft,
    logits,
    make_adapter,
    merged_deltas,
    reference_logits,
    unrolled_merge,
)

import gomerge

VARIANTS = {
    "plain": [MoeSpec(seed=1), MoeSpec(seed=2, alpha=4.0)],
    "rslora-patterns": [
        MoeSpec(seed=3, use_rslora=True, rank_pattern={"gate_up_proj": 2}, alpha_pattern={"down_proj": 3.0}),
        MoeSpec(seed=4, use_rslora=True, rank_pattern={"gate_up_proj": 2}, alpha=5.0),
    ],
    "params-only": [MoeSpec(seed=5, target_modules=[]), MoeSpec(seed=6, target_modules=[])],
}
KINDS = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cache: dict[tuple[str, str], list[str]] = {}

    def get(kind: str, variant: str) -> list[str]:
        if (kind, variant) not in cache:
            cache[kind, variant] = [
                make_adapter(kind, s, str(root / f"{kind}-{variant}-{i}")) for i, s in enumerate(VARIANTS[variant])
            ]
        return cache[kind, variant]

    return get


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_updates(out: str, ref: dict[str, np.ndarray], kind: str, rtol: float = 1e-5) -> None:
    got = merged_deltas(kind, out)
    assert sorted(got) == sorted(ref)
    for key, d in ref.items():
        assert got[key].shape == d.shape, key
        assert rel(got[key], d) < rtol, (key, rel(got[key], d))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cat_reads_and_writes_per_expert_factors_as_peft(built, kind, variant, tmp_path, record_parity):
    """cat is exact: the merged adapter's per-expert updates, as PEFT's get_delta_weight computes them, are the
    weighted sums of the sources' (each PEFT's get_delta_weight in float64): layout, order, nesting through
    base_layer, rsLoRA, rank_pattern and alpha_pattern are all read as PEFT reads them, and written so."""
    dirs = built(kind, variant)
    weights = [0.7, -1.3]
    out = str(tmp_path / "cat")
    gomerge.add_weighted_adapter(dirs, weights, "cat", combination_type="cat", output_dir=out)
    srcs = [merged_deltas(kind, d) for d in dirs]
    ref = {k: sum(w * s[k] for w, s in zip(weights, srcs)) for k in srcs[0]}
    assert_updates(out, ref, kind)
    record_parity(f"moe {kind} {variant} cat", max(rel(merged_deltas(kind, out)[k], ref[k]) for k in ref))
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert sorted(cfg["target_parameters"]) == sorted(EXPERT_PARAMS)


def test_error_message_gives_the_rank_per_expert(built, tmp_path):
    """The config's r is the rank per expert; a stack whose rows are not a multiple of it is refused by name."""
    import shutil

    src = built("mixtral", "params-only")[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.load(open(bad / "adapter_config.json"))
    cfg["r"] = 3
    json.dump(cfg, open(bad / "adapter_config.json", "w"))
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.mlp\.experts\.lora_A\.weight \(parameter model\.layers\.0\.mlp\.experts\.down_proj\) "
        r"has 16 rows, which is not a multiple of r=3",
    ):
        gomerge.add_weighted_adapter([str(bad)], [1.0], "x", combination_type="cat", output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    info = gomerge.inspect_adapter(src)
    assert info["r"] == 4


METHODS = [
    ("linear", {}),
    ("cat", {}),
    ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.6}),
    ("svd", {"svd_rank": 8}),  # the rank of the sum per expert: nothing truncated
    ("ties_svd", {"density": 0.5, "svd_rank": 32}),  # the full size of every update: nothing truncated
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_merges_each_expert_as_peft_merges_a_module(built, kind, method, kw, tmp_path, record_parity):
    """Each expert's update is a low-rank matrix of its own: gomerge's merge equals PEFT's add_weighted_adapter on a
    model with one nn.Linear per expert (TIES and magnitude pruning elect and prune per expert). The output reloads
    in PEFT with the same target_parameters, and its logits equal the base model's with the merged updates added."""
    dirs = built(kind, "plain")
    weights = [1.0, 0.6]
    out = str(tmp_path / method)
    gomerge.add_weighted_adapter(dirs, weights, "m", combination_type=method, output_dir=out, **kw)
    ref = unrolled_merge(kind, dirs, weights, method, **kw)
    assert_updates(out, ref, kind)
    record_parity(f"moe {kind} {method}", max(rel(merged_deltas(kind, out)[k], ref[k]) for k in ref))
    merged = load_peft(kind, [out]).eval()
    np.testing.assert_allclose(logits(merged), reference_logits(kind, ref), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def unrolled(built, tmp_path_factory):
    from moe_cases import write_unrolled

    root = tmp_path_factory.mktemp("unrolled")
    return [write_unrolled("mixtral", d, str(root / f"u{i}")) for i, d in enumerate(built("mixtral", "plain"))]


def _method_kwargs(m: dict) -> dict:
    kw = {"density": 0.5} if "density" in m["params"] else {}
    if "svd_rank" in m["params"]:
        kw["svd_rank"] = 6
    return kw


@pytest.mark.parametrize("method", [m["name"] for m in gomerge.methods() if not m["random"]])
def test_every_method_merges_an_expert_as_a_module(built, unrolled, method, tmp_path):
    """Every deterministic method of gomerge.methods() merges each expert exactly as it merges a module holding that
    expert's factors (the adapters written out with one module per expert): the per-expert meaning of every method,
    whose module-wise results the method tests hold to their references."""
    from moe_cases import file_updates

    weights = [1.0, 0.6]
    m = next(x for x in gomerge.methods() if x["name"] == method)
    kw = _method_kwargs(m)
    gomerge.add_weighted_adapter(
        built("mixtral", "plain"), weights, "m", combination_type=method, output_dir=str(tmp_path / "moe"), **kw
    )
    gomerge.add_weighted_adapter(unrolled, weights, "u", combination_type=method, output_dir=str(tmp_path / "u"), **kw)
    ours, ref = file_updates(str(tmp_path / "moe")), file_updates(str(tmp_path / "u"))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert rel(ours[k], ref[k]) < 1e-5, (k, rel(ours[k], ref[k]))


@pytest.mark.parametrize("method", [m["name"] for m in gomerge.methods() if m["random"]])
def test_random_methods_merge_experts_and_reload_in_peft(built, method, tmp_path):
    """The random methods draw each expert's masks from its own stream (labelled `<module>[e]`): the output has
    each parameter's stacked shape, reloads in PEFT, and is reproducible with its seed."""
    m = next(x for x in gomerge.methods() if x["name"] == method)
    kw = _method_kwargs(m)
    for run in ("a", "b"):
        gomerge.add_weighted_adapter(
            built("mixtral", "plain"),
            [1.0, 0.6],
            "m",
            combination_type=method,
            output_dir=str(tmp_path / run),
            seed=7,
            **kw,
        )
    from moe_cases import file_updates

    a, b = file_updates(str(tmp_path / "a")), file_updates(str(tmp_path / "b"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    deltas = merged_deltas("mixtral", str(tmp_path / "a"))
    assert deltas["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)


def test_resize_by_energy_pads_experts_to_the_parameters_rank(built, tmp_path):
    """resize with the energy rule picks each expert's rank from its own spectrum; the parameter's r (rank_pattern,
    keyed by the parameter path as PEFT resolves it) is the largest, the others padded with zeros: every expert's
    update equals the resize of that expert as a module, and the adapter reloads in PEFT."""
    import shutil

    from moe_cases import file_updates, write_unrolled
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "src")  # expert 0 of every parameter has rank 1: its B columns k*E+0, k >= 1, are zero
    shutil.copytree(built("mixtral", "plain")[0], src)
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    for k, t in sd.items():
        if "experts" in k and "lora_B" in k:
            t[:, 4::4] = 0
    save_file(sd, os.path.join(src, "adapter_model.safetensors"), metadata={"format": "pt"})
    usrc = write_unrolled("mixtral", src, str(tmp_path / "usrc"))
    res = gomerge.resize(src, energy=0.8, output_dir=str(tmp_path / "moe"))
    ures = gomerge.resize(usrc, energy=0.8, output_dir=str(tmp_path / "u"))
    ours, ref = file_updates(str(tmp_path / "moe")), file_updates(str(tmp_path / "u"))
    for k in ref:
        assert rel(ours[k], ref[k]) < 1e-5, k
    cfg = json.load(open(tmp_path / "moe" / "adapter_config.json"))
    per_expert: dict[str, list[int]] = {}
    for k, r in ures.module_ranks.items():
        if "__e" in k:
            per_expert.setdefault(k.partition("__e")[0], []).append(r)
    assert any(min(rs) < max(rs) for rs in per_expert.values())  # some experts are padded
    for key, rs in per_expert.items():
        module, _, param = key.rpartition(".")
        wrapped = module if param == "down_proj" else module + ".base_layer"
        assert res.module_ranks[wrapped] == max(rs)
        assert cfg["rank_pattern"].get(key.replace(".", r"\."), cfg["r"]) == max(rs)
    merged_deltas("mixtral", str(tmp_path / "moe"))  # PEFT reloads it


def test_inspect_and_model_card_give_ranks_per_expert(built, tmp_path):
    info = gomerge.inspect_adapter(built("mixtral", "rslora-patterns")[0])
    assert info["r"] == 4 and sorted(info["target_parameters"]) == sorted(EXPERT_PARAMS)
    assert info["experts"] == {
        f"model.layers.{i}.mlp.experts.{p}": 4 for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    assert info["ranks"] == {
        "4": 4,
        "2": 2,
    }  # two layers: q_proj and down_proj at 4; gate_up_proj at 2 per expert (rank_pattern)
    res = gomerge.add_weighted_adapter(
        built("mixtral", "plain"), [1.0, 1.0], "m", combination_type="cat", output_dir=str(tmp_path / "m")
    )
    assert res.module_experts["model.layers.0.mlp.experts.base_layer"] == {
        "param": "model.layers.0.mlp.experts.gate_up_proj",
        "experts": 4,
    }
    assert res.module_ranks["model.layers.0.mlp.experts.base_layer"] == 8
    card = open(tmp_path / "m" / "README.md").read()
    assert "## Mixture-of-experts parameters" in card
    assert "| `model.layers.1.mlp.experts` | `model.layers.1.mlp.experts.down_proj` | 4 | 8 |" in card


DROPIN = [("linear", {}), ("cat", {}), ("ties", {"density": 0.5}), ("svd", {"svd_rank": 8})]


@pytest.mark.parametrize("method,kw", DROPIN, ids=[m for m, _ in DROPIN])
def test_patched_peft_keeps_its_error_for_parameter_targets(built, method, kw):
    """A patched script behaves as PEFT: add_weighted_adapter refuses adapters on nn.Parameters with PEFT's error
    (PEFT's own test_target_parameters expects it)."""
    pm = load_peft("mixtral", built("mixtral", "plain"))
    with gomerge.patch_peft():
        with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
            pm.add_weighted_adapter(["a0", "a1"], [1.0, 0.6], "m", combination_type=method, **kw)
    assert "m" not in pm.peft_config


@pytest.mark.parametrize("method,kw", DROPIN, ids=[m for m, _ in DROPIN])
def test_direct_call_merges_parameter_targets_as_from_disk(built, method, kw, tmp_path):
    """gomerge.peft.add_weighted_adapter called directly merges them: the new adapter is injected into the model's
    ParamWrappers as PEFT injects a loaded target_parameters adapter, each expert merged as a module (PEFT's
    add_weighted_adapter per expert is the reference), and what it saves equals gomerge's merge from disk."""
    from moe_cases import param_wrappers

    from gomerge.peft import add_weighted_adapter

    dirs = built("mixtral", "plain")
    pm = load_peft("mixtral", dirs)
    add_weighted_adapter(pm, ["a0", "a1"], [1.0, 0.6], "m", combination_type=method, **kw)
    assert pm.peft_config["m"].target_parameters == pm.peft_config["a0"].target_parameters
    wrappers = param_wrappers(pm)
    assert all("m" in w.lora_A for w in wrappers.values())
    pm.save_pretrained(str(tmp_path / "live"), selected_adapters=["m"])
    live = str(tmp_path / "live" / "m")
    ref = unrolled_merge("mixtral", dirs, [1.0, 0.6], method, **kw)
    assert_updates(live, ref, "mixtral")
    gomerge.add_weighted_adapter(dirs, [1.0, 0.6], "d", combination_type=method, output_dir=str(tmp_path / "d"), **kw)
    from moe_cases import file_updates

    disk = file_updates(str(tmp_path / "d"))
    live_u = file_updates(live)
    for k in disk:
        assert rel(live_u[k], disk[k]) < 1e-6, k
    pm.set_adapter("m")
    np.testing.assert_allclose(logits(pm.eval()), reference_logits("mixtral", ref), rtol=1e-4, atol=1e-5)


def test_adapters_with_and_without_parameter_targets_merge(built, tmp_path):
    """An adapter on modules only merges with one on parameters (only the adapters present at a module contribute,
    as in PEFT): from disk and live, the merged adapter keeps the shared target_parameters, even when the first
    adapter has none."""
    from moe_cases import file_updates

    from gomerge.peft import add_weighted_adapter

    plain = make_adapter("mixtral", MoeSpec(seed=9, target_parameters=[]), str(tmp_path / "plain"))
    src = built("mixtral", "plain")[0]
    gomerge.add_weighted_adapter([plain, src], [0.5, 1.0], "d", combination_type="cat", output_dir=str(tmp_path / "d"))
    cfg = json.load(open(tmp_path / "d" / "adapter_config.json"))
    assert sorted(cfg["target_parameters"]) == sorted(EXPERT_PARAMS)
    pm = load_peft("mixtral", [plain, src])
    add_weighted_adapter(pm, ["a0", "a1"], [0.5, 1.0], "m", combination_type="cat")
    pm.save_pretrained(str(tmp_path / "live"), selected_adapters=["m"])
    live, disk = file_updates(str(tmp_path / "live" / "m")), file_updates(str(tmp_path / "d"))
    assert sorted(live) == sorted(disk)
    for k in disk:
        assert rel(live[k], disk[k]) < 1e-6, k
    ref = {k: v for k, v in merged_deltas("mixtral", src).items()}
    ref = {k: v + (0.5 * merged_deltas("mixtral", plain).get(k, 0)) for k, v in ref.items()}
    assert_updates(str(tmp_path / "d"), ref, "mixtral")


def test_adapters_targeting_different_parameters_are_refused(built, tmp_path):
    other = make_adapter("mixtral", MoeSpec(seed=9, target_parameters=["mlp.experts.down_proj"]), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="target different parameters"):
        gomerge.add_weighted_adapter(
            [built("mixtral", "plain")[0], other],
            [1.0, 1.0],
            "m",
            combination_type="cat",
            output_dir=str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists()


def test_hostile_adapters_are_refused_naming_them(built, tmp_path):
    """An expert count that disagrees between adapters (same rank, other stack), a nesting deeper than the targeted
    parameters, and a parameter the base lacks when fusing (test_moe_fuse.py): ValueErrors naming the module, and
    nothing written."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = built("mixtral", "params-only")[0]
    eight = tmp_path / "eight"  # r=2 per expert over 8 experts: the same 16 rows, another expert count
    shutil.copytree(src, eight)
    cfg = json.load(open(eight / "adapter_config.json"))
    cfg["r"] = 2
    json.dump(cfg, open(eight / "adapter_config.json", "w"))
    with pytest.raises(
        ValueError, match=r"module model\.layers\.0\.mlp\.experts: .* with 4 experts, .* with 8 experts"
    ):
        gomerge.add_weighted_adapter(
            [src, str(eight)], [1.0, 1.0], "m", combination_type="cat", output_dir=str(tmp_path / "out")
        )
    assert not (tmp_path / "out").exists()

    deep = tmp_path / "deep"
    shutil.copytree(src, deep)
    path = deep / "adapter_model.safetensors"
    sd = load_file(str(path))
    for k in [k for k in sd if ".experts.base_layer.lora_" in k and "layers.1." in k]:
        sd[k.replace(".base_layer.", ".base_layer.base_layer.")] = sd.pop(k)
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"module model\.layers\.1\.mlp\.experts\.base_layer\.base_layer is nested 2 deep"
    ):
        gomerge.add_weighted_adapter([str(deep)], [1.0], "m", combination_type="cat", output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_merges_and_inspects_expert_adapters(built, tmp_path, capsys):
    from gomerge.cli import main

    dirs = built("mixtral", "plain")
    out = str(tmp_path / "cli")
    assert main(["merge", *dirs, "--weights", "1", "0.6", "--method", "ties", "--density", "0.5", "-o", out]) == 0
    assert_updates(out, unrolled_merge("mixtral", dirs, [1.0, 0.6], "ties", density=0.5), "mixtral")
    capsys.readouterr()
    assert main(["inspect", dirs[0]]) == 0
    text = capsys.readouterr().out
    assert "target params  mlp.experts.down_proj, mlp.experts.gate_up_proj (4 experts; ranks are per expert)" in text


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear_svd"])
def test_direct_call_dare_draws_expert_masks_from_torch(built, method, tmp_path):
    """DARE in the live merge draws each expert's masks from torch's global generator (PEFT has no order to follow
    for experts: expert by expert, A masks then B masks, or one mask per expert update): reproducible under
    torch.manual_seed."""
    import torch
    from moe_cases import file_updates

    from gomerge.peft import add_weighted_adapter

    dirs = built("mixtral", "plain")
    outs = []
    for run in ("x", "y"):
        pm = load_peft("mixtral", dirs)
        torch.manual_seed(5)
        add_weighted_adapter(pm, ["a0", "a1"], [1.0, 0.6], "m", combination_type=method, density=0.5)
        pm.save_pretrained(str(tmp_path / run), selected_adapters=["m"])
        outs.append(file_updates(str(tmp_path / run / "m")))
    assert sorted(outs[0]) == sorted(outs[1])
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])
