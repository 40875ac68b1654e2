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
from peft.tuners.lora.layer import ParamWrapper
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


class _TorchGenerator:
    """torch's default CPU generator (at::mt19937) as the state that `torch.get_rng_state()` returns: the legacy
    struct of CPUGeneratorImplState, 5056 bytes: the initial seed (uint64), `left` (int32), `seeded` (int32), `next`
    (uint64), the 624 state words (each in a uint64), then the normal samples' cache. Go draws from a copy of the
    words (`words`, uint32) and `set` writes the advanced words and position back. `read()` is None for a state of
    another layout (another torch), whose draws then stay with torch."""

    SIZE, LEFT, NEXT, WORDS, N = 5056, 8, 16, 24, 624

    def __init__(self, state: torch.Tensor, pos: int) -> None:
        self.state, self.pos = state, pos
        self.words = self._slots().to(torch.int32)  # the words' bits (Go reads them as uint32)

    def _slots(self) -> torch.Tensor:
        return self.state[self.WORDS : self.WORDS + 8 * self.N].view(torch.int64)

    @classmethod
    def read(cls) -> _TorchGenerator | None:
        state = torch.get_rng_state()
        if state.dtype != torch.uint8 or state.numel() != cls.SIZE:
            return None
        left = int(state[cls.LEFT : cls.LEFT + 4].view(torch.int32)[0])
        nxt = int(state[cls.NEXT : cls.NEXT + 8].view(torch.int64)[0])
        slots = state[cls.WORDS : cls.WORDS + 8 * cls.N].view(torch.int64)
        # at::mt19937's invariant: next + left == 625 (left == 1, next == 0 right after seeding)
        if not (1 <= left <= cls.N and (nxt + left == cls.N + 1 or (left == 1 and nxt == 0))):
            return None
        if bool(((slots < 0) | (slots > 0xFFFFFFFF)).any()):
            return None
        return cls(state, cls.N + 1 - left)

    def set(self, pos: int) -> None:
        """Sets torch's generator to the words as Go left them, at position `pos`."""
        self._slots().copy_(self.words.to(torch.int64) & 0xFFFFFFFF)
        self.state[self.LEFT : self.LEFT + 4].view(torch.int32)[0] = self.N + 1 - pos
        self.state[self.NEXT : self.NEXT + 8].view(torch.int64)[0] = pos
        torch.set_rng_state(self.state)


# probability tensors whose torch.bernoulli draws one 24-bit word per element (float64 draws 53 bits)
_BERNOULLI_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# held by a drop-in call while it draws from torch's generator (the injection; DARE's masks, from reading the
# generator until it is set after Go's draws): calls in several threads take turns, and each draw advances the
# generator, as PEFT's draws do
_TORCH_RNG_LOCK = threading.Lock()


class _DareMasks:
    """PEFT's DARE keep-masks of the factors, drawn as PEFT draws them (`torch.bernoulli(torch.full_like(x,
    density))`, in the same order from torch's global generator), into uint8 views of one buffer.

    Where every factor is a contiguous CPU tensor of a float32, bfloat16 or float16 dtype, Go draws them
    (`torch_masks`): torch.bernoulli takes one generator word per element, in memory order, so the masks are one
    run of words from torch's generator, which Go reproduces bit for bit at a fraction of torch's per-element cost;
    torch's generator is then set where PEFT's draws leave it. Otherwise torch draws them here, factor by factor:
    the in-place `bernoulli_` with a probability tensor draws the same numbers in the same order for any output
    dtype, and the probability tensors (of x's shape and dtype: a bf16 0.2 is not a float32 0.2) are made once per
    shape; tensors off the CPU or not contiguous take PEFT's own expression."""

    def __init__(self, density: float, factors: list[torch.Tensor], keep: list) -> None:
        self.density = density
        self.buffer = torch.empty(sum(x.numel() for x in factors), dtype=torch.uint8)
        keep.append(self.buffer)
        self.offset = 0
        self.probs: dict[tuple, torch.Tensor] = {}
        self.generator = None
        if all(x.device.type == "cpu" and x.is_contiguous() and x.dtype in _BERNOULLI_DTYPES for x in factors):
            self.generator = _TorchGenerator.read()
        if self.generator is not None:
            keep.append(self.generator.words)
        self.runs: list[dict[str, Any]] = []
        self.p_of: dict[torch.dtype, float] = {}

    def draw(self, x: torch.Tensor, keep: list) -> int:
        """The address of x's mask (drawn by Go during the merge where `request()` is not None)."""
        x = x.data
        if self.generator is not None:
            p = self.p_of.get(x.dtype)
            if p is None:
                p = self.p_of[x.dtype] = torch.tensor(self.density, dtype=x.dtype).item()
            if self.runs and self.runs[-1]["p"] == p:
                self.runs[-1]["n"] += x.numel()
            else:
                self.runs.append({"n": x.numel(), "p": p})
            address = self.buffer.data_ptr() + self.offset
            self.offset += x.numel()
            return address
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

    def request(self) -> dict[str, Any] | None:
        """The engine's `torch_masks`: the draws Go makes before the merge, or None where torch drew them."""
        if self.generator is None:
            return None
        g = self.generator
        return {"state": g.words.data_ptr(), "pos": g.pos, "out": self.buffer.data_ptr(), "runs": self.runs}

    def done(self, pos: int | None) -> None:
        """Sets torch's generator after Go's draws (`pos`: the engine's `torch_pos`)."""
        if self.generator is not None and pos is not None:
            self.generator.set(pos)


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

    Called directly, it also merges adapters on mixture-of-experts parameters (`target_parameters`, PEFT's
    `ParamWrapper`), which PEFT's own method refuses: each expert's update is merged as a module of its own and the
    new adapter is injected as PEFT injects a loaded `target_parameters` adapter (the adapters must target the same
    parameters, as PEFT requires of adapters on one model). Through `patch_peft()` the call keeps PEFT's contract and
    raises PEFT's `ValueError` for them.

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
    _add_weighted_adapter(
        model,
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
        seed=seed,
        progress=progress,
        parameters=True,
    )


def _check_args(self: LoraModel, adapters: list[str], combination_type: str, svd_rank: int | None, parameters: bool):
    """PEFT's `_check_add_weighted_adapter`; with `parameters`, adapters on nn.Parameters pass it when they all
    target the same parameters (PEFT's rule for adapters on one model)."""
    configs = {a: self.peft_config[a] for a in adapters if a in self.peft_config}
    targeted = {a: c.target_parameters for a, c in configs.items() if getattr(c, "target_parameters", None)}
    if not parameters or not targeted:
        return self._check_add_weighted_adapter(adapters=adapters, combination_type=combination_type, svd_rank=svd_rank)
    sets = {a: set(t) for a, t in targeted.items()}
    first = next(iter(sets))
    for a, t in sets.items():
        if t != sets[first]:
            raise ValueError(
                f"adapters {first!r} and {a!r} target different parameters ({sorted(sets[first])} and {sorted(t)}); "
                "adapters merged together must target the same ones, as PEFT requires of adapters on one model"
            )
    try:
        for a in targeted:
            self.peft_config[a] = replace(configs[a], target_parameters=None)
        return self._check_add_weighted_adapter(adapters=adapters, combination_type=combination_type, svd_rank=svd_rank)
    finally:
        for a in targeted:
            self.peft_config[a] = configs[a]


def _add_weighted_adapter(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: CombinationType,
    svd_rank: int | None,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    svd_driver: str | None,
    density: float | None,
    majority_sign_method: Literal["total", "frequency"],
    *,
    seed: int | None,
    progress: bool | None,
    parameters: bool,
) -> None:
    """add_weighted_adapter; `parameters` merges adapters on nn.Parameters (the direct call) where PEFT refuses
    them (the patched method)."""
    self = _lora_model(model)
    if adapter_name in list(self.peft_config.keys()):
        return
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"weights: got {len(weights)} weights for {len(adapters)} adapters")
    requested_type = combination_type
    combination_type, new_rank, new_target_modules = _check_args(self, adapters, combination_type, svd_rank, parameters)
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

    method = _method(combination_type)
    # DARE's default masks come from torch's generator after the injection (which draws the new factors' initial
    # values from it), so that merge starts after it; every other merge runs in Go while PEFT injects the adapter
    # in Python (on another core), into buffers that become the adapter's tensors.
    early = not (method["pruning"] == "dare" and seed is None and density < 1)
    start = functools.partial(
        _Merge,
        self,
        adapters,
        weights,
        method=method,
        new_rank=new_rank,
        svd_clamp=svd_clamp,
        density=density,
        majority_sign_method=majority_sign_method,
        seed=seed,
        progress=progress,
    )
    merge = start(None) if early else None
    # The injection draws the new factors' initial values from torch's generator, and DARE's default masks follow
    # them: the lock is held from the one to the other (PEFT's call draws them in a row, with no other thread's
    # draws between); an early merge lets it go after the injection.
    _TORCH_RNG_LOCK.acquire()
    locked = True
    try:
        try:
            # Create the adapter exactly as PEFT does; its target_parameters are the ones the adapters share (see
            # _check_args).
            params = next((c.target_parameters for a in adapters if (c := self.peft_config[a]).target_parameters), None)
            self.peft_config[adapter_name] = replace(
                self.peft_config[adapters[0]],
                r=new_rank,
                lora_alpha=new_rank,
                target_modules=new_target_modules,
                alpha_pattern={},
                rank_pattern={},
                **({"target_parameters": params} if params else {}),
            )
            self.inject_adapter(self.model, adapter_name)
            _freeze_adapter(self.model, adapter_name)
        except BaseException:
            if merge is not None:
                merge.abandon()
            raise
        try:
            if merge is None:
                merge = start(adapter_name)  # DARE's masks: drawn during the merge, with the lock still held
            else:
                _TORCH_RNG_LOCK.release()
                locked = False
            merge.finish(adapter_name)
        except BaseException:
            if merge is not None:
                merge.abandon()
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise
    finally:
        if locked:
            _TORCH_RNG_LOCK.release()


def _layers(self: LoraModel, adapters: list[str], weights: list[float], adapter_name: str | None) -> list:
    """The modules to merge in PEFT's order (it walks named_modules and looks each key up again: the same
    modules): those that hold the new adapter `adapter_name` (once it is injected), or, with None, every module
    that holds one of the adapters (before the injection). Each is (key, layer, its new factors or None, its
    sources (index, adapter, weight, A, B), its experts)."""
    layers = []
    for key, target in self.model.named_modules():
        if self.prefix in key or not isinstance(target, LoraLayer):
            continue
        tgt = None if adapter_name is None else _factors(target, adapter_name)
        if adapter_name is not None and tgt is None:
            continue
        srcs = [
            (i, name, w) + f
            for i, (name, w) in enumerate(zip(adapters, weights))
            if (f := _factors(target, name)) is not None
        ]
        if not srcs:
            if adapter_name is None:
                continue
            raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
        experts = getattr(target, "num_experts", 1) if isinstance(target, ParamWrapper) else 1
        layers.append((key, target, tgt, srcs, experts))
    return layers


class _Merge:
    """One merge in Go: started at construction, from the modules that hold the new adapter (`adapter_name`,
    already injected: Go writes into its tensors where it can) or, with None, from those that hold the adapters
    (before the injection: Go writes into buffers of the new factors' shapes); `finish` waits for it and gives the
    new adapter its factors."""

    def __init__(
        self,
        lora_model: LoraModel,
        adapters,
        weights,
        adapter_name: str | None,
        method: dict[str, Any],
        new_rank: int,
        svd_clamp,
        density,
        majority_sign_method,
        seed,
        progress,
    ) -> None:
        self.lora_model, self.progress, self.job = lora_model, progress, None
        self.early = adapter_name is None
        combination_type = method["name"]
        self.combination_type = combination_type
        family1 = self.family1 = method["family"] == "factors"
        dare_torch = method["pruning"] == "dare" and seed is None and density < 1
        self.keep: list = []  # every buffer whose address goes to Go stays referenced here until the job ends
        layers = _layers(lora_model, adapters, weights, adapter_name)
        masks = None
        if dare_torch and family1:
            masks = _DareMasks(
                density, [x for _, _, _, srcs, _ in layers for *_, a, b in srcs for x in (a, b)], self.keep
            )
        self.masks = masks
        try:
            self._start(layers, new_rank, svd_clamp, density, majority_sign_method, seed, dare_torch)
        except BaseException:
            self.abandon()
            raise

    def _start(self, layers, new_rank, svd_clamp, density, majority_sign_method, seed, dare_torch) -> None:
        """Builds the engine's request and starts the job."""
        family1, combination_type, masks = self.family1, self.combination_type, self.masks
        request_modules: list = []
        units = _Units(request_modules, self.keep, family1, combination_type, dare_torch, density, masks)
        self.targets = []
        for key, target, tgt, srcs, experts in layers:
            a0, b0 = srcs[0][3], srcs[0][4]
            # the new factors' shapes, per unit (each expert of a ParamWrapper is a unit of its own)
            r = new_rank if tgt is None else tgt[0].shape[0] // experts
            shapes = ((r, *a0.shape[1:]), (b0.shape[0], r, *b0.shape[2:]))
            if experts == 1:
                out = units.add(key, target, srcs, shapes, tgt, experts)
                outs = None if out is None else [out]
            else:  # named as the engine names an expert read from disk
                shapes = ((r, a0.shape[1]), (b0.shape[0], r))
                outs = [
                    units.add(
                        f"{key}[{e}]",
                        target,
                        [(i, n, w) + _expert(a, b, experts, e) for i, n, w, a, b in srcs],
                        shapes,
                        None,
                        experts,
                    )
                    for e in range(experts)
                ]
            if outs is not None:
                self.targets.append((target, tgt, srcs, outs, experts))
        if not request_modules:
            return
        # every key the engine takes, None (its default) unless PEFT's call sets it; new_rank is PEFT's resolved
        # svd_rank, and the engine refuses a key it does not know
        request = dict.fromkeys(_native.request_keys()["merge_tensors"])
        request.update(
            combination_type=combination_type,
            rank=new_rank,
            seed=seed,
            modules=request_modules,
            torch_masks=None if masks is None else masks.request(),
            **_peft_args(
                combination_type, svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method
            ),
        )
        self.job = _native.merge_tensors_start(request)

    def abandon(self) -> None:
        """Stops the job, if it still runs, and waits for it: Go must not write into buffers given up."""
        job, self.job = self.job, None
        if job is not None:
            _native.job_cancel(job)
            try:
                while _native.job_wait(job, 100)["state"] != "done":
                    pass
            except BaseException:  # its own outcome (usually "cancelled") does not matter
                pass

    def finish(self, adapter_name: str) -> None:
        """Waits for the job and gives the new adapter `adapter_name` its factors: PEFT's dtypes and devices."""
        if self.job is not None:
            result = _native.run_job(self.job, self.progress)
            self.job = None
            if self.masks is not None:
                self.masks.done(result.get("torch_pos"))
            for message in result.get("warnings") or []:
                warnings.warn(message, stacklevel=4)
        merged = set()
        for target, tgt, srcs, outs, experts in self.targets:  # the results that were not written in place
            if tgt is None:  # merged before the injection
                tgt = _factors(target, adapter_name)
                if tgt is None:  # a module the new adapter's config leaves out
                    continue
                merged.add(id(target))
            t_a, t_b = tgt
            out_a, out_b = _stack(outs, experts)
            # (family 1 gives the sources' shapes, as PEFT does, whatever the new adapter's rank)
            if not self.family1 and (out_a.shape != t_a.shape or out_b.shape != t_b.shape):
                raise RuntimeError(
                    f"gomerge: merged factors of shapes {tuple(out_a.shape)}, {tuple(out_b.shape)} for the new "
                    f"adapter's {tuple(t_a.shape)}, {tuple(t_b.shape)} (please report this)"
                )
            a0, b0 = srcs[0][3], srcs[0][4]
            if self.family1:  # PEFT: combined on the first source's device, cast to its A's dtype
                t_a.data = out_a.to(device=a0.device, dtype=a0.dtype)
                t_b.data = out_b.to(device=b0.device, dtype=a0.dtype)
            elif self.combination_type == "cat":  # PEFT: written into the new adapter's own tensors (a buffer
                # that is already what they would hold becomes their storage: no copy)
                for t, out in ((t_a, out_a), (t_b, out_b)):
                    if _writable(t, out.shape):
                        t.data = out
                    else:
                        t.data.copy_(out)
            else:  # PEFT: the float32 SVD factors, on the device of the first source's update
                t_a.data = out_a.to(b0.device)
                t_b.data = out_b.to(b0.device)
        if self.early:  # PEFT's check, which _layers makes after the injection: every module given the new
            # adapter has a source
            prefix = self.lora_model.prefix
            for key, layer in self.lora_model.model.named_modules():
                if prefix in key or not isinstance(layer, LoraLayer) or id(layer) in merged:
                    continue
                if _factors(layer, adapter_name) is not None:
                    raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
        self.keep.clear()


def _expert(a: torch.Tensor, b: torch.Tensor, experts: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's factors of a ParamWrapper, as PEFT's get_delta_weight reshapes them: A (E*r, in) -> (E, r, in),
    B (out, r*E) -> (out, r, E)."""
    return a.reshape(experts, -1, a.shape[-1])[e], b.reshape(b.shape[0], -1, experts)[:, :, e]


def _stack(outs: list[tuple[torch.Tensor, torch.Tensor]], experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' merged factors in a ParamWrapper's layout (the inverse of _expert)."""
    if experts == 1:
        return outs[0]
    a = torch.cat([o[0] for o in outs], dim=0)
    b = torch.stack([o[1] for o in outs], dim=-1)
    return a, b.reshape(b.shape[0], -1)


class _Units:
    """The engine's request, one unit (a module, or one expert of a ParamWrapper) at a time."""

    def __init__(
        self,
        modules: list,
        keep: list,
        family1: bool,
        combination_type: str,
        dare_torch: bool,
        density: float | None,
        masks: _DareMasks | None,
    ) -> None:
        self.modules, self.keep, self.family1, self.combination_type = modules, keep, family1, combination_type
        self.dare_torch, self.density, self.masks = dare_torch, density, masks

    def add(self, name: str, target: LoraLayer, srcs: list, shapes: tuple, dest: tuple | None, experts: int):
        """Adds one unit; returns its output buffers, or None where Go writes straight into `dest`, the new
        adapter's tensors (when they already have the dtype, device and shape that PEFT's result gets)."""
        keep, family1 = self.keep, self.family1
        sources = []
        for i, adapter, w, a, b in srcs:
            fa, fb = _f32(a, keep), _f32(b, keep)
            sources.append(
                {
                    "a": fa.data_ptr(),
                    "b": fb.data_ptr(),
                    "a_shape": list(fa.shape),
                    "b_shape": list(fb.shape),
                    "scaling": float(target.scaling[adapter]),
                    "weight": w,
                    "index": i,
                    "round_dw": "" if family1 or b.dtype == torch.float32 else str(b.dtype).removeprefix("torch."),
                }
            )
        if self.masks is not None:  # PEFT: every A mask in adapter order, then every B mask
            for s, (_, _, _, a, _) in zip(sources, srcs):
                s["mask_a"] = self.masks.draw(a, keep)
            for s, (_, _, _, _, b) in zip(sources, srcs):
                s["mask_b"] = self.masks.draw(b, keep)
        elif self.dare_torch:  # PEFT: one mask per dense update, in adapter order
            for s, (_, adapter, _, a, b) in zip(sources, srcs):
                if experts == 1:
                    mask = _dw_mask_2d(target, adapter, self.density)
                else:  # an expert's update, as B_e @ A_e
                    mask = torch.bernoulli(
                        torch.full((b.shape[0], a.shape[1]), self.density, dtype=b.dtype, device=b.device)
                    )
                s["mask_dw"] = _u8(mask, keep)
        a0, b0 = srcs[0][3], srcs[0][4]
        if family1:  # PEFT: combined on the first source's device, cast to its A's dtype
            shape_a, shape_b = a0.shape, b0.shape
            direct = a0.dtype == torch.float32 and a0.device.type == b0.device.type == "cpu"
        else:  # the new adapter's shapes; cat writes into its tensors, the SVD types on the first update's device
            shape_a, shape_b = shapes
            direct = self.combination_type == "cat" or b0.device.type == "cpu"
        direct = dest is not None and direct and _writable(dest[0], shape_a) and _writable(dest[1], shape_b)
        if direct:  # Go writes every element (zeros beyond the merged rank): no buffer, no copy
            out_a, out_b = dest[0].data, dest[1].data
        else:
            out_a = torch.empty(shape_a, dtype=torch.float32)
            out_b = torch.empty(shape_b, dtype=torch.float32)
        keep += [out_a, out_b]
        self.modules.append(
            {
                "name": name,
                "sources": sources,
                "out_a": out_a.data_ptr(),
                "out_b": out_b.data_ptr(),
                "out_rank": out_a.shape[0],
            }
        )
        return None if direct else (out_a, out_b)


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
    return _add_weighted_adapter(
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
        seed=None,
        progress=None,
        parameters=False,
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
