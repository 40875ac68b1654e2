"""Hostile and broken inputs, faults and load (issue: never crash the host, never lose or half-write data).

Every hostile input must raise the expected exception naming the file and tensor, write nothing, and leave the
interpreter working. Kills during merges must leave either no output or a complete one.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gomerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from example_adapters import write_all  # noqa: E402
from test_cli import _big_adapters  # noqa: E402

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def st_file(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)


def weights_path(d: str) -> str:
    return os.path.join(d, "adapter_model.safetensors")


def rewrite(d: str, **tensors) -> None:
    """Replaces the weights of adapter d with the given tensors (name -> array)."""
    save_file({k.replace("__", "."): v for k, v in tensors.items()}, weights_path(d), metadata={"format": "pt"})


def _a(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _raw(header_tensors: dict, data: bytes):
    return lambda d: st_file(weights_path(d), {"__metadata__": {"format": "pt"}, **header_tensors}, data)


def _with_values(value):
    def f(d):
        a = _a((8, 256))
        a[3, 7] = value
        rewrite(d, **{Q + "__lora_A__weight": a, Q + "__lora_B__weight": _a((256, 8))})
        _edit(d, target_modules=["q_proj"])

    return f


def _edit(d, **changes):
    p = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def _truncate(d):
    data = open(weights_path(d), "rb").read()
    open(weights_path(d), "wb").write(data[: len(data) // 2])


F32_8 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE = [
    # id, how to break adapter 0 (norobots), exception, texts the message must contain
    ("truncated", _truncate, ValueError, ["norobots/adapter_model.safetensors", "the file holds"]),
    (
        "header-beyond-file",
        lambda d: st_file(weights_path(d), {"x": F32_8}, b"\0" * 8, header_len=1 << 20),
        ValueError,
        ["norobots", "beyond the end of the file"],
    ),
    (
        "header-above-cap",
        lambda d: st_file(weights_path(d), {"x": F32_8}, b"\0" * 8, header_len=1 << 40),
        ValueError,
        ["norobots", "cap"],
    ),
    (
        "overlapping-offsets",
        _raw(
            {
                Q + ".lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                Q + ".lora_B.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        ValueError,
        ["norobots", "lora_B.weight", "overlaps"],
    ),
    (
        "gapped-offsets",
        _raw(
            {
                Q + ".lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                Q + ".lora_B.weight": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
            },
            b"\0" * 20,
        ),
        ValueError,
        ["norobots", "lora_B.weight", "gap"],
    ),
    (
        "dtype-shape-vs-bytes",
        _raw({Q + ".lora_A.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        ValueError,
        ["norobots", "lora_A.weight", "need 12 bytes"],
    ),
    (
        "duplicate-names",
        lambda d: open(weights_path(d), "wb").write(
            struct.pack("<Q", 168)
            + (
                b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
            ).ljust(168)
            + b"\0" * 16
        ),
        ValueError,
        ["norobots", "tensor a appears twice"],
    ),
    (
        "fp8",
        _raw(
            {
                Q + ".lora_A.weight": {"dtype": "F8_E4M3", "shape": [8, 2], "data_offsets": [0, 16]},
                Q + ".lora_B.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [16, 80]},
            },
            b"\0" * 80,
        ),
        ValueError,
        ["norobots", "lora_A.weight", "dtype F8_E4M3"],
    ),
    (
        "int-dtype-factor",
        _raw(
            {
                Q + ".lora_A.weight": {"dtype": "I32", "shape": [8, 2], "data_offsets": [0, 64]},
                Q + ".lora_B.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [64, 128]},
            },
            b"\0" * 128,
        ),
        ValueError,
        ["norobots", "lora_A.weight", "dtype I32"],
    ),
    ("nan", _with_values(np.nan), ValueError, ["norobots", "lora_A.weight", "NaN", "allow_nonfinite"]),
    ("inf", _with_values(np.inf), ValueError, ["norobots", "lora_A.weight", "+Inf"]),
    (
        "a-b-rank-disagree",
        lambda d: rewrite(d, **{Q + "__lora_A__weight": _a((8, 256)), Q + "__lora_B__weight": _a((256, 4))}),
        ValueError,
        ["norobots", "q_proj", "disagree on the rank"],
    ),
    ("rank-vs-config", lambda d: _edit(d, r=16), ValueError, ["norobots", "rank 8", "r=16"]),
    (
        "missing-lora-b",
        lambda d: rewrite(d, **{Q + "__lora_A__weight": _a((8, 256))}),
        ValueError,
        ["norobots", "lora_B.weight is missing"],
    ),
    ("other-peft-type", lambda d: _edit(d, peft_type="PREFIX_TUNING"), ValueError, ["norobots", "PREFIX_TUNING"]),
    (
        "targets-match-nothing",
        lambda d: _edit(d, target_modules=["c_attn"]),
        ValueError,
        ["norobots", "matches none of the 16 modules"],
    ),
    (
        "dora-weights",
        lambda d: rewrite(
            d,
            **{
                Q + "__lora_A__weight": _a((8, 256)),
                Q + "__lora_B__weight": _a((256, 8)),
                Q + "__lora_magnitude_vector": _a((256,)),
            },
        ),
        ValueError,
        ["norobots", "DoRA"],
    ),
    (
        "not-safetensors",
        lambda d: open(weights_path(d), "wb").write(b"PK\x03\x04 a zip file, not safetensors"),
        ValueError,
        ["norobots", "not a valid safetensors file"],
    ),
]


@pytest.mark.parametrize("case_id,breaker,exc,texts", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input(tmp_path, case_id, breaker, exc, texts):
    dirs = write_all(str(tmp_path / "in"))
    breaker(dirs[0])
    out = tmp_path / "out"
    with pytest.raises(exc) as info:
        gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "svd", output_dir=out)
    for text in texts:
        assert text in str(info.value), str(info.value)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".gomerge")] == []
    fresh = write_all(str(tmp_path / "fresh"))
    assert gomerge.add_weighted_adapter(fresh, [1.0, 1.0, 1.0], "m", "cat", output_dir=tmp_path / "ok").rank == 24


def test_nonfinite_values_can_be_allowed(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    _with_values(np.nan)(dirs[0])
    res = gomerge.add_weighted_adapter(dirs[:1], [1.0], "m", "linear", output_dir=tmp_path / "o", allow_nonfinite=True)
    assert res.modules == 1
    # the NaN reached the output, where it was in the input (A[3, 7]; linear scales A and B by numbers), and only there
    out = load_file(weights_path(str(tmp_path / "o")))
    assert sorted(out) == [Q + ".lora_A.weight", Q + ".lora_B.weight"]
    assert np.argwhere(np.isnan(out[Q + ".lora_A.weight"])).tolist() == [[3, 7]]
    assert np.isfinite(out[Q + ".lora_B.weight"]).all()


def test_symlinks_never_write_outside_output_dir(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    link = tmp_path / "link-out"
    os.symlink(outside, link)
    with pytest.raises(FileExistsError):  # a symlink as output_dir is never replaced
        gomerge.add_weighted_adapter(dirs, [1.0] * 3, "m", output_dir=link, overwrite=True)
    # an adapter directory holding a symlink to an outside file: overwriting it removes the link, not the file
    out = tmp_path / "out"
    gomerge.add_weighted_adapter(dirs, [1.0] * 3, "m", output_dir=out)
    os.symlink(outside, out / "notes.txt")
    gomerge.add_weighted_adapter(dirs, [1.0] * 3, "m", "cat", output_dir=out, overwrite=True)
    assert outside.read_text() == "keep" and not (out / "notes.txt").exists()
    # ".." in output_dir resolves to a plain directory
    res = gomerge.add_weighted_adapter(dirs, [1.0] * 3, "m", output_dir=tmp_path / "in" / ".." / "dotdot")
    assert (tmp_path / "dotdot" / "adapter_config.json").exists() and res.rank == 8


def test_full_disk_leaves_nothing(tmp_path):
    """The output disk fills up (RLIMIT_FSIZE: writes beyond 64 KiB fail with EFBIG)."""
    dirs = write_all(str(tmp_path / "in"))
    out = tmp_path / "out"
    code = (
        f"import gomerge, sys\ntry:\n    gomerge.add_weighted_adapter({dirs!r}, [1.0] * 3, 'm', 'cat', "
        f"output_dir={str(out)!r})\nexcept OSError as e:\n    print('OSError', e)\n    sys.exit(3)\n"
    )

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "adapter_model.safetensors" in proc.stdout and "too large" in proc.stdout
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".gomerge")]


def _kill_target(root):
    """Adapters whose ties_svd merge takes about a second: 12 modules of 1536 x 1536."""
    return _big_adapters(root, n_modules=12, size=1536, rank=8)


def test_sigkill_at_random_points_never_leaves_partial_output(tmp_path):
    dirs = _kill_target(tmp_path)
    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    code = (
        f"import gomerge; gomerge.add_weighted_adapter({dirs!r}, [1.0] * 3, 'm', 'ties_svd', density=0.3, "
        f"output_dir={str(out)!r}, overwrite=True, progress=False)"
    )
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    full = time.monotonic() - t0
    reference = open(out / "adapter_model.safetensors", "rb").read()
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    rng = random.Random(7)
    outcomes = {"none": 0, "complete": 0}
    for trial in range(16):
        shutil.rmtree(out, ignore_errors=True)
        if trial % 2:  # half the trials start without an output, half overwrite a complete one
            shutil.copytree(pristine, out)
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        time.sleep(rng.uniform(0.1, 1.2 * full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert open(out / "adapter_model.safetensors", "rb").read() == reference, f"trial {trial}: partial"
            assert json.load(open(out / "adapter_config.json"))["r"] == 8
            outcomes["complete"] += 1
        else:
            outcomes["none"] += 1
    assert outcomes["complete"] >= 8  # every overwrite trial kept a complete adapter, old or new
    # the next run cleans up what the killed ones left behind
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".gomerge")] == []
    assert open(out / "adapter_model.safetensors", "rb").read() == reference
    print(f"kill trials: {outcomes}")


# each method's arguments: ties prunes, svd and cat take no density
KW = {"svd": {}, "ties": {"density": 0.5}, "cat": {}}


def test_many_threads_at_once_give_correct_results(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    reference = {}
    for ct in ("svd", "ties", "cat"):
        gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "m", ct, output_dir=tmp_path / f"ref-{ct}", **KW[ct])
        reference[ct] = open(tmp_path / f"ref-{ct}" / "adapter_model.safetensors", "rb").read()
    errors = []

    def work(i):
        ct = ("svd", "ties", "cat")[i % 3]
        try:
            out = tmp_path / f"t{i}"
            gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "m", ct, output_dir=out, **KW[ct])
            assert open(out / "adapter_model.safetensors", "rb").read() == reference[ct]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_long_loop_does_not_grow_memory(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    for _ in range(20):  # warm up pools and the Go heap
        gomerge.add_weighted_adapter(
            dirs, [1.0] * 3, "m", "ties", density=0.5, output_dir=tmp_path / "o", overwrite=True
        )
    before = _rss_mib()
    for i in range(200):
        ct = ("ties", "svd", "cat")[i % 3]
        gomerge.add_weighted_adapter(dirs, [1.0] * 3, "m", ct, output_dir=tmp_path / "o", overwrite=True, **KW[ct])
    growth = _rss_mib() - before
    print(f"RSS growth over 200 merges: {growth:.1f} MiB")
    assert growth < 64
