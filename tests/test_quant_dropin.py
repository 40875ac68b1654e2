"""The seed's script shape (PEFT's merging guide) on a 4-bit base: the base loaded with transformers'
BitsAndBytesConfig (NF4, double quant) on CPU, three adapters merged with add_weighted_adapter. Run as it is and with
the one line that switches it to gomerge: the same generated tokens and the same merged adapter."""

from __future__ import annotations

import os
import re

import torch
from peft import LoraConfig, get_peft_model
from peft_cases import LLAMA_ALL
from safetensors.torch import load_file
from test_peft_guide import HERE, ONE_LINE, _run
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

FOUR_BIT = """model = AutoModelForCausalLM.from_pretrained(
    os.environ["GUIDE_BASE"],
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    device_map="cpu",
).eval()
"""


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,  # bitsandbytes' CPU 4-bit matmul needs whole blocks of 64 per row
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _adapter(path: str, seed: int) -> str:
    """A PEFT adapter with random factors (as peft_cases.make_adapter, for this base's shapes)."""
    model = get_peft_model(
        LlamaForCausalLM(_config()), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_ALL, init_lora_weights=False)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(path)
    return path


def test_guide_script_on_a_4bit_base(tmp_path, monkeypatch):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config()).save_pretrained(tmp_path / "base")
    monkeypatch.setenv("GUIDE_BASE", str(tmp_path / "base"))
    original = open(os.path.join(HERE, "guide", "peft_merging_guide.py")).read()
    script, n = re.subn(r"model = AutoModelForCausalLM\.from_config\(.*?\)\.eval\(\)\n", FOUR_BIT, original, flags=re.S)
    assert n == 1
    script = script.replace(
        "from transformers import AutoModelForCausalLM, LlamaConfig",
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
    )
    four = tmp_path / "guide_4bit.py"
    four.write_text(script)
    lines = script.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("import "))
    patched = tmp_path / "guide_4bit_gomerge.py"
    patched.write_text("".join(lines[:first] + [ONE_LINE] + lines[first:]))
    adapters = [_adapter(str(tmp_path / n), seed) for seed, n in ((41, "norobots"), (42, "sql"), (43, "adcopy"))]
    tokens_peft = _run(str(four), adapters, str(tmp_path / "peft"), False)
    tokens_gomerge = _run(str(patched), adapters, str(tmp_path / "gomerge"), True)
    assert tokens_gomerge == tokens_peft
    theirs = load_file(str(tmp_path / "peft" / "merge" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "gomerge" / "merge" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-7)
