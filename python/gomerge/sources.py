"""Where adapters come from: local directories, Hugging Face Hub ids, and older `adapter_model.bin` files.

The Go engine reads PEFT directories with `adapter_model.safetensors`. This module turns the other sources into such
directories: a Hub id (`user/repo`, `user/repo@revision`) is resolved through `huggingface_hub` (its cache and
`HF_HUB_OFFLINE` are honoured), and a directory holding only a pickled `adapter_model.bin` is converted through
torch (`weights_only=True`) into a temporary safetensors copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import ExitStack

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def resolve(source: str, stack: ExitStack, revision: str | None = None, subfolder: str | None = None) -> str:
    """Returns a local PEFT adapter directory with `adapter_model.safetensors` for `source`.

    Args:
        source (`str`): a directory, or a Hub id `user/repo` with an optional `@revision`.
        stack (`contextlib.ExitStack`): owns temporary copies until the merge is done.
        revision (`str`, *optional*): Hub revision (overrides an `@revision` in `source`).
        subfolder (`str`, *optional*): folder of the adapter inside the directory or repository.

    Raises:
        `FileNotFoundError`: no such directory, and not a Hub id, or a Hub id that the Hub (unreachable, or without
            `huggingface_hub`) and its cache cannot give; or nothing found there.
        `ImportError`: a `.bin` adapter without torch.
    """
    patterns = [f"{subfolder}/{f}" if subfolder else f for f in ADAPTER_FILES]
    path = local_or_hub(source, "adapter", revision, allow_patterns=patterns)
    if subfolder:
        path = os.path.join(path, subfolder)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"adapter {source}: no subfolder {subfolder!r}")
    if (
        os.path.isdir(path)
        and not os.path.exists(os.path.join(path, "adapter_model.safetensors"))
        and os.path.exists(os.path.join(path, "adapter_model.bin"))
    ):
        path = _convert_bin(path, stack)
    return path


def local_or_hub(
    source: str,
    what: str,
    revision: str | None = None,
    *,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> str:
    """A local folder for `source`: the directory itself, or the snapshot of a Hub id `user/repo[@revision]` through
    `huggingface_hub` (its cache and `HF_HUB_OFFLINE` honoured). The one place where gomerge resolves Hub ids
    (adapters, base and fine-tuned models).

    A source that is not a directory is first a missing directory: when the Hub cannot give it either (unreachable,
    not there, not in the cache, or `huggingface_hub` not installed), the error is a `FileNotFoundError` that says
    "no such directory" and then why the Hub id did not resolve, since a mistyped path such as `adapters/norobot`
    reads as a Hub id too.

    Args:
        source (`str`): a directory, or a Hub id with an optional `@revision`.
        what (`str`): what the source is, for messages (`"adapter"`, `"base model"`).
        revision (`str`, *optional*): Hub revision (overrides an `@revision` in `source`).
        allow_patterns, ignore_patterns (`list[str]`, *optional*): the files to fetch, as `snapshot_download` takes
            them.
    """
    if os.path.exists(source):
        return source
    m = HUB_ID.match(source)
    if m is None:
        raise FileNotFoundError(f"{what} {source}: no such directory (and not a Hub id like user/repo)")
    repo, revision = m.group("repo"), revision or m.group("revision")
    hub_id = repo + ("@" + revision if revision else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{what} {source}: no such directory; read as the Hub id {hub_id}, it needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    try:
        return snapshot_download(
            repo, revision=revision, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        )
    except Exception as e:  # huggingface_hub raises many types: offline cache misses, HTTP, connection errors
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "the local cache does not hold it (HF_HUB_OFFLINE is set)"
            if offline
            else "the Hub could not be reached or does not have it, and the cache does not hold it"
        )
        raise FileNotFoundError(
            f"{what} {source}: no such directory; read as the Hub id {hub_id}, {hint}: {type(e).__name__}: {e}"
        ) from None


def _convert_bin(path: str, stack: ExitStack) -> str:
    """Copies an adapter with `adapter_model.bin` into a temporary directory with `adapter_model.safetensors`."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: adapter_model.bin can only be read with torch installed; or re-save the adapter "
            "with safe_serialization=True"
        ) from None
    try:
        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}/adapter_model.bin: cannot be read safely (weights_only=True): {e}") from None
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gomerge-bin-"))
    shutil.copy(os.path.join(path, "adapter_config.json"), tmp)
    tensors = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}/adapter_model.bin: entry {name} is not a tensor")
        t = t.detach().contiguous()
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue
        tensors[name] = t
    write_safetensors(os.path.join(tmp, "adapter_model.safetensors"), tensors)
    return tmp


_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


def write_safetensors(path: str, tensors: dict) -> None:
    """Writes torch tensors as a safetensors file with PEFT's metadata (no dependency on the safetensors package)."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        blob = t.view(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPES[str(t.dtype)],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
