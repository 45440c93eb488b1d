"""The train-step benchmark's FLOP count runs and measures the paper's network (the
`train_step` fixture: conftest.py)."""


def test_rn50_preset_is_the_standard_stride_32_network(train_step, capsys):
  train_step.main(["--preset", "rn50", "--flops_only", "--depth", "18", "--image_size", "64",
                   "--batch_size", "8"])
  out = capsys.readouterr().out
  assert "(stride 32)" in out
  for line in ("detcon_s / simclr: XLA flops +", "detcon_b / byol: XLA flops +",
               "moco_v2 / simclr: XLA flops x", "swav / simclr: XLA flops x"):
    assert line in out, out                      # DetCon costs more than its base method
