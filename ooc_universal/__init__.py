"""ooc-universal: out-of-core search for universal neurons in GPT-2 models.

Data flow (one module per arrow): tokens -> extract -> reduce ->
universal / persistence / ablate -> report.
"""
__version__ = "0.1.0"

from ooc_universal.api import Run, open_run  # noqa: E402  (the notebook API)

__all__ = ["Run", "open_run", "__version__"]
