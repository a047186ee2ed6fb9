"""The GPU check still runs against the current code.

CI has no GPU, so ``scripts/cuda_check.py`` runs here with ``--device cpu``, where each
comparison is CPU against CPU. What this proves is that the script and the ``ml`` functions
it calls still fit together, so a GPU machine's short loan is not spent on a broken script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_check_runs_every_section_on_cpu():
    result = subprocess.run([sys.executable, "scripts/cuda_check.py", "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "0 failed"
    passed = [line for line in lines if line.startswith("PASS")]
    for section in ("features of GSPC", "compiled single-asset env", "portfolio env", "portfolio policy",
                    "discrete training", "continuous training", "portfolio training", "ONNX parity",
                    "resumes from its checkpoint"):
        assert any(section in line for line in passed), f"no passing check of {section}:\n{result.stdout}"
