"""The Hugging Face hub as extract meets it: how much a model spec would download, and
transformers' weight-loading bars off without touching the hub's download bars.

`download_size(repo_id, revision)` asks the hub for the weight files of one revision
(HfApi().model_info(..., files_metadata=True)) and sums the sizes of those not yet in the
local HF cache (huggingface_hub.try_to_load_from_cache). It returns None when nothing
needs downloading, when the hub is not to be asked (HF_HUB_OFFLINE) or cannot be reached:
the size is information, never a reason to fail.

Which files are the weights is transformers' own choice: the safetensors files when the
revision has any (one file, or the shards an index names), else the PyTorch .bin files.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

SAFETENSORS, PYTORCH = "model.safetensors", "pytorch_model.bin"


@dataclass(frozen=True)
class Download:
    """What a revision still needs: its weight files not in the cache and their bytes."""
    repo_id: str
    revision: str | None
    files: tuple[str, ...]
    n_bytes: int

    def message(self, label: str) -> str:
        return (f"downloading {self.n_bytes / 1e9:.2f} GB for {label} "
                f"({len(self.files)} weight file(s) of {self.repo_id}"
                f"{'@' + self.revision if self.revision else ''})")


def weight_files(names) -> list[str]:
    """The files of a revision's listing that from_pretrained loads as weights."""
    names = list(names)
    top = [n for n in names if "/" not in n]
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    if safetensors:
        return safetensors
    return sorted(n for n in top if n.startswith("pytorch_model") and n.endswith(".bin"))


def _cached(repo_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return isinstance(found, str)


def cached_weights(repo_id: str, revision: str | None) -> bool:
    """Whether the cache holds the revision's single weight file; asks no server.
    (Sharded weights are checked file by file against the hub's listing.)"""
    return any(_cached(repo_id, name, revision) for name in (SAFETENSORS, PYTORCH))


def download_size(repo_id: str, revision: str | None = None, api=None) -> Download | None:
    """The weight files of `repo_id`@`revision` that a load would download and their
    total size; None when they are cached, the hub is offline or unreachable, or the
    listing has no sizes. `api`: an HfApi (the tests pass a stand-in)."""
    from huggingface_hub import constants
    if cached_weights(repo_id, revision) or constants.HF_HUB_OFFLINE:
        return None
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # noqa: BLE001 - no network, no repo, gated: the load says why
        return None
    sizes = {s.rfilename: s.size for s in (getattr(info, "siblings", None) or [])}
    missing = [n for n in weight_files(sizes) if not _cached(repo_id, n, revision)]
    if not missing or any(sizes[n] is None for n in missing):
        return None
    return Download(repo_id, revision, tuple(missing), int(sum(sizes[n] for n in missing)))


def spec_download(spec, api=None) -> Download | None:
    """download_size of a models.ModelSpec; None for a local directory."""
    if getattr(spec, "repo_id", None) is None:
        return None
    return download_size(spec.repo_id, spec.revision, api=api)


@contextlib.contextmanager
def no_weight_loading_bar():
    """transformers' per-checkpoint "Loading weights" bar off for the block; the hub's
    download bars stay as they were. (transformers' disable_progress_bar() also turns
    off every huggingface_hub bar, so the hub's state is put back at once, and both are
    restored on the way out.)"""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging
    ours_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not hub_was_off:
        hub_utils.enable_progress_bars()
    try:
        yield
    finally:
        if ours_was_on:
            hf_logging.enable_progress_bar()      # turns the hub's on as well
        if hub_was_off and not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
