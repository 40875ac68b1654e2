"""The `gomerge` command: merge LoRA adapters and inspect them from a shell."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import Any

from . import __version__, _native, merge, sources
from . import exports as exporting
from .extraction import extract as extract_adapter
from .fuse import fuse as fuse_models
from .merge import COMBINATION_TYPES
from .serving import SERVING_TARGETS, export_profile, write_for_target

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
gomerge merges LoRA adapters as PEFT's add_weighted_adapter does, on fast Go kernels, from PEFT adapter
directories or Hugging Face Hub ids, without a base model or torch."""

EPILOG = """\
exit status:
  0    success
  1    the merge or inspection failed (bad input, missing file, existing output, ...)
  2    invalid command line or recipe, or GOMERGE_KERNELS names kernels this CPU cannot run
  130  interrupted (Ctrl-C); nothing was written

examples:
  gomerge merge adapters/norobots adapters/sql adapters/adcopy --weights 2 1 1 \\
      --method ties --density 0.2 -o merged
  gomerge merge --recipe merge.yaml
  gomerge merge user/lora-a user/lora-b@v2 --method svd --svd-rank 16 -o merged --json
  gomerge inspect merged
  gomerge extract BASE FINETUNED -o extracted --rank 64
  gomerge fuse models/llama adapters/sql -o llama-sql
  gomerge export merged --to gguf --base models/llama -o merged.gguf
  gomerge export merged --to vllm -o merged-vllm

Run `gomerge merge --help` for every option and the recipe format."""

RECIPE_HELP = """\
recipe file (YAML):
  adapters:                       # required
    - source: adapters/norobots   # a directory or a Hub id; relative to the recipe file
      weight: 2.0                 # default 1.0
    - source: adapters/sql
      weight:                     # per module: first matching pattern wins
        'self_attn\\..*': 0.5
        '.*': [0.0, 1.0]          # a gradient from the first layer to the last
    - source: user/repo
      revision: main              # optional
      subfolder: lora             # optional
  method: ties                    # or combination_type:; default svd
  density: 0.2                    # and any merge parameter (the flags below, by their names):
{recipe_params}
  dtype: bfloat16
  adapter_name: merge
  output_dir: merged              # relative to the recipe file
  overwrite: false"""


def _recipe_help() -> str:
    """RECIPE_HELP with a line per merge parameter of the engine's schema (its default, or null)."""
    lines = [
        f"  {p['name']}: {'null' if p['default'] is None else _bool_default(p['default'])}"
        for p in _native.params()
        if p["name"] != "density"
    ]
    return RECIPE_HELP.replace("{recipe_params}", "\n".join(lines))


# Each subcommand's examples, at the end of its --help.
EXAMPLES = {
    "merge": """\
  gomerge merge adapters/norobots adapters/sql --weights 2 1 --method ties --density 0.2 -o merged
  gomerge merge user/lora-a user/lora-b@v2 --method svd --svd-rank 16 -o merged --json
  gomerge merge --recipe merge.yaml""",
    "resize": """\
  gomerge resize adapters/sql --rank 4 -o sql-r4
  gomerge resize adapters/sql --energy 0.95 --max-rank 8 -o sql-e95""",
    "extract": """\
  gomerge extract models/base models/finetuned -o extracted --rank 64
  gomerge extract models/base models/finetuned -o extracted --energy 0.9 --max-rank 128 --save-module norm""",
    "fuse": """\
  gomerge fuse models/llama adapters/sql -o llama-sql
  gomerge fuse models/llama adapters/sql adapters/adcopy --weights 1 0.5 --method ties --density 0.2 -o fused
  gomerge fuse models/llama adapters/sql --dry-run""",
    "export": """\
  gomerge export adapters/sql --to gguf --base models/llama -o sql.gguf
  gomerge export merged --to gguf --base models/llama --dtype q8_0 --drop modules_to_save -o merged-q8.gguf
  gomerge merge adapters/sql adapters/adcopy --method ties --density 0.2 --to gguf --base models/llama \\
      -o merged.gguf
  gomerge export merged --to vllm -o merged-vllm
  gomerge export merged --to lorax --max-rank 32 -o merged-lorax
  gomerge export extracted --to portable --drop-modules-to-save -o extracted-portable""",
    "inspect": """\
  gomerge inspect merged
  gomerge inspect user/lora-a --revision v2 --json""",
}


def _epilog(command: str, before: str = "") -> str:
    """A subcommand's epilog: `before` (the recipe format, say), then its examples."""
    return (before + "\n\n" if before else "") + "examples:\n" + EXAMPLES[command]


def _check_weights(weights: list[Any], parser: argparse.ArgumentParser) -> None:
    """Refuses a bad --weights value as a usage error (exit status 2) with the engine's message, which names the
    adapter's position, the pattern and the problem: the engine is the one validator of the weight grammar
    (a number, a gradient A:B[:C...], or PATTERN=W[,PATTERN=W...]), and the strings go to it as they are."""
    for i, w in enumerate(weights):
        problem = _native.weight_error(i, w)
        if problem:
            parser.error(f"--weights: {problem}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit status 2
        sys.stderr.write(f"gomerge: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _kernels_unusable(info: dict[str, Any]) -> int:
    """An environment error (GOMERGE_KERNELS names a kernel set this CPU cannot run), reported as a usage error:
    exit status 2, for `--version` and every command alike."""
    sys.stderr.write(f"gomerge: error: {info['error']['message']}\n")
    return EXIT_USAGE


class _VersionAction(argparse.Action):
    """`--version`: the package version and the kernel set in use (or why the one GOMERGE_KERNELS asks for cannot
    run, with exit status 2)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        info = _native.kernel_info()
        if "error" in info:
            raise SystemExit(_kernels_unusable(info))
        print(f"gomerge {__version__} (kernels: {info['in_use']}; this CPU runs: {', '.join(info['runnable'])})")
        raise SystemExit(EXIT_OK)


# The options several commands share, declared once: command -> the text that differs.
SHARED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "dtype": (("--dtype",), dict(choices=("float32", "bfloat16", "float16"), help="dtype of the written tensors")),
    "overwrite": (
        ("--overwrite",),
        dict(action="store_true", default=None, help="replace an existing output directory (only one of ours)"),
    ),
    "revision": (("--revision",), dict(help="Hub revision for Hub ids without @revision")),
    "subfolder": (("--subfolder",), dict(help="folder of the adapters inside their directories or repositories")),
    "json": (("--json",), dict(action="store_true", help="print the result as JSON on stdout")),
    "quiet": (("-q", "--quiet"), dict(action="store_true", help="no progress bar and no summary")),
    "no_model_card": (("--no-model-card",), dict(action="store_true", help="do not write README.md")),
}


def _shared(parser: argparse.ArgumentParser, *names: str, **helps: str) -> None:
    """Adds the shared options `names` to a command; `helps` gives a command's own help of one (`dtype=...`)."""
    for name in names:
        flags, kwargs = SHARED[name]
        parser.add_argument(*flags, **{**kwargs, **({"help": helps[name]} if name in helps else {})})


def flag(name: str) -> str:
    """The command-line flag of a merge parameter: `--` and its name with dashes."""
    return "--" + name.replace("_", "-")


def _bool_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add_merge_params(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter of the engine's schema (`gomerge.methods()` says which method takes which): its type,
    its choices, its doc as the help and its default shown. The flags default to None: what is not given is the
    recipe's, then the engine's."""
    group = parser.add_argument_group("merge parameters (each method refuses those it does not take)")
    types: dict[str, Any] = {"int": int, "float": float, "rank": _rank_arg, "str": str}
    metavars = {"int": "N", "float": "X", "rank": "R"}
    for p in _native.params():
        default = "" if p["default"] is None else f" (default: {_bool_default(p['default'])})"
        kwargs: dict[str, Any] = dict(dest=p["name"], default=None, help=p["doc"] + default)
        if p["type"] == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = types[p["type"]]
            if p["choices"]:
                kwargs["choices"] = p["choices"]
            else:
                kwargs["metavar"] = metavars.get(p["type"], "S")
        group.add_argument(flag(p["name"]), **kwargs)


def _given_params(args: argparse.Namespace) -> dict[str, Any]:
    """The merge parameters given on the command line, by the schema's names."""
    return {p["name"]: getattr(args, p["name"]) for p in _native.params() if getattr(args, p["name"]) is not None}


def _override(options: dict[str, Any], args: argparse.Namespace, *names: str, **renamed: str) -> None:
    """Command-line options override the recipe's: each option given (not None) replaces its key in `options`;
    `renamed` maps a key to the option's dest where they differ (``combination_type="method"``)."""
    for key, dest in [(n, n) for n in names] + list(renamed.items()):
        if getattr(args, dest) is not None:
            options[key] = getattr(args, dest)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gomerge", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action=_VersionAction, help="show the version and the kernels in use, then exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    m = sub.add_parser(
        "merge",
        help="merge adapters into a new adapter directory",
        description="Merge LoRA adapters into a new PEFT adapter directory. The options are those of "
        "PEFT's add_weighted_adapter.",
        epilog=_epilog("merge", _recipe_help() + "\n\n" + EPILOG.split("examples:")[0].rstrip()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "adapters", nargs="*", metavar="ADAPTER", help="adapter directories or Hub ids (user/repo, user/repo@revision)"
    )
    m.add_argument("--recipe", metavar="FILE", help="read sources and options from a YAML recipe (see below)")
    m.add_argument(
        "-w",
        "--weights",
        nargs="+",
        metavar="W",
        help="one weight per adapter (default: 1 each); negative weights subtract. A weight is a number, or "
        "PATTERN=W[,PATTERN=W...] for per-module weights: a module takes the W of the first PATTERN (a regular "
        "expression) that matches its whole name or its end after a dot, as PEFT's rank_pattern keys do, e.g. "
        "'self_attn\\..*=1,mlp\\..*=0'; every module must match one (end with '.*=W'). A W may be a gradient "
        "over the layers, A:B[:C...], interpolated linearly from layer 0 to the last ('.*=0:1', or just '0:1'; "
        "write '.*=-1:1' for one that starts negative)",
    )
    m.add_argument(
        "-m",
        "--method",
        "--combination-type",
        dest="method",
        choices=COMBINATION_TYPES,
        metavar="METHOD",
        help=f"combination type, one of: {', '.join(COMBINATION_TYPES)} (default: svd)",
    )
    m.add_argument("-o", "--output-dir", metavar="DIR", help="directory of the merged adapter (required)")
    m.add_argument("-n", "--adapter-name", default=None, help="name of the merged adapter (default: merged)")
    _add_merge_params(m)
    _shared(m, "dtype", dtype="dtype of the written tensors (default: the first adapter's)")
    _shared(m, "revision", "subfolder")
    _shared(m, "overwrite", overwrite="replace an existing output directory (an adapter directory or an empty one)")
    _shared(m, "no_model_card")
    m.add_argument(
        "--allow-nonfinite", action="store_true", help="merge adapters holding NaN / Inf values (refused by default)"
    )
    _shared(m, "json", "quiet")
    _add_to_flags(m)
    _add_target(m)

    p.merge_parser = m  # for errors reported after parsing
    r = sub.add_parser(
        "resize",
        epilog=_epilog("resize"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="re-factorise one adapter to a new rank, exactly (truncated SVD of each module's update)",
        description="Re-factorise one LoRA adapter: each module's update s B A is replaced by its best rank-R "
        "approximation (--rank), or by the smallest rank that keeps the fraction E of its squared norm (--energy), "
        "computed exactly from the factors. Mixed ranks go into rank_pattern / alpha_pattern.",
    )
    r.add_argument("adapter", metavar="ADAPTER", help="the adapter directory or Hub id")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, metavar="R", help="the new rank of every module")
    how.add_argument("--energy", type=float, metavar="E", help="the fraction of each update's energy to keep")
    r.add_argument("--max-rank", type=int, metavar="M", help="cap of every module's rank")
    r.add_argument("-o", "--output-dir", metavar="DIR", help="directory of the resized adapter (required)")
    _shared(r, "overwrite", overwrite="replace an existing adapter directory")
    _shared(r, "dtype", "json", "quiet")
    _add_to_flags(r)
    _add_target(r)
    p.resize_parser = r
    e = sub.add_parser(
        "extract",
        epilog=_epilog("extract"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="extract a LoRA adapter from a fine-tuned model and its base (randomized SVD of each dW)",
        description="Extract a LoRA adapter from a fine-tuned model: each linear module's dW = W_ft - W_base is "
        "factorised by a seeded randomized SVD, at a fixed rank (--rank) or by the energy rule (--energy). The "
        "adapter loads with PeftModel.from_pretrained(base_model, OUT); the model card gives each module's rank and "
        "relative error.",
    )
    e.add_argument("base", nargs="?", metavar="BASE", help="the base model folder (or Hub id)")
    e.add_argument("finetuned", nargs="?", metavar="FINETUNED", help="the fine-tuned model folder (or Hub id)")
    e.add_argument(
        "--recipe",
        metavar="FILE",
        help="read the models and options from a YAML recipe (keys: base, finetuned, output_dir, rank or energy, "
        "max_rank, modules_to_save, seed, dtype, overwrite, model_card, revision); the command line overrides it",
    )
    e.add_argument("-o", "--output-dir", metavar="DIR", help="directory of the extracted adapter (required)")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, metavar="R", help="the rank of every module")
    how.add_argument(
        "--energy", type=float, metavar="E", help="per module, the smallest rank keeping this fraction of ||dW||^2"
    )
    e.add_argument("--max-rank", type=int, metavar="M", help="cap of every module's rank")
    e.add_argument(
        "--save-module",
        action="append",
        metavar="NAME",
        help="save this module whole (modules_to_save): a module path or its last part (lm_head, embed_tokens, "
        "norm); repeat for several",
    )
    e.add_argument(
        "--save-changed",
        action="store_true",
        help="save every changed module that is not factorised (norms, embeddings, lm_head) whole",
    )
    e.add_argument("--seed", type=int, help="seed of the randomized SVD (default 0)")
    _shared(e, "dtype", dtype="dtype of the LoRA factors (default float32)")
    _shared(e, "revision", revision="Hub revision for Hub ids")
    _shared(e, "overwrite", overwrite="replace an existing adapter directory")
    _shared(e, "no_model_card", "json", "quiet")
    _add_target(e)
    p.extract_parser = e  # for errors reported after parsing
    f = sub.add_parser(
        "fuse",
        epilog=_epilog("fuse"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="fuse LoRA adapters into their base model's weights (a model folder transformers loads)",
        description="Fuse LoRA adapters into the weights of their base model, W' = W + s B A as PEFT's "
        "merge_and_unload() computes it (fan_in_fan_out, embeddings, Conv2d, DoRA, lora_bias, modules_to_save), "
        "in float32 with one rounding, streaming one tensor per core. Several adapters are merged first (--method, "
        "default cat: the exact weighted sum) or applied one after another (--stack). The output folder appears "
        "complete or not at all.",
    )
    f.add_argument("base", nargs="?", metavar="BASE", help="base model folder or Hub id")
    f.add_argument("adapters", nargs="*", metavar="ADAPTER", help="PEFT adapter directories or Hub ids")
    f.add_argument("--recipe", metavar="FILE", help="read the base, sources and options from a YAML recipe")
    f.add_argument("-o", "--output-dir", metavar="DIR", help="folder of the fused model (required unless --dry-run)")
    f.add_argument("-w", "--weights", nargs="+", metavar="W", help="one weight per adapter")
    f.add_argument(
        "-m",
        "--method",
        "--combination-type",
        dest="method",
        choices=COMBINATION_TYPES,
        metavar="METHOD",
        help="how several adapters are merged before fusing (default: cat, the exact weighted sum), one of: "
        + ", ".join(COMBINATION_TYPES),
    )
    f.add_argument("--stack", action="store_true", help="apply several adapters one after another")
    f.add_argument("--max-shard-size", metavar="SIZE", help="split the output into shards of at most SIZE (5GB)")
    f.add_argument("--dry-run", action="store_true", help="list what would change; write nothing")
    q = f.add_argument_group("quantized bases (bitsandbytes NF4/FP4/int8, FP8): --dtype writes them dequantized")
    q.add_argument("--keep-format", action="store_true", help="requantize the changed tensors to the base's format")
    q.add_argument(
        "--survival-threshold",
        type=float,
        metavar="F",
        help="warn about tensors keeping less than F of their update (default 0.5)",
    )
    q.add_argument("--reference-base", metavar="DIR", help="the 16-bit original, for the report (and --merge-base w16)")
    q.add_argument(
        "--merge-base", choices=("dequant", "w16"), help="add the update to the dequantized base (default) or to w16"
    )
    _add_merge_params(f)
    _shared(f, "dtype", dtype="dtype of every float tensor (default: the base's)")
    _shared(f, "revision")
    _shared(f, "overwrite", overwrite="replace an existing model folder")
    _shared(f, "json", "quiet")
    p.fuse_parser = f
    i = sub.add_parser(
        "inspect",
        epilog=_epilog("inspect"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="describe an adapter: ranks, alpha, scaling, targets, dtype, size",
        description="Describe a PEFT LoRA adapter (a directory or a Hub id).",
    )
    i.add_argument("adapter", metavar="ADAPTER", help="the adapter directory or Hub id (user/repo, user/repo@revision)")
    _shared(i, "revision", revision="Hub revision for a Hub id without @revision")
    _shared(i, "subfolder", subfolder="folder of the adapter inside the directory or repository")
    _shared(i, "json", json="print the description as JSON")
    p.export_parser = _add_export_parser(sub)
    return p


def _add_target(parser: argparse.ArgumentParser) -> None:
    """--target: write the adapter in a serving target's form directly (see `gomerge export --help`)."""
    parser.add_argument(
        "--target",
        choices=SERVING_TARGETS,
        metavar="TARGET",
        help="write the adapter in the form a server loads with the same numbers, one of: "
        f"{', '.join(SERVING_TARGETS)} "
        "(scales in lora_B, lora_alpha = r, one allowed rank, no patterns; --max-rank caps that rank, truncating "
        "exactly); see `gomerge export --help`",
    )


# The Python API's parameter names (which the engine's messages use) and the command line's flags that set them: the
# one mapping by which errors and warnings speak the command line's language.
FLAGS: dict[str, str] = {
    # every merge parameter of the engine's schema, by its name and its Python keyword (lambda_)
    **{p["name"]: flag(p["name"]) for p in _native.params()},
    **{merge.keyword(p["name"]): flag(p["name"]) for p in _native.params()},
    "combination_type": "--method",
    "weights": "--weights",
    "dtype": "--dtype",
    "adapter_name": "--adapter-name",
    "output_dir": "-o/--output-dir",
    "overwrite": "--overwrite",
    "allow_nonfinite": "--allow-nonfinite",
    "revision": "--revision",
    "subfolder": "--subfolder",
    "dry_run": "--dry-run",
    "stack": "--stack",
    "max_shard_size": "--max-shard-size",
    "rank": "--rank",
    "energy": "--energy",
    "modules_to_save": "--save-module",
    "save_modules": "--save-module",
    "drop_modules_to_save": "--drop-modules-to-save",
}
_NAMES = "|".join(sorted(map(re.escape, FLAGS), key=len, reverse=True))
# where a name is a parameter's: name=True / name=, a name with an underscore anywhere (no path around it), a name
# that starts the message, and the names after "does not take" and in "(it takes: a, b)"
_ASSIGNED = re.compile(rf"(?<![\w/.-])({_NAMES})=(True\b)?")
_UNDERSCORED = re.compile(rf"(?<![\w/.-])({'|'.join(n for n in FLAGS if '_' in n)})(?![\w/-])")
_LEADING = re.compile(rf"^({_NAMES})(?=[: ])")
_TAKES = re.compile(r"(does not take |\(it takes: )([\w, ]*)")


def cli_words(message: str) -> str:
    """An engine or API message in the command line's words: parameter names become flags (FLAGS), and the
    Python-only "or None" goes."""
    message = _ASSIGNED.sub(lambda m: FLAGS[m.group(1)], message)
    message = _LEADING.sub(lambda m: FLAGS[m.group(1)], message)
    message = _TAKES.sub(
        lambda m: m.group(1) + re.sub(r"\w+", lambda w: FLAGS.get(w.group(0), w.group(0)), m.group(2)), message
    )
    message = _UNDERSCORED.sub(lambda m: FLAGS[m.group(1)], message)
    return re.sub(r",? or None\b", "", message)


def _fail(message: str) -> int:
    sys.stderr.write(f"gomerge: error: {' '.join(str(message).split())}\n")
    return EXIT_FAILED


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings as one line, `gomerge: warning: <message>`, without Python's file name and source line."""
    sys.stderr.write(f"gomerge: warning: {' '.join(str(message).split())}\n")


def _require_output(options: dict[str, Any], parser: argparse.ArgumentParser, recipe: bool = True) -> None:
    """The one rule of every command that writes: -o/--output-dir (or the recipe's output_dir) is required; without
    it, a usage error (exit status 2)."""
    if not options.get("output_dir"):
        parser.error("give -o/--output-dir" + (" (or output_dir in the recipe)" if recipe else ""))


def _read_recipe(load: Callable[[str], Any], path: str) -> tuple[Any, int | None]:
    """`load(path)`, or None and the exit status of a missing or invalid recipe (reported on stderr)."""
    from .recipe import RecipeError

    try:
        return load(path), None
    except FileNotFoundError:
        return None, _fail(f"recipe {path}: no such file")
    except RecipeError as e:
        sys.stderr.write(f"gomerge: error: {e}\n")
        return None, EXIT_USAGE


def _merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options: dict = {}
    if args.recipe:
        from .recipe import load_recipe

        if args.adapters or args.weights:
            parser.error("give adapters either on the command line or in --recipe, not both")
        recipe, failed = _read_recipe(load_recipe, args.recipe)
        if failed is not None:
            return failed
        srcs, options = recipe.sources, dict(recipe.options)
    else:
        if not args.adapters:
            parser.error("name at least one ADAPTER, or give --recipe")
        weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
        if len(weights) != len(args.adapters):
            parser.error(f"--weights: got {len(weights)} weights for {len(args.adapters)} adapters")
        _check_weights(weights, parser)
        srcs = [{"source": a, "weight": w} for a, w in zip(args.adapters, weights)]
    options.update(_given_params(args))
    _override(options, args, "dtype", "output_dir", "adapter_name", "overwrite", combination_type="method")
    _require_output(options, parser)
    merging = {p["name"] for p in _native.params()} | {"combination_type"}
    with ExitStack() as stack:
        local = [
            sources.resolve(
                s["source"], stack, s.get("revision") or args.revision, s.get("subfolder") or args.subfolder
            )
            for s in srcs
        ]
        res, profile = _with_target(
            args,
            lambda output_dir, overwrite: merge._run(
                local,
                [s["source"] for s in srcs],
                [s["weight"] for s in srcs],
                {k: v for k, v in options.items() if k in merging and v is not None},
                adapter_name=options.get("adapter_name") or "merged",
                output_dir=output_dir,
                overwrite=overwrite,
                model_card=not args.no_model_card,
                allow_nonfinite=args.allow_nonfinite,
                dtype=options.get("dtype"),
                progress=False if args.quiet or args.json else None,
            ),
            options["output_dir"],
            options.get("overwrite"),
            options.get("max_rank"),
        )
    if args.to:
        return _print_exported(args, res)
    if args.json:
        print(json.dumps(_with_profile(res.__dict__, profile)))
    elif not args.quiet:
        seed = f", seed {res.seed}" if res.seed is not None else ""
        print(
            f"merged {_n(len(srcs), 'adapter')} ({res.combination_type}) into {res.output_dir}: rank {res.rank}, "
            f"{_n(res.modules, 'module')}, {res.dtype}{seed}, {res.seconds:.2f} s"
        )
        _print_profile(profile)
    return EXIT_OK


def _with_target(
    args: argparse.Namespace, run: Callable[[str, Any], Any], output_dir: str, overwrite: Any, max_rank: Any
) -> tuple[Any, Any]:
    """`run(output_dir, overwrite)`, or with --target, `run` into a temporary folder and that adapter exported in the
    target's form to `output_dir` (`--max-rank` caps its rank too); returns `run`'s result (its output_dir the
    final one) and the export's (or None). With --to FORMAT (gguf), `run` writes into a temporary folder that is
    exported as one file at `output_dir` (`_exported`; its result in args.exported)."""
    to = getattr(args, "to", None)  # extract has --target only
    if to and args.target:
        raise ValueError("give --to (a file format) or --target (a serving form), not both")
    if to:
        with _exported(args, output_dir, overwrite) as adapter_dir:
            return run(adapter_dir, False), None
    if not args.target:
        return run(output_dir, overwrite), None
    res, profile = write_for_target(
        lambda tmp: run(tmp, False),
        output_dir,
        args.target,
        max_rank=max_rank,
        overwrite=bool(overwrite),
        progress=False,
    )
    return res, profile


def _with_profile(result: dict[str, Any], profile: Any) -> dict[str, Any]:
    """A command's JSON result, with the --target export's under "target" (when there was one)."""
    return result if profile is None else {**result, "target": profile.__dict__}


def _print_profile(profile: Any) -> None:
    """The summary line of an export to a serving target (and its serving note)."""
    if profile is None:
        return
    worst = max((t["relative_error"] for t in profile.truncated.values()), default=0.0)
    trunc = f", {len(profile.truncated)} truncated (largest relative error {worst:.3g})" if profile.truncated else ""
    dropped = f", left out: {', '.join(profile.dropped)}" if profile.dropped else ""
    print(
        f"wrote the {profile.target} form to {profile.output_dir}: rank {profile.rank} (lora_alpha = r, scales in "
        f"lora_B), {_n(profile.modules, 'module')}, {profile.padded} zero-padded{trunc}{dropped}, {profile.dtype}"
    )
    if profile.note:
        print(f"  {profile.note}")


def _n(count: int, noun: str) -> str:
    """`count` and `noun`, plural unless it is 1: "1 adapter", "3 adapters"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _rank_arg(value: str) -> int | str:
    """--svd-rank: an integer, or a rule such as energy:0.99 (checked by the engine)."""
    return int(value) if value.strip().lstrip("-").isdigit() else value


def _resize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_output({"output_dir": args.output_dir}, parser, recipe=False)
    res, profile = _with_target(
        args,
        lambda output_dir, overwrite: merge.resize(
            args.adapter,
            rank=args.rank,
            energy=args.energy,
            max_rank=args.max_rank,
            output_dir=output_dir,
            overwrite=overwrite,
            dtype=args.dtype,
            progress=False if args.quiet or args.json else None,
        ),
        args.output_dir,
        args.overwrite,
        args.max_rank,
    )
    if args.to:
        return _print_exported(args, res)
    if args.json:
        print(json.dumps(_with_profile(res.__dict__, profile)))
    elif not args.quiet:
        ranks = sorted(res.module_ranks.values())
        worst = max(res.module_errors.values(), default=0.0)
        print(
            f"resized {args.adapter} into {res.output_dir}: {_n(res.modules, 'module')}, ranks {ranks[0]}-{ranks[-1]} "
            f"(r={res.rank}), largest relative error {worst:.3g}, {res.seconds:.2f} s"
        )
        _print_profile(profile)
    return EXIT_OK


def _extract(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.save_module and args.save_changed:
        parser.error("give --save-module or --save-changed, not both")
    options: dict[str, Any] = {}
    if args.recipe:
        from .recipe import load_extract_recipe

        if args.base or args.finetuned:
            parser.error("give the models either on the command line or in --recipe, not both")
        options, failed = _read_recipe(load_extract_recipe, args.recipe)
        if failed is not None:
            return failed
    elif not (args.base and args.finetuned):
        parser.error("name the BASE and FINETUNED model folders, or give --recipe")
    else:
        options = {"base": args.base, "finetuned": args.finetuned}
    # command-line options override the recipe's
    if args.rank is not None or args.energy is not None:
        options.pop("rank", None)
        options.pop("energy", None)
    _override(options, args, "output_dir", "rank", "energy", "max_rank", "seed", "dtype", "revision")
    if args.save_module or args.save_changed:
        options["modules_to_save"] = args.save_module or True
    if args.overwrite:
        options["overwrite"] = True
    if args.no_model_card:
        options["model_card"] = False
    _require_output(options, parser)
    if options.get("rank") is None and options.get("energy") is None:
        parser.error("give --rank or --energy (or rank / energy in the recipe)")
    if args.target and options.get("modules_to_save"):
        parser.error(
            f"--target {args.target}: no serving target loads modules_to_save; leave out --save-module / "
            "--save-changed (or save_modules in the recipe)"
        )
    res, profile = _with_target(
        args,
        lambda output_dir, overwrite: extract_adapter(
            options["base"],
            options["finetuned"],
            output_dir,
            rank=options.get("rank"),
            energy=options.get("energy"),
            max_rank=options.get("max_rank"),
            modules_to_save=options.get("modules_to_save", False),
            seed=options.get("seed", 0),
            dtype=options.get("dtype"),
            overwrite=overwrite,
            model_card=options.get("model_card", True),
            revision=options.get("revision"),
            progress=False if args.quiet or args.json else None,
        ),
        options["output_dir"],
        options.get("overwrite", False),
        options.get("max_rank"),
    )
    if args.json:
        print(json.dumps(_with_profile(res.__dict__, profile)))
    elif not args.quiet:
        ranks = sorted(res.module_ranks.values())
        worst = max(res.module_errors.values(), default=0.0)
        saved = f", {len(res.modules_to_save)} saved whole" if res.modules_to_save else ""
        print(
            f"extracted {_n(res.modules, 'module')} from {options['finetuned']} into {res.output_dir}: rank {res.rank} "
            f"(ranks {ranks[0]}-{ranks[-1]}), largest relative error {worst:.3g}, {len(res.unchanged)} unchanged "
            f"skipped{saved}, {res.seconds:.2f} s"
        )
        _print_profile(profile)
    return EXIT_OK


def _fuse(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options: dict[str, Any] = {}
    if args.recipe:
        from .recipe import load_recipe

        if args.base or args.adapters or args.weights:
            parser.error("give the base and adapters either on the command line or in --recipe, not both")
        recipe, failed = _read_recipe(lambda path: load_recipe(path, "fuse"), args.recipe)
        if failed is not None:
            return failed
        options = dict(recipe.options)
        srcs = recipe.sources
    else:
        if not args.base or not args.adapters:
            parser.error("name the BASE model and at least one ADAPTER, or give --recipe")
        srcs = [{"source": a} for a in args.adapters]
        if args.weights is not None:
            if len(args.weights) != len(args.adapters):
                parser.error(f"--weights: got {len(args.weights)} weights for {len(args.adapters)} adapters")
            _check_weights(args.weights, parser)
            for s, w in zip(srcs, args.weights):
                s["weight"] = w
        options["base"] = args.base
    options.update(_given_params(args))
    _override(
        options,
        args,
        "output_dir",
        "dtype",
        "max_shard_size",
        "survival_threshold",
        "reference_base",
        "merge_base",
        combination_type="method",
    )
    for key in ("stack", "dry_run", "overwrite", "keep_format"):
        if getattr(args, key):
            options[key] = True
    if not options.get("dry_run"):
        _require_output(options, parser)
    weights = [s.get("weight", 1.0) for s in srcs] if any("weight" in s for s in srcs) else None
    base = options.pop("base")
    options = {merge.keyword(k): v for k, v in options.items()}  # the recipe's and the flags' names: fuse's keywords
    with ExitStack() as stack:
        local = [
            sources.resolve(s["source"], stack, s.get("revision") or args.revision, s.get("subfolder")) for s in srcs
        ]
        res = fuse_models(
            base,
            local,
            weights=weights,
            progress=False if args.quiet or args.json else None,
            revision=args.revision,
            **options,
        )
    if args.json:
        print(json.dumps(res.__dict__))
    elif not args.quiet:
        if res.dry_run:
            for c in res.changed:
                print(f"{c['tensor']} {c['shape']} {c['dtype']}: {', '.join(c['ops'])} ({', '.join(c['adapters'])})")
            print(f"dry run: {len(res.changed)} of {res.tensors} tensors would change; nothing was written")
        if res.quantized:
            for t in res.quantized["tensors"]:
                print(f"{t['tensor']}: survival {t['survival']:.4g}, residual {t['residual']:.4g}")
        else:
            print(
                f"fused {_n(len(res.adapters), 'adapter')} into {res.output_dir}: {len(res.changed)} of "
                f"{_n(res.tensors, 'tensor')} changed, {_n(len(res.shards), 'shard')}, "
                f"{res.total_size / 2**20:.1f} MiB, {res.seconds:.2f} s"
            )
    return EXIT_OK


# --- export: `gomerge export ADAPTER --to FORMAT -o OUT`, and `--to FORMAT` on merge and resize (one step) ---


def _add_export_parser(sub: Any) -> argparse.ArgumentParser:
    """`gomerge export ADAPTER --to FORMAT -o OUT`: a GGUF file for llama.cpp, or a serving target's form."""
    x = sub.add_parser(
        "export",
        epilog=_epilog("export"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="export an adapter for a runtime or server (GGUF for llama.cpp / ollama; vLLM, SGLang, LoRAX, portable)",
        description="Export a PEFT LoRA adapter in the form a runtime loads, with PEFT's numbers: every module's scale "
        "(alpha/r, alpha/sqrt(r) with rsLoRA, rank_pattern / alpha_pattern applied) is multiplied into B. "
        "--to gguf writes one GGUF LoRA adapter file for llama.cpp, ollama and llama-cpp-python "
        "(adapter.lora.alpha = 0), reading only the base's config.json, without torch. --to vllm|sglang|lorax|portable "
        "writes a PEFT directory with lora_alpha = r, no rank_pattern / alpha_pattern, and one rank the target "
        "allows (smaller modules zero-padded: exact); --max-rank truncates instead, by an exact SVD, and reports each "
        "module's error. Ranks: vllm 1, 8, 16, 32, 64, 128, 256, 320, 512; sglang any; lorax 8 or a multiple of 16; "
        "portable (loads on all three) 8, 16, 32, 64, 128, 256, 320, 512. DoRA and LoRA biases are refused (fuse "
        "them); modules_to_save are refused unless --drop-modules-to-save. The output appears complete or not at all.",
    )
    x.add_argument("adapter", metavar="ADAPTER", help="the adapter directory or Hub id")
    x.add_argument(
        "--to",
        required=True,
        choices=tuple(exporting.EXPORTERS),
        metavar="FORMAT",
        help="one of: " + ", ".join(exporting.EXPORTERS),
    )
    x.add_argument(
        "-o",
        "--output",
        "--output-dir",
        dest="output_dir",
        metavar="OUT",
        help="the file (gguf) or directory (serving targets) to write (required)",
    )
    _add_format_flags(x)
    x.add_argument(
        "--max-rank",
        type=int,
        metavar="M",
        help="serving targets: cap of the written rank (truncate larger modules exactly)",
    )
    x.add_argument(
        "--drop-modules-to-save",
        action="store_true",
        help="leave modules_to_save out (no target loads them; for --to gguf, the same as --drop modules_to_save)",
    )
    x.add_argument(
        "--dtype",
        help="dtype of the written tensors (default: the adapter's): float32, bfloat16, float16; --to gguf also "
        + ", ".join(exporting.GGUF_DTYPES),
    )
    _shared(x, "revision", "subfolder")
    _shared(x, "overwrite", overwrite="replace an existing output (only one of that format)")
    _shared(x, "json", "quiet")
    return x


def _add_to_flags(parser: argparse.ArgumentParser) -> None:
    """--to FORMAT on a command that writes an adapter: -o is then the exported file."""
    parser.add_argument(
        "--to",
        choices=tuple(EXPORT_FORMATS),
        help="write the result in this file format at -o instead of a PEFT directory (as `gomerge export` does; the "
        "tensors' dtype is --dtype's; for a serving form, --target)",
    )
    _add_format_flags(parser)


def _add_format_flags(parser: argparse.ArgumentParser) -> None:
    """The GGUF format's own flags."""
    parser.add_argument(
        "--base",
        dest="gguf_base",
        metavar="BASE",
        help="--to gguf: the base model's folder, its config.json or a Hub "
        "id (only config.json is read); default: the adapter's base_model_name_or_path",
    )
    parser.add_argument(
        "--drop",
        action="append",
        choices=exporting.GGUF_DROP,
        help="--to gguf: leave out what llama.cpp cannot represent instead of failing (listed in the output): "
        "modules_to_save (full tensors), lora_bias, lm_head (a LoRA of lm_head on a base with tied embeddings); repeat "
        "for several",
    )


def _gguf_options(args: argparse.Namespace, dtype: str | None) -> dict[str, Any]:
    return {"base": args.gguf_base, "dtype": dtype, "drop": args.drop or []}


def _gguf_summary(res: Any) -> str:
    ranks = ", ".join(f"r={k}: {v}" for k, v in sorted(res.ranks.items(), key=lambda kv: int(kv[0])))
    lines = [
        f"wrote {res.output}: GGUF LoRA adapter for llama.cpp's {res.architecture}, {_n(res.modules, 'module')} "
        f"({ranks}), {res.dtype}, {res.size / 2**20:.1f} MiB, {res.seconds:.2f} s"
    ]
    lines += [f"dropped: {d}" for d in res.dropped]
    if res.f16_fallback:
        lines.append(f"{_n(len(res.f16_fallback), 'tensor')} written as f16 (rows not a multiple of 32 for q8_0)")
    return "\n".join(lines)


# --to FORMAT: the format's keywords from the parsed arguments (and the dtype to write), and its summary line(s).
# Other formats add their row.
EXPORT_FORMATS: dict[str, tuple[Callable[[argparse.Namespace, str | None], dict[str, Any]], Callable[[Any], str]]] = {
    "gguf": (_gguf_options, _gguf_summary),
}
# merge's and resize's --dtype (torch names) as the GGUF tensor types
_GGUF_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`gomerge export ADAPTER --to FORMAT -o OUT`: a format of EXPORT_FORMATS (gguf), or a serving target."""
    _require_output({"output_dir": args.output_dir}, parser, recipe=False)
    if args.to not in EXPORT_FORMATS:
        if args.gguf_base or args.drop:
            parser.error(f"--base and --drop are options of --to gguf, not of --to {args.to}")
        return _export_profile(args, parser)
    if args.max_rank is not None:
        parser.error("--max-rank is an option of the serving targets, not of --to gguf (resize the adapter first)")
    if args.drop_modules_to_save:
        args.drop = sorted(set(args.drop or []) | {"modules_to_save"})
    options, summary = EXPORT_FORMATS[args.to]
    res = exporting.export(
        args.adapter,
        args.to,
        args.output_dir,
        revision=args.revision,
        subfolder=args.subfolder,
        overwrite=bool(args.overwrite),
        progress=False if args.quiet or args.json else None,
        **options(args, _GGUF_DTYPE.get(args.dtype or "", args.dtype)),
    )
    if args.json:
        print(json.dumps(res.__dict__))
    elif not args.quiet:
        print(summary(res))
    return EXIT_OK


@contextmanager
def _exported(args: argparse.Namespace, output: str, overwrite: bool | None) -> Any:
    """With --to FORMAT, yields a folder for the adapter inside a temporary folder beside `output` and, when the
    command succeeded, exports it to `output` (result in args.exported); the folder is removed either way. Without
    --to, yields `output` itself."""
    if not args.to:
        yield output
        return
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    # the engine's temporary-folder prefix: a killed run's folder is removed by the next writer there
    tmp = tempfile.mkdtemp(prefix=f".gomerge-tmp-{os.getpid()}-export-", dir=parent)
    try:
        yield os.path.join(tmp, "adapter")
        options, _ = EXPORT_FORMATS[args.to]
        args.exported = exporting.export(
            os.path.join(tmp, "adapter"),
            args.to,
            output,
            overwrite=bool(overwrite),
            progress=False,
            **options(args, _GGUF_DTYPE.get(args.dtype or "")),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_exported(args: argparse.Namespace, res: Any) -> int:
    """The result of a command run with --to: the command's and the export's, or the export's summary."""
    if args.json:
        print(json.dumps({**res.__dict__, "output_dir": args.exported.output, "export": args.exported.__dict__}))
    elif not args.quiet:
        print(EXPORT_FORMATS[args.to][1](args.exported))
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        path = sources.resolve(args.adapter, stack, args.revision, args.subfolder)
        info = merge.inspect_adapter(path)
        info["serving"] = _native.serving_check(path)
        size = sum(
            os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))
        )
    info["dir"] = args.adapter
    info["size_bytes"] = size
    r, alpha = info["r"], info["lora_alpha"]
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    targets = info["target_modules"]
    ranks = ", ".join(f"r={k}: {v} modules" for k, v in sorted(info["ranks"].items(), key=lambda kv: int(kv[0])))
    lines = [
        f"adapter        {args.adapter}",
        f"base model     {info['base_model'] or '(not recorded)'}",
        f"rank           r={r} ({ranks})",
        f"alpha          {alpha:g}{' (rsLoRA)' if info['use_rslora'] else ''}",
        f"scaling        {info['scaling']:g}",
        f"target modules {targets if isinstance(targets, str) else ', '.join(targets)}",
        f"modules        {info['modules']}",
        f"dtype          {info['dtype']}",
        f"parameters     {info['parameters']:,}",
        f"size           {size / 2**20:.1f} MiB",
    ]
    if info["use_dora"] or info["lora_bias"]:
        kinds = " and ".join(k for k, on in (("DoRA", info["use_dora"]), ("lora_bias", info["lora_bias"])) if on)
        lines.append(f"variant        {kinds} (merges refuse it; gomerge fuse applies it)")
    if info.get("target_parameters"):
        experts = sorted(set(info["experts"].values()))
        lines.insert(
            6,
            f"target params  {', '.join(sorted(info['target_parameters']))} ({'/'.join(map(str, experts))} "
            "experts; ranks are per expert)",
        )
    if info["extra_tensors"]:
        lines.append(f"other tensors  {len(info['extra_tensors'])} (not LoRA factors; left out of merges)")
    lines += _serving_lines(info["serving"])
    print("\n".join(lines))
    return EXIT_OK


def _serving_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """`gomerge inspect`'s serving section: per target, whether the adapter loads as it is, and if not, why."""
    lines = ["serving (loads as it is, with PEFT's numbers?)"]
    for v in verdicts:
        if v["loads"]:
            lines.append(f"  {v['target']:<9} yes" + (f"; {v['note']}" if v["note"] else ""))
            continue
        fix = (
            f"gomerge export --to {v['target']} writes a form that loads"
            if v["fixable"]
            else "no export gives a form that loads"
        )
        lines.append(f"  {v['target']:<9} no ({fix})")
        lines += [f"    - {reason}" for reason in v["reasons"]]
    return lines


def _export_profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`gomerge export ADAPTER --to vllm|sglang|lorax|portable -o OUT`."""
    res = export_profile(
        args.adapter,
        args.to,
        args.output_dir,
        max_rank=args.max_rank,
        drop_modules_to_save=args.drop_modules_to_save,
        dtype=args.dtype,
        overwrite=bool(args.overwrite),
        revision=args.revision,
        subfolder=args.subfolder,
        progress=False if args.quiet or args.json else None,
    )
    if args.json:
        print(json.dumps(res.__dict__))
    elif not args.quiet:
        _print_profile(res)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    info = _native.kernel_info()
    if "error" in info:
        return _kernels_unusable(info)
    # with a recipe, messages keep the parameter names: they are the recipe's keys
    words = (lambda m: m) if getattr(args, "recipe", None) else cli_words
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **kw: _show_warning(words(str(message)), *rest, **kw)
        try:
            if args.command == "merge":
                return _merge(args, parser.merge_parser)
            if args.command == "resize":
                return _resize(args, parser.resize_parser)
            if args.command == "extract":
                return _extract(args, parser.extract_parser)
            if args.command == "export":
                return _export(args, parser.export_parser)
            if args.command == "fuse":
                return _fuse(args, parser.fuse_parser)
            return _inspect(args)
        except KeyboardInterrupt:
            sys.stderr.write("gomerge: interrupted; nothing was written\n")
            return EXIT_INTERRUPTED
        except (ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
            return _fail(words(str(e)))
