"""PEFT's merging guide, run as it is and with the one line that switches it to gomerge: same text, same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from peft_cases import LLAMA_ALL, AdapterSpec, make_adapter
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ONE_LINE = "import gomerge; gomerge.patch_peft()\n"


def _run(script: str, adapters: list[str], out: str, patched: bool) -> list[int]:
    env = dict(
        os.environ,
        GUIDE_ADAPTERS=os.pathsep.join(adapters),
        GUIDE_OUTPUT=out,
        PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), os.path.join(HERE, "guide")]),
    )
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"gomerge-patched: {patched}" in proc.stderr  # reported by guide/sitecustomize.py
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the generated token ids


def test_guide_script_with_one_added_line(tmp_path):
    adapters = [
        make_adapter(
            "llama",
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), seed, std=0.2),
            str(tmp_path / name),
        )
        for seed, name in ((41, "norobots"), (42, "sql"), (43, "adcopy"))
    ]
    original = open(os.path.join(HERE, "guide", "peft_merging_guide.py")).read()
    lines = original.splitlines(keepends=True)
    first_code = next(i for i, line in enumerate(lines) if line.startswith("import "))
    patched = "".join(lines[:first_code] + [ONE_LINE] + lines[first_code:])
    assert len(patched.splitlines()) == len(original.splitlines()) + 1
    script = tmp_path / "guide_with_gomerge.py"
    script.write_text(patched)

    tokens_peft = _run(os.path.join(HERE, "guide", "peft_merging_guide.py"), adapters, str(tmp_path / "peft"), False)
    tokens_gomerge = _run(str(script), adapters, str(tmp_path / "gomerge"), True)
    assert tokens_gomerge == tokens_peft
    theirs = load_file(str(tmp_path / "peft" / "merge" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "gomerge" / "merge" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 14
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-7)
