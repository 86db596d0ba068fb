"""The command line as a user meets it: every --help has examples, --json is JSON on
stdout and nothing else, bad values are one line with exit status 2, one progress flag,
one device syntax, --run-dir/-R everywhere; and the hub download size extract prints
(tested offline with a stand-in for HfApi)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from ooc_universal.cli.main import cli, main

REPO = Path(__file__).resolve().parents[1]
HELP_COMMANDS = [(), ("tokens",), ("extract",), ("reduce",), ("universal",), ("cards",),
                 ("persistence",), ("ablate",), ("report",), ("run",), ("status",), ("clean",),
                 ("zoo",), ("zoo", "train"), ("bench",)]
QUICK_COMMANDS = ((), ("zoo",), ("status",), ("clean",))  # no long work: no progress bar


@pytest.mark.parametrize("path", HELP_COMMANDS, ids=lambda p: " ".join(p) or "group")
def test_help_has_examples(path):
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output and "ooc-universal " in res.output.split("Example", 1)[1]
    if path not in QUICK_COMMANDS:
        assert "--progress / --no-progress" in res.output
    if path not in ((), ("zoo",), ("zoo", "train"), ("bench",)):
        assert "-R, --run-dir RUN" in res.output


def test_group_help_documents_exit_statuses():
    out = CliRunner().invoke(cli, ["--help"]).output
    section = out.split("Exit status:", 1)[1]
    for status, word in (("0", "done"), ("1", "run-time failure"), ("2", "usage error"),
                         ("130", "interrupted")):
        assert any(line.split()[:1] == [status] and word in line
                   for line in section.splitlines()), (status, section)


# ---------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """A run made step by step with --json, two tiny models at two checkpoints each:
    {command: CliRunner result}."""
    from tests.tiny import save_tiny
    root = tmp_path_factory.mktemp("cli")
    for i in range(2):
        for step in (10, 20):
            save_tiny(root / "zoo" / f"m{i}" / f"checkpoint-{step}", seed=10 * i + step)
    text = root / "text.txt"
    text.write_bytes(bytes(range(32, 127)) * 120)
    rd = str(root / "run")
    models = [str(root / "zoo" / f"m{i}@{s}") for s in (10, 20) for i in range(2)]
    runner, out = CliRunner(), {"run_dir": Path(rd)}
    commands = {
        "tokens": ["tokens", "-R", rd, "--source", str(text), "--n-tokens", "384",
                   "--n-eval-tokens", "128", "--window", "32", "--tokenizer", "bytes"],
        "extract": ["extract", "-R", rd, *models, "--device", "cpu"],
    }
    for name, args in commands.items():
        out[name] = runner.invoke(cli, [*args, "--no-progress", "--json"])
        assert out[name].exit_code == 0, out[name].output
    for step in (10, 20):   # reduce is another helper's command: no --json there
        res = runner.invoke(cli, ["reduce", "--run-dir", rd, "--reference", f"m0@{step}",
                                  f"m1@{step}", "--baseline-draws", "2", "--no-progress"])
        assert res.exit_code == 0, res.output
    for name, args in {
            "universal": ["universal", "-R", rd, "--thresholds", "0.1,0.2"],
            "persistence": ["persistence", "-R", rd],
            "ablate": ["ablate", "-R", rd, "--control-draws", "2", "--device", "cpu"],
            "cards": ["cards", "-R", rd, "--top-n", "2"],
            "report": ["report", "-R", rd]}.items():
        out[name] = runner.invoke(cli, [*args, "--no-progress", "--json"])
        assert out[name].exit_code == 0, out[name].output
    return out


def _doc(res):
    return json.loads(res.stdout)     # the whole of stdout is one JSON document


def test_tokens_and_extract_json(steps):
    tokens = _doc(steps["tokens"])
    assert tokens["n_tokens"] == 384 and tokens["written"] and len(tokens["hash"]) >= 12
    stores = _doc(steps["extract"])["stores"]
    assert [s["label"] for s in stores] == ["m0@10", "m1@10", "m0@20", "m1@20"]
    assert all(Path(s["path"]).is_file() and s["tokens_written"] == 384 for s in stores)
    assert all(s["download_bytes"] is None for s in stores)   # local models


def test_universal_json_is_table1(steps):
    doc = _doc(steps["universal"])
    table1 = json.loads((steps["run_dir"] / "universal" / "table1.json").read_text())
    assert doc["table1"] == table1["rows"]
    assert all(Path(p).is_file() for p in doc["wrote"])


def test_persistence_json_is_its_rows(steps):
    doc = _doc(steps["persistence"])
    rows = json.loads((steps["run_dir"] / "persistence" / "persistence.json").read_text())["rows"]
    assert len(doc["persistence"]) == len(rows) > 0
    assert {(r["t1"], r["t2"]) for r in doc["persistence"]} == {(10, 20)}


def test_ablate_json_is_the_tidy_summary(steps):
    doc = _doc(steps["ablate"])
    saved = json.loads((steps["run_dir"] / "ablate" / "ablation.json").read_text())["rows"]
    assert doc["rows"] == saved and doc["n_models"] == 2
    assert {r["scope"] for r in doc["rows"]} == {"all", "layer"}
    assert all(r["layer"] is None for r in doc["rows"] if r["scope"] == "all")


def test_cards_and_report_json(steps):
    cards = _doc(steps["cards"])
    assert cards["cards"] and Path(cards["wrote"][0]).is_file()
    report = _doc(steps["report"])["wrote"]
    assert Path(report["html"]).is_file() and Path(report["md"]).is_file()


def test_tables_of_the_run_have_tidy_columns(steps):
    """Every CSV and parquet file the steps wrote, and the rows of their JSON tables:
    an integer layer where one is shown, no column named after a DataFrame method."""
    import pandas as pd
    rd = steps["run_dir"]
    frames = {p: pd.read_csv(p) for p in rd.rglob("*.csv")}
    frames.update({p: pd.read_parquet(p) for p in rd.rglob("*.parquet")})
    for name in ("universal/table1.json", "persistence/persistence.json",
                 "ablate/ablation.json"):
        doc = json.loads((rd / name).read_text())
        for key in ("rows", "draws"):
            if doc.get(key):
                frames[rd / f"{name}:{key}"] = pd.DataFrame(doc[key])
    assert len(frames) >= 10
    for path, df in frames.items():
        assert [c for c in df.columns if hasattr(pd.DataFrame, c)] == [], path
        if "scope" in df.columns:
            assert len(df[df.layer == 0]) > 0, path
            assert df.loc[df.scope == "all", "layer"].isna().all(), path


def test_the_same_command_again_prints_json_too(steps):
    """A step whose output is complete says so in JSON as well (tokens: kept as is)."""
    rd = str(steps["run_dir"])
    res = CliRunner().invoke(cli, ["tokens", "--run-dir", rd, "--source",
                                   str(steps["run_dir"].parent / "text.txt"), "--n-tokens",
                                   "384", "--n-eval-tokens", "128", "--window", "32",
                                   "--tokenizer", "bytes", "--json"])
    assert res.exit_code == 0 and _doc(res)["written"] is False
    res = CliRunner().invoke(cli, ["extract", "-R", rd,
                                   str(steps["run_dir"].parent / "zoo" / "m0@10"), "--json"])
    assert res.exit_code == 0 and _doc(res)["stores"][0]["status"] == "skipped"


def test_bench_from_json_and_zoo_train_json(tmp_path):
    results = REPO / "bench" / "results" / "cpu-2c-xeon.json"
    res = CliRunner().invoke(cli, ["bench", "--from-json", str(results), "--json"])
    assert res.exit_code == 0, res.output
    assert _doc(res)["results"] == json.loads(results.read_text())
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(32, 127)) * 60)
    res = CliRunner().invoke(cli, [
        "zoo", "train", "--out", str(tmp_path / "zoo"), "--n-models", "1", "--n-layer", "1",
        "--n-embd", "16", "--n-head", "1", "--d-mlp", "16", "--context", "16",
        "--batch-size", "2", "--steps", "4", "--warmup-steps", "1", "--checkpoint-steps",
        "2,4", "--eval-bytes", "256", "--corpus", str(corpus), "--device", "cpu",
        "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    doc = _doc(res)
    assert doc["steps"] == [2, 4] and doc["complete"] and Path(doc["zoo_json"]).is_file()
    assert all(v > 0 for v in doc["models"][0]["heldout_loss"].values())


# ---------------------------------------------------------------------------- usage errors

def _bad_cases(rd: str) -> list:
    return [
        ["universal", "-R", rd, "--thresholds", "0.5,x"],
        ["universal", "-R", rd, "--bogus"],
        ["persistence"],                                     # no run directory
        ["ablate", "-R", rd, "--device", "gpu"],
        ["ablate", "-R", rd, "--model", "no-equals-sign"],
        ["ablate", "-R", rd, "--control-draws", "-1"],
        ["extract", "-R", rd, "--device", "cuda:x", "m@1"],
        ["extract", "-R", rd, "--device", "cpu:0", "m@1"],
        ["tokens", "-R", rd, "--source", "t.txt", "--n-tokens", "0", "--tokenizer", "bytes"],
        ["cards", "-R", rd, "--top-n", "many"],
        ["report", rd, "--run-dir", rd + "-other"],
        ["report"],
        ["bench", "--device", "tpu"],
        ["bench", "--quick", "--tiny"],
        ["zoo", "train", "--out", rd, "--device", "cuda:"],
        ["zoo", "train", "--out", rd, "--preset", "nope"],
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("x"))))
def test_bad_values_are_one_line_exit_2(case, tmp_path, capsys):
    args = _bad_cases(str(tmp_path / "run"))[case]
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (args, out, err)
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_deprecated_quiet_still_parses():
    from ooc_universal.bench import bench_reduce, bench_stream, bench_width
    for mod in (bench_width, bench_stream):
        assert mod.build_parser().parse_args(["--quiet"]).progress is False
        assert mod.build_parser().parse_args(["--no-progress"]).progress is False
        assert mod.build_parser().parse_args([]).progress is True
    parsed = bench_reduce.build_parser().parse_args(["--quiet"])
    assert parsed.progress is False
    assert bench_reduce.build_parser().parse_args(["--no-progress"]).progress is False
    assert bench_reduce.build_parser().parse_args([]).progress is True


# ---------------------------------------------------------------------------- the hub


class FakeApi:
    """HfApi's model_info as the hub answers it with files_metadata=True."""

    def __init__(self, files: dict):
        self.files, self.calls = files, []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        self.calls.append((repo_id, revision, files_metadata))
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s)
                                         for n, s in self.files.items()])


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def test_download_size_sums_the_weight_files(hub_cache):
    from ooc_universal.hub import download_size
    api = FakeApi({"config.json": 700, "model.safetensors": 497_000_000,
                   "pytorch_model.bin": 548_000_000, "tf_model.h5": 1, "README.md": 10})
    got = download_size("org/name", "checkpoint-100", api=api)
    assert api.calls == [("org/name", "checkpoint-100", True)]
    assert got.files == ("model.safetensors",) and got.n_bytes == 497_000_000
    assert got.message("a@100").startswith("downloading 0.50 GB for a@100")
    shards = FakeApi({"model-00001-of-00002.safetensors": 3_000_000_000,
                      "model-00002-of-00002.safetensors": 1_500_000_000,
                      "model.safetensors.index.json": 20_000})
    assert download_size("org/big", None, api=shards).n_bytes == 4_500_000_000
    assert download_size("org/old", None, api=FakeApi({"pytorch_model.bin": 5})).n_bytes == 5


def test_download_size_is_none_cached_offline_or_unreachable(hub_cache, monkeypatch):
    from huggingface_hub import constants
    from ooc_universal.hub import download_size
    from tests.tiny import make_hub_cache, save_tiny
    src = save_tiny(hub_cache / "src")
    make_hub_cache(hub_cache, src, "org/name", "checkpoint-100")
    api = FakeApi({"model.safetensors": 10**9})
    assert download_size("org/name", "checkpoint-100", api=api) is None
    assert api.calls == []                                   # the cache answered
    assert download_size("org/name", "checkpoint-200", api=api).n_bytes == 10**9

    # sharded: the hub lists the shards, only those not in the cache count
    shard_dir = hub_cache / "shards"
    shard_dir.mkdir()
    (shard_dir / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    make_hub_cache(hub_cache, shard_dir, "org/sharded", "main")
    listing = {"model-00001-of-00002.safetensors": 10, "model-00002-of-00002.safetensors": 7,
               "model.safetensors.index.json": 3}
    got = download_size("org/sharded", "main", api=FakeApi(listing))
    assert got.files == ("model-00002-of-00002.safetensors",) and got.n_bytes == 7

    class Down:
        def model_info(self, *a, **k):
            raise OSError("network is unreachable")
    assert download_size("org/other", "main", api=Down()) is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert download_size("org/other", "main", api=api) is None


def test_extract_prints_the_download_size_before_it_starts(hub_cache, monkeypatch):
    import huggingface_hub
    import ooc_universal.cli.extract as cli_extract
    api = FakeApi({"model.safetensors": 2_500_000_000, "config.json": 600})
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    events = []

    def fake_extract(run_dir, spec, *a, stats=None, **k):
        events.append(("extract", spec.label))
        stats.update(status="skipped")
        return Path(run_dir) / "stores" / f"{spec.label}.h5"
    monkeypatch.setattr(cli_extract, "extract_store", fake_extract)
    monkeypatch.setattr(cli_extract.click, "echo",
                        lambda msg="", **k: events.append(("echo", str(msg))))
    from ooc_universal.models import parse_model_spec
    label = parse_model_spec("org/name@checkpoint-7").label     # the store's name
    cli_extract.extract.main(["-R", str(hub_cache / "run"), "org/name@checkpoint-7",
                              "--no-progress"], standalone_mode=False)
    assert events[0] == ("echo", f"downloading 2.50 GB for {label} "
                                 "(1 weight file(s) of org/name@checkpoint-7)")
    assert events[1] == ("extract", label)
    assert api.calls == [("org/name", "checkpoint-7", True)]


def test_weight_loading_bar_off_keeps_the_hub_bars(monkeypatch):
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging
    from ooc_universal.hub import no_weight_loading_bar
    monkeypatch.setattr(hub_utils.tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None, raising=False)
    hf_logging.enable_progress_bar()
    try:
        with no_weight_loading_bar():
            assert not hf_logging.is_progress_bar_enabled()
            assert not hub_utils.are_progress_bars_disabled()
        assert hf_logging.is_progress_bar_enabled()
        assert not hub_utils.are_progress_bars_disabled()
        hub_utils.disable_progress_bars()          # a user who turned the hub's bars off
        with no_weight_loading_bar():
            assert hub_utils.are_progress_bars_disabled()
        assert hub_utils.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
