#!/usr/bin/env bash
# Installs the reference implementation (sd-mecha 1.1.8 + torch from PyPI) into bench/.venv for
# the side-by-side benchmarks and the golden-fixture script. A large download (torch); never
# needed by the package, its tests or CI.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --upgrade pip >/dev/null
.venv/bin/pip install "sd-mecha==1.1.8" torch numpy
.venv/bin/python -c "import sd_mecha, torch; print('sd-mecha', sd_mecha.__file__, 'torch', torch.__version__)"
