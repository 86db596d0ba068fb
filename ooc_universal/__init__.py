"""ooc-universal: out-of-core search for universal neurons in GPT-2 models.

Data flow (one module per arrow): tokens -> extract -> reduce ->
universal / persistence / ablate -> report.
"""
import importlib
import importlib.machinery
import os
import sys

__version__ = "0.1.0"


def _unshadow_hf_kernels():
    """Keep a source checkout's ``kernels/`` folder from hiding Hugging Face's ``kernels``.

    Our kernels are imported as ``ooc_universal.kernels``, but when the checkout's root is
    on ``sys.path`` (``python -m pytest`` or ``python -m ooc_universal`` run from it) the
    folder is also importable as a top-level ``kernels`` and shadows the HF package of that
    name, which transformers >= 5.25 requires and imports (``from kernels import
    CUDAProperties``). Where that happens, import HF's package first, from the path with
    the checkout left out, so ``sys.modules["kernels"]`` is HF's for everyone after.
    """
    if "kernels" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("kernels")
    if spec is None or not spec.origin:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    if not (os.path.isfile(os.path.join(root, "setup.cfg"))
            and os.path.isdir(os.path.join(root, "ooc_universal"))):
        return  # the top-level `kernels` is someone else's: nothing of ours in the way

    def _is_root(entry):
        return os.path.abspath(entry or os.curdir) == root

    others = [entry for entry in sys.path if not _is_root(entry)]
    if importlib.machinery.PathFinder.find_spec("kernels", others) is None:
        return  # HF's package is not installed: transformers will not ask for it
    saved = sys.path[:]
    sys.path[:] = others
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # a broken HF install: transformers will say so in its own words
    finally:
        sys.path[:] = saved


_unshadow_hf_kernels()

from ooc_universal.api import Run, open_run  # noqa: E402  (the notebook API)

__all__ = ["Run", "open_run", "__version__"]
