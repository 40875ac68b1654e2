"""Helpers shared by the benchmarks: PEFT adapters on models of real shapes, built without random init cost."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> nn.Module:
    """A Llama-shaped model with uninitialised weights (allocation only: merges never read base weights)."""
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.to_empty(device="cpu").eval()


def tinyllama() -> nn.Module:
    """TinyLlama-1.1B's shapes: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads."""
    return llama(2048, 5632, 22, 32, 4)


class Linear(nn.Module):
    """One nn.Linear module of the given shape, named `proj`."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out, bias=False)


def save_adapters(
    make_model, root: str, ranks: list[int], targets: list[str], std: float = 0.02, dtype: torch.dtype = torch.float32
) -> list[str]:
    """Saves one PEFT adapter per rank (random factors, fixed seeds) and returns the directories."""
    dirs = []
    model = make_model()
    for i, r in enumerate(ranks):
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        d = os.path.join(root, f"adapter{i}")
        if dtype != torch.float32:
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
        pm.save_pretrained(d)
        model = pm.unload()
        dirs.append(d)
    return dirs


def load_peft(make_model, dirs: list[str]) -> PeftModel:
    model = PeftModel.from_pretrained(make_model(), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model


@contextmanager
def timer(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t0
