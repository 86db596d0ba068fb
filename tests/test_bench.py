"""`ooc-universal bench`: the suite in its tiniest mode, its JSON, Markdown and README block."""
from __future__ import annotations

import json
import math

import pytest

from ooc_universal.bench import suite
from ooc_universal.cli.main import main
from ooc_universal.errors import OocError

README = """# Project

Intro text.

## Performance

Run `ooc-universal bench`.

<!-- bench:begin -->
old table
<!-- bench:end -->

## After
The end.
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `bench --tiny` run (all parts) that also rewrites a README's bench block."""
    tmp = tmp_path_factory.mktemp("bench")
    readme = tmp / "README.md"
    readme.write_text(README)
    out = tmp / "results"
    main(["bench", "--tiny", "--device", "cpu", "--out", str(out), "--machine", "test-box",
          "--quiet", "--update-readme", "--readme", str(readme)])
    doc = json.loads((out / "test-box.json").read_text())
    return doc, (out / "test-box.md").read_text(), readme.read_text(), out / "test-box.json"


def test_json_has_every_part_and_the_provenance(tiny_run):
    doc = tiny_run[0]
    for key in ("bench", "toolkit_version", "timestamp", "machine", "config", "parts",
                "figures", "projection", "wall_s"):
        assert key in doc, key
    assert set(doc["parts"]) == set(suite.PARTS)
    assert doc["machine"]["name"] == "test-box"
    assert doc["machine"]["slug"].startswith("cpu-")
    assert doc["config"]["size"] == "tiny"
    assert "--tiny" in doc["config"]["argv"]
    red = doc["parts"]["reduce"]
    for key in ("ours", "accuracy", "alternatives", "scaling", "read_path", "figures"):
        assert key in red, key
    assert set(red["alternatives"]) == {"original", "dask", "corrcoef"}
    assert {"comoment", "tile_max", "accuracy"} <= set(doc["parts"]["kernels"])
    assert doc["parts"]["extract"]["fraction_of_forward"] > 0


def test_ratios_are_finite_and_positive(tiny_run):
    doc = tiny_run[0]
    parts = {r["part"] for r in doc["figures"]}
    assert parts == set(suite.PARTS)
    ratios = [r["ratio"] for r in doc["figures"] if r["ratio"] is not None]
    assert len(ratios) >= 30
    for r in doc["figures"]:
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        if r["goal"] is not None and r["ratio"] is not None:
            assert isinstance(r["met"], bool), r
    red = doc["parts"]["reduce"]
    for prec in ("fp32", "bf16"):
        assert 0 < red["ours"][prec]["fraction_of_peak"] < math.inf
    for name, alt in red["alternatives"].items():
        assert alt["speedup_ours_fp32"] > 0 and alt["speedup_ours_bf16"] > 0, name


def test_alternatives_agree_with_ours(tiny_run):
    """The row max correlations of (a), (b), (c) and float64 match ours in fp32."""
    red = tiny_run[0]["parts"]["reduce"]
    for name, alt in red["alternatives"].items():
        assert alt["agreement_row_max"] < 1e-3, name
        assert alt["agreement_baseline"] < 1e-3, name
    assert red["accuracy"]["fp32_vs_float64_row_max"] < 1e-3
    assert red["accuracy"]["bf16_vs_fp32_row_max"] < 1e-2
    assert red["scaling"]["memory_halved"]["max_diff_row_max"] < 1e-3


def test_projection_from_measured_rates(tiny_run):
    proj = tiny_run[0]["projection"]
    assert proj["disk_gbps"] == 2.0
    assert set(proj["stages"]) == {"extract", "reduce_fp32", "reduce_bf16"}
    for s in proj["stages"].values():
        assert s["seconds"] == max(s["compute_s"], s["disk_s"]) > 0
    # 15 stores of 5e6 x 36,864 fp16 at 2 GB/s
    assert proj["stages"]["extract"]["disk_s"] == pytest.approx(15 * 5e6 * 36864 * 2 / 2e9)
    assert proj["total_fp32_s"] > proj["stages"]["reduce_fp32"]["seconds"]


def test_markdown_table_and_readme_block(tiny_run):
    doc, md, readme, _ = tiny_run
    header = "| part | figure | value | baseline | ratio | goal | met |"
    assert header in md
    figures_part = md.partition("Projection")[0]
    table = [l for l in figures_part.splitlines() if l.startswith("| ") and " | " in l]
    rows = [l for l in table if l.split(" | ")[0][2:] in suite.PARTS]
    assert len(rows) == len(doc["figures"])
    assert any("| met |" in l or "| missed |" in l for l in rows)
    assert "Projection" in md and "| stage | work |" in md
    assert "`--tiny`" in md and "Not representative" in md
    # README: the block between the markers is replaced, the rest untouched
    assert "old table" not in readme
    assert header in readme
    head, _, rest = readme.partition("<!-- bench:begin -->")
    assert head == README.partition("<!-- bench:begin -->")[0]
    assert rest.endswith("<!-- bench:end -->\n\n## After\nThe end.\n")


def test_inputs_are_checked(tmp_path):
    assert suite.parse_parts(None) == suite.PARTS
    assert suite.parse_parts("reduce, kernels") == ("kernels", "reduce")
    with pytest.raises(OocError, match="unknown part"):
        suite.parse_parts("kernels,gpu")
    no_markers = tmp_path / "README.md"
    no_markers.write_text("# no markers\n")
    with pytest.raises(OocError, match="bench:begin"):
        suite.update_readme(no_markers, {})
    # a run of other parts writes its own block, never the whole suite's table
    assert suite.readme_markers(("width",)) == ("<!-- bench-width:begin -->",
                                                "<!-- bench-width:end -->")
    assert suite.readme_markers(suite.PARTS) == (suite.BEGIN, suite.END)
    with pytest.raises(OocError, match="bench-width:begin"):
        suite.update_readme(no_markers, {"parts": {"width": {}}})
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "nope", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_machine_slug():
    assert suite.machine_slug("cpu", "Intel(R) Xeon(R) Platinum 8488C", 2) == \
        "cpu-2c-xeon-8488c"
    assert suite.machine_slug("cpu", "AMD EPYC 7763 64-Core Processor", 16) == \
        "cpu-16c-epyc-7763"
    assert suite.machine_slug("cpu", "Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", 8) == \
        "cpu-8c-i7-1165g7"
    assert suite.machine_slug("cuda", "Intel(R) Xeon(R) Platinum 8480+", 16,
                              "NVIDIA H100 80GB HBM3") == "cuda-h100-80gb-16c-xeon-8480"


def test_from_json_rerenders_without_measuring(tiny_run, tmp_path, capsys):
    doc, md, _, json_path = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text(README)
    main(["bench", "--from-json", str(json_path), "--out", str(tmp_path / "again"),
          "--update-readme", "--readme", str(readme)])
    assert (tmp_path / "again" / "test-box.md").read_text() == md
    assert json.loads((tmp_path / "again" / "test-box.json").read_text()) == doc
    assert "| part | figure |" in readme.read_text() and "old table" not in readme.read_text()
    assert "| part | figure |" in capsys.readouterr().out


def test_width_part_runs_only_when_named_and_reports_its_figures(tmp_path):
    """`bench --only width --tiny`: both budgets (one without panels, one with), every
    figure finite, peak RSS within --memory, row max and baseline against float64."""
    assert "width" not in suite.PARTS and suite.parse_parts("width") == ("width",)
    out = tmp_path / "results"
    main(["bench", "--only", "width", "--tiny", "--out", str(out), "--machine", "w-box",
          "--quiet"])
    doc = json.loads((out / "w-box.json").read_text())
    width = doc["parts"]["width"]
    runs = list(width["runs"].values())
    assert [(r["plan"]["panels"] > 1, r["precision"]) for r in runs] == \
        [(False, "fp32"), (True, "fp32"), (False, "bf16")]
    for r in runs:
        tol = 2e-3 if r["precision"] == "bf16" else 1e-5
        assert r["peak_rss_bytes"] <= r["memory_bytes"]
        assert r["row_max_error"] < tol and r["baseline_error"] < tol
        assert 0 < r["fraction_per_cpu_s"] and 0 < r["plan_over_actual"]
        # the wall estimate's cores (measured with the dry run's rates) and the load
        # the dry run and the reduce met are recorded beside both ratios
        assert 0 < r["rates"]["cores_now"] <= r["rates"]["threads"]
        assert r["plan_over_actual_cpu"] > 0 and r["other_jobs_cpu_share_dry_run"] >= 0
    rows = [r for r in doc["figures"] if r["part"] == "width"]
    assert len(rows) == 7 * len(runs)
    assert all(r["ratio"] is None or math.isfinite(r["ratio"]) for r in rows)
    assert "| width | width 2 x 128" in (out / "w-box.md").read_text()


def test_verify_bench_measures_the_digests_against_whole_files(tmp_path):
    """bench_verify at a small width: universal ran on files written by the reduce's own
    writer, and hashing the digested arrays is a small part of hashing the whole files."""
    from ooc_universal.bench import bench_verify
    doc = bench_verify.run(["--layers", "2", "--d-mlp", "64", "--pairs", "2",
                            "--workdir", str(tmp_path)])
    assert doc["pairs"] == 2 and doc["n_neurons"] == 128 and doc["step_s"] > 0
    # digested: ref/{mean,var,zero_var}, other/{...}, row_*, col_*, one baseline draw
    n = 128
    assert doc["digested_bytes"] == 2 * (n * (8 + 8 + 1) * 2 + n * (4 + 8) * 2 + n * 4)
    assert doc["digested_bytes"] < sum(doc["file_bytes"]) / 2
    assert 0 < doc["verify_fraction"] and 0 < doc["whole_file_fraction"]


def test_wall_estimate_is_cpu_work_over_the_cores_measured_now():
    """plan.expected_seconds with measured cores: each compute phase's CPU-seconds (per
    CPU-second rates) over min(its threads, cores_now), rotations on one thread; reads,
    checkpoints and the output at their wall rates. Checked against a hand computation."""
    from ooc_universal.plan import PairShape, Rates, expected_seconds, make_plan
    plan = make_plan(2048, 512, [PairShape("b", 512, 128)], memory="4GB",
                     store_chunk_rows=64, block_tokens=1024)
    cpu = dict(gemm_flops_per_s=2e10, baseline_flops_per_s=1e10, centre_elements_per_s=1e8,
               tile_elements_per_s=2e8, normals_per_s=1e7)
    rates = Rates(gemm_flops_per_s=9e9, baseline_flops_per_s=9e9, read_bytes_per_s=1e8,
                  disk_bytes_per_s=5e7, per_cpu_s=cpu, threads=2, cores_now=1.5)
    got = expected_seconds(plan, rates)
    kinds = plan.flops_by_kind
    centred = 2048 * (512 + 512 * (len(plan.panels) + 1))
    want = {"gemm": (kinds["cross"] + kinds["self"]) / 2e10 / 1.5,
            "baseline_gemm": (kinds["baseline"] + kinds["scales"]) / 1e10 / 1.5,
            "centre": centred / 1e8 / 1.5, "tile_max": 512 * 512 / 2e8 / 1.5,
            "rotations": 4 * 128 * 128 / 1e7,  # one thread: CPU-seconds = wall seconds
            "read": plan.bytes_read / 1e8, "output": plan.output_bytes / 5e7,
            # sha256 of every store block read once, and of the pair file twice (its
            # checksum, its per-dataset digests), on one thread at the default rate
            "verify": (2048 * 2 * (512 + 512) + 2 * plan.output_bytes) / 7e8}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))
    # CPU time: the same work at the per-CPU-second rates, no division by cores
    per_cpu = expected_seconds(plan, rates, per_cpu=True)
    assert per_cpu["gemm"] == pytest.approx(want["gemm"] * 1.5)
    # fewer cores than threads now: the compute phases stretch, the single-threaded not
    slow = expected_seconds(plan, Rates(**{**rates.__dict__, "cores_now": 0.5}))
    assert slow["gemm"] == pytest.approx(3 * want["gemm"])
    assert slow["rotations"] == pytest.approx(2 * want["rotations"])
    # no cores measured (a given GEMM rate, a GPU): the wall rates as they are
    plain = expected_seconds(plan, Rates(gemm_flops_per_s=9e9, baseline_flops_per_s=9e9))
    assert plain["gemm"] == pytest.approx((kinds["cross"] + kinds["self"]) / 9e9)


def test_convergence_snapshots_are_in_the_plans_flops_and_time():
    """Each convergence snapshot finalizes once more: its baseline (2 Na Nb d per draw)
    and rotated scales (2 Nb d^2 per draw) are FLOPs of the plan, costed at the
    baseline's rate, and its tile max at the tile rate (by hand)."""
    from ooc_universal.plan import PairShape, Rates, expected_seconds, make_plan
    args = (2048, 512, [PairShape("b", 512, 128)])
    kw = dict(memory="4GB", store_chunk_rows=64, block_tokens=1024, baseline_draws=2)
    none, three = make_plan(*args, **kw), make_plan(*args, **kw, snapshots=3)
    assert "snapshot" not in none.flops_by_kind
    assert three.flops_by_kind["snapshot"] == pytest.approx(
        3 * 2 * (2.0 * 512 * 512 * 128 + 2.0 * 512 * 128 ** 2))
    assert three.flops == pytest.approx(none.flops + three.flops_by_kind["snapshot"])
    rates = Rates(gemm_flops_per_s=1e10, baseline_flops_per_s=2e9, tile_elements_per_s=1e6)
    a, b = expected_seconds(none, rates), expected_seconds(three, rates)
    assert b["baseline_gemm"] - a["baseline_gemm"] == pytest.approx(
        three.flops_by_kind["snapshot"] / 2e9)
    assert b["tile_max"] == pytest.approx(4 * a["tile_max"])


def test_verification_is_in_the_plan_and_a_stream_hashes_no_store():
    """The plan's "verify" phase: the stores' bytes hashed once as they are read plus the
    pair files hashed twice, at the sha256 rate (by hand); a streamed reduce reads no
    store, so only its outputs count. At the paper's shape it is a small share."""
    from ooc_universal.plan import (PairShape, Rates, StreamShape, expected_seconds,
                                    make_plan, verify_bytes)
    pairs = [PairShape("b", 1024, 256)]
    store = make_plan(4096, 1024, pairs, memory="4GB", store_chunk_rows=64)
    assert verify_bytes(store) == 4096 * 2 * (1024 + 1024) + 2 * store.output_bytes
    rates = Rates(hash_bytes_per_s=1e8)
    assert expected_seconds(store, rates)["verify"] == pytest.approx(
        verify_bytes(store) / 1e8)
    stream = make_plan(4096, 1024, pairs, memory="4GB", store_chunk_rows=64,
                       stream=StreamShape(positions=4096, flops_ref=1e6, flops_others=(1e6,),
                                          resident_bytes=1 << 20, transient_bytes=1 << 20))
    assert stream.source == "stream" and verify_bytes(stream) == 2 * stream.output_bytes
    paper = make_plan(5_000_000, 36864, [PairShape(f"o{i}", 36864, 3072) for i in range(4)],
                      memory="16GB", store_chunk_rows=4096)
    secs = expected_seconds(paper, Rates())
    assert secs["verify"] < 0.01 * secs["total"]
