"""Where a run's results go: TensorBoard on the first host (nothing elsewhere), and the
evaluation table at checkpoints and at the end of the run."""
from __future__ import annotations

import os

TB_DIR = "tb"


class TensorBoard:
  """Scalars and images to WORKDIR/tb (tf.summary)."""

  def __init__(self, workdir: str):
    import tensorflow as tf
    self._tf = tf
    self._writer = tf.summary.create_file_writer(os.path.join(workdir, TB_DIR))

  def scalars(self, step: int, values: dict) -> None:
    with self._writer.as_default(step=step):
      for k, v in values.items():
        self._tf.summary.scalar(k, v)
    self._writer.flush()

  def images(self, step: int, name: str, images) -> None:
    with self._writer.as_default(step=step):
      self._tf.summary.image(name, images, step=step, max_outputs=len(images))
    self._writer.flush()

  def close(self):
    self._writer.close()


class NoWriter:
  def scalars(self, step, values):
    pass

  def images(self, step, name, images):
    pass

  def close(self):
    pass


def make_writer(workdir: str, primary: bool):
  return TensorBoard(workdir) if primary else NoWriter()
