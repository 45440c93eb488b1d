"""DetCon-B. Presets: demo (CPU minutes), bench (demo x 5),
imagenet[-EPOCHS], coco[-EPOCHS]; see common.py."""
from configs import common


@common.with_bench
def get_config(arg: str | None = None):
  return common.get_preset("detcon_b", "byol", arg)
