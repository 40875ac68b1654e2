"""The built-in example (`make run`): merge three small LoRA adapters with gomerge and say what happened."""

from __future__ import annotations

import os
import sys

import gomerge

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from example_adapters import write_all  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def main() -> None:
    adapters = write_all(os.path.join(OUT, "adapters"))
    print(f"gomerge {gomerge.__version__} (engine {gomerge.engine_version()}, kernels {gomerge.engine_kernels()})")
    for path in adapters:
        info = gomerge.inspect_adapter(path)
        print(
            f"  input  {os.path.relpath(path)}: r={info['r']} alpha={info['lora_alpha']:g} "
            f"{info['modules']} modules, {info['parameters']:,} parameters, {info['dtype']}"
        )
    for combination_type, kwargs in (("svd", {}), ("cat", {}), ("linear", {}), ("ties", {"density": 0.2})):
        # linear and ties need equal ranks (they are 8, 8, 8); cat gives rank 24; svd truncates back to rank 8
        res = gomerge.add_weighted_adapter(
            adapters,
            [2.0, 1.0, 1.0],
            f"merged-{combination_type}",
            combination_type,
            output_dir=os.path.join(OUT, f"merged-{combination_type}"),
            overwrite=True,
            **kwargs,
        )
        print(
            f"  {combination_type:6s} -> {os.path.relpath(res.output_dir)}: rank {res.rank}, "
            f"{res.modules} modules, {res.dtype}, {res.seconds * 1000:.1f} ms"
        )
    print("Load a result with PEFT: PeftModel.from_pretrained(base_model, 'examples/out/merged-ties')")
    print("Or from a shell: gomerge merge ADAPTER... --weights 2 1 1 --method ties --density 0.2 -o OUT")


if __name__ == "__main__":
    main()
