#!/usr/bin/env bash
# The wheels the GPU check needs on the lent H200 machine, which reaches no package
# registry: its image holds torch, transformers, numba, h5py, pandas, pyarrow, xarray,
# click, tqdm, matplotlib, pytest (Python 3.12) but not dask, distributed or pydantic.
# Run here, where pip reaches the registries; then carry the folder:
#
#   bash bench/gpu_wheels.sh            # -> .whl/ in the repo root (about 6 MB; git ignores it)
#   device run, carry [".whl"]: bash bench/gpu_check.sh
#
# The versions are the ones installed here (what the suite ran with), where they are;
# gpu_check.sh installs whatever lies in .whl/ (pip --no-index --target /tmp/site) before
# the package itself (--no-deps --no-build-isolation: no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}"
DEST=.whl
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >> "$EXCLUDE"
# dask[array,distributed] and pydantic with what they need beyond the image's packages
# (typing-extensions: pydantic-core needs a newer one than the image may have)
NAMES=(dask distributed partd locket tblib tornado zict
       pydantic pydantic-core annotated-types typing-inspection typing-extensions)
mapfile -t PKGS < <("$PY" - "${NAMES[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PYEOF
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
rm -rf "$DEST"                     # one version of each: two would stop the install there
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PKGS[@]}"
ls "$DEST"
