"""gomerge: PEFT's `add_weighted_adapter` for LoRA adapter directories, on Go kernels.

```python
import gomerge

res = gomerge.add_weighted_adapter(["a", "b"], [1.0, 1.0], "merged", combination_type="svd")
```
"""

from ._native import engine_version
from .merge import COMBINATION_TYPES, MergeResult, add_weighted_adapter, inspect_adapter

__version__ = "0.1.0"

__all__ = ["COMBINATION_TYPES", "MergeResult", "add_weighted_adapter", "engine_version", "inspect_adapter"]
