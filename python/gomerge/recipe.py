"""Merge recipes: a YAML file naming the sources, weights and options of a merge.

```yaml
# merge.yaml
adapters:
  - source: adapters/norobots        # a directory or a Hub id (user/repo)
    weight: 2.0
  - source: smangrul/tinyllama_lora_sql
    weight: 1.0
    revision: main                   # optional, Hub ids only
    subfolder: null                  # optional
  - source: adapters/adcopy          # weight defaults to 1.0
  - source: adapters/chat
    weight:                          # per-module weights: the first pattern that matches wins (PEFT's rank_pattern
      'self_attn\\..*': 1.0          # rule: a pattern matches the module name's end after a dot)
      'mlp\\..*': [0.0, 1.0]         # a gradient from the first layer to the last
      '.*': 0.5                      # a catch-all: every module must match a pattern
method: ties                         # combination_type: any of PEFT's eleven (default: svd)
density: 0.2
majority_sign_method: total
svd_rank: null
svd_clamp: null
seed: null                           # the random methods only (dare_*, della*, *_dare_ties)
dtype: bfloat16                      # float32, bfloat16 or float16 (default: the first adapter's)
adapter_name: merge
output_dir: merged                   # relative paths are relative to the recipe file
overwrite: false
```

A fuse recipe (`gomerge fuse --recipe fuse.yaml`) names the base model too, and takes the fuse's own keys:

```yaml
base: models/llama                   # a model folder or a Hub id; relative to the recipe file
adapters:
  - source: adapters/sql
  - source: adapters/adcopy
    weight: 0.5
method: cat                          # how several adapters are merged first (default: cat); or stack: true
max_shard_size: 5GB                  # optional; default: the base's shard layout
dtype: bfloat16                      # optional; default: the base's
output_dir: llama-fused
```

Errors name the file, the line and the key at fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import _native
from .merge import COMBINATION_TYPES, _weight_json

# a schema type's name in recipe errors
_KINDS = {"int": "int", "float": "number", "bool": "bool", "str": "str", "rank": "int or str"}
TOP_KEYS = {
    "adapters": "list of sources",
    "method": "str",
    "combination_type": "str",
    # every merge parameter of the engine's schema
    **{p["name"]: _KINDS[p["type"]] for p in _native.params()},
    "dtype": "str",
    "adapter_name": "str",
    "output_dir": "str",
    "overwrite": "bool",
}
# keys of fuse recipes only (gomerge fuse --recipe), and keys fuse recipes do not take
FUSE_KEYS = {"base": "str", "stack": "bool", "max_shard_size": "int or str", "dry_run": "bool"}
MERGE_ONLY_KEYS = {"adapter_name"}
SOURCE_KEYS = {
    "source": "str",
    "weight": "number, mapping of pattern -> number, or list of numbers",
    "revision": "str",
    "subfolder": "str",
}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, line and key."""


@dataclass
class Recipe:
    """A parsed recipe: keyword arguments for `gomerge.add_weighted_adapter`."""

    sources: list[dict] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


def _type_ok(value: Any, kind: str) -> bool:
    if value is None:
        return True
    return {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "int or str": isinstance(value, (int, str)) and not isinstance(value, bool),
    }.get(kind, True)


def _weight_request(node: Any) -> Any:
    """A source's `weight` node in the engine's request form, unchecked: a mapping becomes the list of {"pattern",
    "weight"} entries in the YAML order (every entry, so that the engine can name a pattern given twice)."""
    import yaml

    def load(n: Any) -> Any:
        return yaml.safe_load(yaml.serialize(n))

    if isinstance(node, yaml.MappingNode):
        return [{"pattern": load(k), "weight": _weight_json(load(v))} for k, v in node.value]
    return _weight_json(load(node))


def _weight_node(node: Any, message: str) -> Any:
    """The node of a `weight` that the engine's message is about, for its line: the last pattern the message names
    (the second of a pattern given twice), else the entry it names, else the whole weight."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return node
    named = [k for k, _ in node.value if isinstance(k, yaml.ScalarNode) and f"pattern '{k.value}'" in message]
    if named:
        return named[-1]
    match = re.search(r": entry (\d+): ", message)
    if match and int(match.group(1)) < len(node.value):
        return node.value[int(match.group(1))][0]
    return node


def load_recipe(path: str, command: str = "merge") -> Recipe:
    """Reads and validates a recipe file.

    Args:
        path (`str`): the YAML file.
        command (`str`, defaults to `"merge"`): `"merge"`, or `"fuse"` for a recipe with a `base` model.

    Returns:
        [`Recipe`]: sources (dicts with `source`, `weight`, `revision`, `subfolder`) and options.

    Raises:
        `FileNotFoundError`: the file does not exist.
        `RecipeError` (a `ValueError`): invalid YAML, unknown keys, wrong types or values.
    """
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise ImportError("recipes need PyYAML (pip install pyyaml)") from None
    with open(path) as f:
        text = f.read()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None

    def err(node, msg: str) -> RecipeError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return RecipeError(f"{path}{line}: {msg}")

    if root is None or not isinstance(root, yaml.MappingNode):
        raise err(root, "a recipe is a mapping of keys (adapters, method, ...)")
    data = yaml.safe_load(text)
    nodes = {k.value: (k, v) for k, v in root.value}
    top = dict(TOP_KEYS)
    if command == "fuse":
        top = {k: v for k, v in top.items() if k not in MERGE_ONLY_KEYS} | FUSE_KEYS
    for key, (knode, vnode) in nodes.items():
        if key not in top:
            if key in FUSE_KEYS:
                raise err(knode, f"key {key!r} belongs to fuse recipes: run `gomerge fuse --recipe {path}`")
            raise err(knode, f"unknown key {key!r} for a {command} recipe (expected one of: {', '.join(top)})")
        if key != "adapters" and not _type_ok(data[key], top[key]):
            raise err(vnode, f"key {key!r} must be a {top[key]}, got {data[key]!r}")
    if command == "fuse" and "base" not in nodes:
        raise err(root, "key 'base' is missing: name the base model folder (or Hub id) to fuse into")
    if "adapters" not in nodes:
        raise err(root, "key 'adapters' is missing: list the adapters to merge")
    if "method" in nodes and "combination_type" in nodes:
        raise err(nodes["combination_type"][0], "give either 'method' or 'combination_type', not both")
    anode = nodes["adapters"][1]
    if not isinstance(data["adapters"], list) or not data["adapters"]:
        raise err(anode, "key 'adapters' must be a non-empty list of sources")
    sources = []
    for index, (item, node) in enumerate(zip(data["adapters"], anode.value)):
        if isinstance(item, str):
            item = {"source": item}
        elif not isinstance(item, dict):
            raise err(node, "each adapter is a path / Hub id, or a mapping with 'source' and 'weight'")
        sub = {k.value: (k, v) for k, v in node.value} if isinstance(node, yaml.MappingNode) else {}
        for key in item:
            if key not in SOURCE_KEYS:
                raise err(
                    sub.get(key, (node,))[0],
                    f"adapter: unknown key {key!r} (expected one of: {', '.join(SOURCE_KEYS)})",
                )
            if key == "weight":  # the engine is the one validator of the weight grammar
                problem = _native.weight_error(index, _weight_request(sub[key][1]))
                if problem:
                    raise err(_weight_node(sub[key][1], problem), problem)
            elif not _type_ok(item[key], SOURCE_KEYS[key]):
                raise err(sub[key][1], f"adapter: key {key!r} must be a {SOURCE_KEYS[key]}, got {item[key]!r}")
        if not item.get("source"):
            raise err(node, "adapter: key 'source' (a directory or Hub id) is missing")
        src = dict(item)
        src.setdefault("weight", 1.0)
        if (
            isinstance(src["source"], str)
            and not os.path.isabs(src["source"])
            and os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), src["source"]))
        ):
            src["source"] = os.path.join(os.path.dirname(os.path.abspath(path)), src["source"])
        sources.append(src)
    options = {k: v for k, v in data.items() if k != "adapters"}
    if "method" in options:
        options["combination_type"] = options.pop("method")
    ctype = options.get("combination_type")
    if ctype is not None and ctype not in COMBINATION_TYPES:
        raise err(
            nodes.get("method", nodes.get("combination_type"))[1],
            f"unknown method {ctype!r} (expected one of: {', '.join(COMBINATION_TYPES)})",
        )
    here = os.path.dirname(os.path.abspath(path))
    out = options.get("output_dir")
    if out and not os.path.isabs(out):
        options["output_dir"] = os.path.join(here, out)
    base = options.get("base")
    if base and not os.path.isabs(base) and os.path.exists(os.path.join(here, base)):
        options["base"] = os.path.join(here, base)
    return Recipe(sources=sources, options=options)


# keys of extraction recipes (gomerge extract --recipe)
EXTRACT_KEYS = {
    "base": "str",
    "finetuned": "str",
    "output_dir": "str",
    "rank": "int",
    "energy": "number",
    "max_rank": "int",
    "modules_to_save": "bool or list of str",
    "seed": "int",
    "dtype": "str",
    "overwrite": "bool",
    "model_card": "bool",
    "revision": "str",
}


def load_extract_recipe(path: str) -> dict[str, Any]:
    """Reads and validates an extraction recipe (`gomerge extract --recipe extract.yaml`): the keyword arguments of
    `gomerge.extract`, with the model folders and the output directory relative to the recipe file.

    ```yaml
    base: models/base                # a model folder or a Hub id
    finetuned: models/finetuned
    output_dir: extracted
    rank: 64                         # or energy: 0.9
    max_rank: 128                    # optional
    modules_to_save: [norm]          # optional: true (every changed module that is not factorised) or names
    seed: 0
    dtype: float32
    ```

    Args:
        path (`str`): the YAML file.

    Returns:
        `dict`: the options, by `gomerge.extract`'s argument names.

    Raises:
        `FileNotFoundError`: the file does not exist.
        `RecipeError` (a `ValueError`): invalid YAML, unknown or missing keys, wrong types.
    """
    import yaml

    with open(path) as f:
        text = f.read()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RecipeError(
            f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: {getattr(e, 'problem', e)}"
        ) from None

    def err(node, msg: str) -> RecipeError:
        return RecipeError(f"{path}{f':{node.start_mark.line + 1}' if node is not None else ''}: {msg}")

    if root is None or not isinstance(root, yaml.MappingNode):
        raise err(root, "an extraction recipe is a mapping of keys (base, finetuned, rank, ...)")
    data = yaml.safe_load(text)
    nodes = {k.value: (k, v) for k, v in root.value}
    for key, (knode, vnode) in nodes.items():
        if key not in EXTRACT_KEYS:
            raise err(knode, f"unknown key {key!r} for an extract recipe (expected one of: {', '.join(EXTRACT_KEYS)})")
        value, kind = data[key], EXTRACT_KEYS[key]
        ok = (
            isinstance(value, bool) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            if kind == "bool or list of str"
            else _type_ok(value, kind)
        )
        if not ok:
            raise err(vnode, f"key {key!r} must be a {kind}, got {value!r}")
    for key in ("base", "finetuned"):
        if not data.get(key):
            raise err(root, f"key {key!r} is missing: name the {key} model folder (or Hub id)")
    if "rank" in data and "energy" in data:
        raise err(nodes["energy"][0], "give either 'rank' or 'energy', not both")
    here = os.path.dirname(os.path.abspath(path))
    options = dict(data)
    for key in ("base", "finetuned", "output_dir"):
        value = options.get(key)
        if value and not os.path.isabs(value) and (key == "output_dir" or os.path.exists(os.path.join(here, value))):
            options[key] = os.path.join(here, value)
    return options
