"""Shards checked against manifest.json before training reads them (missing, short,
resized or changed shards are named), from what the manifest holds."""
import hashlib
import os

import numpy as np
import pytest

from data_pipelines import build, records


@pytest.fixture
def data(tmp_path):
  rng = np.random.default_rng(0)
  exs = [dict(image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
              masks={"grid_2": np.zeros((16, 16), np.int32)}) for _ in range(12)]
  manifest = build.write_records(str(tmp_path), {"train": exs}, shard_size=4)
  return str(tmp_path), manifest


def _shard(data, i=1):
  out, manifest = data
  entry = manifest["splits"]["train"]["shards"][i]
  return entry, os.path.join(out, entry["file"])


def test_intact_shards_pass_and_counts_come_from_the_framing(data):
  out, manifest = data
  records.verify_shards(out, manifest, "train")
  assert [records.count_records(p) for p in records.shard_paths(out, manifest, "train")] == [4, 4, 4]


def test_a_missing_shard_is_named(data):
  out, manifest = data
  entry, path = _shard(data)
  os.remove(path)
  with pytest.raises(records.ShardError, match=rf"{entry['file']} .* missing"):
    records.verify_shards(out, manifest, "train")
  others = [p for p in records.shard_paths(out, manifest, "train") if p != path]
  records.verify_shards(out, manifest, "train", others)      # only this host's shards


def test_a_truncated_shard_or_a_wrong_count_is_named(data):
  out, manifest = data
  for shard in manifest["splits"]["train"]["shards"]:   # a manifest from before sizes were kept:
    shard.pop("bytes", None), shard.pop("sha256", None)  # the record count is what is checked
  entry, path = _shard(data)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)
  with pytest.raises(records.ShardError, match=rf"{entry['file']} .* ends inside a record"):
    records.verify_shards(out, manifest, "train")
  entry2, _ = _shard(data, 2)
  entry2["count"] = 5
  manifest["splits"]["train"]["shards"][1]["count"] = 4
  with pytest.raises(records.ShardError, match=rf"{entry2['file']} .* holds 4 records, .* says 5"):
    records.verify_shards(out, manifest, "train", [os.path.join(out, entry2["file"])])


def test_size_and_sha256_are_checked_when_the_manifest_has_them(data):
  out, manifest = data
  entry, path = _shard(data)
  with open(path, "rb") as f:
    content = f.read()
  entry.update(bytes=len(content), sha256=hashlib.sha256(content).hexdigest())
  records.verify_shards(out, manifest, "train")
  flipped = bytearray(content)
  flipped[len(content) // 2] ^= 0xFF                       # same size, other bytes
  with open(path, "wb") as f:
    f.write(bytes(flipped))
  with pytest.raises(records.ShardError, match=rf"{entry['file']} .* does not match its sha256"):
    records.verify_shards(out, manifest, "train")
  records.verify_shards(out, manifest, "train", checksums=False)
  with open(path, "ab") as f:
    f.write(b"x")
  with pytest.raises(records.ShardError, match=rf"{entry['file']} .* has {len(content) + 1} bytes"):
    records.verify_shards(out, manifest, "train", checksums=False)


def test_verify_command_names_each_bad_shard_and_exits_1(data, capsys):
  out, manifest = data
  assert records.main(["verify", out]) == 0
  assert f"{out}: 3 of 3 shards match manifest.json." in capsys.readouterr().out
  entry, path = _shard(data)
  with open(path, "ab") as f:
    f.write(b"x")
  os.remove(_shard(data, 2)[1])
  assert records.main(["verify", out]) == 1
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith(f"{out}/{entry['file']}: has ") and "bytes" in printed[0]
  assert printed[1].endswith("listed in manifest.json but missing")
  assert printed[2].startswith(f"{out}: 1 of 3 shards match manifest.json; 2 do not (rebuild: ")
  assert records.main(["verify", os.path.join(out, "nowhere")]) == 1
  assert capsys.readouterr().err.startswith("error: ")
