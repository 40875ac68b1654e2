# Loaded by the guide test's subprocesses (on PYTHONPATH): reports at exit whether gomerge's patch was active.
import atexit
import sys


@atexit.register
def _report() -> None:
    peft_module = sys.modules.get("gomerge.peft")
    print(f"gomerge-patched: {bool(peft_module and peft_module.is_patched())}", file=sys.stderr)
