"""Session fixtures the tests share; the helpers they use live in tests/harness.py."""
import importlib.util
import os

import pytest

from data_pipelines import build
from harness import ROOT, TINY_DEMO


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
  """(records dir, manifest) of tiny demo records (harness.TINY_DEMO; masks fh, grid,
  gt), built once per session. A test that changes them must leave them as built."""
  out = str(tmp_path_factory.mktemp("tiny_demo"))
  return out, build.build("demo", out, masks="fh,grid,gt", workers=1, **TINY_DEMO)


@pytest.fixture(scope="session")
def train_step():
  """benchmarks/train_step.py as a module (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "train_step_benchmark", os.path.join(ROOT, "benchmarks", "train_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
