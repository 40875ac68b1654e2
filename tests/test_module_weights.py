"""Per-module weights: a weight is a number or a mapping of module-name patterns to numbers (PEFT's rank_pattern
rule, first match wins), or a gradient over the layers; checked against numpy references per module, PEFT's reload,
the command line and recipes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft_cases import LLAMA_ALL, AdapterSpec, delta, file_factors, llama, logits, make_adapter

import gomerge
from gomerge import _native, merge, recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# attention from adapter 0, the MLP from adapter 1 (a gradient over the two layers) and adapter 2 (q_proj and v_proj
# only) everywhere it has modules, q_proj twice as strong
WEIGHTS = [
    {r"self_attn\..*": 1.0, r"mlp\..*": 0.0},
    {r"layers\.0\.self_attn\..*": 0.0, r"self_attn\..*": 0.5, ".*": [0.2, 1.0]},
    {r".*q_proj": 2.0, ".*": -0.5},
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three rank-4 Llama adapters (alpha 8, 16 with rsLoRA, 4); the third has only q_proj and v_proj."""
    root = tmp_path_factory.mktemp("module-weights")
    specs = [
        AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), seed=1),
        AdapterSpec(dict(r=4, lora_alpha=16, target_modules=LLAMA_ALL, use_rslora=True), seed=2),
        AdapterSpec(dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), seed=3),
    ]
    return [make_adapter("llama", s, str(root / f"a{i}")) for i, s in enumerate(specs)]


def _scaling(path: str) -> float:
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r


def _layer(module: str) -> int | None:
    return next((int(p) for p in module.split(".") if p.isdigit()), None)


def resolve(weight, module: str, layers: int) -> float:
    """The reference: PEFT's get_pattern_key rule (re.match(rf"(.*\\.)?({key})$", module), first key wins), and
    mergekit's linear interpolation of a gradient at t = layer / (layers - 1)."""
    if not isinstance(weight, dict):
        weight = {".*": weight} if isinstance(weight, list) else {".*": float(weight)}
    for key, value in weight.items():
        if re.match(rf"(.*\.)?({key})$", module):
            if isinstance(value, list):
                t = _layer(module) / (layers - 1) if layers > 1 else 0.0
                return float(np.interp(t, np.linspace(0, 1, len(value)), value))
            return float(value)
    raise AssertionError(f"no pattern matches {module}")


def per_module_weights(dirs, weights) -> dict[str, list[float | None]]:
    """Each module's weight per adapter (None where the adapter lacks the module)."""
    factors = [file_factors(d) for d in dirs]
    modules = sorted(set().union(*factors))
    layers = 1 + max(_layer(m) for m in modules)
    return {m: [resolve(w, m, layers) if m in f else None for w, f in zip(weights, factors)] for m in modules}


def dense_reference(dirs, weights) -> dict[str, np.ndarray]:
    """sum_i w_i(module) s_i B_i A_i per module, in float64."""
    factors = [file_factors(d) for d in dirs]
    out = {}
    for m, ws in per_module_weights(dirs, weights).items():
        out[m] = sum(w * _scaling(d) * delta(*f[m]) for w, d, f in zip(ws, dirs, factors) if w is not None)
    return out


def linear_reference(dirs, weights) -> dict[str, np.ndarray]:
    """PEFT's linear combination of the factors with each module's weights: A with sign(c) sqrt|c|, B with sqrt|c|,
    c = w(module) * scaling; B'A' with its cross terms."""
    factors = [file_factors(d) for d in dirs]
    out = {}
    for m, ws in per_module_weights(dirs, weights).items():
        a = b = 0
        for w, d, f in zip(ws, dirs, factors):
            if w is None:
                continue
            c = w * _scaling(d)
            a = a + np.sign(c) * np.sqrt(abs(c)) * f[m][0]
            b = b + np.sqrt(abs(c)) * f[m][1]
        out[m] = delta(a, b)
    return out


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert sorted(got) == sorted(want)
    worst = 0.0
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=k)
        worst = max(worst, float(np.abs(got[k] - w).max() / np.abs(w).max()))
    return worst


def merged_products(path) -> dict[str, np.ndarray]:
    return {k: delta(a, b) for k, (a, b) in file_factors(str(path)).items()}


def test_the_weights_really_differ_per_module(adapters):
    ws = per_module_weights(adapters, WEIGHTS)
    assert ws["model.layers.0.self_attn.q_proj"] == [1.0, 0.0, 2.0]
    assert ws["model.layers.1.self_attn.v_proj"] == [1.0, 0.5, -0.5]
    assert ws["model.layers.0.mlp.up_proj"] == [0.0, pytest.approx(0.2), None]
    assert ws["model.layers.1.mlp.down_proj"] == [0.0, 1.0, None]


@pytest.mark.parametrize("combination_type", ["cat", "task_arithmetic", "linear"])
def test_per_module_weights_match_the_reference(adapters, tmp_path, combination_type, record_parity):
    out = tmp_path / combination_type
    res = gomerge.add_weighted_adapter(adapters, WEIGHTS, "m", combination_type, output_dir=str(out))
    assert res.modules == 14 and res.rank == (4 if combination_type == "linear" else 12)
    ref = linear_reference if combination_type == "linear" else dense_reference
    worst = assert_close(merged_products(out), ref(adapters, WEIGHTS))
    record_parity(f"per-module weights {combination_type} vs numpy reference", worst)
    card = (out / "README.md").read_text()
    assert "## Per-module weights" in card and card.count("per module (below)") == 3
    assert "| `self_attn\\..*` | 1 |" in card and "| `.*` | gradient [0.2, 1] |" in card


def test_per_module_equals_the_scalar_merge_of_each_modules_weights(adapters, tmp_path):
    """For every module, a per-module merge writes the factors of a plain merge with that module's weights
    (ties: pruning and sign election per module, deterministic)."""
    out = tmp_path / "ties"
    gomerge.add_weighted_adapter(adapters, WEIGHTS, "m", "ties", density=0.5, output_dir=str(out))
    got = file_factors(str(out))
    for i, (module, ws) in enumerate(per_module_weights(adapters, WEIGHTS).items()):
        if i % 3:  # a third of the modules keeps the test quick; they cover every weight vector used above
            continue
        plain = tmp_path / f"plain-{i}"
        scalar = [0.0 if w is None else w for w in ws]
        gomerge.add_weighted_adapter(adapters, scalar, "m", "ties", density=0.5, output_dir=str(plain))
        a, b = file_factors(str(plain))[module]
        np.testing.assert_array_equal(got[module][0], a, err_msg=module)
        np.testing.assert_array_equal(got[module][1], b, err_msg=module)


def test_peft_reloads_the_per_module_merge(adapters, tmp_path):
    out = tmp_path / "cat"
    gomerge.add_weighted_adapter(adapters, WEIGHTS, "m", "cat", output_dir=str(out))
    want = dense_reference(adapters, WEIGHTS)
    merged = PeftModel.from_pretrained(llama(0), str(out)).eval()
    reference = llama(0)
    with torch.no_grad():
        for name, mod in reference.named_modules():
            if name in want:
                mod.weight += torch.from_numpy(want[name]).to(mod.weight.dtype)
    np.testing.assert_allclose(logits(merged, "llama"), logits(reference, "llama"), rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits(merged, "llama"), logits(llama(0), "llama"), atol=1e-3)  # it did change the model


def test_a_list_of_numbers_is_a_gradient_for_every_module(adapters, tmp_path):
    weights = [[1.0, 0.0], [0.0, 1.0], 0.5]
    out = tmp_path / "grad"
    gomerge.add_weighted_adapter(adapters, weights, "m", "cat", output_dir=str(out))
    assert_close(merged_products(out), dense_reference(adapters, weights))
    ws = per_module_weights(adapters, weights)
    assert ws["model.layers.0.mlp.up_proj"] == [1.0, 0.0, None] and ws["model.layers.1.self_attn.q_proj"] == [
        0.0,
        1.0,
        0.5,
    ]


@pytest.mark.parametrize(
    "weights,exc,text",
    [
        (
            [1.0, {r"self_attn\..*": 1.0}, 1.0],
            ValueError,
            r"weights\[1\]: module model\.layers\.0\.mlp\.down_proj of adapter 1 \(.*a1\) matches none of its "
            r"patterns \('self_attn\\\.\.\*'\); add a catch-all such as '\.\*'",
        ),
        ([{"self_attn": 1.0, "mlp": 0.0}, 1.0, 1.0], ValueError, "'mlp' occurs inside .* write '\\.\\*mlp\\.\\*'"),
        ([1.0, {"self_attn(": 1.0, ".*": 0.0}, 1.0], ValueError, r"weights\[1\]: pattern \"self_attn\(\" is not a"),
        ([1.0, {"mlp": "x", ".*": 0.0}, 1.0], TypeError, r"weights\[1\]: pattern 'mlp': the weight is not a number"),
        ([1.0, {".*": [0.0, "1"]}, 1.0], TypeError, r"weights\[1\]: pattern '\.\*': gradient value 1 is not a number"),
        ([1.0, {".*": float("nan")}, 1.0], ValueError, r"weights\[1\]: pattern '\.\*': nan is not a finite number"),
        ([1.0, {1: 1.0}, 1.0], TypeError, r"weights\[1\]: entry 0: expected \{\"pattern\": <string>"),
        ([1.0, {}, 1.0], ValueError, r"weights\[1\]: an empty list; give a number"),
        ([1.0, [], 1.0], ValueError, r"weights\[1\]: an empty list; give a number, a gradient with at least one value"),
        ([1.0, {".*": []}, 1.0], ValueError, r"weights\[1\]: pattern '\.\*': a gradient needs at least one value"),
        ([1.0, "mlp=x", 1.0], ValueError, r"weights\[1\]: pattern 'mlp': 'x' is not a number or a gradient"),
        ([1.0, True, 1.0], TypeError, r"weights\[1\]: expected a number, a list of numbers \(a gradient\)"),
        ([1.0, float("inf"), 1.0], ValueError, r"weights\[1\]: inf is not a finite number"),
        ({"a": 1.0}, TypeError, "weights: expected a list"),
    ],
)
def test_errors_name_the_weight_and_write_nothing(adapters, tmp_path, weights, exc, text):
    out = tmp_path / "o"
    with pytest.raises(exc, match=text):
        gomerge.add_weighted_adapter(adapters, weights, "m", "cat", output_dir=str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder either


@pytest.mark.parametrize(
    "text,want",
    [
        ("2", 2.0),
        ("-0.5", -0.5),
        ("0:0.5:1", [0.0, 0.5, 1.0]),
        (r"self_attn\..*=1,mlp\..*=0", {r"self_attn\..*": 1.0, r"mlp\..*": 0.0}),
        ("q{1,2}=1,.*=0", {"q{1,2}": 1.0, ".*": 0.0}),  # a comma inside a pattern
        (".*=-1:1", {".*": [-1.0, 1.0]}),
        ("a=b=2", {"a=b": 2.0}),  # the last "=" separates the weight
    ],
)
def test_cli_weight_syntax(text, want):
    """The command line's strings go to the engine as they are: it reads them as the API's weights."""
    assert _native.weight_error(0, text) is None
    assert _native.weight_error(0, merge._weight_json(want)) is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("x", "weights[0]: 'x' is not a number or a gradient A:B[:C...] of numbers"),
        ("a=x", "weights[0]: pattern 'a': 'x' is not a number or a gradient A:B[:C...] of numbers"),
        ("a=1,junk", "weights[0]: 'a=1,junk': expected PATTERN=W[,PATTERN=W...], got 'junk'"),
        ("a=1,a=2", "weights[0]: pattern 'a' is given twice"),
        ("=1", "weights[0]: '=1': expected PATTERN=W[,PATTERN=W...], got '=1'"),
        ("0:x", "weights[0]: '0:x' is not a number or a gradient A:B[:C...] of numbers"),
    ],
)
def test_cli_weight_syntax_errors(text, message):
    assert _native.weight_error(0, text) == message


def gomerge_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gomerge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
    )


def test_cli_per_module_weights(adapters, tmp_path):
    out = tmp_path / "cli"
    cli_weights = [
        r"self_attn\..*=1,mlp\..*=0",
        r"layers\.0\.self_attn\..*=0,self_attn\..*=0.5,.*=0.2:1",
        ".*q_proj=2,.*=-0.5",
    ]
    r = gomerge_cli(
        "merge", *adapters, "--weights", *cli_weights, "--method", "task_arithmetic", "-o", str(out), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rank"] == 12
    assert_close(merged_products(out), dense_reference(adapters, WEIGHTS))
    assert "| `.*q_proj` | 2 |" in (out / "README.md").read_text()
    assert "PATTERN=W" in gomerge_cli("merge", "--help").stdout


@pytest.mark.parametrize(
    "weights,code,text",
    [
        (["1", "mlp=x", "1"], 2, "--weights: weights[1]: pattern 'mlp': 'x' is not a number or a gradient"),
        (["1", r"self_attn\..*=1", "1"], 1, "matches none of its patterns"),
        (["1", "(=1", "1"], 2, '--weights: weights[1]: pattern "(" is not a regular expression'),
    ],
)
def test_cli_weight_errors(adapters, tmp_path, weights, code, text):
    r = gomerge_cli("merge", *adapters, "--weights", *weights, "--method", "cat", "-o", str(tmp_path / "o"))
    assert r.returncode == code, r.stderr
    assert text in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_recipe_with_per_module_weights(adapters, tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"""adapters:
  - source: {adapters[0]}
    weight:
      'self_attn\\..*': 1.0
      'mlp\\..*': 0
  - source: {adapters[1]}
    weight:
      'layers\\.0\\.self_attn\\..*': 0
      'self_attn\\..*': 0.5
      '.*': [0.2, 1.0]
  - source: {adapters[2]}
    weight: {{'.*q_proj': 2, '.*': -0.5}}
method: cat
output_dir: merged
"""
    )
    loaded = recipe.load_recipe(str(path))
    assert [s["weight"] for s in loaded.sources] == WEIGHTS
    assert list(loaded.sources[1]["weight"]) == list(WEIGHTS[1])  # the YAML order is the first-match order
    r = gomerge_cli("merge", "--recipe", str(path), "-q")
    assert r.returncode == 0, r.stderr
    assert_close(merged_products(tmp_path / "merged"), dense_reference(adapters, WEIGHTS))


@pytest.mark.parametrize(
    "weight,line,text",
    [
        ("'x'", 3, "weights[0]: 'x' is not a number or a gradient A:B[:C...] of numbers"),
        ("null", 3, "weights[0]: expected a number, a list of numbers (a gradient)"),
        ("\n      mlp: x", 4, "weights[0]: pattern 'mlp': the weight is not a number or a list of numbers"),
        ("\n      mlp: 1\n      '.*': [0, one]", 5, "weights[0]: pattern '.*': gradient value 1 is not a number"),
        ("\n      mlp: 1\n      1: 0", 5, 'weights[0]: entry 1: expected {"pattern": <string>'),
        ("\n      mlp: 1\n      mlp: 0", 5, "weights[0]: pattern 'mlp' is given twice"),
        ("{}", 3, "weights[0]: an empty list; give a number"),
        ("[]", 3, "weights[0]: an empty list; give a number, a gradient with at least one value"),
        ("[0, one]", 3, 'weights[0]: gradient value 1 is not a number: "one"'),
    ],
)
def test_recipe_checker_names_file_line_and_key(adapters, tmp_path, weight, line, text):
    path = tmp_path / "bad.yaml"
    path.write_text(f"adapters:\n  - source: {adapters[0]}\n    weight: {weight}\n")
    with pytest.raises(recipe.RecipeError) as info:
        recipe.load_recipe(str(path))
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert text in str(info.value)
    r = gomerge_cli("merge", "--recipe", str(path))
    assert r.returncode == 2 and text in r.stderr


@pytest.mark.parametrize(
    "api,cli_text,yaml_text",
    [
        ({"mlp": 1.0, "(": 0.0}, "mlp=1,(=0", "{mlp: 1, '(': 0}"),
        ({".*": float("nan")}, ".*=nan", "{'.*': .nan}"),
        ("a=1,a=2", "a=1,a=2", "{a: 1, a: 2}"),  # the API takes the command line's strings too
        ({"mlp": "x"}, "mlp=1,.*=x", "{mlp: x}"),
    ],
)
def test_the_same_bad_weight_gives_the_same_error_everywhere(adapters, tmp_path, api, cli_text, yaml_text):
    """Go is the one validator of the weight grammar: the API, the command line and a recipe give its message."""
    with pytest.raises((TypeError, ValueError)) as info:
        gomerge.add_weighted_adapter(adapters[:2], [1.0, api], "m", "cat", output_dir=str(tmp_path / "o"))
    message = str(info.value)
    assert message.startswith("weights[1]: "), message
    r = gomerge_cli("merge", *adapters[:2], "--weights", "1", cli_text, "-o", str(tmp_path / "o"))
    if api != {"mlp": "x"}:  # a string is no number in the API, and a bad number in a command-line string
        assert r.returncode == 2 and f"--weights: {message} (see" in r.stderr, (message, r.stderr)
    path = tmp_path / "bad.yaml"
    path.write_text(f"adapters:\n  - {adapters[0]}\n  - source: {adapters[1]}\n    weight: {yaml_text}\n")
    with pytest.raises(recipe.RecipeError) as rinfo:
        recipe.load_recipe(str(path))
    assert str(rinfo.value) == f"{path}:4: {message}"
    assert not (tmp_path / "o").exists()


def test_a_pattern_that_matches_no_module_warns(adapters, tmp_path):
    """'self_attn' occurs inside the module names but, by PEFT's anchoring, matches none: every module falls to
    '.*=0'. The merge runs, with a warning naming the pattern (from the API and the command line)."""
    with pytest.warns(
        UserWarning, match=r"weights\[0\]: pattern 'self_attn' matches no module of adapter 0 .*'\.\*self_attn\.\*'"
    ):
        gomerge.add_weighted_adapter(
            adapters, [{"self_attn": 1.0, ".*": 0.0}, 1.0, 1.0], "m", "cat", output_dir=str(tmp_path / "api")
        )
    r = gomerge_cli(
        "merge", *adapters, "--weights", "self_attn=1,.*=0", "1", "1", "--method", "cat", "-o", str(tmp_path / "o")
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("gomerge: warning: weights[0]: pattern 'self_attn' matches no module"), r.stderr
