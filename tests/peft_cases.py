"""Small models and real PEFT adapters for the parity tests.

Every adapter is made by PEFT itself (`get_peft_model` + `save_pretrained`) on a small transformers or torch model
built from a config (no downloads). LoRA factors are drawn from a seeded normal distribution so that `lora_B` is
non-zero and merges are not trivial.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_types() -> tuple[str, ...]:
    import typing

    from peft.tuners.lora import LoraModel

    hints = typing.get_type_hints(LoraModel.add_weighted_adapter)
    return typing.get_args(hints["combination_type"])


# PEFT's eleven combination types, in its own order: the Literal of its add_weighted_adapter's signature
PEFT_TYPES: tuple[str, ...] = _peft_types()


def llama(seed: int = 0, tie_word_embeddings: bool = False) -> nn.Module:
    """A 2-layer Llama-shaped causal LM (hidden 64, 4 heads, 2 KV heads, vocabulary 128); with
    `tie_word_embeddings`, lm_head is tied to embed_tokens (save_pretrained omits lm_head.weight)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (Conv1D layers: LoRA needs fan_in_fan_out)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


class ConvNet(nn.Module):
    """A small CNN with a 3x3 and a 1x1 Conv2d and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


class Wide(nn.Module):
    """Two linear layers wide enough (384 x 640) for gomerge's randomized SVD rather than its exact small-matrix
    path. (PEFT writes the class's name into each adapter's config, so the golden corpus's inputs depend on it: Gram
    below is a class of its own, not this one with other sizes.)"""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(384, 640)
        self.down = nn.Linear(640, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def wide(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Wide().eval()


class Gram(nn.Module):
    """Two linear layers (1024 x 2048) where three rank-8 adapters stack to a rank-24 update thin and large enough
    ((m + n) R^2 >= 2^20) for gomerge's exact SVD to take Cholesky factors of the Gram matrices (the route of
    TinyLlama's modules), not Householder QRs."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(1024, 2048)
        self.down = nn.Linear(2048, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def gram(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Gram().eval()


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "llama": llama,
    "gpt2": gpt2,
    "conv": convnet,
    "wide": wide,
    "gram": gram,
}


def model_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    if kind == "conv":
        return torch.randn(2, 3, 8, 8, generator=g)
    if kind == "wide":
        return torch.randn(2, 384, generator=g)
    if kind == "gram":
        return torch.randn(2, 1024, generator=g)
    return torch.randint(0, 128, (2, 12), generator=g)


def logits(model: nn.Module, kind: str) -> np.ndarray:
    with torch.no_grad():
        out = model(model_input(kind))
    out = out if isinstance(out, torch.Tensor) else out.logits
    return out.float().numpy().astype(np.float64)


@dataclass
class AdapterSpec:
    """One adapter to build: LoraConfig arguments, a seed for its factors and the dtype to save it in."""

    lora: dict
    seed: int
    dtype: torch.dtype = torch.float32
    std: float = 0.05


@dataclass
class Case:
    """A parity case: a model kind, the adapters and the merge weights."""

    name: str
    model: str
    adapters: list[AdapterSpec]
    weights: list[float]
    types: tuple[str, ...] = ("linear", "cat", "svd")
    rtol: float = 1e-5
    notes: list[str] = field(default_factory=list)


def make_adapter(kind: str, spec: AdapterSpec, path: str) -> str:
    """Creates an adapter with PEFT and saves it to `path`."""
    model = MODELS[kind](0)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec.lora))
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * spec.std)
    peft_model.to(spec.dtype)
    peft_model.save_pretrained(path)
    return path


def build_case(case: Case, root: str) -> list[str]:
    return [make_adapter(case.model, s, os.path.join(root, f"{case.name}-{i}")) for i, s in enumerate(case.adapters)]


def peft_merge(case: Case, dirs: list[str], combination_type: str, **kwargs) -> PeftModel:
    """Loads the adapters into a PeftModel and runs PEFT's own add_weighted_adapter."""
    model = PeftModel.from_pretrained(MODELS[case.model](0), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(dirs))]
    model.add_weighted_adapter(names, case.weights, "merged", combination_type=combination_type, **kwargs)
    model.set_adapter("merged")
    return model.eval()


def _2d(t: np.ndarray, rank_first: bool) -> np.ndarray:
    return t.reshape(t.shape[0], -1) if rank_first else t.reshape(t.shape[0], t.shape[1])


def peft_factors(model: PeftModel, name: str = "merged") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module path (without `base_model.model.`): the adapter's (A, B) as float64 arrays."""
    out = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if name in mod.lora_A:
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
        elif name in mod.lora_embedding_A:
            a, b = mod.lora_embedding_A[name], mod.lora_embedding_B[name]
        else:
            continue
        key = mod_name.removeprefix("base_model.model.")
        out[key] = (a.detach().float().numpy().astype(np.float64), b.detach().float().numpy().astype(np.float64))
    return out


def file_factors(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module path: (A, B) read from an adapter directory's safetensors, as float64 arrays."""
    import json

    from safetensors import safe_open

    tensors = {}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k).float().numpy().astype(np.float64)
    out: dict[str, list] = {}
    for k, v in tensors.items():
        for suffix, idx in (
            (".lora_A.weight", 0),
            (".lora_B.weight", 1),
            (".lora_embedding_A", 0),
            (".lora_embedding_B", 1),
        ):
            if k.endswith(suffix):
                mod = k.removeprefix("base_model.model.").removesuffix(suffix)
                out.setdefault(mod, [None, None])[idx] = v
    json.load(open(os.path.join(path, "adapter_config.json")))  # must be valid JSON
    return {k: (a, b) for k, (a, b) in out.items()}


def delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """B @ A in two dimensions (Conv2d factors flattened)."""
    return _2d(b, False) @ _2d(a, True)


def rel_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def config_scaling(path: str) -> float:
    """The LoRA scaling of an adapter directory's config: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    import json

    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])


def dense_updates(dirs: list[str], weights: list[float], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """torch, in float64: scale * sum_i w_i s_i B_i A_i per module (the modules of every adapter)."""
    out: dict[str, torch.Tensor] = {}
    for d, w in zip(dirs, weights):
        s = config_scaling(d)
        for mod, (a, b) in file_factors(d).items():
            out[mod] = out.get(mod, 0) + torch.from_numpy(b) @ torch.from_numpy(a) * (w * s)
    return {k: scale * v for k, v in out.items()}


def assert_reloads_as(adapter_dir: str, updates: dict[str, np.ndarray], kind: str = "llama") -> None:
    """PEFT reloads the adapter onto the base model, and its logits are those of the base model with the dense
    updates added to the modules' weights."""
    merged = PeftModel.from_pretrained(MODELS[kind](0), adapter_dir).eval()
    reference = MODELS[kind](0)
    with torch.no_grad():
        for name, mod in reference.named_modules():
            if name in updates:
                mod.weight += torch.from_numpy(np.asarray(updates[name])).to(mod.weight.dtype)
    np.testing.assert_allclose(logits(merged, kind), logits(reference, kind), rtol=1e-4, atol=1e-5)
