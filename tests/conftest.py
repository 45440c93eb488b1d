"""Session fixtures the tests share; the helpers they use live in tests/harness.py."""
import pytest

from data_pipelines import build
from harness import TINY_DEMO, benchmark_module


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
  """(records dir, manifest) of tiny demo records (harness.TINY_DEMO; masks fh, grid,
  gt), built once per session. A test that changes them must leave them as built."""
  out = str(tmp_path_factory.mktemp("tiny_demo"))
  return out, build.build("demo", out, masks="fh,grid,gt", workers=1, **TINY_DEMO)


@pytest.fixture(scope="session")
def train_step():
  """benchmarks/train_step.py as a module."""
  return benchmark_module("train_step")
