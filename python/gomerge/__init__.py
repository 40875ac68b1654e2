"""gomerge: PEFT's `add_weighted_adapter` for LoRA adapter directories, on Go kernels.

```python
import gomerge

res = gomerge.add_weighted_adapter(["a", "b"], [1.0, 1.0], "merged", combination_type="svd")
```
"""

from ._native import engine_kernels, engine_version
from .exports import GGUFResult, export
from .extraction import ExtractResult, extract
from .fuse import FuseResult, fuse
from .merge import COMBINATION_TYPES, MergeResult, add_weighted_adapter, inspect_adapter, methods, resize
from .serving import SERVING_TARGETS, ProfileResult, export_profile, serving_check

__version__ = "0.1.0"

__all__ = [
    "COMBINATION_TYPES",
    "ExtractResult",
    "GGUFResult",
    "FuseResult",
    "MergeResult",
    "ProfileResult",
    "SERVING_TARGETS",
    "add_weighted_adapter",
    "engine_kernels",
    "engine_version",
    "export",
    "export_profile",
    "extract",
    "fuse",
    "inspect_adapter",
    "methods",
    "resize",
    "serving_check",
    "patch_peft",
    "unpatch_peft",
]


def patch_peft():
    """Makes every PEFT `LoraModel.add_weighted_adapter` run on gomerge (see `gomerge.peft`); needs torch and peft.

    One line, `gomerge.patch_peft()`, or a context manager: `with gomerge.patch_peft(): ...`.
    """
    from .peft import patch_peft as _patch

    return _patch()


def unpatch_peft() -> None:
    """Restores PEFT's own `LoraModel.add_weighted_adapter`."""
    from .peft import unpatch_peft as _unpatch

    _unpatch()
