"""`ooc-universal extract`: forward passes -> one activation store per model."""
from __future__ import annotations

import click

from ooc_universal.cli.options import (device_option, echo_json, json_option,
                                       progress_option, run_dir_option, stdout_to_stderr)
from ooc_universal.config import ComputeConfig, ExtractConfig, validated
from ooc_universal.formats.store import parse_compression
from ooc_universal.models import check_same_family, unique_labels
from ooc_universal.rundir import human_bytes
from ooc_universal.steps.extract import DTYPES
from ooc_universal.steps.extract import extract as extract_store

SETTINGS, COMPUTE = ExtractConfig(), ComputeConfig()


@click.command("extract")
@run_dir_option("holds tokens/ (from `ooc-universal tokens`); the stores go to "
                "RUN/stores/<label>.h5.")
@click.argument("models", nargs=-1, required=True)
@click.option("--memory", default=COMPUTE.memory, show_default=True,
              help="RAM budget for this process (e.g. 16GB, 512MB); sets the batch size.")
@device_option(COMPUTE.device)
@click.option("--dtype", type=click.Choice(DTYPES), default=DTYPES[0], show_default=True,
              help="Compute dtype of the forward pass (bfloat16: faster on GPUs and AVX-512 "
                   "BF16 CPUs, less exact); activations are stored as float16 either way.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Windows per forward pass (default: the most that fit in --memory).")
@click.option("--compression", default=SETTINGS.compression, show_default=True,
              help="none | gzip | gzip:0-9 | lzf. Compressed stores are smaller but cannot "
                   "be memory-mapped, so the reduce reads them more slowly.")
@click.option("--block-tokens", type=click.IntRange(min=1), default=None,
              help="Token rows per store chunk (default: about 32 MB per chunk, a multiple "
                   "of 64); the reduce reads whole chunks.")
@click.option("--checkpoint-pattern", default=None,
              help="How the models' local checkpoint folders are named, {step} marking the "
                   "step (e.g. 'ckpt_{step}' or '{step}/hf'); default: checkpoint-N, ckpt-N, "
                   "step-N or stepN. A MODEL may carry its own: DIR/ckpt_{step}@N.")
@click.option("--allow-mixed-families", is_flag=True,
              help="Accept models of different families (GPT-2, GPT-NeoX, ...) in one command; "
                   "their neurons are not comparable layer by layer.")
@progress_option()
@json_option("one record per store (path, status, tokens, speed) and the download sizes")
def extract(run_dir, models, memory, device, dtype, batch_size, compression, block_tokens,
            checkpoint_pattern, allow_mixed_families, progress, as_json):
    """Store each MODEL's MLP neurons (the input of every layer's MLP output projection:
    post-GELU in GPT-2 and Pythia, act(gate) * up in OLMo and Llama) at the token set's
    valid positions.

    MODEL is a spec: a letter a..e (the stanford-crfm GPT-2 small runs) with an optional
    @STEP (a@100000 = checkpoint-100000), a hub id org/name[@rev] (@STEP maps to the
    family's revision: EleutherAI/pythia-160m@143000 = step143000), or a local
    save_pretrained directory[@N]. Models whose labels collide (runs/s1/model@100,
    runs/s2/model@100) get labels from their paths (s1--model@100, s2--model@100).

    Each store is RUN/stores/<label>.h5: one float16 dataset "acts" with one row per
    valid token position (BOS, padding and newlines dropped), in token-set order, and one
    column per neuron, flat index = layer * d_mlp + neuron. The forward pass stops before
    the LM head. Disk needed is checked before any work.

    Resumable: a killed run leaves <label>.h5.partial and a ledger; the same command
    finishes only the missing blocks. A complete store is skipped; a store made from
    another token set or model is refused, never appended to.

    Before a hub model downloads, the size of its weight files still to fetch is
    printed ("downloading 0.50 GB for a@100000 ..."); the hub's own download bars show
    as the hub draws them.

    \b
    Examples:
      ooc-universal extract --run-dir runs/demo a@100000 b@100000
      ooc-universal extract -R runs/p EleutherAI/pythia-160m@143000 --device cuda:0
      ooc-universal extract -R runs/z my-zoo/tiny-a@4500 --memory 4GB --json
    """
    parse_compression(compression)  # the store's own one-line message for a typo
    settings = validated(ExtractConfig, {"compression": compression,
                                         "batch_size": batch_size or SETTINGS.batch_size},
                         "extract options")
    compute = validated(ComputeConfig, {"device": device, "memory": memory}, "extract options")
    specs = unique_labels(models, checkpoint_pattern)
    check_same_family(specs, allow_mixed=allow_mixed_families)
    records = []
    for spec in specs:
        download = _download_of(run_dir, spec)
        if download is not None:
            click.echo(download.message(spec.label), err=as_json)
        stats = {}
        with stdout_to_stderr(as_json):
            path = extract_store(run_dir, spec, settings, compute, dtype=dtype,
                                 block_tokens=block_tokens, progress=progress, stats=stats)
        records.append(_record(spec, path, stats, download))
        if not as_json:
            click.echo(_summary(path, stats))
    if as_json:
        echo_json({"stores": records})


def _download_of(run_dir, spec):
    """What extracting `spec` would download (hub.spec_download); None when its store is
    complete already (nothing is loaded then) or nothing needs downloading."""
    from pathlib import Path

    from ooc_universal.formats.store import StorePaths
    from ooc_universal.hub import spec_download
    if StorePaths.of(Path(run_dir) / "stores", spec.label).final.is_file():
        return None
    return spec_download(spec)


def _record(spec, path, stats: dict, download) -> dict:
    return {"label": spec.label, "path": path, "status": stats.get("status", "written"),
            "download_bytes": None if download is None else download.n_bytes,
            **{k: stats.get(k) for k in ("tokens_written", "seconds", "tokens_per_s",
                                         "batch_size", "peak_rss_bytes")}}


def _summary(path, stats: dict) -> str:
    if stats.get("status") == "skipped":
        return f"{path}  (complete already, skipped)"
    return (f"{path}  ({stats['tokens_written']:,} tokens in {stats['seconds']:.1f} s, "
            f"{stats['tokens_per_s']:,.0f} tokens/s, batch {stats['batch_size']}, "
            f"peak RSS {human_bytes(stats['peak_rss_bytes'])})")
