"""Export to torchvision: strict loading and identical stage-4 features (needs torch)."""
import functools
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from detcon_jax.export import torchvision as export
from detcon_jax.models.resnet import ResNet, normalize_images


@functools.lru_cache(maxsize=None)
def perturbed_variables(model, size, seed=0):
  """Random init with non-trivial BN statistics, so every mapped tensor matters (cached: slow to compile)."""
  v = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)), train=False))(
      jax.random.PRNGKey(seed))
  leaves, tree = jax.tree_util.tree_flatten(v["batch_stats"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(v["batch_stats"])[0]]
  leaves = [0.1 * jax.random.normal(k, l.shape) if "mean" in path
            else jax.random.uniform(k, l.shape, minval=0.5, maxval=1.5)
            for path, k, l in zip(paths, keys, leaves)]
  p_leaves, p_tree = jax.tree_util.tree_flatten(v["params"])
  p_keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(p_leaves))
  p_leaves = [l + 0.05 * jax.random.normal(k, l.shape) if l.ndim == 1 else l
              for k, l in zip(p_keys, p_leaves)]                 # BN scale/bias off 1/0
  return {"params": jax.tree_util.tree_unflatten(p_tree, p_leaves),
          "batch_stats": jax.tree_util.tree_unflatten(tree, leaves)}


def test_state_dict_without_torch_has_torchvision_keys():
  sd = export.torchvision_state_dict(perturbed_variables(ResNet(depth=18), 64), depth=18)
  assert sd["conv1.weight"].shape == (64, 3, 7, 7)
  assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
  assert sd["layer4.1.bn2.running_var"].shape == (512,)
  assert sd["fc.weight"].shape == (1000, 512) and not sd["fc.weight"].any()
  assert len(sd) == 122  # torchvision resnet18().state_dict() has 122 entries


def test_export_refuses_width_multiplier():
  with pytest.raises(ValueError, match="width"):
    export.torchvision_state_dict({"params": {}, "batch_stats": {}}, depth=50, width=2.0)
  with pytest.raises(ValueError, match="stem_pool"):
    export.torchvision_state_dict({"params": {}, "batch_stats": {}}, depth=50, stem_pool=False)


# The torch side runs in a fresh interpreter: torchvision imports triton, and
# importing triton in a process that already loaded TensorFlow (as this test
# process has, through the data pipelines) segfaults. The child imports only
# numpy, torch and torchvision, and compares against features JAX computed here.
TORCH_SIDE = """
import sys
import numpy as np
import torch
import torchvision

depth, weights, arrays = int(sys.argv[1]), sys.argv[2], np.load(sys.argv[3])
net = getattr(torchvision.models, f"resnet{depth}")()
net.load_state_dict(torch.load(weights), strict=True)
net.eval()
trunk = torch.nn.Sequential(*list(net.children())[:-2])   # up to layer4
with torch.no_grad():
  got = trunk(torch.from_numpy(arrays["x"].transpose(0, 3, 1, 2).copy())).numpy()
want = arrays["want"]
got = got.transpose(0, 2, 3, 1)
scale = np.abs(want).max()
assert scale > 0.1, scale                                  # not trivially zero
# float32 rounding differs between the two conv implementations (torch in
# float32 is as far from torch in float64 as JAX is), so 1e-4 is relative to
# the feature scale.
np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
print("max abs difference", float(np.abs(got - want).max()), "of scale", float(scale))
"""


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_torchvision_loads_strictly_and_matches_features(depth, tmp_path):
  pytest.importorskip("torch")
  if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed (pip install -e '.[export]')")
  size = 64
  model = ResNet(depth=depth)
  variables = perturbed_variables(model, size)
  weights = tmp_path / f"resnet{depth}.pt"
  export.save(export.torchvision_state_dict(variables, depth=depth), str(weights))

  images = np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32)
  x = np.asarray(normalize_images(jnp.asarray(images)))
  want = np.asarray(model.apply(variables, jnp.asarray(x), train=False)["stage4"])
  arrays = tmp_path / "features.npz"
  np.savez(arrays, x=x, want=want)
  child = subprocess.run([sys.executable, "-c", TORCH_SIDE, str(depth), str(weights), str(arrays)],
                         capture_output=True, text=True, timeout=600)
  assert child.returncode == 0, f"torch side failed ({child.returncode}):\n{child.stderr[-3000:]}"
