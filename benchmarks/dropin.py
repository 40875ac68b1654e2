"""S1's drop-in columns: the skeleton drop-in (the floor of any `add_weighted_adapter` on a live model) and the
drop-in's targets.

The skeleton drop-in is PEFT's own creation of the new adapter (its checks, the new config, `inject_adapter`, which
also draws the new factors' initial values, and `_freeze_adapter`) plus one write of each of the new adapter's
factors, copied from the sources' factors with no arithmetic (numpy copies: one thread, no torch dispatch). Any
drop-in pays at least that: PEFT's call does it and then its arithmetic, gomerge's patched call does it and then
hands the factors' addresses to Go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from peft.tuners.lora import LoraLayer
from peft.utils import _freeze_adapter

# the targets for the patched call on S1
DROPIN_VS_PEFT = 5.0  # at least this many times faster than PEFT's own call
DROPIN_VS_SKELETON = 1.3  # at most this many times the skeleton drop-in


def skeleton_add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    **_ignored,
) -> None:
    """The skeleton drop-in on a PeftModel of LoRA Linear layers: PEFT's creation of the adapter `adapter_name`,
    then its factors written once from the sources' (the first sources' rows of A and columns of B, as many as the
    new rank holds; zeros beyond). `weights` and the combination's other arguments are not used: no arithmetic."""
    self = model.base_model
    if adapter_name in self.peft_config:
        return
    adapters = list(adapters)
    combination_type, new_rank, new_target_modules = self._check_add_weighted_adapter(
        adapters=adapters, combination_type=combination_type, svd_rank=svd_rank
    )
    self.peft_config[adapter_name] = replace(
        self.peft_config[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_target_modules,
        alpha_pattern={},
        rank_pattern={},
    )
    self.inject_adapter(self.model, adapter_name)
    _freeze_adapter(self.model, adapter_name)
    for key, target in self.model.named_modules():
        if self.prefix in key or not isinstance(target, LoraLayer) or adapter_name not in target.lora_A:
            continue
        ta = target.lora_A[adapter_name].weight.detach().numpy()
        tb = target.lora_B[adapter_name].weight.detach().numpy()
        row = 0
        for name in adapters:
            if name not in target.lora_A or row >= ta.shape[0]:
                continue
            a = target.lora_A[name].weight.detach().numpy()
            b = target.lora_B[name].weight.detach().numpy()
            n = min(a.shape[0], ta.shape[0] - row)
            ta[row : row + n] = a[:n]
            tb[:, row : row + n] = b[:, :n]
            row += n
        ta[row:] = 0
        tb[:, row:] = 0


def targets(rows: list, add, fmt) -> None:
    """The drop-in's targets on S1's rows that have the patched and skeleton columns: `add(name, measured, ok,
    why)` records one, `fmt` formats seconds. Where even the skeleton is not 5x faster than PEFT's call, the 5x
    target is out of reach for any drop-in on this machine, and the line says so with the numbers."""
    for r in rows:
        if r["scenario"] != "S1" or not r.get("patched") or not r.get("skeleton_dropin") or not r.get("peft"):
            continue
        peft, patched, skel = r["peft"], r["patched"], r["skeleton_dropin"]
        est = " (PEFT est.)" if "est." in r.get("note", "") else ""
        why = ""
        if peft < DROPIN_VS_PEFT * skel:
            why = (
                f"the skeleton drop-in alone takes {fmt(skel)}, PEFT's call {fmt(peft)}: "
                f"at most {peft / skel:.1f}x is possible here"
            )
        add(
            f"S1 {r['method']} patched call >= {DROPIN_VS_PEFT:.0f}x PEFT call{est}",
            f"{peft / patched:.1f}x",
            peft >= DROPIN_VS_PEFT * patched,
            why,
        )
        add(
            f"S1 {r['method']} patched call within {DROPIN_VS_SKELETON}x of the skeleton drop-in",
            f"{patched / skel:.2f}x ({fmt(patched)} vs {fmt(skel)}; gomerge disk to disk {fmt(r['gomerge'])})",
            patched <= DROPIN_VS_SKELETON * skel,
        )


def in_process_target(r: dict, add, fmt) -> None:
    """S1 ties in process >= 20x PEFT's call, on the default kernel set. The in-process merge is timed twice, right
    after S1's setup and again after the kernel sets' child processes (`gomerge_late`): the target takes the better,
    and the line shows both, so that a gap between them (the machine's state, not the process) is visible."""
    late = r.get("gomerge_late")
    best = min(r["gomerge"], late) if late else r["gomerge"]
    detail = f" (first {fmt(r['gomerge'])}, after the children {fmt(late)})" if late else ""
    add("S1 ties in process >= 20x PEFT call", f"{r['peft'] / best:.1f}x{detail}", r["peft"] >= 20 * best)
