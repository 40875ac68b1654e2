"""``gomerge.fuse``: LoRA adapters folded into the weights of their base model, streaming, by the Go engine."""

from __future__ import annotations

import numbers
import os
import re
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from . import _native, sources
from ._result import EngineResult
from .merge import PathLike, Weight, _paths, _weights, merge_params, params_doc

# Below this many tensors a progress bar is more noise than help.
_PROGRESS_MIN_TENSORS = 64

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_UNITS["tib"] = 2**40


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size as transformers writes it (``"5GB"`` = 5 * 10**9, ``"2GiB"`` = 2 * 2**30).

    Raises:
        `ValueError`: not a positive size.
        `TypeError`: neither an int nor a string.
    """
    if isinstance(size, bool) or not isinstance(size, (numbers.Integral, str)):
        raise TypeError(f"max_shard_size: expected an int or a string such as '5GB', got {type(size).__name__}")
    if isinstance(size, str):
        m = _SIZE.match(size)
        if m is None:
            raise ValueError(
                f"max_shard_size: {size!r} is not a size (expected bytes, or a number with KB, MB, GB, GiB)"
            )
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    else:
        n = int(size)
    if n <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {size!r}")
    return n


@dataclass(repr=False)
class FuseResult(EngineResult):
    """What a fuse produced (or, with ``dry_run=True``, would produce).

    Attributes:
        output_dir (`str`): the model folder that was written ("" for a dry run without one).
        base (`str`): the base model, as given.
        adapters (`list[str]`): the adapters, as given.
        combination_type (`str`): how several adapters were merged before fusing ("" for one adapter or a stack).
        stack (`bool`): whether the adapters were applied one after another.
        tensors (`int`): number of tensors in the output.
        changed (`list[dict]`): each tensor that differs from the base: ``tensor``, ``shape``, ``dtype``, ``ops``
            (``lora``, ``dora``, ``bias``, ``replace`` (modules_to_save), ``copy of ...``) and ``adapters``.
        shards (`list[str]`): the output's safetensors files.
        total_size (`int`): bytes of all tensors (the index's ``metadata.total_size``).
        untied (`bool`): the adapters changed a tied matrix; both were written and ``tie_word_embeddings`` set false.
        dry_run (`bool`): nothing was written.
        seconds (`float`): wall time.
        warnings (`list[str]`): what the engine wants you to know (also issued as Python warnings).
        quantized (`dict`, *optional*): for a quantized base, ``method``, ``output`` (``"keep_format"`` or the
            dtype), ``merge_base``, ``threshold`` and ``tensors``: per changed tensor ``tensor``, ``survival``
            (``<Q - W, dW> / ||dW||^2``), ``residual`` (``||Q - (W + dW)|| / ||dW||``) and, with a reference base,
            ``reference_gap`` (``||deq(Wq) - W16|| / ||dW||``).
    """

    output_dir: str
    base: str
    adapters: list[str]
    combination_type: str
    stack: bool
    tensors: int
    changed: list[dict[str, Any]]
    shards: list[str]
    total_size: int
    untied: bool
    dry_run: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    quantized: dict[str, Any] | None = None

    def _html_rows(self) -> tuple[str, list[tuple[str, Any]]]:
        return (
            "gomerge fuse",
            [
                ("output_dir", self.output_dir),
                ("base", self.base),
                ("adapters", ", ".join(self.adapters)),
                ("changed tensors", f"{len(self.changed)} of {self.tensors}"),
                ("shards", len(self.shards)),
                ("seconds", f"{self.seconds:.2f}"),
            ],
        )


def resolve_model(source: str, revision: str | None = None) -> str:
    """A local model folder for ``source``: a directory, or a Hub id ``user/repo[@revision]`` (only safetensors
    weights are fetched; see `sources.local_or_hub`)."""
    return sources.local_or_hub(
        source,
        "base model",
        revision,
        ignore_patterns=["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.gguf", "*.onnx"],
    )


def fuse(
    base: PathLike,
    adapters: Sequence[PathLike],
    weights: Sequence[Weight] | None = None,
    combination_type: str | None = None,
    output_dir: PathLike | None = None,
    dtype: str | None = None,
    stack: bool = False,
    max_shard_size: int | str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    revision: str | None = None,
    keep_format: bool = False,
    survival_threshold: float | None = None,
    reference_base: PathLike | None = None,
    merge_base: str | None = None,
    **merge_options: Any,
) -> FuseResult:
    """Fuses LoRA adapters into the weights of their base model and writes a model folder transformers loads.

    Per adapted layer, ``W' = W + s B A`` as PEFT's ``merge_and_unload()`` computes it: Linear layers, GPT-2's
    Conv1D (``fan_in_fan_out``), embeddings, Conv2d, rsLoRA, ``rank_pattern`` / ``alpha_pattern``, ``lora_bias``,
    DoRA's magnitude, and ``modules_to_save`` tensors (which replace the base's). Each row is summed in float64 (in
    the CPU's vector kernels) and rounded once to each tensor's dtype (round to nearest even). The engine streams: a
    layer with one LoRA is read, fused and written a block of rows at a time, several layers at once, so that the
    reads, the arithmetic and the writes overlap; other changed tensors are whole in memory one per worker, within a
    budget of twice the largest. The output folder appears complete or not at all.

    Args:
        base (`str | os.PathLike`):
            A Hugging Face model folder (``config.json`` and ``model.safetensors`` or shards with
            ``model.safetensors.index.json``), or a Hub id ``user/repo[@revision]``.
        adapters (`list[str | os.PathLike]`):
            PEFT LoRA adapter directories (or Hub ids).
        weights (`list[float | dict]`, *optional*):
            One weight per adapter (default 1 each), which scales its update; per-module dicts as in
            [`add_weighted_adapter`].
        combination_type (`str`, *optional*):
            How several adapters are merged before fusing, with any method of [`add_weighted_adapter`] and its
            options (``**merge_options``); defaults to ``"cat"``, the exact sum of the weighted updates.
        output_dir (`str | os.PathLike`):
            Where to write the fused model (required unless ``dry_run``).
        dtype (`str`, *optional*):
            ``"float32"``, ``"bfloat16"`` or ``"float16"`` for every floating-point tensor; by default each keeps
            the base's dtype.
        stack (`bool`, defaults to `False`):
            Apply several adapters one after another (as loading and merging them in turn would) instead of
            merging them first.
        max_shard_size (`int | str`, *optional*):
            Split the output into shards of at most this size (bytes, or ``"5GB"``, ``"2GiB"``); by default the
            base's shard layout is kept.
        dry_run (`bool`, defaults to `False`):
            Check everything and list what would change (``FuseResult.changed``), writing nothing.
        overwrite (`bool`, defaults to `False`):
            Replace an existing ``output_dir`` (only an empty folder or a model folder is ever replaced).
        progress (`bool`, *optional*):
            Show a progress bar (tqdm, if installed); by default shown for models of many tensors.
        workers (`int`, *optional*):
            Tensors fused at once; defaults to twice the number of cores (each tensor's arithmetic runs on all
            cores; more tensors in flight overlap their reads and writes with it).
        revision (`str`, *optional*):
            Hub revision for a base or adapters given as Hub ids without ``@revision``.
        keep_format (`bool`, defaults to `False`):
            For a quantized base (bitsandbytes NF4 / FP4 / int8, FP8 blockwise or per-tensor / per-channel):
            requantize the changed tensors to the base's own format, bit for bit as its reference quantizer, and
            copy every other tensor byte for byte (``quantization_config`` stays). A quantized base needs either
            this or ``dtype`` (which writes the fused model dequantized).
        survival_threshold (`float`, *optional*):
            For a quantized base: a changed tensor whose written weights keep less than this fraction of its
            update is named in a warning (default 0.5). Every changed tensor's survival and residual are in
            ``FuseResult.quantized``, the model card and a dry run.
        reference_base (`str | os.PathLike`, *optional*):
            The 16-bit original of a quantized base: the report adds ``||deq(Wq) - W16|| / ||dW||`` per tensor.
        merge_base (`str`, *optional*):
            What the update is added to on a quantized base: ``"dequant"`` (the dequantized base, as PEFT's
            bitsandbytes merge; default) or ``"w16"`` (``reference_base``'s weights).
        **merge_options:
            The parameters of the merge method, for several adapters without ``stack`` (the engine's schema; each
            method refuses those it does not take):
            {merge_parameters}

    Returns:
        [`FuseResult`]: the output folder, the changed tensors, shards and time taken.

    Raises:
        `FileNotFoundError`: the base, an adapter or one of their files is missing.
        `FileExistsError`: ``output_dir`` exists and ``overwrite`` is not set.
        `ValueError`: a hostile or inconsistent model folder (shard names leaving the folder, a missing shard, a
            tensor in two shards), an adapter module without a base tensor, shapes that disagree, a targeted tensor
            of a dtype that cannot be written, or invalid arguments; the message names the culprit.
        `KeyboardInterrupt`: the fuse was interrupted; nothing was written.

    Example:

    ```python
    >>> import gomerge
    >>> res = gomerge.fuse("models/llama", ["adapters/sql"], output_dir="llama-sql")
    >>> len(res.changed), res.shards
    ```
    """
    if output_dir is None and not dry_run:
        raise ValueError("output_dir: a directory to write the fused model to is required (or pass dry_run=True)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1):
        raise ValueError(f"workers: expected a positive integer or None, got {workers!r}")
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base: expected a path, got {type(base).__name__}")
    params = merge_params(merge_options, "fuse")
    names = _paths(adapters)
    base_name = os.fspath(base)
    request: dict[str, Any] = {
        "base": resolve_model(base_name, revision),
        "base_name": base_name,
        "source_names": names,
        "weights": _weights(weights) if weights is not None else [],
        "combination_type": combination_type or "",
        "stack": bool(stack),
        "output_dir": os.fspath(output_dir) if output_dir is not None else "",
        "overwrite": bool(overwrite),
        "dtype": dtype or "",
        "max_shard_size": 0 if max_shard_size is None else parse_size(max_shard_size),
        "dry_run": bool(dry_run),
        "workers": int(workers or 0),
        "keep_format": bool(keep_format),
        "reference_base": os.fspath(reference_base) if reference_base is not None else "",
        "merge_base": merge_base or "",
        "survival_threshold": None if survival_threshold is None else float(survival_threshold),
    }
    request.update(params)
    with ExitStack() as temporary:  # temporary copies of .bin adapters live until the fuse is done
        request["adapters"] = [sources.resolve(n, temporary, revision) for n in names]
        job = _native.fuse_start(request)
        result = FuseResult._from_engine(_native.run_job(job, progress, _PROGRESS_MIN_TENSORS, unit="tensor"))
    for message in result.warnings:
        warnings.warn(message, stacklevel=2)
    return result


fuse.__doc__ = (fuse.__doc__ or "").replace(" " * 12 + "{merge_parameters}", params_doc(" " * 12))
