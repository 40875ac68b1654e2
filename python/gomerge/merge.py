"""``add_weighted_adapter`` on PEFT adapter directories, computed by the Go engine."""

from __future__ import annotations

import inspect
import keyword as keyword_module
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from . import _native, sources
from ._result import EngineResult

PathLike = Union[str, "os.PathLike[str]"]
# One adapter's weight: a number, a dict of module-name pattern -> number (or a list of numbers: a gradient over the
# layers), first match wins, or a list of numbers (a gradient for every module).
Weight = Union[float, str, Mapping[str, Union[float, Sequence[float]]], Sequence[float]]

# A merge method's name: PEFT's eleven combination types or one of gomerge's own; the engine's method table
# (`gomerge.methods()`) lists them with their parameters, and the engine validates every argument.
CombinationType = str
COMBINATION_TYPES: tuple[str, ...] = tuple(m["name"] for m in _native.methods())

# Below this many modules a progress bar is more noise than help.
_PROGRESS_MIN_MODULES = 64


@dataclass(repr=False)
class MergeResult(EngineResult):
    """What a merge produced.

    Attributes:
        output_dir (`str`): the PEFT adapter directory that was written.
        adapter_name (`str`): the name given to the merged adapter.
        combination_type (`str`): the combination actually used (PEFT forces `"linear"` for one adapter).
        rank (`int`): `r` of the merged adapter.
        modules (`int`): number of LoRA modules merged.
        dtype (`str`): torch name of the dtype of the written tensors.
        seconds (`float`): wall time of the merge, reading and writing included.
        seed (`int`, *optional*): the seed of the DARE masks (`None` for the other types); pass it back as `seed=`
            to reproduce the merge byte for byte.
        warnings (`list[str]`): what the engine wants you to know (also issued as Python warnings).
        module_ranks (`dict[str, int]`): each module's rank. With mixed ranks (the energy rule) `rank` is the
            largest and the others are written to the config's `rank_pattern` / `alpha_pattern`.
        module_errors (`dict[str, float]`): for the methods that factorise each module's combined update (`svd`,
            the `*_svd` types, `cat`, `task_arithmetic`), the relative Frobenius error `||D - B'A'|| / ||D||` of
            that factorisation (0 when exact; before `svd_clamp`).
    """

    output_dir: str
    adapter_name: str
    combination_type: str
    rank: int
    modules: int
    dtype: str
    seconds: float
    seed: int | None = None
    warnings: list[str] = field(default_factory=list)
    module_ranks: dict[str, int] = field(default_factory=dict)
    module_errors: dict[str, float] = field(default_factory=dict)

    def _html_rows(self) -> tuple[str, list[tuple[str, Any]]]:
        return (
            f"gomerge: {self.adapter_name}",
            [
                ("output_dir", self.output_dir),
                ("combination_type", self.combination_type),
                ("rank", self.rank),
                ("modules", self.modules),
                ("dtype", self.dtype),
                ("seconds", f"{self.seconds:.3f}"),
                ("seed", self.seed),
            ],
        )


def _paths(adapters: Sequence[PathLike]) -> list[str]:
    if isinstance(adapters, (str, bytes, os.PathLike)):
        raise TypeError("adapters: expected a list of adapter directories, got a single path; wrap it in a list")
    try:
        items = list(adapters)
    except TypeError:
        raise TypeError(f"adapters: expected a list of adapter directories, got {type(adapters).__name__}") from None
    out = []
    for i, a in enumerate(items):
        if not isinstance(a, (str, os.PathLike)):
            raise TypeError(f"adapters[{i}]: expected a path, got {type(a).__name__}")
        out.append(os.fspath(a))
    return out


def _weight_json(weight: Any) -> Any:
    """One adapter's weight in the request's JSON form, unchecked: the engine is the one validator of the weight
    grammar. A dict becomes the list of {"pattern", "weight"} entries in its order, which is the first-match order (a
    JSON object's order would be lost in Go); a non-finite number, which JSON cannot carry, the string "nan", "inf"
    or "-inf", which the engine refuses by name."""
    if isinstance(weight, Mapping):
        return [{"pattern": p, "weight": _weight_json(v)} for p, v in weight.items()]
    if isinstance(weight, (list, tuple)):
        return [_weight_json(v) for v in weight]
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool) and not math.isfinite(weight):
        return repr(float(weight))
    return weight


def _weights(weights: Sequence[Weight]) -> Any:
    """The engine's form of the weights (`_weight_json` of each); anything but a list of weights is sent as it is,
    for the engine to name what it expected."""
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
        return weights
    return [_weight_json(w) for w in weights]


def add_weighted_adapter(
    adapters: Sequence[PathLike],
    weights: Sequence[Weight],
    adapter_name: str,
    combination_type: CombinationType = "svd",
    svd_rank: int | str | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    output_dir: PathLike | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    model_card: bool = True,
    allow_nonfinite: bool = False,
    dtype: str | None = None,
    progress: bool | None = None,
    workers: int | None = None,
    **params: Any,
) -> MergeResult:
    """Merges LoRA adapter directories into a new adapter directory, as PEFT's `add_weighted_adapter` does.

    The arguments are those of PEFT's `LoraModel.add_weighted_adapter`, with adapter directories in place of adapter
    names. No base model and no torch are needed: the Go engine reads the adapters' `adapter_config.json` and
    `adapter_model.safetensors`, merges every module in parallel and writes a PEFT adapter directory atomically
    (nothing is left behind if the merge fails or is interrupted).

    Args:
        adapters (`list[str | os.PathLike]`):
            PEFT adapters to merge: directories (with `adapter_model.safetensors`, or an older `adapter_model.bin`,
            read through torch with `weights_only=True`) or Hugging Face Hub ids (`user/repo`, `user/repo@revision`,
            resolved through `huggingface_hub` and its cache; `HF_HUB_OFFLINE=1` is honoured).
        weights (`list[float | dict[str, float | list[float]] | list[float] | str]`):
            One weight per adapter. Weights can be negative, to subtract an adapter's effect. A weight is a number
            (for every module), or a dict of module-name patterns to numbers, for per-module weights: a module takes
            the weight of the first pattern, in the dict's order, that matches it by PEFT's `rank_pattern` rule (the
            pattern, a regular expression, matches the whole module name or its end after a dot: `r"mlp\\..*"`
            matches `model.layers.0.mlp.up_proj`, `"mlp"` alone does not). Every module of the adapter must match
            a pattern (end with `".*"` as a catch-all), or the merge is a `ValueError` naming the module, raised
            before anything is written; a pattern that gives no module its weight is a warning naming it. A
            pattern's value may be a list of numbers: a gradient over the layers, as
            in mergekit, spread evenly from layer 0 to the merge's last layer (a module's layer is the first number
            between dots in its name) and interpolated linearly in between; a list of numbers in place of the dict
            is a gradient for every module. For example `[{r"self_attn\\..*": 1.0, r"mlp\\..*": 0.0},
            {r"self_attn\\..*": 0.0, r"mlp\\..*": 1.0}]` takes attention from the first adapter and the MLP from
            the second, and `[[1.0, 0.0], [0.0, 1.0]]` fades from the first adapter at the first layer to the
            second at the last. The model card lists the patterns. A weight may also be written as the command
            line's `--weights` string (`"2"`, `"0:1"`, `"self_attn\\..*=1,.*=0"`). The engine checks every form:
            a bad weight is a `TypeError` or `ValueError` naming `weights[i]` and the pattern.
        adapter_name (`str`):
            Name of the merged adapter; also the output directory when `output_dir` is not given.
        combination_type (`str`, defaults to `"svd"`):
            A method of `gomerge.methods()`: PEFT's eleven types with PEFT's semantics, or gomerge's own
            (`"task_arithmetic"`: `lambda_ * sum_i w_i s_i B_i A_i` exactly, rank = sum of ranks or `svd_rank`;
            mergekit's `"breadcrumbs"`, `"breadcrumbs_ties"`, `"della"`, `"della_linear"` on the dense updates
            `s_i B_i A_i`, then a randomized SVD to `svd_rank`; in the span of the stacked factors, exactly:
            `"iso_c"` (Iso-C), `"iso_cts"` (Iso-CTS), `"tsv"` (TSV-M), `"core_ties"`, `"core_dare_ties"`,
            `"core_tsv"` and `"core_iso_c"` (Core Space), `"knots_ties"`, `"knots_dare_ties"` and `"knots_linear"`
            (KnOTS), rank = that of the merged update or `svd_rank`).
            PEFT's types: On the factors (all adapters of equal rank): `"linear"` (weighted sum, with
            PEFT's cross terms), `"ties"`, `"dare_linear"`, `"dare_ties"`, `"magnitude_prune"`. Exact: `"cat"`
            (rank = sum of ranks). On the adapters' updates, then an SVD to `svd_rank`: `"svd"` (exact SVD computed
            from the factors), `"ties_svd"`, `"dare_linear_svd"`, `"dare_ties_svd"`, `"magnitude_prune_svd"`
            (randomized SVD of the pruned update). With one adapter PEFT always uses `"linear"`, and so does gomerge
            (with a warning).
        {merge_parameters}
        output_dir (`str | os.PathLike`, *optional*):
            Where to write the merged adapter; defaults to `adapter_name`. `PeftModel.from_pretrained(base, output_dir)`
            loads it.
        overwrite (`bool`, defaults to `False`):
            Replace an existing `output_dir` (only an empty directory or an adapter directory is ever replaced).
        revision (`str`, *optional*):
            Hub revision for Hub ids without an `@revision`.
        subfolder (`str`, *optional*):
            Folder of the adapters inside their directories or Hub repositories.
        allow_nonfinite (`bool`, defaults to `False`):
            Merge adapters holding NaN or Inf values; by default such a value is a `ValueError` naming the tensor.
        model_card (`bool`, defaults to `True`):
            Write a `README.md` model card (sources, weights, method, options, seed, usage) with the Hub's metadata.
        dtype (`str`, *optional*):
            dtype of the written tensors (`"float32"`, `"bfloat16"` or `"float16"`); defaults to that of the first
            adapter.
        progress (`bool`, *optional*):
            Show a progress bar (tqdm, if installed). By default it is shown for merges of many modules.
        workers (`int`, *optional*):
            Number of modules merged at once; defaults to the number of cores.
    Returns:
        [`MergeResult`]: the output directory, rank, number of modules, dtype and time taken.

    Raises:
        `FileNotFoundError`: an adapter directory or one of its files is missing.
        `FileExistsError`: `output_dir` exists and `overwrite` is not set.
        `ValueError`: invalid arguments, or adapters that cannot be merged (the message names the file, module or
            argument at fault).
        `TypeError`: an argument of the wrong type (for example a weight that is neither a number, a dict nor a
            list of numbers).
        `KeyboardInterrupt`: the merge was interrupted; no output was written.

    Example:

    ```python
    >>> import gomerge
    >>> res = gomerge.add_weighted_adapter(
    ...     ["adapters/norobots", "adapters/sql", "adapters/adcopy"], [2.0, 1.0, 1.0], "merge",
    ...     combination_type="svd", output_dir="merged",
    ... )
    >>> res.rank, res.modules
    ```
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError("adapter_name: expected a non-empty string")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1):
        raise ValueError(f"workers: expected a positive integer or None, got {workers!r}")
    given = dict(
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
        density=density,
        majority_sign_method=majority_sign_method,
    )
    request = merge_params({**given, **params}, "add_weighted_adapter")
    names = _paths(adapters)
    with ExitStack() as stack:  # temporary copies of .bin adapters live until the merge is done
        local = [sources.resolve(n, stack, revision, subfolder) for n in names]
        return _run(
            local,
            names,
            weights,
            {"combination_type": combination_type, **request},
            adapter_name=adapter_name,
            output_dir=output_dir if output_dir is not None else adapter_name,
            overwrite=overwrite,
            model_card=model_card,
            allow_nonfinite=allow_nonfinite,
            dtype=dtype,
            workers=workers,
            progress=progress,
        )


def keyword(name: str) -> str:
    """The Python keyword of a merge parameter: its name, with a `_` after a Python keyword (`lambda_`)."""
    return name + "_" if keyword_module.iskeyword(name) else name


def merge_params(given: Mapping[str, Any], caller: str) -> dict[str, Any]:
    """The merge parameters of a request from keyword arguments: by the schema's names (`lambda_` becomes
    `lambda`), those given (not None). A keyword that is no merge parameter is a TypeError, as Python's own; the
    values are the engine's to check.

    Args:
        given (`Mapping[str, Any]`): keyword -> value.
        caller (`str`): the function's name, for the error.
    """
    names = {keyword(p["name"]): p["name"] for p in _native.params()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s): {', '.join(unknown)}")
    return {names[k]: v for k, v in given.items() if v is not None}


def params_doc(indent: str = "        ") -> str:
    """The Args entries of the merge parameters, from the engine's schema."""
    kinds = {"int": "int", "float": "float", "bool": "bool", "str": "str", "rank": "int or str"}
    out = []
    for p in _native.params():
        default = "*optional*" if p["default"] is None else f"defaults to `{p['default']!r}`"
        choices = f" One of {', '.join(repr(c) for c in p['choices'])}." if p["choices"] else ""
        out.append(f"{indent}{keyword(p['name'])} (`{kinds[p['type']]}`, {default}):")
        out.append(f"{indent}    {p['doc'][0].upper()}{p['doc'][1:]}.{choices}")
    return "\n".join(out)


add_weighted_adapter.__doc__ = (add_weighted_adapter.__doc__ or "").replace(
    " " * 8 + "{merge_parameters}", params_doc()
)
# the signature shows every merge parameter of the schema, as keyword-only arguments
_signature = inspect.signature(add_weighted_adapter)
add_weighted_adapter.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    + [
        inspect.Parameter(keyword(p["name"]), inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any)
        for p in _native.params()
        if keyword(p["name"]) not in _signature.parameters
    ]
)


def _run(
    local: list[str],
    names: list[str],
    weights: Sequence[Weight],
    params: Mapping[str, Any],
    *,
    adapter_name: str,
    output_dir: PathLike,
    overwrite: bool | None = False,
    model_card: bool = True,
    allow_nonfinite: bool = False,
    dtype: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> MergeResult:
    """Runs a merge of local adapter directories: `params` are `combination_type` and the merge parameters, by the
    schema's names (the API's and the command line's alike)."""
    request = {
        **{p["name"]: None for p in _native.params()},  # every key of the request: None is not given
        **params,
        "adapters": local,
        "source_names": names,
        "weights": _weights(weights),
        "adapter_name": adapter_name,
        "output_dir": os.fspath(output_dir),
        "overwrite": bool(overwrite),
        "model_card": bool(model_card),
        "allow_nonfinite": bool(allow_nonfinite),
        "dtype": dtype or "",
        "workers": int(workers or 0),
    }
    result = MergeResult._from_engine(_native.run_job(_native.merge_start(request), progress, _PROGRESS_MIN_MODULES))
    for message in result.warnings:
        warnings.warn(message, stacklevel=3)
    return result


def resize(
    adapter: PathLike,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    *,
    output_dir: PathLike,
    overwrite: bool = False,
    dtype: str | None = None,
    progress: bool | None = None,
) -> MergeResult:
    """Re-factorises one adapter to a new rank, exactly.

    Each module's update `s B A` gets its rank-`rank` truncated SVD (the best rank-`rank` approximation), computed
    from the factors without forming `B A`; with `energy`, each module gets the smallest rank that keeps that
    fraction of the squared Frobenius norm of its update, capped by `max_rank`. It is `task_arithmetic` of one
    adapter with weight 1 and `svd_rank=rank` (or `"energy:E"`); the result reports each module's rank and relative
    error, and mixed ranks are written to `rank_pattern` / `alpha_pattern` (PEFT reloads them).

    Args:
        adapter (`str | os.PathLike`): the adapter directory (or Hub id).
        rank (`int`, *optional*): the new rank of every module (modules of lower rank are zero-padded). A rank
            above the adapter's largest module rank would only add zeros: it is lowered to that rank, with a
            warning.
        energy (`float`, *optional*): instead of `rank`: the fraction of each update's energy to keep, in (0, 1].
        max_rank (`int`, *optional*): cap of every module's rank.
        output_dir (`str | os.PathLike`): where to write the resized adapter.
        overwrite (`bool`, defaults to `False`): replace an existing adapter directory at `output_dir`.
        dtype (`str`, *optional*): dtype of the written tensors; defaults to the adapter's.
        progress (`bool`, *optional*): show a progress bar (tqdm).

    Returns:
        [`MergeResult`]: with `module_ranks` and `module_errors`.

    Raises:
        `ValueError`: neither or both of `rank` and `energy`, or values out of range.
    """
    if (rank is None) == (energy is None):
        raise ValueError("resize: give exactly one of rank= and energy=")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real)):
        raise TypeError(f"energy: expected a number, got {type(energy).__name__}")
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        with ExitStack() as stack:
            ranks = _native.inspect_adapter(sources.resolve(os.fspath(adapter), stack))["ranks"]
        largest = max(map(int, ranks), default=0)
        if 0 < largest < rank:
            warnings.warn(
                f"resize: rank {rank} is above the largest rank of {os.fspath(adapter)}, {largest}: a higher rank "
                f"would only add zeros; resizing to rank {largest}",
                stacklevel=2,
            )
            rank = largest
    svd_rank = rank if energy is None else f"energy:{float(energy)!r}"
    try:
        return add_weighted_adapter(
            [adapter],
            [1.0],
            os.path.basename(os.path.normpath(os.fspath(output_dir))) or "resized",
            "task_arithmetic",
            svd_rank=svd_rank,
            max_rank=max_rank,
            output_dir=output_dir,
            overwrite=overwrite,
            dtype=dtype,
            progress=progress,
        )
    except (ValueError, TypeError) as e:  # the engine checks svd_rank: name the argument resize was given
        message = str(e)
        if not message.startswith("svd_rank: "):
            raise
        if energy is None:
            raise type(e)("rank: " + message.removeprefix("svd_rank: ")) from None
        raise type(e)(
            f"energy: {energy!r}: "
            + message.removeprefix(f"svd_rank: {svd_rank!r}: ").removeprefix(f'svd_rank: "{svd_rank}": ')
        ) from None


def methods() -> list[dict[str, Any]]:
    """Lists the merge methods, from the engine's method table.

    Returns:
        `list[dict]`: one dict per method: `name`, `family` (`"factors"`, `"cat"`, `"svd"` or `"dense_svd"`),
        `pruning` (`""`, `"magnitude"` or `"dare"`), `ties` (sign election), `random` (takes `seed`), `rank` (the
        output-rank rule), `peft` (one of PEFT's eleven types, with PEFT's semantics), `params` (the arguments it
        reads) and `doc` (its definition in one line).
    """
    return [dict(m) for m in _native.methods()]


def inspect_adapter(path: PathLike) -> dict:
    """Summarises a PEFT LoRA adapter directory: ranks, alpha, target modules, dtype, parameter count, and whether
    it uses DoRA (``use_dora``) or LoRA biases (``lora_bias``).

    Args:
        path (`str | os.PathLike`): the adapter directory.

    Returns:
        `dict`: the summary.
    """
    return _native.inspect_adapter(os.fspath(path))
