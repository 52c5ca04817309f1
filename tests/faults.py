"""Fault injection for the reliability tests: run a genzoo script exactly as `python script.py args` would, but
SIGKILL the process at the n-th call of one function, e.g. inside a checkpoint write (utils.ckpt:save_file,
utils.ckpt:_fsync), between two renames (os:replace) or at a training step (utils.optim:step_optimizer).

    python -m tests.faults utils.ckpt:save_file 3 gan_mnist.py --n_steps 12 ...

The function is replaced before the script is imported, so the script's own `from ... import name` picks up the
armed version. SIGKILL is what a preempted job, the OOM killer or a power cut does: no handler, no cleanup.
"""

import importlib
import os
import runpy
import signal
import sys


def arm(target: str, n: int) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), 0

    def armed(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, armed)


if __name__ == "__main__":
    target, n, script, *argv = sys.argv[1:]
    arm(target, int(n))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
