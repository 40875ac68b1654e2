"""``export_profile``: an adapter in the form a serving engine (vLLM, SGLang, LoRAX) loads with the same numbers.

The rules of each target, with their sources, are one table in the engine (``gomerge/serve/targets.go``); this module
only builds the request and reads the result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Union

from . import _native, sources
from ._result import EngineResult

PathLike = Union[str, "os.PathLike[str]"]

# The serving targets' names, in the order of the engine's table.
SERVING_TARGETS = tuple(t["name"] for t in _native.serving_targets())

# Below this many modules a progress bar is more noise than help.
_PROGRESS_MIN_MODULES = 64


@dataclass(repr=False)
class ProfileResult(EngineResult):
    """What an export to a serving target produced.

    Attributes:
        output_dir (`str`): the PEFT adapter directory that was written.
        target (`str`): the serving target (``"vllm"``, ``"sglang"``, ``"lorax"`` or ``"portable"``).
        rank (`int`): the one rank of every module, allowed by the target; `lora_alpha` equals it.
        modules (`int`): number of LoRA modules written.
        padded (`int`): modules zero-padded up to `rank` (exact).
        truncated (`dict[str, dict]`): for each module truncated to `rank` (`max_rank`): ``from``, ``to``, ``tail``
            (the discarded singular values of its update, decreasing), ``error`` (their root sum of squares, the
            Frobenius norm of what was lost) and ``relative_error``.
        dropped (`list[str]`): tensors left out (`drop_modules_to_save`).
        removed (`list[str]`): config keys the profile reset (``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
            ``modules_to_save``).
        dtype (`str`): torch name of the dtype of the written factors.
        note (`str`): how to serve it there (a server flag), or ``""``.
        seconds (`float`): wall time.
    """

    output_dir: str
    target: str
    rank: int
    modules: int
    padded: int
    dtype: str
    seconds: float
    note: str = ""
    truncated: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def _html_rows(self) -> tuple[str, list[tuple[str, Any]]]:
        worst = max((t["relative_error"] for t in self.truncated.values()), default=0.0)
        return f"gomerge export --to {self.target}", [
            ("output", self.output_dir),
            ("rank", self.rank),
            ("modules", f"{self.modules} ({self.padded} padded, {len(self.truncated)} truncated)"),
            ("largest relative error", f"{worst:.3g}"),
            ("dropped", ", ".join(self.dropped) or "none"),
            ("note", self.note or "none"),
        ]


def export_profile(
    adapter: PathLike,
    target: str,
    output_dir: PathLike,
    *,
    max_rank: int | None = None,
    drop_modules_to_save: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    source_name: str | None = None,
) -> ProfileResult:
    """Writes `adapter` in the form a serving engine loads with the same numbers as PEFT.

    Every module's PEFT scale (`lora_alpha / r`, `lora_alpha / sqrt(r)` with rsLoRA, `rank_pattern` and
    `alpha_pattern` applied) is multiplied into `lora_B`; the config gets `lora_alpha = r`, no `rank_pattern` /
    `alpha_pattern` and `use_rslora = false`; and every module gets one rank, the smallest the target allows that
    holds them all (smaller modules zero-padded: exact). PEFT reloads the result with the same logits.

    Args:
        adapter (`str | os.PathLike`): the adapter directory (or Hub id).
        target (`str`): ``"vllm"`` (ranks 1, 8, 16, 32, 64, 128, 256, 320, 512), ``"sglang"`` (any rank),
            ``"lorax"`` (8 or a multiple of 16) or ``"portable"`` (loads on all three: 8, 16, 32, 64, 128, 256, 320,
            512).
        output_dir (`str | os.PathLike`): where to write the adapter; written atomically.
        max_rank (`int`, *optional*): cap of the output rank. When the target's rank would exceed it, the largest
            allowed rank up to `max_rank` is used and each module of a higher rank is truncated by an exact SVD of
            its update; `ProfileResult.truncated` gives each one's discarded singular values.
        drop_modules_to_save (`bool`, defaults to `False`): leave `modules_to_save` tensors out (no target loads
            them); without it such an adapter is refused.
        dtype (`str`, *optional*): ``"float32"``, ``"bfloat16"`` or ``"float16"``; defaults to the adapter's.
        overwrite (`bool`, defaults to `False`): replace an existing adapter directory at `output_dir`.
        revision (`str`, *optional*), subfolder (`str`, *optional*): for a Hub id.
        workers (`int`, *optional*): worker goroutines (default: all cores).
        progress (`bool`, *optional*): show a progress bar (tqdm).
        source_name (`str`, *optional*): the adapter's name in the model card (default: `adapter` as given; ``""``
            for none).

    Returns:
        [`ProfileResult`]

    Raises:
        `ValueError`: an unknown target, a DoRA adapter or one with LoRA biases (no target loads them; fuse them
            instead), `modules_to_save` without `drop_modules_to_save`, a rank above every allowed rank without
            `max_rank`, or a `max_rank` below every allowed rank.
        `FileNotFoundError`: the adapter is missing.
        `FileExistsError`: `output_dir` exists and `overwrite` is not set.

    Example:

    ```python
    >>> import gomerge
    >>> res = gomerge.export_profile("merged", "vllm", "merged-vllm")
    >>> res.rank, res.note
    ```
    """
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir: expected a path, got {type(output_dir).__name__}")
    with ExitStack() as stack:
        path = sources.resolve(os.fspath(adapter), stack, revision, subfolder)
        request = {
            "adapter": path,
            "target": target,
            "output_dir": os.fspath(output_dir),
            "max_rank": max_rank,
            "drop_modules_to_save": drop_modules_to_save,
            "dtype": dtype or "",
            "overwrite": overwrite,
            "workers": 0 if workers is None else workers,
            "source_name": os.fspath(adapter) if source_name is None else source_name,
        }
        job = _native.profile_start(request)
        return ProfileResult._from_engine(_native.run_job(job, progress, _PROGRESS_MIN_MODULES))


def serving_check(adapter: PathLike, *, revision: str | None = None, subfolder: str | None = None) -> list[dict]:
    """For each serving target, whether `adapter` loads there as it is, with the numbers PEFT gives.

    Returns:
        `list[dict]`: one dict per target (``SERVING_TARGETS`` order) with ``target``, ``loads`` (`bool`),
        ``reasons`` (why not: DoRA, `modules_to_save`, patterns the target ignores, rsLoRA, a rank it does not
        take), ``fixable`` (`export_profile` writes a form that loads) and ``note`` (a server flag to set).
    """
    with ExitStack() as stack:
        return _native.serving_check(sources.resolve(os.fspath(adapter), stack, revision, subfolder))


def write_for_target(
    produce: Callable[[str], Any], output_dir: PathLike, target: str, **export: Any
) -> tuple[Any, ProfileResult]:
    """Runs `produce(tmp_dir)` (a merge, resize or extraction writing a PEFT adapter there), then writes that adapter
    in `target`'s form to `output_dir` (`export_profile` with the keywords `export`). The intermediate adapter lives
    in a temporary folder beside `output_dir`, removed whatever happens; `output_dir` appears complete or not at all.

    Returns:
        `tuple`: `produce`'s result (its `output_dir`, if it has one, set to `output_dir`) and the
        [`ProfileResult`].
    """
    if target not in SERVING_TARGETS:
        raise ValueError(f"target: unknown serving target {target!r} (the targets: {', '.join(SERVING_TARGETS)})")
    parent = os.path.dirname(os.path.abspath(os.fspath(output_dir)))
    os.makedirs(parent, exist_ok=True)  # as the engine creates an output's parent folders
    with tempfile.TemporaryDirectory(prefix=".gomerge-target-", dir=parent) as tmp:
        # the intermediate adapter has the output's name, which its model card uses
        inner_dir = os.path.join(tmp, os.path.basename(os.path.normpath(os.fspath(output_dir))) or "adapter")
        inner = produce(inner_dir)
        profile = export_profile(inner_dir, target, output_dir, source_name="", **export)
    if hasattr(inner, "output_dir"):
        inner.output_dir = profile.output_dir  # the temporary folder is gone
    return inner, profile
