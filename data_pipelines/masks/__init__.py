"""Mask sources: one module each, and the registry the build uses.

A source kind ('fh', 'grid', 'gt', 'mcg') expands into one or more named settings
(e.g. fh -> fh_s500, fh_s1000, fh_s1500; mcg -> mcg_16, mcg_8, mcg_4); each name
becomes one stored id map. Saliency maps (saliency.py) are a record field of
their own, not an id map.
Add a source: a module with `compute(image_uint8, **settings) -> id map`, an
entry in REGISTRY, and one in SETTINGS giving its named settings.
"""
from __future__ import annotations

from data_pipelines.masks import fh, grid, gt, mcg

REGISTRY = {"fh": fh.compute, "grid": grid.compute, "gt": gt.compute, "mcg": mcg.compute}


def _fh_settings(o: dict) -> dict:
  return {fh.name(s): dict(kind="fh", scale=int(s), min_size=int(s), sigma=o["fh_sigma"],
                           backend=o["fh_backend"]) for s in (o["fh_scales"] or fh.PAPER_SCALES)}


def _grid_settings(o: dict) -> dict:
  return {grid.name(n): dict(kind="grid", n=int(n)) for n in o["grid_sizes"]}


def _gt_settings(o: dict) -> dict:
  return {gt.NAME: dict(kind="gt")}


def _mcg_settings(o: dict) -> dict:
  return {mcg.name(k): dict(kind="mcg", level=int(k), superpixels=mcg.SUPERPIXELS,
                            sigma=mcg.EDGE_SIGMA) for k in o["mcg_levels"]}


# kind -> expand's options -> {stored name: {'kind': kind, **settings}}
SETTINGS = {"fh": _fh_settings, "grid": _grid_settings, "gt": _gt_settings, "mcg": _mcg_settings}


def expand(kinds, *, image_size: int | None = None, fh_scales=None, fh_sigma=fh.PAPER_SIGMA,
           fh_backend="skimage", grid_sizes=(grid.DEFAULT_N,),
           mcg_levels=mcg.LEVELS) -> dict[str, dict]:
  """{stored name: {'kind': kind, **settings}} for the requested kinds, in order.

  fh_scales=None means the paper's scales; pass fh.scales_for(size) for small
  images (the demo does). image_size is recorded for reference only.
  """
  if isinstance(kinds, str):
    kinds = [k for k in kinds.split(",") if k]
  options = dict(fh_scales=fh_scales, fh_sigma=fh_sigma, fh_backend=fh_backend,
                 grid_sizes=grid_sizes, mcg_levels=mcg_levels)
  out = {}
  for kind in kinds:
    if kind not in SETTINGS:
      raise ValueError(f"Unknown mask source {kind!r}; choose from {sorted(REGISTRY)} "
                       "(--masks=fh,grid,gt,mcg, and saliency for the saliency field).")
    out.update(SETTINGS[kind](options))
  return out


def compute_all(image, specs: dict[str, dict], instances=None) -> dict:
  """Id maps for every named spec of `expand` on one uint8 RGB image (in spec order).

  FH specs with the same sigma and backend are computed together
  (fh.compute_scales shares smoothing, edge graph and sort between scales), and
  so are the levels of one MCG hierarchy (mcg.compute_levels).
  """
  out = {}
  groups, mcg_groups = {}, {}
  for nm, spec in specs.items():
    if spec["kind"] == "fh":
      groups.setdefault((spec.get("sigma", fh.PAPER_SIGMA), spec.get("backend", "skimage")),
                        []).append(nm)
    elif spec["kind"] == "mcg":
      mcg_groups.setdefault((spec["superpixels"], spec["sigma"]), []).append(nm)
  shared = {}
  for (n_sp, sigma), names in mcg_groups.items():
    shared.update(zip(names, mcg.compute_levels(image, [specs[n]["level"] for n in names],
                                                 n_sp, sigma)))
  for (sigma, backend), names in groups.items():
    maps = fh.compute_scales(image, [specs[n]["scale"] for n in names], sigma=sigma,
                             min_sizes=[specs[n].get("min_size", specs[n]["scale"])
                                        for n in names], backend=backend)
    shared.update(zip(names, maps))
  for nm, spec in specs.items():
    if nm in shared:
      out[nm] = shared[nm]
      continue
    settings = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "gt":
      settings["instances"] = instances
    out[nm] = REGISTRY[spec["kind"]](image, **settings)
  return out
