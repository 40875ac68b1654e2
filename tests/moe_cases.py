"""Tiny mixture-of-experts models built from configs (no downloads) and PEFT adapters on their expert parameters
(`target_parameters`), for the tests of issue 20."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def config(kind: str):
    """The tiny configs: 4 experts, hidden 32, expert intermediate 48, two layers."""
    common = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=48, **common)
    if kind == "qwen3_moe":
        common.pop("num_local_experts")
        return Qwen3MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=48,
            num_experts=4,
            head_dim=8,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            **common,
        )
    if kind == "gpt_oss":
        return gpt_oss_config()
    raise ValueError(kind)


def model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(kind), dtype=torch.float32)
    with torch.no_grad():  # visible routing and experts: normal init at a scale that moves the logits
        for n, p in m.named_parameters():
            if "experts" in n or n.endswith("gate.weight"):
                p.normal_(0, 0.2)
    return m.eval()


def save_base(kind: str, path: str, seed: int = 0) -> str:
    model(kind, seed).save_pretrained(path)
    return path


@dataclass
class MoeSpec:
    """One adapter: ranks per expert, the targets, and the scaling options."""

    seed: int
    r: int = 4
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj"])
    target_parameters: list[str] = field(default_factory=lambda: list(EXPERT_PARAMS))
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


def make_adapter(kind: str, spec: MoeSpec, path: str) -> str:
    """A train-free adapter: PEFT's own layers with random nonzero factors, saved by PEFT."""
    base = model(kind)
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=spec.target_modules,
        target_parameters=spec.target_parameters,
        use_rslora=spec.use_rslora,
        rank_pattern=spec.rank_pattern,
        alpha_pattern=spec.alpha_pattern,
        lora_dropout=0.0,
    )
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1000 + spec.seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm = pm.to(spec.dtype)
    pm.save_pretrained(path)
    return path


def load_peft(kind: str, dirs: list[str], names: list[str] | None = None) -> PeftModel:
    names = names or [f"a{i}" for i in range(len(dirs))]
    pm = PeftModel.from_pretrained(model(kind), dirs[0], adapter_name=names[0])
    for d, n in zip(dirs[1:], names[1:]):
        pm.load_adapter(d, adapter_name=n)
    return pm


def param_wrappers(pm: PeftModel) -> dict[str, torch.nn.Module]:
    """PEFT's ParamWrappers by the path of the parameter they adapt (without base_model.model.)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, ParamWrapper):
            module = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{module}.{mod.parameter_name}"] = mod
    return out


def peft_expert_deltas(kind: str, adapter_dir: str, name: str = "default") -> dict[str, np.ndarray]:
    """The oracle: PEFT's get_delta_weight of each targeted parameter, in float64, in the parameter's layout
    [E, ...], keyed by the parameter path."""
    pm = load_peft(kind, [adapter_dir], [name]).double()
    return {k: w.get_delta_weight(name).detach().numpy() for k, w in param_wrappers(pm).items()}


def file_expert_factors(path: str, key_module: str, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert factors of a saved module: A (E, r, in) and B (E, out, r), in PEFT's order."""
    sd = load_file(os.path.join(path, "adapter_model.safetensors"))
    a = sd[f"base_model.model.{key_module}.lora_A.weight"].double().numpy()
    b = sd[f"base_model.model.{key_module}.lora_B.weight"].double().numpy()
    a = a.reshape(experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, experts).transpose(2, 0, 1)
    return a, b


def logits(m: torch.nn.Module) -> np.ndarray:
    ids = torch.arange(0, 24).reshape(2, 12) % 64
    with torch.no_grad():
        return m(ids).logits.double().numpy()


class Unrolled(torch.nn.Module):
    """One nn.Linear per expert of every targeted parameter and per adapted module: the reference model on which
    PEFT's own add_weighted_adapter merges each expert as a module of its own."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.mods = torch.nn.ModuleDict({n: torch.nn.Linear(i, o, bias=False) for n, (o, i) in shapes.items()})

    def forward(self, x):
        return x


def _unrolled_name(key: str, e: int | None) -> str:
    return key.replace(".", "_") + ("" if e is None else f"__e{e}")


def source_factors(kind: str, adapter_dir: str) -> dict[str, dict]:
    """Per parameter or module path: the factors per expert (A_e r x in, B_e out x r, float64), r, alpha, rsLoRA,
    and whether the parameter stores each expert as (out, in) (PEFT swaps in and out) or transposed."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    pm = load_peft(kind, [adapter_dir], ["default"]).double()
    out = {}
    for name, mod in pm.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
            continue
        a = mod.lora_A["default"].weight.detach().numpy()
        b = mod.lora_B["default"].weight.detach().numpy()
        entry = dict(r=mod.r["default"], alpha=mod.lora_alpha["default"], rslora=mod.use_rslora["default"])
        if isinstance(mod, ParamWrapper):
            e = mod.num_experts
            module = name.removeprefix("base_model.model.").replace(".base_layer", "")
            key = f"{module}.{mod.parameter_name}"
            entry.update(
                a=a.reshape(e, -1, a.shape[-1]),
                b=b.reshape(b.shape[0], -1, e).transpose(2, 0, 1),
                experts=e,
                swapped=mod._did_swap_in_out_features,
            )
        else:
            key = name.removeprefix("base_model.model.")
            entry.update(a=a[None], b=b[None], experts=None, swapped=True)
        out[key] = entry
    return out


def unrolled_merge(kind: str, dirs: list[str], weights: list[float], combination_type: str, **kwargs) -> dict:
    """PEFT's add_weighted_adapter applied per expert: every expert (and every module) of the adapters becomes an
    nn.Linear of an Unrolled model, PEFT merges them, and the merged updates are returned in each parameter's
    layout ([E, ...], float64) and, for modules, as (out, in)."""
    from peft import get_peft_model

    sources = [source_factors(kind, d) for d in dirs]
    shapes, layout = {}, {}
    for src in sources:
        for key, f in src.items():
            layout[key] = (f["experts"], f["swapped"])
            for e in range(f["a"].shape[0]):
                shapes[_unrolled_name(key, None if f["experts"] is None else e)] = (f["b"].shape[1], f["a"].shape[2])
    model = Unrolled(shapes).double()
    names = []
    for i, src in enumerate(sources):
        targets, rp, ap = [], {}, {}
        for key, f in src.items():
            for e in range(f["a"].shape[0]):
                n = _unrolled_name(key, None if f["experts"] is None else e)
                targets.append(n)
                rp[n], ap[n] = f["r"], f["alpha"]
        first = next(iter(src.values()))
        cfg = LoraConfig(
            r=first["r"],
            lora_alpha=first["alpha"],
            use_rslora=first["rslora"],
            target_modules=targets,
            rank_pattern=rp,
            alpha_pattern=ap,
        )
        name = f"a{i}"
        if i == 0:
            model = get_peft_model(model, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():
            for key, f in src.items():
                for e in range(f["a"].shape[0]):
                    mod = model.base_model.model.mods[_unrolled_name(key, None if f["experts"] is None else e)]
                    mod.lora_A[name].weight.copy_(torch.from_numpy(f["a"][e]))
                    mod.lora_B[name].weight.copy_(torch.from_numpy(f["b"][e]))
        names.append(name)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    model = model.double()
    out = {}
    for key, (experts, swapped) in layout.items():
        if experts is None:
            out[key] = (
                model.base_model.model.mods[_unrolled_name(key, None)].get_delta_weight("merged").detach().numpy()
            )
            continue
        ds = [
            model.base_model.model.mods[_unrolled_name(key, e)].get_delta_weight("merged").detach().numpy()
            for e in range(experts)
        ]
        out[key] = np.stack([d if swapped else d.T for d in ds])
    return out


def merged_deltas(kind: str, adapter_dir: str) -> dict[str, np.ndarray]:
    """An adapter's updates as PEFT loads it, float64: per parameter [E, ...] (get_delta_weight), per module
    (out, in)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    pm = load_peft(kind, [adapter_dir], ["default"]).double()
    out = {}
    for name, mod in pm.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
            continue
        if isinstance(mod, ParamWrapper):
            key = name.removeprefix("base_model.model.").replace(".base_layer", "") + "." + mod.parameter_name
        else:
            key = name.removeprefix("base_model.model.")
        out[key] = mod.get_delta_weight("default").detach().numpy()
    return out


def reference_logits(kind: str, updates: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the base model with the dense updates added to its parameters and modules' weights."""
    m = model(kind)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for key, d in updates.items():
            p = params[key] if key in params else params[key + ".weight"]
            p += torch.from_numpy(np.asarray(d)).to(p.dtype)
    return logits(m)


def write_unrolled(kind: str, adapter_dir: str, path: str) -> str:
    """The adapter as a plain LoRA adapter directory with one module per expert (`<parameter>__e<k>`), each with its
    expert's factors, rank and alpha (explicit rank_pattern and alpha_pattern): what a merge per expert means."""
    from safetensors.torch import save_file

    tensors, targets, rp, ap = {}, [], {}, {}
    for key, f in source_factors(kind, adapter_dir).items():
        n = f["a"].shape[0]
        for e in range(n):
            name = key if f["experts"] is None else f"{key}__e{e}"
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(f["a"][e]).float().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(f["b"][e]).float().contiguous()
            targets.append(name)
            rp[name.replace(".", r"\.")], ap[name.replace(".", r"\.")] = f["r"], f["alpha"]
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    cfg.update(target_modules=targets, target_parameters=None, rank_pattern=rp, alpha_pattern=ap)
    os.makedirs(path, exist_ok=True)
    json.dump(cfg, open(os.path.join(path, "adapter_config.json"), "w"))
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def file_updates(path: str) -> dict[str, np.ndarray]:
    """A merged adapter's updates read from its files (merged adapters have scaling 1: lora_alpha and alpha_pattern
    equal r and rank_pattern): per module (out, in), and per expert of a parameter under `<parameter>__e<k>`."""
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    sd = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    params = {}
    for t in cfg.get("target_parameters") or []:
        params[t.rpartition(".")[2]] = t
    out = {}
    for k in sd:
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = sd[k].double().numpy(), sd[k.replace("lora_A", "lora_B")].double().numpy()
        if ".experts" not in mod or "__e" in mod:
            out[mod] = b @ a
            continue
        plain, depth = mod, 0
        while plain.endswith(".base_layer"):
            plain, depth = plain.removesuffix(".base_layer"), depth + 1
        order = [p for p in ("gate_up_proj", "down_proj") if p in params]
        key = f"{plain}.{order[len(order) - 1 - depth]}"
        r = cfg["rank_pattern"].get(key.replace(".", r"\."), cfg["r"])
        e = a.shape[0] // r
        a_e = a.reshape(e, r, -1)
        b_e = b.reshape(b.shape[0], r, e).transpose(2, 0, 1)
        for i in range(e):
            out[f"{key}__e{i}"] = b_e[i] @ a_e[i]
    return out


def gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    )
