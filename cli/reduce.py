"""`ooc-universal reduce`: co-moment statistics of a reference model against the others."""
from __future__ import annotations

import typing

import click

from ooc_universal.cli.options import device_option, progress_option, run_dir_option
from ooc_universal.config import ComputeConfig, ReduceConfig, validated

REDUCE, COMPUTE = ReduceConfig(), ComputeConfig()  # the option defaults (one source)
PRECISIONS = typing.get_args(ReduceConfig.model_fields["precision"].annotation)
SOURCES = typing.get_args(ReduceConfig.model_fields["source"].annotation)
FORWARD = typing.get_args(ReduceConfig.model_fields["forward_precision"].annotation)


@click.command("reduce")
@run_dir_option("holds stores/ (from `ooc-universal extract`) and the token set; the "
                "outputs go to RUN/reduce/.")
@click.option("--reference", "-r", required=True,
              help="Reference model: a store label, a store path or a model spec (a@100000; "
                   "with --source stream, a model spec or a store that records its spec).")
@click.argument("others", nargs=-1, required=True)
@click.option("--memory", default=COMPUTE.memory, show_default=True,
              help="Memory budget per worker (e.g. 16GB). The planner picks block size, "
                   "pair groups and row panels to stay inside it.")
@device_option(COMPUTE.device)
@click.option("--precision", type=click.Choice(PRECISIONS), default=REDUCE.precision,
              show_default=True,
              help="GEMM inputs; accumulation is fp32 (fp64 for fp64). bf16 is ~2x faster on "
                   "CPUs with AVX-512 BF16, with correlation errors up to ~2e-3; its "
                   "rotation baseline's GEMMs run in bf16 too.")
@click.option("--baseline-draws", default=REDUCE.baseline_draws, show_default=True, type=int,
              help="Independent random rotations for the excess-correlation baseline "
                   "(draw j uses seed + j; computed from co-moments, no second pass).")
@click.option("--seed", default=REDUCE.seed, show_default=True, type=int,
              help="Seed of the first draw.")
@click.option("--keep-covariance", is_flag=True, default=REDUCE.keep_covariance,
              help="Also store the cross co-moment matrix (fp32, Na x Nb), so more "
                   "baseline draws can be computed later without the activations.")
@click.option("--scheduler", default=COMPUTE.scheduler or None, metavar="tcp://HOST:PORT",
              help="Run the graph on a dask.distributed cluster; workers must see the run "
                   "directory at the same path.")
@click.option("--source", type=click.Choice(SOURCES), default=REDUCE.source,
              show_default=True,
              help="Where token blocks come from: the activation stores (store), forward "
                   "passes of the models over the run's token set, writing no store "
                   "(stream), or whichever the plan expects to be faster within the free "
                   "disk (auto; --dry-run prints both options and why).")
@click.option("--forward-precision", type=click.Choice(FORWARD), default=REDUCE.forward_precision,
              show_default=True,
              help="--source stream: the forward passes' precision; auto = fp32 on every "
                   "device (bf16 autocast moved GPT-2 small's row max by 3.1e-3, over the "
                   "2e-3 bound); bf16 = bf16 autocast (faster forwards, see the README).")
@click.option("--disk-gbps", type=float, default=REDUCE.disk_gbps, show_default=True,
              help="Disk bandwidth in GB/s that --source auto assumes for reading stores "
                   "(0: measure it now).")
@click.option("--block-tokens", type=click.IntRange(1), default=None,
              help="Token rows per GEMM block (default: chosen by the planner).")
@click.option("--checkpoint-every", type=click.IntRange(1), default=None, metavar="BLOCKS",
              help="Save the accumulators every BLOCKS token blocks (default: about every "
                   "2e13 FLOP), the most work a kill can lose.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (tasks, passes, bytes, FLOPs, peak memory, expected time "
                   "at the GEMM rate measured now) and exit.")
@click.option("--force", is_flag=True, help="Recompute pairs whose output already exists.")
@progress_option()
def reduce(run_dir, reference, others, memory, device, precision, baseline_draws, seed,
           keep_covariance, scheduler, source, forward_precision, disk_gbps, block_tokens,
           checkpoint_every, dry_run, force, progress):
    """Reduce REFERENCE against each of OTHERS into RUN/reduce/<ref>__<other>.h5.

    Pearson correlations come from mergeable co-moments (Chan et al.), each block
    centred on its own mean; a neuron with zero variance has correlation 0 (counted,
    never NaN). Row max/argmax run over every neuron of the other model (all layers).
    A killed run resumes from its last checkpoint when the same command is run again.

    \b
    Examples:
      ooc-universal reduce -R runs/demo -r tiny-a@4500 tiny-b@4500 tiny-c@4500
      ooc-universal reduce -R runs/demo -r tiny-a@4500 tiny-b@4500 --memory 4GB --dry-run
      ooc-universal reduce -R runs/gpu -r a@100000 b@100000 --source stream --device cuda \\
          --precision bf16                       # no stores: forward passes feed the GEMMs
    """
    from ooc_universal.steps.reduce import reduce as run_reduce
    from ooc_universal.steps.reduce import summary_line, zero_variance_warnings
    settings = validated(ReduceConfig, dict(precision=precision, baseline_draws=baseline_draws,
                                            seed=seed, keep_covariance=keep_covariance,
                                            source=source, disk_gbps=disk_gbps,
                                            forward_precision=forward_precision),
                         "reduce options")
    compute = validated(ComputeConfig, dict(memory=memory, device=device,
                                            scheduler=scheduler or ""), "reduce options")
    result = run_reduce(run_dir, reference, list(others), settings, compute,
                        block_tokens=block_tokens, checkpoint_blocks=checkpoint_every,
                        dry_run=dry_run, force=force, progress=progress)
    if dry_run:
        click.echo(result["describe"])
        return
    if result.get("source_choice"):
        click.echo(result["source_choice"])
    click.echo(summary_line(result))
    for path in result["outputs"]:
        click.echo(f"  {path}")
    for line in zero_variance_warnings(result):
        click.echo(line, err=True)
