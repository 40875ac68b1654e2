"""Drop-in for PEFT: `LoraModel.add_weighted_adapter` computed by gomerge's Go kernels, with PEFT's results.

```python
import gomerge

gomerge.patch_peft()   # the one added line: every model.add_weighted_adapter(...) now runs on gomerge
model.add_weighted_adapter(["norobots", "sql", "adcopy"], [2.0, 1.0, 1.0], "merge", combination_type="ties",
                           density=0.2)
```

The new adapter is created exactly as PEFT creates it (the same config, injected, frozen and not active); only the
merge of the factors runs in Go. The factors are read from the model without copies when they are contiguous CPU
float32 tensors (their addresses go to Go; everything else is converted first), and Go writes the results straight
into the new adapter's tensors where those already have the dtype, device and shape PEFT's result gets (contiguous CPU
float32); elsewhere they come back with the dtype and on the device PEFT would give them.

DARE: by default the keep-masks are drawn with torch's global generator in PEFT's order and shapes, so a script that
calls `torch.manual_seed(...)` gets PEFT's adapter; `seed=` selects gomerge's own generator instead.

Not handled (DoRA, `lora_bias`, Conv1d/Conv3d LoRA layers, other layer types): the call falls back to PEFT's own
`add_weighted_adapter` with a warning.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import _freeze_adapter
from torch import nn

from . import _native
from .merge import CombinationType

__all__ = ["add_weighted_adapter", "patch_peft", "unpatch_peft"]


def _row(combination_type: str) -> dict[str, Any] | None:
    """The engine's method-table row of a combination type, or None for a name it does not know."""
    return next((m for m in _native.methods() if m["name"] == combination_type), None)


def _method(combination_type: str) -> dict[str, Any]:
    """The engine's method-table row of a combination type (validated first)."""
    row = _row(combination_type)
    assert row is not None, combination_type
    return row


_PEFT_ADD_WEIGHTED_ADAPTER = LoraModel.add_weighted_adapter  # PEFT's own method, whatever patching happens later
_patch_lock = threading.Lock()


def _lora_model(model: Any) -> LoraModel:
    if isinstance(model, PeftModel):
        model = model.base_model
    if not isinstance(model, LoraModel):
        raise TypeError(f"model: expected a PeftModel or LoraModel with LoRA adapters, got {type(model).__name__}")
    return model


def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _unsupported(lora_model: LoraModel, adapters: Sequence[str]) -> str | None:
    """Why gomerge cannot merge these adapters exactly as PEFT would, or None."""
    for name in adapters:
        cfg = lora_model.peft_config[name]
        for option in ("use_dora", "lora_bias"):
            if getattr(cfg, option, False):
                return f"adapter {name!r} uses {option}"
    wanted = set(adapters)
    for layer in lora_model.model.modules():  # one pass without names: the key is looked up only to report
        if not isinstance(layer, LoraLayer):
            continue
        for name, a in layer.lora_A.items():
            if name not in wanted or (type(a) is nn.Linear or (type(a) is nn.Conv2d and a.groups == 1)):
                continue
            key = next(k for k, m in lora_model.model.named_modules() if m is layer)
            if isinstance(a, nn.Conv2d):
                return f"module {key} of adapter {name!r} is a grouped Conv2d"
            return f"module {key} of adapter {name!r} is a {type(a).__name__} LoRA layer"
    return None


def _peft_args(combination_type: str, **args: Any) -> dict[str, Any]:
    """PEFT's arguments that the method reads (its row's ``params``): PEFT ignores the others (``density`` with
    ``"svd"``, say), and so does the drop-in, where the engine refuses them from gomerge's own API."""
    row = _row(combination_type)  # an unknown name: everything goes on, for the engine to refuse
    return {k: v for k, v in args.items() if row is None or k in row["params"]}


def _validate(combination_type: str, density: float | None, majority_sign_method: str, svd_clamp: float | None) -> None:
    """The engine's checks of the combination arguments, before the model is changed."""
    _native.validate_combination(
        {
            "combination_type": combination_type,
            **_peft_args(
                combination_type, density=density, majority_sign_method=majority_sign_method, svd_clamp=svd_clamp
            ),
        }
    )


def _f32(t: torch.Tensor, keep: list) -> torch.Tensor:
    """A contiguous CPU float32 view of t (t itself when it already is one), kept alive in `keep`."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    keep.append(t)
    return t


def _u8(mask: torch.Tensor, keep: list) -> int:
    m = mask.detach().to(device="cpu", dtype=torch.uint8).contiguous()
    keep.append(m)
    return m.data_ptr()


def _writable(t: torch.Tensor, shape: torch.Size) -> bool:
    """Whether Go can write a result of this shape straight into t (a contiguous CPU float32 tensor of it)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.shape == shape


class _DareMasks:
    """PEFT's DARE keep-masks of the factors, drawn as PEFT draws them (`torch.bernoulli(torch.full_like(x,
    density))`, in the same order from torch's global generator) but into uint8 views of one buffer: the
    in-place `bernoulli_` with a probability tensor draws the same numbers in the same order for any output dtype,
    and the probability tensors (of x's shape and dtype: a bf16 0.2 is not a float32 0.2) are made once per
    shape rather than once per factor. Tensors off the CPU or not contiguous take PEFT's own expression."""

    def __init__(self, density: float, numel: int, keep: list) -> None:
        self.density = density
        self.buffer = torch.empty(numel, dtype=torch.uint8)
        keep.append(self.buffer)
        self.offset = 0
        self.probs: dict[tuple, torch.Tensor] = {}

    def draw(self, x: torch.Tensor, keep: list) -> int:
        """The address of x's mask."""
        x = x.data
        if x.device.type != "cpu" or not x.is_contiguous() or self.offset + x.numel() > self.buffer.numel():
            return _u8(torch.bernoulli(torch.full_like(input=x, fill_value=self.density)), keep)
        key = (tuple(x.shape), x.dtype)
        p = self.probs.get(key)
        if p is None:
            p = self.probs[key] = torch.full(x.shape, self.density, dtype=x.dtype)
        mask = self.buffer[self.offset : self.offset + x.numel()].view(x.shape)
        self.offset += x.numel()
        mask.bernoulli_(p)
        return mask.data_ptr()


def _dw_mask_2d(layer: LoraLayer, adapter: str, density: float) -> torch.Tensor:
    """PEFT's DARE mask of one dense update, drawn exactly as PEFT draws it (same shape, strides, dtype, device),
    then laid out as B @ A."""
    dw = layer.get_delta_weight(adapter)
    mask = torch.bernoulli(torch.full_like(input=dw, fill_value=density))
    is_embedding = adapter in layer.lora_embedding_A
    if getattr(layer, "fan_in_fan_out", False) or is_embedding:
        mask = mask.T
    return mask.reshape(mask.shape[0], -1)


def add_weighted_adapter(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: CombinationType = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    seed: int | None = None,
    progress: bool | None = None,
) -> None:
    """PEFT's `LoraModel.add_weighted_adapter` on a live model, computed by gomerge.

    Same arguments and behaviour as PEFT's method (see its documentation): the new adapter `adapter_name` is added
    to `model`, frozen and not active; an existing `adapter_name` makes the call do nothing; one adapter forces
    `linear`; only the adapters present at a module contribute to it.

    Args:
        model (`PeftModel` or `LoraModel`): the model holding the adapters, loaded by name.
        adapters (`list[str]`): names of the adapters to merge.
        weights (`list[float]`): one weight per adapter (a length mismatch is a `ValueError`; PEFT zips silently).
        adapter_name (`str`): name of the new adapter.
        combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method:
            as in PEFT.
        seed (`int`, *optional*): DARE only: use gomerge's own generator with this seed instead of drawing the
            masks from torch's global generator (the default, which reproduces PEFT under `torch.manual_seed`).
        progress (`bool`, *optional*): show a progress bar (tqdm) while Go works; by default for large models.
    """
    self = _lora_model(model)
    if adapter_name in list(self.peft_config.keys()):
        return
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"weights: got {len(weights)} weights for {len(adapters)} adapters")
    requested_type = combination_type
    combination_type, new_rank, new_target_modules = self._check_add_weighted_adapter(
        adapters=adapters, combination_type=combination_type, svd_rank=svd_rank
    )
    reason = _unsupported(self, adapters)
    if reason is not None:
        warnings.warn(
            f"gomerge: {reason}, which gomerge does not merge; using PEFT's own add_weighted_adapter", stacklevel=2
        )
        return _PEFT_ADD_WEIGHTED_ADAPTER(
            self,
            adapters,
            weights,
            adapter_name,
            requested_type,
            svd_rank,
            svd_clamp,
            svd_full_matrices,
            svd_driver,
            density,
            majority_sign_method,
        )
    _validate(combination_type, density, majority_sign_method, svd_clamp)

    # Create the adapter exactly as PEFT does (this also draws its initial weights from torch's generator).
    self.peft_config[adapter_name] = replace(
        self.peft_config[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_target_modules,
        alpha_pattern={},
        rank_pattern={},
    )
    self.inject_adapter(self.model, adapter_name)
    _freeze_adapter(self.model, adapter_name)
    try:
        _merge(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type,
            new_rank,
            svd_clamp,
            density,
            majority_sign_method,
            seed,
            progress,
        )
    except BaseException:
        self.delete_adapter(adapter_name)  # leave the model as it was
        raise


def _merge(
    self: LoraModel,
    adapters,
    weights,
    adapter_name,
    combination_type,
    new_rank,
    svd_clamp,
    density,
    majority_sign_method,
    seed,
    progress,
) -> None:
    method = _method(combination_type)
    family1 = method["family"] == "factors"
    dare_torch = method["pruning"] == "dare" and seed is None and density < 1
    keep: list = []  # every buffer whose address goes to Go stays referenced here until the job ends
    # the modules in PEFT's order (it walks named_modules and looks each key up again: the same modules)
    layers = []
    for key, target in self.model.named_modules():
        if self.prefix in key or not isinstance(target, LoraLayer):
            continue
        tgt = _factors(target, adapter_name)
        if tgt is None:
            continue
        srcs = [
            (i, name, w) + f
            for i, (name, w) in enumerate(zip(adapters, weights))
            if (f := _factors(target, name)) is not None
        ]
        if not srcs:
            raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
        layers.append((key, target, tgt, srcs))
    masks = None
    if dare_torch and family1:
        masks = _DareMasks(density, sum(a.numel() + b.numel() for *_, srcs in layers for *_, a, b in srcs), keep)
    targets, modules = [], []
    for key, target, (t_a, t_b), srcs in layers:
        sources = []
        for i, name, w, a, b in srcs:
            fa, fb = _f32(a, keep), _f32(b, keep)
            sources.append(
                {
                    "a": fa.data_ptr(),
                    "b": fb.data_ptr(),
                    "a_shape": list(fa.shape),
                    "b_shape": list(fb.shape),
                    "scaling": float(target.scaling[name]),
                    "weight": w,
                    "index": i,
                    "round_dw": "" if family1 or b.dtype == torch.float32 else str(b.dtype).removeprefix("torch."),
                }
            )
        if masks is not None:  # PEFT: every A mask in adapter order, then every B mask
            for s, (_, _, _, a, _) in zip(sources, srcs):
                s["mask_a"] = masks.draw(a, keep)
            for s, (_, _, _, _, b) in zip(sources, srcs):
                s["mask_b"] = masks.draw(b, keep)
        elif dare_torch:  # PEFT: one mask per dense update, in adapter order
            for s, (_, name, _, _, _) in zip(sources, srcs):
                s["mask_dw"] = _u8(_dw_mask_2d(target, name, density), keep)
        # Go writes every element of the outputs (zeros beyond the merged rank), straight into the new adapter's
        # tensors where they already have the dtype, device and shape that PEFT's result gets: no buffer, no copy
        a0, b0 = srcs[0][3], srcs[0][4]
        if family1:  # PEFT: combined on the first source's device, cast to its A's dtype
            shape_a, shape_b = a0.shape, b0.shape
            direct = a0.dtype == torch.float32 and a0.device.type == b0.device.type == "cpu"
        elif combination_type == "cat":  # PEFT: written into the new adapter's own tensors
            shape_a, shape_b = t_a.shape, t_b.shape
            direct = True
        else:  # PEFT: the float32 SVD factors, on the device of the first source's update
            shape_a, shape_b = t_a.shape, t_b.shape
            direct = b0.device.type == "cpu"
        direct = direct and _writable(t_a, shape_a) and _writable(t_b, shape_b)
        if direct:
            out_a, out_b = t_a.data, t_b.data
        else:
            out_a = torch.empty(shape_a, dtype=torch.float32)
            out_b = torch.empty(shape_b, dtype=torch.float32)
            targets.append((t_a, t_b, a0, b0, out_a, out_b))
        keep += [out_a, out_b]
        modules.append(
            {
                "name": key,
                "sources": sources,
                "out_a": out_a.data_ptr(),
                "out_b": out_b.data_ptr(),
                "out_rank": out_a.shape[0],
            }
        )
    if not modules:
        return
    # every key the engine takes, None (its default) unless PEFT's call sets it; new_rank is PEFT's resolved
    # svd_rank, and the engine refuses a key it does not know
    request = dict.fromkeys(_native.request_keys()["merge_tensors"])
    request.update(
        combination_type=combination_type,
        rank=new_rank,
        seed=seed,
        modules=modules,
        **_peft_args(combination_type, svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method),
    )
    result = _native.run_job(_native.merge_tensors_start(request), progress)
    for message in result.get("warnings") or []:
        warnings.warn(message, stacklevel=3)
    for t_a, t_b, a0, b0, out_a, out_b in targets:  # the results that could not be written in place
        if family1:
            t_a.data = out_a.to(device=a0.device, dtype=a0.dtype)
            t_b.data = out_b.to(device=b0.device, dtype=a0.dtype)
        elif combination_type == "cat":
            t_a.data.copy_(out_a)
            t_b.data.copy_(out_b)
        else:
            t_a.data = out_a.to(b0.device)
            t_b.data = out_b.to(b0.device)
    del keep


@functools.wraps(_PEFT_ADD_WEIGHTED_ADAPTER)
def _patched_add_weighted_adapter(
    self,
    adapters,
    weights,
    adapter_name,
    combination_type="svd",
    svd_rank=None,
    svd_clamp=None,
    svd_full_matrices=True,
    svd_driver=None,
    density=None,
    majority_sign_method="total",
):
    return add_weighted_adapter(
        self,
        adapters,
        weights,
        adapter_name,
        combination_type,
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        svd_driver,
        density,
        majority_sign_method,
    )


class PeftPatch:
    """Returned by `patch_peft()`; as a context manager, it undoes the patch on exit."""

    def __enter__(self) -> PeftPatch:
        return self

    def __exit__(self, *exc) -> None:
        unpatch_peft()


def patch_peft() -> PeftPatch:
    """Makes every `LoraModel.add_weighted_adapter` (also reached from `PeftModel`) run on gomerge.

    Use it as one line (`gomerge.patch_peft()`) or as a context manager (`with gomerge.patch_peft(): ...`).
    `unpatch_peft()` restores PEFT's method.
    """
    with _patch_lock:
        LoraModel.add_weighted_adapter = _patched_add_weighted_adapter
    return PeftPatch()


def unpatch_peft() -> None:
    """Restores PEFT's own `LoraModel.add_weighted_adapter`."""
    with _patch_lock:
        LoraModel.add_weighted_adapter = _PEFT_ADD_WEIGHTED_ADAPTER


def is_patched() -> bool:
    """Whether `LoraModel.add_weighted_adapter` currently runs on gomerge."""
    return LoraModel.add_weighted_adapter is _patched_add_weighted_adapter
