"""launch/colab_demo.ipynb runs top to bottom (on CPU, a few steps), so it never rots."""
import os
import time

import pytest
from harness import ROOT

NOTEBOOK = os.path.join(ROOT, "launch", "colab_demo.ipynb")
STEPS = 3


@pytest.mark.slow   # 42 s; .ci/run runs it after the default suite
def test_colab_demo_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  from data_pipelines import build
  records = str(tmp_path / "records")          # a small demo set, so the run is short
  build.build("demo", records, masks="fh,grid,gt", workers=1, num_train=48, num_test=24,
              shard_size=48, progress=False)
  monkeypatch.setenv("DETCON_DEMO_STEPS", str(STEPS))
  monkeypatch.setenv("DETCON_DEMO_RECORDS", records)
  monkeypatch.setenv("DETCON_DEMO_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("DETCON_DEMO_EVALS", "knn,linear")       # the table's cheapest columns
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  t = time.time()
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  print(f"notebook executed in {time.time() - t:.0f} s")
  for cell in nb.cells:                       # per-cell wall time (nbclient's timestamps)
    ex = cell.get("metadata", {}).get("execution", {})
    if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
      import datetime
      t0, t1 = (datetime.datetime.fromisoformat(ex[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply"))
      print(f"  {(t1 - t0).total_seconds():6.1f} s  {cell.source.splitlines()[0][:60]}")
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", out
      text.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
      images += "image/png" in out.get("data", {})
  text = "\n".join(text)
  assert "runtime: cpu" in text and "detcon_jax already installed" in text
  assert "'train': 48" in text
  assert f"DetCon-B after {STEPS} steps vs random init" in text
  assert "random init" in text and "knn" in text.lower()
  assert images == 2                                  # masks over views, loss curve
