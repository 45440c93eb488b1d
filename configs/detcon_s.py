"""DetCon-S. Presets: demo (CPU minutes), imagenet[-EPOCHS], coco[-EPOCHS]; see common.py."""
from configs import common


def get_config(arg: str | None = None):
  return common.get_preset("detcon_s", "simclr", arg)
