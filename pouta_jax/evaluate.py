"""Anomaly maps and image scores of a trained model on a test set, then the metrics.

The map is the model's `anomaly_map` (DRAEM: softmax anomaly channel); the image score is the
maximum of the map after a centred mean filter with zero padding (DRAEM: 21x21 at 256 px).
"""

from __future__ import annotations

import functools
import re
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pouta_jax import errors, metrics
from pouta_jax.models.reconstructive import ReconstructiveNetwork


def mean_filter_max(maps: jax.Array, size: int) -> jax.Array:
  """Per-image max of the `size`x`size` mean-filtered maps (B, H, W); zeros outside the map."""
  pad = size // 2
  summed = jax.lax.reduce_window(
    maps, 0.0, jax.lax.add, (1, size, size), (1, 1, 1), ((0, 0), (pad, pad), (pad, pad))
  )
  return jnp.max(summed / (size * size), axis=(1, 2))


# What a predict function maps: the model's anomaly map; the mean of a coarse-to-fine model's
# final map and every level's map (eval.fuse_levels: HED's fusion of side outputs, so evidence
# a finer level loses still counts); or the error of its reconstruction (mean |x -
# reconstruction| over the channels; eval.reconstruction_error): what the reconstructive
# network finds without any discriminative part, a peer that shows what that part adds; or
# `level_source(i)`, a coarse-to-fine model's map at level i (eval.level_maps).
MAP_SOURCES = ("anomaly_map", "fused_levels", "reconstruction_error")


def map_source(config: ml_collections.ConfigDict) -> str:
  """The source of a run's anomaly map (its scoring: eval.fuse_levels)."""
  return "fused_levels" if config.eval.fuse_levels else "anomaly_map"


def reconstruction_error(images: jax.Array, out: dict) -> jax.Array:
  """(B, H, W): mean |image - reconstruction| over the channels."""
  return jnp.mean(jnp.abs(images - out["reconstruction"]), axis=-1)


def level_source(level: int) -> str:
  return f"level{level}"


def level_map(out: dict, level: int, size: tuple[int, int]) -> jax.Array:
  """(B, *size): the anomaly probability of the model's map at `level` (finest 0), resized
  bilinearly to the image's size."""
  probability = jax.nn.softmax(out["level_logits"][level], axis=-1)[..., 1]
  return jax.image.resize(probability, (probability.shape[0], *size), "bilinear")


def fused_levels(out: dict, size: tuple[int, int]) -> jax.Array:
  """(B, *size): the mean of the final anomaly map and every level's map (`level_map`)."""
  levels = [level_map(out, level, size) for level in range(len(out["level_logits"]))]
  return (out["anomaly_map"] + sum(levels)) / (1 + len(levels))


@functools.lru_cache(maxsize=16)  # one compilation per (model, filter size, source, weight)
def make_predict_fn(
  model: nn.Module, filter_size: int, source: str = "anomaly_map", error_weight: float = 0.0
) -> Callable:
  """`error_weight` (eval.error_weight): the anomaly map (or fused levels) plus that many
  times the reconstruction error (a level map takes none: it shows that level alone)."""
  level = int(source.removeprefix("level")) if re.fullmatch(r"level\d+", source) else None
  if source not in MAP_SOURCES and level is None:
    raise ValueError(f"source={source!r}: expected one of {MAP_SOURCES} or level<i>")

  @jax.jit
  def predict(variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = model.apply(variables, images, train=False)
    if level is not None:
      maps = level_map(out, level, images.shape[1:3])
    elif source == "reconstruction_error":
      maps = reconstruction_error(images, out)
    else:
      maps = fused_levels(out, images.shape[1:3]) if source == "fused_levels" else out[source]
      if error_weight:
        maps = maps + error_weight * reconstruction_error(images, out)
    return maps, mean_filter_max(maps, filter_size)

  return predict


# Maps float32 images (B, H, W, 3) in [0, 1] to anomaly maps (B, H, W) and image scores (B,):
# a trained model with its variables bound, or an exported artifact.
PredictFn = Callable[[np.ndarray], tuple[jax.Array, jax.Array]]


def model_predict_fn(
  model: nn.Module,
  variables: dict,
  filter_size: int,
  source: str = "anomaly_map",
  error_weight: float = 0.0,
) -> PredictFn:
  """`variables` (host copies, say) placed on the device once, not at every batch."""
  predict_fn = make_predict_fn(model, filter_size, source, error_weight)
  return functools.partial(predict_fn, jax.device_put(variables))


def predict(
  predict_fn: PredictFn, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Anomaly maps (N, H, W) and image scores (N,) of uint8 images (N, H, W, 3).

  The last batch is padded to `batch_size`, so one compilation serves every batch.
  """
  maps, scores = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size].astype(np.float32) / 255.0
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    batch_maps, batch_scores = jax.device_get(predict_fn(chunk))
    maps.append(batch_maps[:n])
    scores.append(batch_scores[:n])
  return np.concatenate(maps), np.concatenate(scores)


class Evaluation(NamedTuple):
  metrics: dict[str, float]
  maps: np.ndarray  # (N, H, W)
  scores: np.ndarray  # (N,)
  # The image-score and pixel thresholds that maximise F1 on the test set (anomalib's adaptive
  # F1 threshold; MVTec AD has no validation split). None where the test set lacks normal or
  # defective examples.
  thresholds: dict[str, float | None]
  curves: dict[str, metrics.Curve]  # "image" and "pixel"
  by_defect: dict[str, dict[str, float]]  # defect type -> its metrics (`defect_metrics`)


def evaluate(
  predict_fn: PredictFn, test_set: dict, batch_size: int, balanced_threshold: bool = False
) -> Evaluation:
  """Metrics of one category, with the maps and scores they came from. `balanced_threshold`:
  the image threshold maximises F1 with the defective images weighing as much in total as the
  good ones, so it does not follow the set's share of defective images (the validation set's
  is set by how many kinds of anomaly it makes of each held-out image)."""
  maps, scores = predict(predict_fn, test_set["image"], batch_size)
  if np.isnan(maps).any() or np.isnan(scores).any():
    raise errors.DivergedError(
      f"the model's anomaly maps hold {int(np.isnan(maps).sum())} NaN values (of {maps.size}): "
      f"its weights are not finite, or it overflows on these images"
    )
  # Image-level datasets (no masks for their defect images): no pixel curve or metrics.
  masks = test_set["mask"] if test_set.get("has_masks", True) else None
  curves = {
    "image": metrics.curve(test_set["label"], scores),
    "pixel": None if masks is None else metrics.curve(masks, maps),
  }
  weights = {"image": 1.0, "pixel": 1.0}
  if balanced_threshold and curves["image"].has_both_classes:
    weights["image"] = curves["image"].num_negative / curves["image"].num_positive
  found = {
    kind: metrics.f1_max(c, positive_weight=weights[kind])[1]
    if c is not None and c.has_both_classes
    else None
    for kind, c in curves.items()
  }
  return Evaluation(
    metrics.category_metrics(
      test_set["label"], scores, masks, maps, (curves["image"], curves["pixel"])
    ),
    maps,
    scores,
    found,
    curves,
    defect_metrics(test_set, maps, scores),
  )


def at_thresholds(evaluation: Evaluation, thresholds: dict[str, float | None]) -> dict:
  """`metrics.AT_VALIDATION_THRESHOLDS` of a test-set `evaluation` at `thresholds` (the
  validation set's F1-max thresholds, `Evaluation.thresholds`): None for pixels without masks,
  nan where validation gave no threshold."""
  found = {}
  for name in metrics.AT_VALIDATION_THRESHOLDS:
    kind = name.split("_", 1)[0]
    c, threshold = evaluation.curves[kind], thresholds.get(kind)
    if c is None:
      found[name] = None
    elif threshold is None:
      found[name] = float("nan")
    else:
      found[name] = metrics.f1_at(c, None, threshold)
  return found


def defect_metrics(test_set: dict, maps: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
  """Each defect type's metrics, on its images and every good one: where a model fails (MVTec
  AD's types range from obvious to faint within one category). {} without a defect column."""
  if "defect" not in test_set:
    return {}
  defects, good = np.asarray(test_set["defect"]), ~np.asarray(test_set["label"], bool)
  has_masks = test_set.get("has_masks", True)
  found = {}
  for defect in sorted(set(defects[~good].tolist())):
    keep = good | (defects == defect)
    found[defect] = metrics.category_metrics(
      test_set["label"][keep],
      scores[keep],
      test_set["mask"][keep] if has_masks else None,
      maps[keep],
    )
  return found


def profile(
  model: nn.Module,
  variables: dict,
  image_size: int,
  filter_size: int,
  repeats: int = 20,
  by_part: bool = True,
) -> dict:
  """Parameters per subnetwork (the models' top-level groups: reconstructive, discriminative,
  and a frozen backbone where there is one) and in total, XLA's FLOP count of inference on one
  image (batch 1: anomaly map and image score) and, with `by_part`, for models built on the
  reconstructive network, its parts (`flops`: reconstructive, discriminative, scoring, total),
  and the median latency."""
  counts = {
    name: int(sum(x.size for x in jax.tree.leaves(tree)))
    for name, tree in variables["params"].items()
  }
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # Compiled once: counted, then timed (a call of the jitted function would compile again).
  predict = make_predict_fn(model, filter_size).lower(variables, image).compile()
  total = _cost(predict)
  parts = {}
  if by_part and "reconstructive" in counts:  # DRAEM and POUTA: the shared network, the rest
    # XLA drops what an output does not need, so each part is a difference of two programs:
    # the discriminative part is the map and the reconstruction against the reconstructive
    # network alone; scoring (the image score's filter and maximum) is the whole against the
    # map alone; the reconstructive network is the rest (POUTA's maps never need its last conv).
    recon = ReconstructiveNetwork(model.base_width)
    shared = {group: tree["reconstructive"] for group, tree in variables.items()}
    alone = _flops(jax.jit(functools.partial(recon.apply, train=False)), shared, image)

    def network(*keys: str) -> float:
      return _flops(
        jax.jit(lambda v, x: [model.apply(v, x, train=False)[k] for k in keys]), variables, image
      )

    discriminative = network("anomaly_map", "reconstruction") - alone
    scoring = total - network("anomaly_map")
    parts = {
      "flops": {
        "reconstructive": total - discriminative - scoring,
        "discriminative": discriminative,
        "scoring": scoring,
        "total": total,
      }
    }
  jax.block_until_ready(predict(variables, image))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(predict(variables, image))
    times.append(time.perf_counter() - start)
  return {
    "params": {**counts, "total": sum(counts.values())},
    "flops_per_image": total,
    **parts,
    "latency_ms": 1000 * float(np.median(times)),
  }


def _flops(fn: Callable, *args) -> float:
  """XLA's FLOP count of the jitted `fn` on `args`."""
  return _cost(fn.lower(*args).compile())


def _cost(compiled: jax.stages.Compiled) -> float:
  """XLA's FLOP count of a compiled program."""
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
