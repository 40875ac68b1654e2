"""Writes three small LoRA adapters in PEFT's format, with the standard library only (no torch, no numpy).

They stand in for three task adapters (`norobots`, `sql`, `adcopy`) of a 4-layer Llama-shaped model with hidden
size 256: rank 8 on q/k/v/o and, for `sql`, also on the MLP projections.
"""

from __future__ import annotations

import json
import os
import random
import struct

HIDDEN, INTERMEDIATE, LAYERS = 256, 512, 4
SHAPES = {  # module -> (in, out)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN // 4),
    "self_attn.v_proj": (HIDDEN, HIDDEN // 4),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
ADAPTERS = {  # name -> (rank, alpha, target modules, seed)
    "norobots": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 1),
    "sql": (8, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2),
    "adcopy": (8, 32, ["q_proj", "v_proj"], 3),
}


def write_safetensors(path: str, tensors: dict[str, tuple[list[int], list[float]]]) -> None:
    """Writes float32 tensors {name: (shape, values)} as a safetensors file with PEFT's metadata."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        shape, values = tensors[name]
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_adapter(root: str, name: str) -> str:
    rank, alpha, targets, seed = ADAPTERS[name]
    rng = random.Random(seed)
    tensors = {}
    for layer in range(LAYERS):
        for mod, (fan_in, fan_out) in SHAPES.items():
            if mod.split(".")[-1] not in targets:
                continue
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[key + ".lora_A.weight"] = ([rank, fan_in], [rng.gauss(0, 0.05) for _ in range(rank * fan_in)])
            tensors[key + ".lora_B.weight"] = ([fan_out, rank], [rng.gauss(0, 0.05) for _ in range(fan_out * rank)])
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "example/tiny-llama-256",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return path


def write_all(root: str) -> list[str]:
    """Writes the three example adapters under `root` and returns their directories."""
    return [write_adapter(root, name) for name in ADAPTERS]


if __name__ == "__main__":
    for p in write_all(os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "adapters")):
        print(p)
