"""The import contract in pyproject.toml (layer order, no cycles) holds: import-linter."""
import os
import shutil
import subprocess
from harness import ROOT


def test_import_contract_is_kept():
  exe = shutil.which("lint-imports")
  assert exe, "lint-imports missing: pip install -e '.[test]' (import-linter)"
  out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  assert "2 kept, 0 broken" in out.stdout
