"""Test set-up: pick the device and the grid size before hf_flash (and so Triton) is imported.

On a machine without CUDA the kernels run under Triton's interpreter, which must be chosen before
the kernels are defined. GPU-only tests carry the `gpu` marker; `slow` ones need HF_FLASH_SLOW=1.
"""

import os
import sys
from pathlib import Path

# The repository's top-level kernels/ folder (installed as hf_flash.kernels) would shadow the
# `kernels` package that transformers imports (a dependency of transformers >= 5.25) wherever
# the repository root is on sys.path, as `python -m pytest` run from it puts it. Take the root off
# the path, for this process and (PYTHONSAFEPATH, Python >= 3.11) the processes the tests start.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ.setdefault("PYTHONSAFEPATH", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# The GPU grid is larger: longer sequences, every dtype, more head dims.
GPU_GRID = HAS_CUDA


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow; set HF_FLASH_SLOW=1")
    slow_ok = os.environ.get("HF_FLASH_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(skip_slow)


@pytest.fixture
def device():
    return DEVICE


def strict_constant_results() -> None:
    """Make this process's dynamo hold functions marked assume_constant_result to torch 2.11's
    rule: their arguments must be tensors or Python constants (a class, a string, a number).
    torch 2.13 also passes other objects (a model's config, a module) by identity, so code that
    compiles here could fail under 2.11 with "... is not a constant" unless a test checks."""
    if torch.__version__ < "2.13":
        return  # the rule is dynamo's own here
    from torch._dynamo.variables import functions
    from torch._dynamo.variables.user_defined import UserDefinedObjectVariable

    call = functions.invoke_and_store_as_constant

    def strict(tx, fn, name, args, kwargs):
        for arg in [*args, *kwargs.values()]:
            if isinstance(arg, UserDefinedObjectVariable) or (
                    not arg.is_tensor() and not arg.is_python_constant()):
                raise AssertionError(f"{name} takes {arg}, which torch 2.11 cannot pass to an "
                                     f"assume_constant_result function")
        return call(tx, fn, name, args, kwargs)

    functions.invoke_and_store_as_constant = strict


def run_fresh(code: str, timeout: int = 600, fails: bool = False, env: dict = None) -> str:
    """Run `code` in a new Python process (same environment, tests/ importable); return stdout,
    or with fails=True assert that it fails and return its stderr. `env`: variables to set in
    its environment (None: unset).

    torch.compile tests run this way: dynamo and the custom-op registry are process-wide, and a
    compile test should see what a user's fresh process sees, not what earlier tests left behind.
    So do tests of device-side assertions, which leave their process's CUDA context unusable.
    """
    import subprocess
    import sys
    changes, env = env or {}, dict(os.environ)
    env.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:  # None: unset it
        env.pop(k, None)
    here = os.path.dirname(os.path.abspath(__file__))
    # No empty entry: Python reads one as the current folder, which from the repository root
    # would put its kernels/ folder ahead of the 'kernels' package transformers imports.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [here, env.get("PYTHONPATH", "")] if p)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if fails:
        assert res.returncode != 0, res.stdout[-4000:]
        return res.stderr
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout
