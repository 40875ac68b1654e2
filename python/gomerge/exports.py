"""Export an adapter for where it is deployed: ``gomerge.export(adapter, to=FORMAT, output=...)``.

Each format is one row of `EXPORTERS`, a function taking the local adapter directory, the output path and the
format's own keywords. ``"gguf"`` writes a GGUF LoRA adapter for llama.cpp, ollama and llama-cpp-python (the Go
engine's `gomerge/gguf`, torch-free; only the base's ``config.json`` is read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Union

from . import _native, sources
from ._result import EngineResult
from .serving import SERVING_TARGETS, export_profile

PathLike = Union[str, "os.PathLike[str]"]

# The GGUF tensor types of `export(..., to="gguf", dtype=...)`, and what `drop=` may leave out.
GGUF_DTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
GGUF_DROP: tuple[str, ...] = ("modules_to_save", "lora_bias", "lm_head")


@dataclass(repr=False)
class GGUFResult(EngineResult):
    """What an export to GGUF wrote.

    Attributes:
        output (`str`): the ``.gguf`` file.
        architecture (`str`): its ``general.architecture``, llama.cpp's name of the base's architecture.
        modules (`int`): LoRA modules written (two tensors each, ``<name>.lora_a`` and ``<name>.lora_b``).
        tensors (`int`): tensors written.
        dtype (`str`): the tensor type: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        size (`int`): the file's size in bytes.
        ranks (`dict[str, int]`): how many modules have each rank.
        dropped (`list[str]`): what `drop=` left out, each with its reason; empty when the file is exact.
        f16_fallback (`list[str]`): with ``q8_0``, the tensors written as f16 because their rows are not a multiple
            of 32 (as llama.cpp's converter does).
        skipped (`list[str]`): the base's own weights that PEFT saved beside an embedding LoRA
            (``save_embedding_layers``), which llama.cpp takes from the base model.
        seconds (`float`): wall time.
    """

    output: str
    architecture: str
    modules: int
    tensors: int
    dtype: str
    size: int
    seconds: float
    ranks: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    f16_fallback: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def _html_rows(self) -> tuple[str, list[tuple[str, Any]]]:
        return (
            f"gomerge export: {os.path.basename(self.output)}",
            [
                ("output", self.output),
                ("architecture", self.architecture),
                ("modules", self.modules),
                ("dtype", self.dtype),
                ("size", f"{self.size / 2**20:.1f} MiB"),
                ("dropped", ", ".join(self.dropped) or "nothing"),
            ],
        )


def _base_config(base: PathLike | None, adapter_dir: str) -> str:
    """The base's config.json or its folder: `base` (a folder, a config.json, or a Hub id ``user/repo[@revision]``, of
    which only config.json is fetched), or else the adapter config's ``base_model_name_or_path``."""
    if base is None:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                "base: the adapter config names no base_model_name_or_path; pass base= (the base model's folder or "
                "its config.json): the GGUF tensor names depend on its architecture"
            )
    base = os.fspath(base)
    if os.path.isfile(base):
        return base
    return sources.local_or_hub(base, "base model", allow_patterns=["config.json"])


def export_gguf(
    adapter_dir: str,
    output: PathLike,
    *,
    base: PathLike | None = None,
    dtype: str | None = None,
    drop: Sequence[str] = (),
    name: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> GGUFResult:
    """Writes a local adapter directory as a GGUF LoRA adapter (`export`'s ``to="gguf"``)."""
    if isinstance(drop, str):
        drop = [drop]
    request = {
        "adapter": adapter_dir,
        "base": _base_config(base, adapter_dir),
        "output": os.fspath(output),
        "dtype": dtype or "",
        "drop": list(drop),
        "overwrite": bool(overwrite),
        "name": name or "",
        "workers": 0,
    }
    return GGUFResult._from_engine(_native.run_job(_native.gguf_export_start(request), progress))


def _serving(target: str) -> Callable[..., Any]:
    """`export`'s row for a serving target: `export_profile` (gomerge.serving) writing that target's form."""

    def write(adapter_dir: str, output: PathLike, **options: Any) -> Any:
        return export_profile(adapter_dir, target, output, **options)

    return write


# The export formats: `to=` -> the function that writes it, called as fn(adapter_dir, output, **options) with a local
# adapter directory: one GGUF file for llama.cpp, or a serving target's PEFT directory (`export_profile`).
EXPORTERS: dict[str, Callable[..., Any]] = {"gguf": export_gguf, **{t: _serving(t) for t in SERVING_TARGETS}}


def export(
    adapter: PathLike,
    to: str,
    output: PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    **options: Any,
) -> Any:
    """Exports a LoRA adapter in the form a server or runtime loads.

    ``to="vllm"``, ``"sglang"``, ``"lorax"`` or ``"portable"`` writes that serving target's form of the adapter (a
    PEFT directory; `export_profile`'s keywords: ``max_rank``, ``drop_modules_to_save``, ``dtype``, ``overwrite``,
    ``progress``).

    ``to="gguf"`` writes one ``.gguf`` file that llama.cpp loads with ``--lora`` (ollama: ``ADAPTER`` in a
    Modelfile; llama-cpp-python: ``Llama(..., lora_path=...)``), with PEFT's numbers: each module's own scale
    (``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA, ``rank_pattern`` / ``alpha_pattern`` applied) is multiplied into its
    B and ``adapter.lora.alpha`` is 0, so llama.cpp applies exactly PEFT's update (times its ``--lora-scaled``
    scale). Only the base's ``config.json`` is read; torch is not needed.

    Args:
        adapter (`str | os.PathLike`): the PEFT adapter directory (or Hub id).
        to (`str`): the format, one of `EXPORTERS`: ``"gguf"``, ``"vllm"``, ``"sglang"``, ``"lorax"``,
            ``"portable"``.
        output (`str | os.PathLike`): the file (gguf) or directory (serving targets) to write, whole or not at all.
        revision, subfolder (`str`, *optional*): for Hub ids, as in `add_weighted_adapter`.
        **options: the format's own keywords. For ``"gguf"``:

            - base (`str | os.PathLike`, *optional*): the base model's folder, its ``config.json``, or a Hub id
              ``user/repo[@revision]`` (only ``config.json`` is fetched); defaults to the adapter config's
              ``base_model_name_or_path``.
            - dtype (`str`, *optional*): ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``; defaults to the adapter's.
            - drop (`list[str]`, *optional*): what may be left out where llama.cpp cannot represent it:
              ``"modules_to_save"`` (full tensors), ``"lora_bias"`` (LoRA biases), ``"lm_head"`` (an lm_head LoRA on a
              base with tied embeddings). Without it these are errors; what is dropped is listed in the result.
            - name (`str`, *optional*): ``general.name``; defaults to the file name.
            - overwrite (`bool`): replace an existing GGUF file.
            - progress (`bool`, *optional*): show a progress bar.

    Returns:
        the format's result: [`GGUFResult`] for ``"gguf"``, [`ProfileResult`] for a serving target.

    Raises:
        `ValueError`: an unknown format or option; an unsupported architecture (named); DoRA; and, unless dropped,
            ``modules_to_save``, ``lora_bias`` or an ``lm_head`` LoRA over tied embeddings.
        `FileExistsError`: `output` exists and `overwrite` is not set (or it is not a GGUF file).
    """
    try:
        fn = EXPORTERS[to]
    except KeyError:
        raise ValueError(f"to: unknown export format {to!r} (expected one of: {', '.join(EXPORTERS)})") from None
    with ExitStack() as stack:
        local = sources.resolve(os.fspath(adapter), stack, revision, subfolder)
        return fn(local, output, **options)
