"""Bad input: each case raises a clear exception naming what is at fault, writes nothing, and leaves the
interpreter working."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

import gomerge

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from example_adapters import write_all  # noqa: E402


@pytest.fixture
def dirs(tmp_path):
    return write_all(str(tmp_path / "adapters"))


def _corrupt(path: str, data: bytes) -> None:
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(data)


def _edit_config(path: str, **changes) -> None:
    p = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def _reshape_module(path: str) -> None:
    """Rewrites one lora_A with a different input size."""
    from safetensors.numpy import load_file, save_file

    f = os.path.join(path, "adapter_model.safetensors")
    t = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = t[key][:, :100].copy()
    save_file(t, f, metadata={"format": "pt"})


CASES = [
    # (id, how to break the inputs, call overrides, exception, text the message must contain)
    ("missing-dir", lambda d: shutil.rmtree(d[1]), {}, FileNotFoundError, "sql"),
    (
        "missing-safetensors",
        lambda d: os.remove(os.path.join(d[1], "adapter_model.safetensors")),
        {},
        FileNotFoundError,
        "adapter_model.safetensors",
    ),
    (
        "missing-config",
        lambda d: os.remove(os.path.join(d[2], "adapter_config.json")),
        {},
        FileNotFoundError,
        "adcopy/adapter_config.json",
    ),
    (
        "corrupt-safetensors",
        lambda d: _corrupt(d[0], b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
        {},
        ValueError,
        "norobots/adapter_model.safetensors",
    ),
    (
        "truncated-safetensors",
        lambda d: _corrupt(d[0], open(os.path.join(d[0], "adapter_model.safetensors"), "rb").read()[:5000]),
        {},
        ValueError,
        "norobots",
    ),
    ("empty-safetensors", lambda d: _corrupt(d[0], b""), {}, ValueError, "norobots"),
    ("not-lora", lambda d: _edit_config(d[1], peft_type="IA3"), {}, ValueError, 'peft_type is "IA3"'),
    ("dora", lambda d: _edit_config(d[1], use_dora=True), {}, ValueError, "DoRA"),
    (
        "config-not-json",
        lambda d: open(os.path.join(d[0], "adapter_config.json"), "w").write("{oops"),
        {},
        ValueError,
        "norobots/adapter_config.json",
    ),
    ("weights-length", None, {"weights": [1.0, 1.0]}, ValueError, "2 weights for 3 adapters"),
    ("unknown-type", None, {"combination_type": "average"}, ValueError, "combination_type"),
    ("shape-mismatch", lambda d: _reshape_module(d[1]), {}, ValueError, "model.layers.0.self_attn.q_proj"),
    ("rank-disagrees-with-config", lambda d: _edit_config(d[0], r=4), {}, ValueError, "rank 8"),
    (
        "linear-unequal-ranks",
        lambda d: _edit_config(d[2], r=4, rank_pattern={".*": 8}),
        {"combination_type": "linear"},
        None,
        None,
    ),  # max(r, *rank_pattern) is still 8: allowed, and merges
    ("svd-rank-zero", None, {"svd_rank": 0}, ValueError, "svd_rank"),
    ("svd-clamp-range", None, {"svd_clamp": 1.5}, ValueError, "svd_clamp"),
    ("svd-driver", None, {"svd_driver": "magic"}, ValueError, "svd_driver"),
    ("single-path", None, {"adapters": "one/path"}, TypeError, "single path"),
    ("weight-type", None, {"weights": [1.0, None, 1.0]}, TypeError, "weights[1]"),
    ("weight-string", None, {"weights": [1.0, "a", 1.0]}, ValueError, "weights[1]: 'a' is not a number"),
    ("dtype", None, {"dtype": "int8"}, ValueError, "dtype"),
    ("density-missing", None, {"combination_type": "ties"}, ValueError, "needs a density"),
    ("density-negative", None, {"combination_type": "ties_svd", "density": -0.1}, ValueError, "density"),
    ("density-above-one", None, {"combination_type": "magnitude_prune", "density": 1.5}, ValueError, "[0, 1]"),
    ("density-zero-dare", None, {"combination_type": "dare_linear", "density": 0.0}, ValueError, "density > 0"),
    (
        "sign-method",
        None,
        {"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"},
        ValueError,
        "majority_sign_method",
    ),
    (
        "ties-unequal-ranks",
        lambda d: _edit_config(d[2], r=16, rank_pattern={".*": 8}),
        {"combination_type": "ties", "density": 0.5},
        ValueError,
        "same r value",
    ),
    ("seed", None, {"combination_type": "dare_ties", "density": 0.5, "seed": -1}, ValueError, "seed"),
]


@pytest.mark.parametrize("case_id,breaker,overrides,exc,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input(dirs, tmp_path, case_id, breaker, overrides, exc, text):
    if breaker is not None:
        breaker(dirs)
    out = tmp_path / "merged"
    kwargs = dict(adapters=dirs, weights=[2.0, 1.0, 1.0], adapter_name="m", combination_type="svd", output_dir=out)
    kwargs.update(overrides)
    if exc is None:
        gomerge.add_weighted_adapter(**kwargs)
        assert (out / "adapter_config.json").exists()
        return
    with pytest.raises(exc) as info:
        gomerge.add_weighted_adapter(**kwargs)
    assert text in str(info.value)
    assert not out.exists(), "a failed merge wrote output"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".gomerge-tmp")], "temporary folder left behind"
    # the interpreter and the engine still work
    fresh = write_all(str(tmp_path / "fresh"))
    res = gomerge.add_weighted_adapter(fresh, [1.0, 1.0, 1.0], "ok", "cat", output_dir=tmp_path / "ok")
    assert res.rank == 24


def test_existing_output_is_refused_and_untouched(dirs, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", output_dir=out)
    # overwrite=True still refuses a directory that is not an adapter
    with pytest.raises(FileExistsError, match="not an adapter"):
        gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", output_dir=out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_an_adapter(dirs, tmp_path):
    out = tmp_path / "merged"
    gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "cat", output_dir=out)
    res = gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "svd", output_dir=out, overwrite=True)
    assert json.load(open(out / "adapter_config.json"))["r"] == res.rank == 8
    assert sorted(os.listdir(tmp_path)) == ["adapters", "merged"]


def test_parent_of_named_adapters_suggests_the_subfolders(tmp_path):
    """PEFT saves an adapter named other than "default" into <dir>/<name>/: point the user there."""
    import shutil

    dirs = write_all(str(tmp_path / "in"))
    parent = tmp_path / "saved"
    parent.mkdir()
    shutil.copytree(dirs[0], parent / "norobots")
    with pytest.raises(FileNotFoundError, match="these subfolders are adapters: .*saved/norobots"):
        gomerge.add_weighted_adapter([str(parent), dirs[1]], [1.0, 1.0], "m", output_dir=tmp_path / "o")


@pytest.mark.parametrize(
    "method,kwargs,name",
    [
        ("ties", dict(density=0.5, seed=3), "seed"),
        ("svd", dict(density=0.5), "density"),
        ("ties", dict(density=0.5, svd_rank=4), "svd_rank"),
        ("linear", dict(svd_clamp=0.9), "svd_clamp"),
        ("cat", dict(majority_sign_method="frequency"), "majority_sign_method"),
        ("magnitude_prune", dict(density=0.5, svd_driver="gesvd"), "svd_driver"),
    ],
)
def test_a_method_refuses_every_parameter_it_does_not_take(dirs, tmp_path, method, kwargs, name):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f'^{name}: combination_type "{method}" does not take {name} '):
        gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", method, output_dir=out, **kwargs)
    assert not out.exists()


def test_unread_parameters_are_refused_from_the_cli_and_recipes(dirs, tmp_path):
    import subprocess

    env = dict(
        os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    )
    cli = [sys.executable, "-m", "gomerge", "merge", *dirs, "-o", str(tmp_path / "out")]
    for args, text in (
        (["--method", "ties", "--density", "0.5", "--seed", "1"], '--seed: --method "ties" does not take --seed'),
        (["--method", "svd", "--density", "0.5"], '--density: --method "svd" does not take --density'),
        (["--method", "ties", "--density", "0.5", "--svd-rank", "4"], '--svd-rank: --method "ties" does not take'),
    ):
        r = subprocess.run(cli + args, capture_output=True, text=True, env=env)
        assert r.returncode == 1 and text in r.stderr, r.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "adapters:\n" + "".join(f"  - {d}\n" for d in dirs) + "method: svd\ndensity: 0.5\noutput_dir: o\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", "--recipe", str(recipe)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1 and 'density: combination_type "svd" does not take density' in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


# The parameter schema, walked: every merge parameter is reachable, with the same default and the same error on a
# bad value, from the API, `gomerge merge`, `gomerge fuse` and recipes; and every method refuses every parameter it
# does not take, from all of them.

from gomerge import _native, cli  # noqa: E402
from gomerge.merge import keyword  # noqa: E402

PARAMS = {p["name"]: p for p in _native.params()}
METHODS = {m["name"]: m for m in gomerge.methods()}
# a value out of each ranged parameter's range (the check is the engine's, its text the same from every surface)
BAD = {"svd_rank": 0, "max_rank": 0, "svd_clamp": 1.5, "density": 1.5, "seed": -1, "gamma": 1.5, "epsilon": -1.0}
BAD["common_fraction"] = 1.5


def _good(p: dict) -> object:
    """A valid value of a parameter that is not its default."""
    if p["choices"]:
        return next(c for c in p["choices"] if c != p["default"])
    return {"bool": False, "int": 4, "rank": 4, "float": 0.1 if p["name"] == "epsilon" else 0.5}[p["type"]]


def _taker(name: str) -> str:
    """A method that takes the parameter."""
    return next(n for n, m in METHODS.items() if name in m["params"])


def _cli_value(value: object) -> list[str]:
    return [] if isinstance(value, bool) else [str(value)]


def _cli_flag(name: str, value: object) -> list[str]:
    if isinstance(value, bool):
        return [cli.flag(name) if value else "--no-" + cli.flag(name)[2:]]
    return [cli.flag(name), str(value)]


def _surfaces(dirs, tmp_path, method: str, params: dict, capsys) -> dict[str, str]:
    """The error message of a merge (method, params) from each surface: the API's exception, and the command
    line's stderr for merge, fuse (several adapters: merged first) and a merge recipe."""
    out = tmp_path / "out"
    got = {}
    try:
        gomerge.add_weighted_adapter(
            dirs, [1.0] * len(dirs), "m", method, output_dir=out, **{keyword(k): v for k, v in params.items()}
        )
        got["api"] = ""
    except (ValueError, TypeError) as e:
        got["api"] = str(e)
    flags = [a for k, v in params.items() for a in _cli_flag(k, v)]
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    for name, argv in (
        ("merge", ["merge", *dirs, "--method", method, *flags, "-o", str(out)]),
        ("fuse", ["fuse", str(base), *dirs, "--method", method, *flags, "-o", str(tmp_path / "fused")]),
    ):
        capsys.readouterr()
        code = cli.main(argv)
        err = capsys.readouterr().err
        got[name] = err.removeprefix("gomerge: error: ").strip() if code == 1 else f"exit {code}: {err}"
    recipe = tmp_path / "r.yaml"
    lines = [f"{k}: {json.dumps(v)}" for k, v in params.items()]
    recipe.write_text("adapters:\n" + "".join(f"  - {d}\n" for d in dirs) + f"method: {method}\n" + "\n".join(lines))
    recipe.write_text(recipe.read_text() + f"\noutput_dir: {out}\n")
    capsys.readouterr()
    code = cli.main(["merge", "--recipe", str(recipe)])
    err = capsys.readouterr().err
    got["recipe"] = err.removeprefix("gomerge: error: ").strip() if code == 1 else f"exit {code}: {err}"
    assert not out.exists() and not (tmp_path / "fused").exists()
    return got


def _needs(method: str, name: str) -> dict:
    """What the method needs besides the parameter: a density for the pruning methods."""
    return {"density": 0.5} if METHODS[method]["pruning"] and name != "density" else {}


@pytest.mark.parametrize("name", list(PARAMS))
def test_every_parameter_has_one_default_everywhere(name):
    import inspect

    p = PARAMS[name]
    default = inspect.signature(gomerge.add_weighted_adapter).parameters[keyword(name)].default
    assert default is None or default == p["default"], "the API's default is the engine's (None: the engine's)"
    parser = cli.build_parser()
    for command in ("merge", "fuse"):
        sub = parser._subparsers._group_actions[0].choices[command]
        action = next(a for a in sub._actions if a.dest == name)
        assert action.default is None  # what is not given is the recipe's, then the engine's
        assert p["doc"] in " ".join(action.help.split())
        if p["default"] is not None:
            assert f"(default: {cli._bool_default(p['default'])})" in action.help
    shown = "null" if p["default"] is None else cli._bool_default(p["default"])
    assert name == "density" or f"  {name}: {shown}\n" in cli._recipe_help() + "\n"
    from gomerge import recipe

    assert name in recipe.TOP_KEYS


@pytest.mark.parametrize("name", [n for n, p in PARAMS.items() if p["default"] is not None and not p["peft"]])
def test_the_engine_applies_the_schemas_default(dirs, tmp_path, name):
    method = _taker(name)
    out = tmp_path / "o"
    gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", method, output_dir=out, **_needs(method, name))
    assert f"- {name}: {cli._bool_default(PARAMS[name]['default'])}\n" in (out / "README.md").read_text()


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_value_is_the_same_error_everywhere(dirs, tmp_path, capsys, name):
    method = _taker(name)
    got = _surfaces(dirs, tmp_path, method, {**_needs(method, name), name: BAD[name]}, capsys)
    assert got["api"].startswith(f"{name}: "), got
    assert got["recipe"] == got["api"], "a recipe speaks the parameters' names"
    assert got["merge"] == got["fuse"] == cli.cli_words(got["api"]), got


@pytest.mark.parametrize("name", list(PARAMS))
def test_every_method_refuses_every_parameter_it_does_not_take_everywhere(dirs, tmp_path, capsys, name):
    value = _good(PARAMS[name])
    for method, m in METHODS.items():
        if name in m["params"]:
            continue
        got = _surfaces(dirs, tmp_path, method, {**_needs(method, name), name: value}, capsys)
        want = f'{name}: combination_type "{method}" does not take {name} (it takes: '
        assert got["api"].startswith(want) and got["recipe"] == got["api"], got
        assert got["merge"] == got["fuse"] == cli.cli_words(got["api"]), got
