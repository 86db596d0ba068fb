"""ooc-universal: out-of-core search for universal neurons in GPT-2 models.

Data flow (one module per arrow): tokens -> extract -> reduce ->
universal / persistence / ablate -> report.
"""
__version__ = "0.1.0"
