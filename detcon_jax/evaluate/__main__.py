"""Evaluate a training run: python -m detcon_jax.evaluate --workdir=runs/demo

Prints kNN, linear-probe, segment-retrieval, dense linear (seg_linear) and
multi-label mAP numbers (seg_finetune on request; --compare=DIR adds rows) for the latest (or
--step) checkpoint beside a random-init baseline of the same architecture, and
the mask quality (ABO) of every mask source in the records; then writes
WORKDIR/eval/step_N.json (adding to the evaluations already there) and TensorBoard
output under WORKDIR/tb/eval; with --data=OTHER_RECORDS, under
WORKDIR/eval/on_NAME_HASH/ instead, so the run's own results stay as they are. Mistakes
(a missing workdir, an unknown evaluation, a read-only workdir) end in one
`error:` line.
"""
from __future__ import annotations

from absl import flags

from detcon_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (checkpoints/, config.json).")
_EVALS = flags.DEFINE_string("evals", "knn,linear,retrieval,seg_linear,multilabel,masks",
                             "Comma list of evaluations: knn, linear, retrieval, seg_linear "
                             "(dense linear probe, mIoU), multilabel (per-class logistic "
                             "regression, mAP), seg_finetune (FCN fine-tuning, mIoU), masks, "
                             "gradcam, background (BG-Gap; needs GT foregrounds).")
_DATA = flags.DEFINE_string("data", None, "Records directory (default: the run's config.data.records_dir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that restores).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per feature-extraction batch (all devices).")
_SIZE = flags.DEFINE_integer("image_size", None, "Evaluation image size, a multiple of the "
                             "model's output stride (32; 16 with model.stem_pool=False) "
                             "(default: the records' size rounded down to one).")
_SWEEP = flags.DEFINE_string("linear_sweep", "default",
                             "Linear-probe C values: default (11), quick (5), full (the paper's 45), "
                             "or a number.")
_RES = flags.DEFINE_integer("retrieval_resolution", None,
                            "Side of the feature grid K-means runs on (default: image_size // 8).")
_DILATED = flags.DEFINE_bool("retrieval_dilated", True,
                             "Retrieval on a dilated last stage (stride 1, dilation 2), as the "
                             "paper; --noretrieval_dilated uses the plain stage-4 map.")
_COMPARE = flags.DEFINE_list("compare", [], "Other training workdirs (same model) to add as rows.")
_FT_PRESET = flags.DEFINE_enum("finetune_preset", "demo", ["demo", "paper"],
                               "seg_finetune: demo (minutes on a CPU) or paper (45 epochs, "
                               "512 px crops).")
_FT_SCHEDULE = flags.DEFINE_enum("finetune_schedule", "detcon", ["detcon", "revisiting"],
                                 "seg_finetune learning rate: detcon (0.02, x0.1 at 70%/90%) or "
                                 "revisiting (0.003, x0.1 at epochs 30/40 of 45).")
_FT_DILATION = flags.DEFINE_integer("finetune_dilation", 6, "seg_finetune head dilation (6: "
                                    "PASCAL; 1: the Cityscapes head).")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", None, "seg_finetune steps (default: the "
                                 "preset's epochs over the train split).")
_SEG_EPOCHS = flags.DEFINE_integer("seg_linear_epochs", 10, "seg_linear training epochs.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also evaluate the random-init baseline row.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from detcon_jax.evaluate import run
  from detcon_jax.core import checkpointing
  sweep = int(_SWEEP.value) if _SWEEP.value.isdigit() else _SWEEP.value
  settings = run.Settings(batch_size=_BATCH.value, image_size=_SIZE.value, linear_sweep=sweep,
                          retrieval_resolution=_RES.value, retrieval_dilated=_DILATED.value,
                          finetune_preset=_FT_PRESET.value, finetune_schedule=_FT_SCHEDULE.value,
                          finetune_dilation=_FT_DILATION.value, finetune_steps=_FT_STEPS.value,
                          seg_linear_epochs=_SEG_EPOCHS.value)
  try:
    run.evaluate_workdir(_WORKDIR.value, evals=_EVALS.value, data_dir=_DATA.value,
                         step=_STEP.value, settings=settings, baseline=_BASELINE.value,
                         compare=tuple(_COMPARE.value))
  except (ValueError, OSError, KeyError, checkpointing.WorkdirError) as e:
    cli.fail(e)


if __name__ == "__main__":
  cli.run(main)
