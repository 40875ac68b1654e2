"""``extract``: a LoRA adapter from a fine-tuned model and its base, computed by the Go engine."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from . import _native, sources
from ._result import EngineResult

PathLike = Union[str, "os.PathLike[str]"]

# Files of a Hugging Face model folder that extraction reads.
MODEL_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "*.safetensors"]

# Below this many modules a progress bar is more noise than help.
_PROGRESS_MIN_MODULES = 64


@dataclass(repr=False)
class ExtractResult(EngineResult):
    """What an extraction produced.

    Attributes:
        output_dir (`str`): the PEFT adapter directory that was written.
        rank (`int`): `r` of the adapter: the largest module rank (the others are in `rank_pattern`).
        modules (`int`): number of LoRA modules written.
        dtype (`str`): torch name of the dtype of the LoRA factors.
        seconds (`float`): wall time, reading and writing included.
        seed (`int`): the seed of the randomized SVD; the same seed gives the same bytes.
        warnings (`list[str]`): changed modules that the adapter does not carry (also issued as Python warnings).
        module_ranks (`dict[str, int]`): each LoRA module's rank.
        module_errors (`dict[str, float]`): each LoRA module's relative Frobenius error `||dW - B A|| / ||dW||`.
        unchanged (`list[str]`): linear modules whose weights are equal in both models (dW = 0), skipped.
        modules_to_save (`list[str]`): modules saved whole (PEFT's `modules_to_save`).
    """

    output_dir: str
    rank: int
    modules: int
    dtype: str
    seconds: float
    seed: int
    warnings: list[str] = field(default_factory=list)
    module_ranks: dict[str, int] = field(default_factory=dict)
    module_errors: dict[str, float] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def _model_folder(source: PathLike, what: str, revision: str | None) -> str:
    """A local model folder for `source`: a directory as it is, or a Hub id's snapshot (its config and weights)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a model folder path or a Hub id, got {type(source).__name__}")
    return sources.local_or_hub(os.fspath(source), f"{what} model", revision, allow_patterns=MODEL_FILES)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: {value} must be a positive integer")
    return int(value)


def extract(
    base: PathLike,
    finetuned: PathLike,
    output_dir: PathLike,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    *,
    modules_to_save: bool | Sequence[str] = False,
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    model_card: bool = True,
    workers: int | None = None,
    revision: str | None = None,
    progress: bool | None = None,
) -> ExtractResult:
    """Extracts a LoRA adapter from a fine-tuned model and its base.

    For every linear module (2-D weights of the attention and MLP projections; not embeddings, norms or `lm_head`),
    the update `dW = W_ft - W_base` is formed in float32 and factorised as `B A` by a seeded randomized SVD (a range
    finder with power iterations; its error is held within 1% of the optimal rank-k error by the tests), with
    `B = U S` and `A = V^T`. Modules are read one at a time per worker and factorised on all cores; neither model is
    loaded whole. The adapter has `lora_alpha = r` (PEFT's scaling is 1), per-module ranks in `rank_pattern` /
    `alpha_pattern`, and `target_modules` listing the module paths; `PeftModel.from_pretrained(base_model,
    output_dir)` loads it. It is written atomically (complete or absent) with a `README.md` model card that gives
    each module's rank and relative error.

    Args:
        base (`str | os.PathLike`): the base model: a Hugging Face model folder (`config.json` and
            `model.safetensors` or shards listed in `model.safetensors.index.json`) or a Hub id.
        finetuned (`str | os.PathLike`): the fine-tuned model, of the same architecture and shapes.
        output_dir (`str | os.PathLike`): where to write the adapter.
        rank (`int`, *optional*): the rank of every module (capped by the module's shorter side).
        energy (`float`, *optional*): instead of `rank`: each module gets the smallest rank that keeps this fraction
            of `||dW||^2`, in (0, 1].
        max_rank (`int`, *optional*): cap of every module's rank.
        modules_to_save (`bool | list[str]`, defaults to `False`): `True` saves every changed module that is not
            factorised (norms, embeddings, `lm_head`) whole, as PEFT's `modules_to_save`; a list saves the modules it
            names (a module path or its last part: `"lm_head"`, `"embed_tokens"`, `"norm"`), changed or not. Changed
            modules that are not saved are listed in `warnings`: the adapter does not reproduce them.
        seed (`int`, defaults to 0): seed of the randomized SVD; the same seed gives the same bytes on any number of
            workers.
        dtype (`str`, *optional*): dtype of the LoRA factors: `"float32"` (default), `"bfloat16"` or `"float16"`.
            Modules saved whole keep the fine-tune's dtype.
        overwrite (`bool`, defaults to `False`): replace an existing adapter directory at `output_dir`.
        model_card (`bool`, defaults to `True`): write the `README.md` model card.
        workers (`int`, *optional*): modules factorised at once; defaults to the number of cores.
        revision (`str`, *optional*): Hub revision for Hub ids.
        progress (`bool`, *optional*): show a progress bar (tqdm); by default for extractions of many modules.

    Returns:
        [`ExtractResult`]: the output directory, ranks, per-module errors, unchanged and saved modules.

    Raises:
        `ValueError`: neither or both of `rank` and `energy`, values out of range, tensors whose shapes differ
            between the models, tensors missing in one of them, tensors that are not floats, model folders whose
            index names files outside them (the message names the tensor and the file).
        `FileNotFoundError`: a model folder or one of its files is missing.
        `FileExistsError`: `output_dir` exists and `overwrite` is not set.
        `KeyboardInterrupt`: interrupted; nothing was written.

    Example:

    ```python
    >>> import gomerge
    >>> res = gomerge.extract("TinyLlama-base", "TinyLlama-chat", "extracted", rank=64)
    >>> max(res.module_errors.values())
    ```
    """
    if (rank is None) == (energy is None):
        raise ValueError("extract: give exactly one of rank= and energy=")
    if rank is not None:
        spec: int | str = _positive_int(rank, "rank")
    else:
        if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
            raise TypeError(f"energy: expected a number, got {type(energy).__name__}")
        if not 0 < float(energy) <= 1:
            raise ValueError(f"energy: {energy} must be in (0, 1]")
        spec = f"energy:{float(energy)!r}"
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    save_changed, save_modules = False, []
    if isinstance(modules_to_save, bool):
        save_changed = modules_to_save
    elif isinstance(modules_to_save, str) or not isinstance(modules_to_save, Sequence):
        raise TypeError(f"modules_to_save: expected a bool or a list of module names, got {modules_to_save!r}")
    else:
        for i, name in enumerate(modules_to_save):
            if not isinstance(name, str):
                raise TypeError(f"modules_to_save[{i}]: expected a module name, got {type(name).__name__}")
        save_modules = list(modules_to_save)
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir: expected a path, got {type(output_dir).__name__}")
    request = {
        "base": _model_folder(base, "base", revision),
        "finetuned": _model_folder(finetuned, "finetuned", revision),
        "output_dir": os.fspath(output_dir),
        "rank": spec,
        "max_rank": None if max_rank is None else _positive_int(max_rank, "max_rank"),
        "save_modules": save_modules,
        "save_changed": save_changed,
        "seed": int(seed),
        "dtype": dtype or "",
        "overwrite": bool(overwrite),
        "workers": 0 if workers is None else _positive_int(workers, "workers"),
        "model_card": bool(model_card),
        "base_name": os.fspath(base),
        "finetuned_name": os.fspath(finetuned),
    }
    job = _native.extract_start(request)
    result = ExtractResult._from_engine(_native.run_job(job, progress, _PROGRESS_MIN_MODULES))
    for message in result.warnings:
        warnings.warn(message, stacklevel=2)
    return result
