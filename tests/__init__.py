# Importing the package first un-shadows Hugging Face's `kernels` (see ooc_universal/__init__.py),
# which transformers imports and our checkout's `kernels/` folder would otherwise hide.
import ooc_universal  # noqa: F401
