"""Chain the steps from one RunConfig: tokens -> extract -> reduce -> universal ->
persistence -> ablate -> report. Each step skips what is complete and resumes what is
partial, so `run` after a kill does only what is missing.

The reduce's blocks come from cfg.reduce.source (`run --source`): "store" (extract
writes activation stores, the reduce reads them, the disk budget may make them one
checkpoint at a time), "stream" (the reduce runs the models' forward passes: no extract,
no stores, the disk plan counts none), or "auto": decided once for the study before any
extract (study_source: the plan's options, plan.choose_source against the disk budget),
then run as that source. Outputs are the same whichever source.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ooc_universal.config import RunConfig
from ooc_universal.devices import check_memory_limit
from ooc_universal.disk import release_stores
from ooc_universal.errors import StaleInputError
from ooc_universal.rundir import human_bytes, run_lock, write_json_atomic

STEP_NAMES = ("tokens", "extract", "reduce", "universal", "cards", "persistence", "ablate",
              "report")


def check_run_dir_config(run_dir: Path, cfg: RunConfig, force: bool = False) -> None:
    """RUN/config.toml: written on the first run; a later run must use the same config
    (up to where/how fast: device, memory, scheduler, batch sizes)."""
    path = run_dir / "config.toml"
    if path.exists():
        old = RunConfig.from_toml(path)
        if old.hash() != cfg.hash() and not force:
            diff = old.differences(cfg)
            raise StaleInputError(
                f"run directory {str(run_dir)!r} was made with another configuration "
                f"(differs in {sorted(diff)}); use a new run directory, or --force to "
                "recompute with the new one")
    tmp = path.with_name("config.toml.tmp")
    tmp.write_text(cfg.to_toml())
    tmp.replace(path)


def _token_source(cfg: RunConfig):
    """The source for the tokens step ("zoo-heldout" -> the zoo's held-out bytes, never
    seen in training)."""
    if cfg.tokens.source != "zoo-heldout":
        return None
    from ooc_universal.zoo import heldout_ids
    return heldout_ids(cfg.report.zoo_json)


def run(cfg: RunConfig, run_dir, *, force: bool = False, progress: bool = True,
        steps=STEP_NAMES, echo=print) -> dict:
    """Run the study; returns {step: seconds} and where the report is."""
    from ooc_universal.steps import ablate as ablate_mod
    from ooc_universal.steps import cards as cards_mod
    from ooc_universal.steps import extract as extract_mod
    from ooc_universal.steps import persistence as persistence_mod
    from ooc_universal.steps import reduce as reduce_mod
    from ooc_universal import report as report_mod
    from ooc_universal.formats.tables import format_table1
    from ooc_universal.formats.tokens import existing_hash
    from ooc_universal.steps import tokens as tokens_mod
    from ooc_universal.steps import universal as universal_mod

    run_dir = Path(run_dir)
    timings = {}
    specs = study_specs(cfg)  # (model, checkpoint) -> ModelSpec with a unique label
    if "reduce" in steps:  # refused now, not after hours of extract
        check_memory_limit(_reduce_plan(cfg, *_neurons(cfg)).required_bytes,
                           f"the reduce's plan (--memory {cfg.compute.memory})")
    with run_lock(run_dir):
        check_run_dir_config(run_dir, cfg, force=force)
        ref = cfg.reference_model
        refs = list(cfg.models) if cfg.all_references else [ref]

        def step(name, fn):
            if name not in steps:
                return
            echo(f"[{name}]")
            t0 = time.perf_counter()
            fn()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

        def do_tokens():
            if existing_hash(run_dir) and not force:
                echo("  token set complete; skipped")
                return
            # the first model's context bounds the window (read offline from its config)
            first = specs[(cfg.models[0], cfg.checkpoint_list()[0])]
            res = tokens_mod.tokens(run_dir, cfg.tokens, source=_token_source(cfg),
                                    models=[first], force=force, progress=progress)
            ts = res.token_set
            echo(f"  {ts.n_tokens:,} tokens -> {res.folder} (hash {ts.hash[:12]})")

        reduced = set() if force else reduced_checkpoints(cfg, run_dir, specs, refs)
        done_before = released_checkpoints(cfg, run_dir, specs, reduced)
        blocks = {"extract", "reduce"} & set(steps)
        choice = study_source(cfg, run_dir, specs, done=done_before,
                              reduced=reduced) if blocks else None
        source = choice.source if choice else "store"
        if choice is not None and cfg.reduce.source == "auto":
            echo(choice.line)
        if choice is not None:
            timings["source"] = source
        streamed = source == "stream"
        settings = cfg.reduce.model_copy(update={"source": source})
        disk = study_disk_plan(cfg, run_dir, specs, stores=not streamed) if blocks else None
        if disk is not None:
            echo(f"disk: {disk.describe()}")

        def do_extract(checkpoints):
            if streamed:
                echo("  block source stream: no activation stores to write (the reduce "
                     "runs the models' forward passes)")
                return
            todo = [specs[m, c] for c in checkpoints if c not in done_before
                    for m in cfg.models]
            if cfg.compute.scheduler:
                from distributed import Client
                with Client(cfg.compute.scheduler) as client:
                    futs = [client.submit(extract_mod.extract, str(run_dir), s, cfg.extract,
                                          cfg.compute, progress=False, pure=False)
                            for s in todo]
                    for f in futs:
                        echo(f"  {f.result()}")
                return
            for s in todo:
                echo(f"  {extract_mod.extract(run_dir, s, cfg.extract, cfg.compute, progress=progress)}")

        def do_reduce(checkpoints):
            for r, c in ((r, c) for r in refs for c in checkpoints):
                if c in done_before:
                    echo(f"  checkpoint {c}: reduced; its stores were released")
                    continue
                others = [m for m in cfg.models if m != r]
                # stores are found by their run-unique labels; streamed models are given
                # as their ModelSpecs (the same labels, so the same output files)
                name = (lambda s: s) if streamed else (lambda s: s.label)
                res = reduce_mod.reduce(run_dir, name(specs[r, c]),
                                        [name(specs[o, c]) for o in others],
                                        settings, cfg.compute, force=force, progress=progress)
                echo(f"  {reduce_mod.summary_line(res)}")

        def release(c):
            if streamed or c in done_before or not {"extract", "reduce"} <= set(steps):
                return
            freed = release_stores(run_dir, [specs[m, c].label for m in cfg.models], c,
                                   pair_outputs(cfg, run_dir, specs, refs, c))
            echo(f"  checkpoint {c}: its stores are reduced; deleted them "
                 f"({human_bytes(freed)} freed; --keep-stores keeps them)")

        made = {}  # what this run's own steps made, for the steps after them

        def do_universal():
            out = universal_mod.universal(run_dir, cfg.universal,
                                          reference=None if cfg.all_references else ref,
                                          all_references=cfg.all_references, progress=progress)
            made["universal_id"] = out.table1.provenance.universal_id
            echo(format_table1(out.table1))

        def do_cards():
            out = cards_mod.cards(run_dir, cfg.cards, progress=progress)
            echo(f"  {len(out.cards.cards)} neuron cards -> {out.path}")

        def do_persistence():
            if len(cfg.checkpoint_list()) < 2:
                echo("  fewer than two checkpoints: persistence not applicable; skipped")
                return
            res = persistence_mod.persistence(run_dir, progress=progress)
            echo(f"  {res.paths['json']}")

        def do_ablate():
            out = ablate_mod.ablate(run_dir, cfg.ablate, cfg.compute,
                                    reference=None if cfg.all_references else ref,
                                    thresholds=list(cfg.universal.thresholds),
                                    universal_id=made.get("universal_id"), progress=progress)
            echo(f"  {getattr(out, 'csv', out)}")

        def do_report():
            paths = report_mod.report(run_dir, cfg.report, progress=progress)
            timings["report_paths"] = {k: str(v) for k, v in paths.items()}

        step("tokens", do_tokens)
        if disk is None or disk.mode == "all" or cfg.compute.keep_stores or streamed:
            step("extract", lambda: do_extract(cfg.checkpoint_list()))
            step("reduce", lambda: do_reduce(cfg.checkpoint_list()))
        else:  # one checkpoint's stores on disk at a time
            for c in cfg.checkpoint_list():
                step("extract", lambda: do_extract([c]))
                step("reduce", lambda: do_reduce([c]))
                release(c)
        step("universal", do_universal)
        step("cards", do_cards)
        step("persistence", do_persistence)
        step("ablate", do_ablate)
        step("report", do_report)
        write_json_atomic(run_dir / "run_timings.json", timings)
    return timings


def study_specs(cfg: RunConfig) -> dict:
    """(model, checkpoint) -> its models.ModelSpec, labels unique across the run (folders
    with the same base name get path-derived labels); one family per run unless
    cfg.allow_mixed_families. Offline: reads configs only where they are local or cached."""
    from ooc_universal.models import check_same_family, unique_labels
    keys = [(m, c) for c in cfg.checkpoint_list() for m in cfg.models]
    parsed = unique_labels([cfg.spec(m, c) for m, c in keys])
    check_same_family(parsed, allow_mixed=cfg.allow_mixed_families)
    return dict(zip(keys, parsed))


def study_disk_plan(cfg: RunConfig, run_dir, specs: dict, stores: bool = True):
    """disk.plan_disk for the study: with `stores` (store mode) all at once, or one
    checkpoint at a time when they do not fit the budget; without (stream mode) the
    reduce outputs and work directory only."""
    from ooc_universal.disk import disk_budget, plan_disk
    n_layers, d_mlp, _ = _model_shapes(cfg)
    n_neurons = n_layers * d_mlp
    plan = _reduce_plan(cfg, n_neurons, d_mlp)
    budget, where = disk_budget(run_dir, cfg.compute.disk)
    n_refs = len(cfg.models) if cfg.all_references else 1
    return plan_disk(len(cfg.models), len(cfg.checkpoint_list()),
                     store_file_bytes(cfg.tokens.n_tokens, n_neurons) if stores else 0,
                     plan.output_bytes * n_refs, plan.work_disk_bytes, budget, where,
                     keep_stores=cfg.compute.keep_stores and stores)


# ------------------------------------------------------------------- the block source

@dataclass(frozen=True)
class SourceChoice:
    """The study's block source: `source` (store | stream), how it was decided (`line`:
    one line for the run's output), and under --source auto the options compared
    (plan.SourceOption, study totals) and the dry run's text (plan.describe_options)."""
    source: str
    line: str
    options: list = field(default_factory=list)
    reason: str = ""
    text: str = ""


def study_source(cfg: RunConfig, run_dir, specs: dict, *, done=(), reduced=(), rates=None,
                 forward_rate=None, compare: bool = False) -> SourceChoice:
    """cfg.reduce.source resolved for the whole study, before any extract: "store" and
    "stream" as given; "auto" from study_source_options (the reduce's own plan functions:
    the same plans, rates and choose_source as `reduce --source auto`, summed over the
    study's checkpoints and references). `done`: checkpoints already reduced (released);
    `reduced`: checkpoints whose pair files are complete (all of them: nothing is costed);
    `rates`/`forward_rate` (positions/s): measured already (the dry run); `compare`: cost
    both options even when the source is given (the dry run prints them)."""
    given = cfg.reduce.source
    if given != "auto" and not compare:
        return SourceChoice(given, f"block source: {given} (--source {given})")
    if given == "auto" and not compare and set(cfg.checkpoint_list()) <= set(reduced):
        # nothing left to extract or reduce: no rates to measure, no choice to make; the
        # source that does no work is the one whose inputs are there (never write stores)
        stored = all(_store_there(run_dir, s) for s in specs.values())
        source = "store" if stored else "stream"
        return SourceChoice(source, f"block source (--source auto): {source} (every pair "
                            "file is complete: nothing to extract or reduce, no rates measured)")
    from ooc_universal.plan import choose_source, describe_options
    options, device, rates_line = study_source_options(cfg, run_dir, specs, done=done,
                                                       rates=rates, forward_rate=forward_rate)
    budget, _ = _disk_budget(cfg, run_dir)
    if given == "auto":
        chosen, reason = choose_source(options, budget)
    else:
        chosen, reason = next(o for o in options if o.source == given), f"--source {given}"
    text = describe_options(options, chosen, reason, device, given=given)
    text += f"\n  {rates_line}"
    return SourceChoice(chosen.source, f"block source (--source {given}): {chosen.source} "
                        f"({reason})", options, reason, text)


def _disk_budget(cfg: RunConfig, run_dir) -> tuple[int, str]:
    from ooc_universal.disk import disk_budget
    return disk_budget(run_dir or Path.cwd(), cfg.compute.disk)


def study_source_options(cfg: RunConfig, run_dir, specs: dict, *, done=(), rates=None,
                         forward_rate=None) -> tuple[list, str, str]:
    """([stream, store] plan.SourceOption for the whole study, the device, a line on the
    rates): per checkpoint still to reduce and per reference, plan.stream_option of the
    streamed plan (make_plan(stream=stream_shape(sources.stream_meta ...))) and
    plan.store_option of the stored plan, the store also writing the checkpoint's stores
    that are not there yet (extract: their forward FLOPs, their bytes); disk: the study's
    peak (disk.plan_disk, with or without stores); rates: plan.measure_rates at the
    plan's shapes, plan.disk_rates (measured, or cfg.reduce.disk_gbps), the forward rate
    of a model of these shapes (_measure_forward_rate, offline)."""
    from ooc_universal.devices import device_name
    from ooc_universal.plan import (disk_rates, measure_rates, store_option, stream_option,
                                    stream_shape)
    from ooc_universal.rundir import existing_parent
    from ooc_universal.sources import stream_meta
    device = device_name(cfg.compute.device)
    shapes = _model_shapes(cfg)
    n_neurons, d_mlp = shapes[0] * shapes[1], shapes[1]
    checkpoints = cfg.checkpoint_list()
    todo = [c for c in checkpoints if c not in set(done)]
    refs = list(cfg.models) if cfg.all_references else [cfg.reference_model]
    token_meta = _token_meta(cfg, run_dir)
    order = [refs[0], *(m for m in cfg.models if m != refs[0])]
    metas = [stream_meta(specs[m, checkpoints[0]], token_meta, device) for m in order]
    shape = stream_shape(metas)
    store_plan = _reduce_plan(cfg, n_neurons, d_mlp, device=device)
    stream_plan = _reduce_plan(cfg, n_neurons, d_mlp, device=device, stream=shape)
    rates = rates or measure_rates(store_plan, seconds=0.3)
    write, read, how = disk_rates(existing_parent(Path(run_dir or Path.cwd())),
                                  cfg.reduce.disk_gbps)
    positions_per_s = forward_rate or _measure_forward_rate(shapes, seconds=0.3)
    rates = replace(rates, read_bytes_per_s=read, disk_bytes_per_s=write,
                    forward_flops_per_s=positions_per_s * shape.flops_ref,
                    measured=tuple(rates.measured) + ("forward", f"disk ({how})"))
    model_flops = dict(zip(order, (shape.flops_ref, *shape.flops_others)))
    store_bytes = store_file_bytes(cfg.tokens.n_tokens, n_neurons)
    stream_one = stream_option(stream_plan, rates)
    stored = []
    for c in todo:
        missing = [m for m in cfg.models if not _store_there(run_dir, specs[m, c])]
        stored.append(store_option(
            store_plan, rates, write_bytes=len(missing) * store_bytes,
            extract_flops=sum(model_flops.get(m, shape.flops_ref) for m in missing)
            * shape.positions))
        stored += [store_option(store_plan, rates)] * (len(refs) - 1)
    stream_all = _total("stream", [stream_one] * (len(todo) * len(refs)),
                        _study_disk(cfg, run_dir, store_plan, 0), stream_one.memory_bytes)
    store_all = _total("store", stored, _study_disk(cfg, run_dir, store_plan, store_bytes),
                       store_plan.required_bytes)
    line = (f"rates: forward {rates.forward_flops_per_s / 1e9:.1f} GFLOP/s (a model of "
            f"these shapes, measured now), disk read {read / 1e9:.2f} GB/s, write "
            f"{write / 1e9:.2f} GB/s ({how}); {len(todo)} checkpoint(s) x {len(refs)} "
            f"reference(s) to reduce; disk budget {human_bytes(_disk_budget(cfg, run_dir)[0])}")
    return [stream_all, store_all], device, line


def _total(source: str, per_reduce: list, disk_bytes: int, memory_bytes: int):
    """One study-wide plan.SourceOption from the options of its reduces."""
    from ooc_universal.plan import SourceOption
    parts: dict = {}
    for o in per_reduce:
        for k, v in o.parts.items():
            parts[k] = parts.get(k, 0.0) + v
    return SourceOption(source, sum(o.seconds for o in per_reduce), disk_bytes,
                        memory_bytes, parts)


def _study_disk(cfg: RunConfig, run_dir, plan, store_bytes: int) -> int:
    """The study's peak disk with stores of `store_bytes` (0: streamed): every
    checkpoint's at once when --keep-stores or when they fit the budget, else one
    checkpoint's (disk.DiskPlan; choose_source compares it with the budget)."""
    from ooc_universal.disk import DiskPlan
    budget, where = _disk_budget(cfg, run_dir)
    n_refs = len(cfg.models) if cfg.all_references else 1
    plan = DiskPlan(budget, where, store_bytes, len(cfg.models), len(cfg.checkpoint_list()),
                    plan.output_bytes * n_refs, plan.work_disk_bytes, "all")
    if plan.all_at_once <= budget or (cfg.compute.keep_stores and store_bytes):
        return plan.all_at_once
    return plan.per_checkpoint


def _store_there(run_dir, spec) -> bool:
    """A complete store of `spec` (its final name and a sidecar) is in RUN/stores."""
    from ooc_universal.rundir import read_sidecar
    if run_dir is None:
        return False
    path = Path(run_dir) / "stores" / f"{spec.label}.h5"
    return path.is_file() and read_sidecar(path) is not None


def _token_meta(cfg: RunConfig, run_dir) -> dict:
    """The token set's shape: RUN/tokens' when it is there, else the config's (windows of
    `window` positions, the first a BOS when cfg.tokens.bos)."""
    from ooc_universal.errors import OocError
    if run_dir is not None and (Path(run_dir) / "tokens").is_dir():
        try:
            from ooc_universal.formats.tokens import load_token_set
            ts = load_token_set(run_dir)
            return {"hash": ts.hash, "n_tokens": ts.n_tokens, "window": ts.window,
                    "n_windows": ts.n_windows}
        except OocError:
            pass
    t = cfg.tokens
    per_window = max(1, t.window - (1 if t.bos else 0))
    return {"hash": "", "n_tokens": t.n_tokens, "window": t.window,
            "n_windows": -(-t.n_tokens // per_window)}


def _neurons(cfg: RunConfig) -> tuple[int, int]:
    n_layers, d_mlp, _ = _model_shapes(cfg)
    return n_layers * d_mlp, d_mlp


def store_file_bytes(n_tokens: int, n_neurons: int) -> int:
    """A store's size on disk: fp16 rows and a few KB of header and ledger."""
    return n_tokens * n_neurons * 2 + (1 << 16)


def _reduce_plan(cfg: RunConfig, n_neurons: int, d_mlp: int, device: str = "cpu",
                 stream=None):
    """One reference's reduce plan (plan.make_plan); `stream`: its plan.StreamShape."""
    from ooc_universal.plan import PairShape, make_plan
    from ooc_universal.sources import STREAM_BLOCK_ROWS
    pairs = [PairShape(o, n_neurons, d_mlp) for o in cfg.models[1:]]
    return make_plan(cfg.tokens.n_tokens, n_neurons, pairs, memory=cfg.compute.memory,
                     device=device, precision=cfg.reduce.precision,
                     store_chunk_rows=STREAM_BLOCK_ROWS if stream else 64,
                     baseline_draws=cfg.reduce.baseline_draws,
                     keep_covariance=cfg.reduce.keep_covariance, stream=stream,
                     snapshots=_snapshot_counts(cfg))


def _snapshot_counts(cfg: RunConfig) -> tuple:
    """The reduce's convergence snapshot counts below the total (steps/reduce.py)."""
    from ooc_universal.kernels.convergence import snapshot_counts
    n, first = cfg.tokens.n_tokens, cfg.reduce.convergence_first
    return tuple(snapshot_counts(n, first)[:-1]) if first and n >= 2 else ()


def pair_outputs(cfg: RunConfig, run_dir, specs: dict, refs: list, checkpoint) -> list:
    """The reduce's pair files of one checkpoint: what its stores are read for."""
    from ooc_universal.formats.reduced import reduced_path
    return [reduced_path(run_dir, specs[r, checkpoint].label, specs[o, checkpoint].label)
            for r in refs for o in cfg.models if o != r]


def reduced_checkpoints(cfg: RunConfig, run_dir, specs: dict, refs: list) -> set:
    """Checkpoints whose pair files are all complete (final name and a sidecar)."""
    from ooc_universal.rundir import read_sidecar
    return {c for c in cfg.checkpoint_list()
            if all(p.exists() and read_sidecar(p) is not None
                   for p in pair_outputs(cfg, run_dir, specs, refs, c))}


def released_checkpoints(cfg: RunConfig, run_dir, specs: dict, reduced: set) -> set:
    """Of the `reduced` checkpoints (reduced_checkpoints), those whose stores an earlier
    run released after their reduce completed: neither extracted nor reduced again."""
    from ooc_universal.disk import released
    gone = released(run_dir)
    return {c for c in reduced if all(specs[m, c].label in gone for m in cfg.models)}


# ----------------------------------------------------------------------------- dry run

# fp32 GEMMs on an H100-class GPU without TF32 (the forward passes' precision: extract,
# stream, ablate): ~67 TFLOP/s nominal on an H100 SXM; an assumption, not a measurement
GPU_FP32_TFLOPS = 50.0


def dry_run(cfg: RunConfig, *, gpu_tflops: float = 400.0, gpu_mem_gb: float = 80.0,
            disk_gbps: float = 2.0, run_dir=None, echo=print,
            gpu_fp32_tflops: float = GPU_FP32_TFLOPS) -> dict:
    """The plan of the whole study, offline: disk, RAM, FLOPs and time, step by step.

    Times here use GEMM and forward rates measured now on this machine; GPU times use
    `gpu_tflops` (dense bf16, an H100 SXM is ~990 nominal, ~400-600 sustained) for the
    reduce's GEMMs, `gpu_fp32_tflops` for the forward passes (fp32: extract, stream, ablate) and
    `disk_gbps` for reading the stores. The reduce's CPU time comes from rates measured
    at the plan's own shapes (plan.measure_rates); the disk plan from `run_dir`'s free
    space (or cfg.compute.disk).
    """
    from ooc_universal.models import parse_model_spec
    from ooc_universal.plan import (PairShape, describe, expected_seconds, make_plan,
                                    measure_gemm_rate, measure_rates)
    shapes = _model_shapes(cfg)
    n_models, n_ck = len(cfg.models), len(cfg.checkpoint_list())
    n_layers, d_mlp, n_params = shapes
    n_neurons = n_layers * d_mlp
    store_bytes = cfg.tokens.n_tokens * n_neurons * 2
    fwd_flops = 2.0 * n_params * cfg.tokens.n_tokens * cfg.tokens.window / max(cfg.tokens.window - 1, 1)
    gemm = measure_gemm_rate("cpu", cfg.reduce.precision if cfg.reduce.precision != "fp64" else "fp32")
    fwd_rate = _measure_forward_rate(shapes)
    out = {"stores": n_models * n_ck, "store_bytes": store_bytes,
           "disk_bytes": store_bytes * n_models * n_ck, "gemm_flops_per_s_here": gemm,
           "forward_tokens_per_s_here": fwd_rate}
    echo(f"study: {n_models} models x {n_ck} checkpoint(s) x {cfg.tokens.n_tokens:,} tokens x "
         f"{n_neurons:,} neurons ({n_layers} layers x {d_mlp})")
    echo(f"[tokens]  {cfg.tokens.n_tokens + cfg.tokens.n_eval_tokens:,} positions from {cfg.tokens.source}")
    hub = [m for m in cfg.models if parse_model_spec(m).repo_id]
    if hub:
        echo(f"  downloads: {len(hub) * n_ck} hub checkpoints of ~{n_params * 4 / 1e9:.2f} GB "
             f"each = {human_bytes(len(hub) * n_ck * n_params * 4)} in the HF cache")
    t_fwd = cfg.tokens.n_tokens / fwd_rate
    echo(f"[extract] {n_models * n_ck} stores of {human_bytes(store_bytes)} = "
         f"{human_bytes(out['disk_bytes'])} on disk (fp16); forward {fwd_flops:.3g} FLOP each; "
         f"here ~{_hms(t_fwd * n_models * n_ck)} at {fwd_rate:,.0f} tok/s; "
         f"GPU ~{_hms(n_models * n_ck * max(fwd_flops / (gpu_fp32_tflops * 1e12), store_bytes / (disk_gbps * 1e9)))}"
         " (disk-bound)")
    pairs = [PairShape(o, n_neurons, d_mlp) for o in cfg.models[1:]]
    plan = _reduce_plan(cfg, n_neurons, d_mlp)
    rates = measure_rates(plan, seconds=0.5)
    echo(f"[reduce]  per checkpoint ({n_ck} in all):")
    echo("  " + describe(plan, rates).replace("\n", "\n  "))
    gpu_plan = make_plan(cfg.tokens.n_tokens, n_neurons, pairs, memory=f"{gpu_mem_gb}GB",
                         device="cuda", precision="bf16", store_chunk_rows=64,
                         baseline_draws=cfg.reduce.baseline_draws,
                         snapshots=_snapshot_counts(cfg))
    t_gpu = max(gpu_plan.flops / (gpu_tflops * 1e12), gpu_plan.bytes_read / (disk_gbps * 1e9))
    out.update(reduce_flops=plan.flops * n_ck, reduce_peak_bytes=plan.peak_bytes,
               reduce_seconds_here=expected_seconds(plan, rates)["total"] * n_ck,
               reduce_seconds_gpu=t_gpu * n_ck)
    echo(f"  all checkpoints: {plan.flops * n_ck:.3g} FLOP, here ~{_hms(out['reduce_seconds_here'])}"
         f"; on a {gpu_mem_gb:.0f} GB GPU ~{_hms(t_gpu * n_ck)} "
         f"({len(gpu_plan.groups)} pass(es), {human_bytes(gpu_plan.bytes_read)} read at "
         f"{disk_gbps} GB/s, {gpu_tflops:.0f} TFLOP/s bf16)")
    out.update(_source_dry_run(cfg, run_dir, rates, fwd_rate, shapes,
                               (gpu_tflops, gpu_fp32_tflops), gpu_mem_gb, echo))
    out.update(_ablation_dry_run(cfg, shapes, fwd_rate, gpu_fp32_tflops, n_ck, echo))
    out.update(_disk_dry_run(cfg, run_dir, n_neurons, plan, echo,
                             stores=out.get("source") != "stream"))
    echo("[universal, persistence, report] seconds; read only the reduced statistics")
    echo(f"peak RAM per process: reduce {human_bytes(plan.peak_bytes)} "
         f"(budget {cfg.compute.memory}); extract within --memory")
    return out


def _source_dry_run(cfg: RunConfig, run_dir, rates, fwd_rate, shapes, gpu_rates,
                    gpu_mem_gb, echo) -> dict:
    """Both block sources of the study (study_source with compare: time, disk, memory),
    the one chosen (--source auto) or given, and why; and the streamed reduce on a GPU."""
    from ooc_universal.devices import device_name
    from ooc_universal.errors import OocError
    here = device_name(cfg.compute.device) == "cpu"
    try:
        choice = study_source(cfg, run_dir, study_specs(cfg), rates=rates if here else None,
                              forward_rate=fwd_rate if here else None, compare=True)
    except OocError as exc:
        echo(f"[source]  --source {cfg.reduce.source}: cannot be planned here: {exc}")
        return {"source": None}
    echo("[source]  " + choice.text.replace("\n", "\n  "))
    out = {"source": choice.source, "source_reason": choice.reason,
           "source_options": {o.source: {"seconds": o.seconds, "disk_bytes": o.disk_bytes,
                                         "memory_bytes": o.memory_bytes}
                              for o in choice.options}}
    out.update(_gpu_stream_dry_run(cfg, shapes, *gpu_rates, gpu_mem_gb, echo))
    return out


def _gpu_stream_dry_run(cfg: RunConfig, shapes, gpu_tflops, fp32_tflops, gpu_mem_gb,
                        echo) -> dict:
    """The streamed reduce of the whole study on one GPU of `gpu_mem_gb`: the plan's
    GEMM FLOPs at `gpu_tflops` (bf16) and its forward FLOPs at `fp32_tflops` (the
    forward passes run in fp32, sources.forward_autocast), an estimate."""
    from ooc_universal.errors import OocError
    from ooc_universal.plan import stream_shape
    from ooc_universal.sources import stream_meta
    n_neurons, d_mlp = shapes[0] * shapes[1], shapes[1]
    c0, n_ck = cfg.checkpoint_list()[0], len(cfg.checkpoint_list())
    n_refs = len(cfg.models) if cfg.all_references else 1
    specs = study_specs(cfg)
    order = [cfg.reference_model, *(m for m in cfg.models if m != cfg.reference_model)]
    try:
        shape = stream_shape([stream_meta(specs[m, c0], _token_meta(cfg, None), "cuda")
                              for m in order], param_bytes=4)  # fp32 weights
        gpu_cfg = cfg.replace(memory=f"{gpu_mem_gb}GB", precision="bf16")
        plan = _reduce_plan(gpu_cfg, n_neurons, d_mlp, device="cuda", stream=shape)
    except OocError as exc:
        echo(f"  stream on a {gpu_mem_gb:.0f} GB GPU: does not fit ({exc})")
        return {}
    secs = (plan.flops / (gpu_tflops * 1e12) + plan.forward_flops / (fp32_tflops * 1e12)) \
        * n_ck * n_refs
    echo(f"  stream on a {gpu_mem_gb:.0f} GB GPU: ~{_hms(secs)} of reduce for the study "
         f"({len(plan.groups)} pass(es), {len(plan.panels)} panel(s); {plan.flops:.3g} FLOP "
         f"of GEMMs at {gpu_tflops:.0f} TFLOP/s bf16 + {plan.forward_flops:.3g} of fp32 "
         f"forwards at {fp32_tflops:.0f} TFLOP/s, per reference and checkpoint; no stores)")
    return {"reduce_seconds_gpu_stream": secs}


def _disk_dry_run(cfg: RunConfig, run_dir, n_neurons: int, plan, echo,
                  stores: bool = True) -> dict:
    """The disk plan against the budget (disk.plan_disk): the stores' (store mode) or
    only the reduce outputs' (stream)."""
    from ooc_universal.disk import disk_budget, plan_disk
    from ooc_universal.errors import OocError
    budget, where = disk_budget(run_dir or Path.cwd(), cfg.compute.disk)
    n_refs = len(cfg.models) if cfg.all_references else 1
    try:
        disk = plan_disk(len(cfg.models), len(cfg.checkpoint_list()),
                         store_file_bytes(cfg.tokens.n_tokens, n_neurons) if stores else 0,
                         plan.output_bytes * n_refs, plan.work_disk_bytes, budget, where,
                         keep_stores=cfg.compute.keep_stores and stores)
    except OocError as exc:
        echo(f"[disk]    {'store' if stores else 'stream'} mode does not fit: {exc}")
        return {"disk_mode": None, "disk_budget_bytes": budget}
    echo(f"[disk]    {disk.describe()}")
    return {"disk_mode": disk.mode, "disk_peak_bytes": disk.peak, "disk_budget_bytes": budget}


def _ablation_dry_run(cfg: RunConfig, shapes, fwd_rate, gpu_fp32_tflops, n_ck,
                      echo) -> dict:
    """The ablation's plan here and on a GPU: sets restart from the residual cached before
    their first ablated layer (steps.ablate.ablation_plan)."""
    from ooc_universal.steps.ablate import (ablation_plan, describe_ablation_plan,
                                            layer_flops_per_token, measure_kl_rate,
                                            planned_first_layers)
    n_layers, d_mlp, _ = shapes
    d_model, vocab = d_mlp // 4, 50_257  # GPT-2-shaped (the forward rate's model is too)
    firsts = planned_first_layers((len(cfg.models) - 1) * len(cfg.universal.thresholds),
                                  n_layers, cfg.ablate.control_draws, cfg.ablate.layerwise,
                                  cfg.ablate.all_non_universal)
    args = (n_layers, d_model, d_mlp, vocab, cfg.tokens.window, cfg.tokens.n_eval_tokens, firsts)
    here = ablation_plan(*args, fwd_rate * n_layers * layer_flops_per_token(d_model, d_mlp, 128),
                         kl_elements_per_s=measure_kl_rate("cpu", vocab))
    # the float64 KL is memory-bound on a GPU: ~64 B moved per element at ~3.35 TB/s
    # (H100 HBM3), an estimate, not a measurement
    # the ablated forward passes run in fp32 (steps.ablate loads the models in fp32)
    gpu = ablation_plan(*args, gpu_fp32_tflops * 1e12, kl_elements_per_s=3.35e12 / 64)
    echo(f"[ablate]  {len(firsts)} sets per checkpoint x {cfg.tokens.n_eval_tokens:,} eval tokens "
         f"x {n_ck} checkpoint(s)")
    echo(f"  here:   {describe_ablation_plan(here)}")
    echo(f"  on GPU: {describe_ablation_plan(gpu)}")
    return {"ablate_seconds_here": here["seconds"] * n_ck,
            "ablate_seconds_gpu": gpu["seconds"] * n_ck, "ablate_sets": len(firsts)}


def _model_shapes(cfg: RunConfig):
    """(n_layers, d_mlp, n_params) of the first model, offline (models.model_shape)."""
    from ooc_universal.models import model_shape
    return model_shape(cfg.spec(cfg.models[0], cfg.checkpoint_list()[0]))


def _measure_forward_rate(shapes, seconds=1.0) -> float:
    """Tokens/s of a randomly initialised GPT-2 of these shapes (no download): the
    forward cost does not depend on the weights."""
    import torch
    from transformers import GPT2Config, GPT2Model
    n_layers, d_mlp, _ = shapes
    n_embd = d_mlp // 4
    cfg = GPT2Config(n_layer=n_layers, n_embd=n_embd, n_head=max(1, n_embd // 64),
                     n_inner=d_mlp, vocab_size=1024, n_positions=128, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, 1024, (4, 128))
    with torch.no_grad():
        model(ids)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(ids)
            n += ids.numel()
    return n / (time.perf_counter() - t0)


def _hms(secs: float) -> str:
    from ooc_universal.plan import _hms as f
    return f(secs)
