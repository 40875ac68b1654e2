"""The one Go extension of gomerge, built by gopy from ``bindings/``.

Every call into Go goes through this module: it imports the extension once and decodes its JSON replies.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import time
import warnings
from typing import Any

from ._errors import raise_engine_error

try:
    from ._engine import bindings as _b
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "gomerge's Go extension is missing: build it with `make build` in a source checkout, "
        "or install gomerge with pip (building from source needs Go >= 1.26)"
    ) from exc

_PID = os.getpid()


def _check_fork() -> None:
    if os.getpid() != _PID:
        raise RuntimeError(
            "gomerge cannot run in a process forked after it was imported (the Go runtime does not survive fork); "
            "use multiprocessing with the 'spawn' start method"
        )


def engine_version() -> str:
    """Returns the version of the Go engine."""
    return _b.engine_version()


def kernel_info() -> dict[str, Any]:
    """Returns the engine's kernel sets: ``{"in_use": ..., "runnable": [...]}``, plus ``"error"`` when the set that
    ``GOMERGE_KERNELS`` asks for cannot run on this CPU."""
    return json.loads(_b.engine_kernels())


def engine_kernels() -> str:
    """Returns the element-wise kernels in use on this CPU: `"avx512"`, `"avx2"` or `"go"` (portable).

    The fastest set the CPU runs is chosen at start-up; the environment variable ``GOMERGE_KERNELS`` (``go``,
    ``avx2`` or ``avx512``) forces one.

    Raises:
        `ValueError`: ``GOMERGE_KERNELS`` names a set that this CPU (or this build) cannot run; the message names the
            missing CPU features. Merges raise the same error until the variable is changed and Python restarted.
    """
    info = kernel_info()
    if "error" in info:
        raise_engine_error(info["error"])
    return info["in_use"]


def kernel_rates(
    seconds: float = 0.25, gemm: tuple[int, int, int] | None = None, sets: list[str] | None = None
) -> dict[str, Any]:
    """Measures the machine's arithmetic rates for each kernel set this CPU runs (or those of ``sets``): the peak
    fused multiply-add rate in GFLOP/s, float32 and float64, on one core and on all cores, and, with ``gemm=(m, n,
    k)``, the rate of the engine's float32 matrix product on that shape (the randomized SVD's). Each rate is given
    per second of the wall clock (``"wall"``) and per second of CPU time of each thread (``"cpu"``: what the
    threads reach with a core each, whatever else shares the machine). Each measurement runs for ``seconds``.

    Raises:
        `ValueError`: a set this CPU or build cannot run, or a bad ``gemm`` shape.
    """
    request: dict[str, Any] = {"seconds": seconds}
    if gemm is not None:
        request["gemm"] = list(gemm)
    if sets is not None:
        request["sets"] = list(sets)
    reply = json.loads(_b.kernel_rates(encode(request)))
    if reply.get("state") == "error":
        raise_engine_error(reply["error"])
    return reply


def _json_scalar(value: Any) -> Any:
    """numpy's and torch's scalars as JSON numbers (``json.dumps``'s ``default``); anything else is left to the
    engine, which names the key of a value of the wrong type."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def encode(request: dict[str, Any]) -> str:
    """A request as JSON. JSON has no NaN or infinity: such a value at the top level is a ValueError naming its
    key (the engine checks every other value)."""
    for key, value in request.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: {value} is not a finite number")
    try:
        return json.dumps(request, default=_json_scalar, allow_nan=False)
    except TypeError as e:
        raise TypeError(f"invalid request: {e}") from None


def merge_start(request: dict[str, Any]) -> int:
    """Starts a merge of adapter directories in Go and returns its job id."""
    _check_fork()
    return int(_b.merge_start(encode(request)))


def merge_tensors_start(request: dict[str, Any]) -> int:
    """Starts a merge of tensors in memory (raw addresses; the caller keeps them alive) and returns its job id."""
    _check_fork()
    return int(_b.merge_tensors_start(encode(request)))


def extract_start(request: dict[str, Any]) -> int:
    """Starts the extraction of a LoRA adapter from a fine-tuned model folder and its base; returns its job id."""
    _check_fork()
    return int(_b.extract_start(encode(request)))


def fuse_start(request: dict[str, Any]) -> int:
    """Starts a fuse of adapters into their base model in Go and returns its job id."""
    _check_fork()
    return int(_b.fuse_start(encode(request)))


def gguf_export_start(request: dict[str, Any]) -> int:
    """Starts the export of an adapter directory to a GGUF LoRA adapter in Go and returns its job id."""
    _check_fork()
    return int(_b.gguf_export_start(encode(request)))


def run_job(job: int, progress: bool | None, min_modules: int = 64, unit: str = "module") -> dict[str, Any]:
    """Waits for a job, showing a progress bar, and returns its result.

    Python polls the job (the GIL is free while Go works), so Ctrl-C or a notebook's interrupt button stops it: the
    job is cancelled, its clean-up awaited, and the `KeyboardInterrupt` re-raised.

    Args:
        job (`int`): the job id.
        progress (`bool`, *optional*): force the progress bar on or off; by default it is shown for jobs of at least
            `min_modules` modules when tqdm is installed. Without tqdm, a job that wanted a bar (or that runs for
            more than 5 s) prints a one-time hint to install it.
        min_modules (`int`): the default threshold for the progress bar.
        unit (`str`): what the job counts (``"module"``, ``"tensor"``), for the progress bar.
    """
    bar = None
    start = time.monotonic()
    try:
        while True:
            status = job_wait(job, _POLL_MS)
            total, done = status.get("total", 0), status.get("done", 0)
            wanted = bool(total) and (progress or (progress is None and total >= min_modules))
            if bar is None and wanted:
                bar = _progress_bar(total, unit)
            if bar is None and progress is not False and (wanted or time.monotonic() - start > _HINT_AFTER_S):
                _hint_tqdm()
            if bar is not None:
                bar.update(done - bar.n)
            if status["state"] == "done":
                return status["result"]
    except KeyboardInterrupt:
        job_cancel(job)
        try:  # let the job finish its clean-up (it removes any temporary output) before giving control back
            while job_wait(job, _POLL_MS)["state"] != "done":
                pass
        except BaseException:  # the job's own outcome (usually "cancelled") is superseded by the interrupt
            pass
        raise
    finally:
        if bar is not None:
            bar.close()


_POLL_MS = 100
# A job that runs longer than this without a progress bar (tqdm missing) prints the hint.
_HINT_AFTER_S = 5.0
_hinted = False


@functools.cache
def _tqdm() -> Any:
    """tqdm's bar class, or None without tqdm: tqdm.auto's (a widget in Jupyter) where ipywidgets is importable, plain
    tqdm otherwise (tqdm.auto in Jupyter without ipywidgets warns a TqdmWarning and falls back to text anyway)."""
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        try:
            from tqdm import tqdm
        except ImportError:
            return None
    return tqdm


def _hint_tqdm() -> None:
    """Once per process, when a bar would help and tqdm is missing: how to get one."""
    global _hinted
    if _hinted or _tqdm() is not None:
        return
    _hinted = True
    warnings.warn(
        "no progress bar: tqdm is not installed (pip install tqdm, or the extra gomerge[progress])", stacklevel=4
    )


def _progress_bar(total: int, unit: str = "module") -> Any:
    tqdm = _tqdm()
    return None if tqdm is None else tqdm(total=total, desc="gomerge", unit=unit)


def job_wait(job: int, timeout_ms: int) -> dict[str, Any]:
    """Waits up to ``timeout_ms`` for a job; returns its status (raises on a failed job)."""
    status = json.loads(_b.job_wait(job, timeout_ms))
    if status.get("state") == "error":
        raise_engine_error(status["error"])
    return status


def job_cancel(job: int) -> None:
    """Asks a running job to stop."""
    _b.job_cancel(job)


def inspect_adapter(path: str) -> dict[str, Any]:
    """Returns the engine's summary of an adapter directory."""
    _check_fork()
    info = json.loads(_b.inspect_adapter(path))
    if info.get("state") == "error":
        raise_engine_error(info["error"])
    return info


@functools.cache
def methods() -> tuple[dict[str, Any], ...]:
    """The engine's method table: one dict per merge method (``name``, ``family``, ``pruning``, ``ties``,
    ``random``, ``rank``, ``peft``, ``params``, ``doc``), in the order of the docs."""
    return tuple(json.loads(_b.engine_methods()))


@functools.cache
def params() -> tuple[dict[str, Any], ...]:
    """The engine's parameter schema: one dict per merge parameter (``name``, ``type`` (``"int"``, ``"float"``,
    ``"bool"``, ``"str"`` or ``"rank"``), ``default`` (as the engine applies it; ``None`` where a rule of the method
    gives it), ``choices``, ``min``, ``max``, ``peft`` (in PEFT's signature) and ``doc``), in the order of the docs.
    The API's keywords, the command line's flags and the recipes' keys are built from it."""
    return tuple(json.loads(_b.engine_params()))


@functools.cache
def request_keys() -> dict[str, list[str]]:
    """The keys the engine accepts in each request and sends in each result (its JSON tags)."""
    return json.loads(_b.request_keys())


def weight_error(index: int, weight: Any) -> str | None:
    """The engine's check of adapter ``index``'s weight in its request form (any form a merge takes, the command
    line's ``PATTERN=W[,PATTERN=W...]`` strings included), without merging: None, or the engine's message naming
    ``weights[index]``, the pattern and the problem. Python holds no rule of the weight grammar: the command line and
    recipes call this to report a bad weight before they start."""
    try:
        text = json.dumps(weight, default=_json_scalar, allow_nan=False)
    except (TypeError, ValueError) as e:
        return f"weights[{index}]: {e}"
    status = json.loads(_b.check_weight(index, text))
    return status["error"]["message"] if "error" in status else None


def validate_combination(request: dict[str, Any]) -> None:
    """Checks combination arguments (``combination_type``, ``density``, ...) against the method table, as a merge
    would, without merging; raises the engine's error (a ``ValueError`` naming the argument)."""
    status = json.loads(_b.validate_combination(encode(request)))
    if "error" in status:
        raise_engine_error(status["error"])


def profile_start(request: dict[str, Any]) -> int:
    """Starts the export of an adapter directory in a serving target's form (vllm, sglang, lorax, portable); returns
    its job id."""
    _check_fork()
    return int(_b.profile_start(encode(request)))


def serving_check(path: str) -> list[dict[str, Any]]:
    """For every serving target: whether the adapter directory loads there as it is (``loads``), why not
    (``reasons``), whether an export fixes it (``fixable``) and a serving ``note``."""
    _check_fork()
    info = json.loads(_b.serving_check(path))
    if info.get("state") == "error":
        raise_engine_error(info["error"])
    return info["targets"]


@functools.cache
def serving_targets() -> tuple[dict[str, Any], ...]:
    """The engine's table of serving targets: one dict per target (``name``, ``title``, ``ranks``, ``ranks_up_to``,
    ``one_rank``, ``alpha_is_r``, ``patterns``, ``rslora``, ``modules_to_save``, ``dora``, ``sources``)."""
    return tuple(json.loads(_b.serving_targets()))


def quant_codec(request: dict[str, Any]) -> None:
    """Runs one of the engine's quantization codecs (``format``: ``bnb4``, ``int8``, ``fp8_block``, ``fp8_scaled``,
    ``mxfp4``; ``op``: ``dequantize`` or ``quantize``) from the safetensors file ``input`` into ``output``; the
    tensor names are those of ``gomerge/quant/codec.go``. Raises the engine's error."""
    status = json.loads(_b.quant_codec(encode(request)))
    if "error" in status:
        raise_engine_error(status["error"])
