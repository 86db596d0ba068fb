"""The layout's rules, checked on the source (README: Architecture).

- kernels/ imports nothing of ours (pure array functions).
- Only formats/ opens the files the steps exchange (HDF5, parquet, npz, the JSON/CSV
  outputs); a few modules own a file kind of their own (named below, with why).
- A step reads the formats of earlier steps, never their code: steps/ do not import
  one another, formats/ import no step, and the library never imports cli/.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "ooc_universal"

# calls that open a step's data file
OPENERS = {"h5py.File", "pd.read_parquet", "pd.read_csv", "np.load", "np.savez",
           "np.savez_compressed", "json.load", "json.loads", "csv.reader", "csv.DictReader",
           "csv.writer", "csv.DictWriter"}
OPENER_METHODS = {"to_parquet", "to_csv", "read_text", "read_bytes"}
# modules outside formats/ that own a file kind of their own
OWNERS = {
    "config.py": "RUN/config.toml and the demo zoo's zoo.json preset",
    "rundir.py": "checksum sidecars, atomic JSON writes, locks",
    "zoo.py": "a zoo's zoo.json, training logs and checkpoints (zoo train)",
    "faults.py": "the fault-injection spec",
    "models.py": "model configs and safetensors headers (validation before loading)",
    "steps/tokens.py": "the user's raw sources (text files, .npy token ids)",
    "report/__init__.py": "its own output, RUN/report/ (written here; read via rundir)",
}


def _modules(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "zoo_data" not in p.parts)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else f"<relative>.{node.module}"
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _file_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in OPENERS or (isinstance(node.func, ast.Attribute)
                                   and node.func.attr in OPENER_METHODS):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name or node.func.attr}")
    return found


def test_kernels_import_nothing_of_ours():
    bad = [f"{p.name}: {m}" for p in _modules(ROOT / "kernels") for m in _imports(p)
           if m.startswith("ooc_universal") and not m.startswith("ooc_universal.kernels")]
    assert not bad, bad


def test_only_format_owners_open_step_files():
    bad = []
    for p in _modules(LIB):
        rel = p.relative_to(LIB)
        if rel.parts[0] == "formats" or str(rel) in OWNERS:
            continue
        bad += _file_calls(p)
    for p in _modules(ROOT / "cli"):
        bad += _file_calls(p)
    assert not bad, "open these through ooc_universal.formats: " + "; ".join(bad)


def test_arrows_point_down_the_data_flow():
    bad = []
    for p in _modules(LIB):
        rel = p.relative_to(LIB)
        for m in _imports(p):
            if m.startswith("ooc_universal.cli") and rel.name != "__main__.py":
                bad.append(f"{rel} imports the CLI ({m})")
            if rel.parts[0] == "formats" and m.startswith("ooc_universal.steps"):
                bad.append(f"{rel} (a format) imports a step ({m})")
            if rel.parts[0] == "steps" and m.startswith("ooc_universal.steps"):
                bad.append(f"{rel} imports another step's code ({m})")
            if rel.parts[0] in ("formats", "steps") and m.startswith("ooc_universal.report"):
                bad.append(f"{rel} imports the report ({m})")
    assert not bad, bad


def test_the_readme_tree_matches_the_package():
    """Every module the README's Architecture tree names exists, and every module of the
    package is named there."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    named, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        del stack[depth:]
        for token in line.split():
            if token.endswith("/"):
                stack.append(token)
                break
            if not token.endswith(".py"):
                break
            named.add("".join(stack) + token)
    named = {n.replace("ooc_universal/", "", 1) for n in named}
    actual = {str(p.relative_to(ROOT)).replace("ooc_universal/", "", 1)
              for p in _modules(LIB) if p.name != "__init__.py" and p.name != "__main__.py"}
    actual |= {f"{d}/{p.name}" for d in ("kernels", "cli") for p in _modules(ROOT / d)
               if p.name != "__init__.py"}
    assert named, "no tree found under '## Architecture'"
    assert named == actual, (f"named in README but missing: {sorted(named - actual)}; "
                             f"in the package but not in README: {sorted(actual - named)}")


def test_the_checkout_kernels_folder_does_not_hide_hf_kernels(tmp_path):
    """Run from the checkout's root, our `kernels/` folder is importable as a top-level
    `kernels` and would shadow Hugging Face's package of that name, which transformers
    >= 5.25 imports (`from kernels import CUDAProperties`). A stand-in HF package later on
    the path must still be the `kernels` everyone gets once ooc_universal is imported."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'hf'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path / "site")]))
    code = ("import ooc_universal, kernels; "
            "print(kernels.CUDAProperties); "
            "from ooc_universal.kernels import comoments; print(comoments.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hf", "ooc_universal.kernels.comoments"]
