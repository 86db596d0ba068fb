"""The typed RunConfig: every wrong type, range, unknown key or unparsable value, in a
TOML file or on the command line, is one line naming the field and the value, a non-zero
exit, and nothing written; a valid config round-trips through TOML unchanged."""
from __future__ import annotations

import tomllib

import pytest

from ooc_universal.cli.main import main
from ooc_universal.config import RunConfig, demo_config, paper_config, validated
from ooc_universal.errors import OocError

BASE = 'models = ["a", "b"]\n'

# (case id, TOML text, words the one error line must hold)
TOML_CASES = [
    ("n-tokens-string", BASE + '[tokens]\nn_tokens = "5000"\n', ["tokens.n_tokens", "'5000'", "integer"]),
    ("n-tokens-float", BASE + "[tokens]\nn_tokens = 2048.5\n", ["tokens.n_tokens", "2048.5"]),
    ("n-tokens-one", BASE + "[tokens]\nn_tokens = 1\n", ["tokens.n_tokens", "greater than or equal to 2"]),
    ("n-tokens-huge", BASE + "[tokens]\nn_tokens = 1000000000000000\n", ["tokens.n_tokens", "less than"]),
    ("window-float", BASE + "[tokens]\nwindow = 64.5\n", ["tokens.window", "64.5"]),
    ("window-negative", BASE + "[tokens]\nwindow = -1\n", ["tokens.window", "-1"]),
    ("eval-negative", BASE + "[tokens]\nn_eval_tokens = -5\n", ["tokens.n_eval_tokens"]),
    ("baseline-draws-negative", BASE + "[reduce]\nbaseline_draws = -3\n", ["reduce.baseline_draws", "-3"]),
    ("baseline-draws-zero", BASE + "[reduce]\nbaseline_draws = 0\n", ["reduce.baseline_draws", "0"]),
    ("precision-unknown", BASE + '[reduce]\nprecision = "fp8"\n', ["reduce.precision", "'fp8'", "fp32"]),
    ("seed-negative", BASE + "[reduce]\nseed = -1\n", ["reduce.seed", "-1"]),
    ("seed-float", BASE + "[reduce]\nseed = 1.5\n", ["reduce.seed", "1.5"]),
    ("seed-huge", BASE + "[ablate]\nseed = 99999999999999\n", ["ablate.seed"]),
    ("keep-covariance-string", BASE + '[reduce]\nkeep_covariance = "true"\n', ["reduce.keep_covariance", "'true'", "boolean"]),
    ("thresholds-string", BASE + '[universal]\nthresholds = "0.5"\n', ["universal.thresholds", "'0.5'", "list"]),
    ("thresholds-nan", BASE + "[universal]\nthresholds = [nan]\n", ["universal.thresholds", "NaN"]),
    ("thresholds-one", BASE + "[universal]\nthresholds = [1.0]\n", ["universal.thresholds", "(0, 1)"]),
    ("thresholds-empty", BASE + "[universal]\nthresholds = []\n", ["universal.thresholds", "[]"]),
    ("thresholds-duplicate", BASE + "[universal]\nthresholds = [0.5, 0.5]\n", ["universal.thresholds", "distinct"]),
    ("definition-unknown", BASE + '[universal]\ndefinition = "averaged"\n', ["universal.definition", "'averaged'"]),
    ("control-draws-string", BASE + '[ablate]\ncontrol_draws = "5"\n', ["ablate.control_draws", "'5'"]),
    ("ablate-mode-unknown", BASE + '[ablate]\nmode = "resample"\n', ["ablate.mode", "'resample'", "zero"]),
    ("layerwise-int", BASE + "[ablate]\nlayerwise = 1\n", ["ablate.layerwise", "boolean"]),
    ("device-unknown", BASE + '[compute]\ndevice = "gpu"\n', ["compute.device", "'gpu'", "cuda:N"]),
    ("device-cpu-index", BASE + '[compute]\ndevice = "cpu:1"\n', ["compute.device", "'cpu:1'"]),
    ("memory-unparsable", BASE + '[compute]\nmemory = "lots"\n', ["compute.memory", "'lots'", "8GB"]),
    ("memory-number", BASE + "[compute]\nmemory = 8\n", ["compute.memory", "8", "string"]),
    ("scheduler-no-scheme", BASE + '[compute]\nscheduler = "host:8786"\n', ["compute.scheduler", "tcp://"]),
    ("compression-unknown", BASE + '[extract]\ncompression = "zstd"\n', ["extract.compression", "'zstd'"]),
    ("unknown-top-key", BASE + "n_token = 5\n", ["unknown key 'n_token'", "models"]),
    ("unknown-section-key", BASE + "[tokens]\nwindw = 64\n", ["unknown key 'tokens.windw'", "window"]),
    ("unknown-section", BASE + "[extracts]\nbatch_size = 2\n", ["unknown key 'extracts'"]),
    ("models-string", 'models = "a,b"\n', ["models", "'a,b'", "list"]),
    ("models-one", 'models = ["a"]\n', ["models", "need at least two models"]),
    ("models-duplicate", 'models = ["a", "a"]\n', ["models", "once"]),
    ("models-missing", "[tokens]\nwindow = 64\n", ["models is missing"]),
    ("checkpoints-unsorted", BASE + "checkpoints = [300, 100]\n", ["checkpoints", "sorted", "[100, 300]"]),
    ("checkpoints-strings", BASE + 'checkpoints = ["1k"]\n', ["checkpoints", "'1k'"]),
    ("checkpoints-negative", BASE + "checkpoints = [-1]\n", ["checkpoints", "non-negative"]),
    ("reference-unknown", BASE + 'reference = "z"\n', ["reference 'z' is not among models"]),
    ("legacy-flat-bad", BASE + 'n_tokens = "5000"\n', ["tokens.n_tokens", "'5000'"]),
    ("not-toml", "models = [\n", ["not valid TOML"]),
]

CLI_CASES = [
    ("cli-checkpoints-1k", ["--checkpoints", "1k"], ["--checkpoints", "'1k'", "integer"]),
    ("cli-thresholds-word", ["--thresholds", "0.5,high"], ["--thresholds", "'high'"]),
    ("cli-thresholds-range", ["--thresholds", "0.5,1.5"], ["universal.thresholds", "(0, 1)"]),
    ("cli-n-tokens-float", ["--n-tokens", "2.5"], ["--n-tokens", "'2.5'"]),
    ("cli-window-one", ["--window", "1"], ["tokens.window", "1"]),
    ("cli-memory", ["--memory", "lots"], ["compute.memory", "'lots'"]),
    ("cli-device", ["--device", "tpu"], ["compute.device", "'tpu'"]),
    ("cli-precision", ["--precision", "fp8"], ["reduce.precision", "'fp8'"]),
    ("cli-baseline-draws", ["--baseline-draws", "-1"], ["reduce.baseline_draws", "-1"]),
    ("cli-seed", ["--seed", "-4"], ["seed", "-4"]),
    ("cli-ablate-mode", ["--ablate-mode", "x"], ["ablate.mode", "'x'"]),
    ("cli-steps", ["--steps", "tokens,bogus"], ["unknown steps", "bogus"]),
    ("cli-models-one", ["--models", "a"], ["need at least two models"]),
]


def _run(argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return exc.value.code, err


@pytest.mark.parametrize("case,text,words", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_toml_is_one_line(case, text, words, tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(text)
    run_dir = tmp_path / "run"
    code, err = _run(["run", str(cfg), "--run-dir", str(run_dir), "--no-progress"], capsys)
    assert code not in (0, None) and len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not run_dir.exists()  # nothing written, nothing that looks like a result


@pytest.mark.parametrize("case,args,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_is_one_line(case, args, words, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = _run(["run", "--run-dir", str(run_dir), "--no-progress", *args], capsys)
    assert code not in (0, None) and len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not run_dir.exists()


@pytest.mark.parametrize("make", [demo_config, paper_config])
def test_presets_round_trip_through_toml(make):
    cfg = make()
    again = RunConfig.from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg and again.hash() == cfg.hash()


def test_legacy_flat_keys_move_into_their_sections():
    cfg = RunConfig.from_dict({"models": ["a", "b"], "n_tokens": 4096, "seed": 7,
                               "ablate_mode": "mean", "extract_batch_size": 3})
    assert cfg.tokens.n_tokens == 4096 and cfg.ablate.mode == "mean"
    assert cfg.reduce.seed == cfg.universal.seed == cfg.ablate.seed == 7
    assert cfg.extract.batch_size == 3


def test_hash_ignores_where_and_how_fast():
    cfg = demo_config()
    faster = cfg.replace(device="cpu", memory="16GB", extract_batch_size=4)
    assert faster.hash() == cfg.hash()
    assert cfg.replace(n_tokens=1000).hash() != cfg.hash()
    assert cfg.replace(n_tokens=1000).differences(cfg) == ["n_tokens"]


def test_validated_names_the_section():
    from ooc_universal.config import ReduceConfig
    with pytest.raises(OocError, match=r"reduce: baseline_draws = 0 is invalid"):
        validated(ReduceConfig, {"baseline_draws": 0}, "reduce")
