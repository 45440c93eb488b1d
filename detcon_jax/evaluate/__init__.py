"""Evaluation of frozen representations: kNN, linear probe, segment retrieval, mask quality.

Pure metric functions live in knn.py, linear_probe.py, retrieval.py and
mask_quality.py; features.py extracts frozen features; run.py holds the
registry, the table and `evaluate_workdir`; visualize.py draws TensorBoard
pictures. The two entry points other packages use are re-exported lazily here
(so importing the package does not pull in TensorFlow or the trainer).
"""

__all__ = ["evaluate_workdir", "view_mask_overlay_images"]


def __getattr__(name):
  if name == "evaluate_workdir":
    from detcon_jax.evaluate.run import evaluate_workdir
    return evaluate_workdir
  if name == "view_mask_overlay_images":
    from detcon_jax.evaluate.visualize import view_mask_overlay_images
    return view_mask_overlay_images
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
