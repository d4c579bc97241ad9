"""DRAEM inference: pouta_jax against anomalib's DraemModel (eval mode), on this machine's CPU.

    .venv/bin/python bench/inference.py [--base_width=128] [--image_size=256] [--repeats=5]

Latency per image at batch 1 and throughput at batch 16, same widths and image size on both
sides, timed in turns (each side in its own process) after warm-up. Both return the anomaly map
and an image score (ours: max of the mean-filtered map; anomalib: max of the map).
"""

from __future__ import annotations

from typing import Callable

import harness
import jax
import numpy as np
import optax
from absl import app, flags

from pouta_jax import config as config_lib, evaluate, models, train

BATCHES = {"latency": 1, "throughput": 16}


def _images(batch: int, size: int) -> np.ndarray:
  return np.random.default_rng(0).random((batch, size, size, 3), np.float32)


def jax_predict(base_width: int, size: int, batch: int) -> tuple[Callable[[], None], dict]:
  config = config_lib.load("draem")
  config.model.base_width = base_width
  model = models.get("draem").build(config)
  state = train.fresh_state(model, optax.identity(), size, seed=0)
  predict = evaluate.make_predict_fn(model, config.eval.score_filter_size)
  images = jax.device_put(_images(batch, size))
  compiled, compile_s = harness.timed(lambda: predict.lower(state.variables, images).compile())

  def run() -> None:
    jax.block_until_ready(compiled(state.variables, images))

  return run, {"start_s": compile_s}


def peer_predict(base_width: int, size: int, batch: int) -> tuple[Callable[[], None], dict]:
  torch = harness.require_peer()
  from anomalib.models.image.draem.torch_model import (
    DiscriminativeSubNetwork,
    ReconstructiveSubNetwork,
  )

  torch.manual_seed(0)
  recon = ReconstructiveSubNetwork(base_width=base_width).eval()
  seg = DiscriminativeSubNetwork(in_channels=6, out_channels=2, base_width=base_width // 2).eval()
  images = torch.from_numpy(_images(batch, size)).permute(0, 3, 1, 2).contiguous()

  @torch.inference_mode()
  def run() -> None:  # anomalib's DraemModel.forward in eval mode
    reconstruction = recon(images)
    anomaly_map = torch.softmax(seg(torch.cat([images, reconstruction], 1)), dim=1)[:, 1]
    torch.amax(anomaly_map, dim=(-2, -1))

  _, first_s = harness.timed(run)
  return run, {"start_s": first_s}


def run(base_width: int, size: int, repeats: int) -> harness.Report:
  harness.require_peer()
  lines = ["| measure | batch | pouta_jax | anomalib | speedup |", "|---|---|---|---|---|"]
  figures = {}
  for measure, batch in BATCHES.items():
    results = harness.interleaved(
      {
        "pouta_jax": (jax_predict, (base_width, size, batch)),
        "anomalib": (peer_predict, (base_width, size, batch)),
      },
      repeats,
    )
    ours, peer = results["pouta_jax"][0], results["anomalib"][0]
    if measure == "latency":
      lines.append(
        f"| latency ms/image | 1 | {1000 * ours:.1f} | {1000 * peer:.1f} | {peer / ours:.2f}x |"
      )
    else:
      lines.append(
        f"| throughput images/s | {batch} | {batch / ours:.2f} | {batch / peer:.2f} | "
        f"{peer / ours:.2f}x |"
      )
    figures[f"inference_speedup_{measure}"] = peer / ours
  figures["inference_speedup"] = figures["inference_speedup_latency"]
  lines += [
    "",
    f"DRAEM widths {base_width}/{base_width // 2}, {size} px, eval mode; median of "
    f"{repeats} interleaved calls after one warm-up call, each side in its own process.",
  ]
  return harness.Report("Inference (DRAEM)", lines, figures)


def main(argv: list[str]) -> None:
  del argv
  run(_WIDTH.value, _SIZE.value, _REPEATS.value).show()


if __name__ == "__main__":
  # Defined here, not on import: run_all.py imports every script.
  _WIDTH = flags.DEFINE_integer("base_width", 128, "Reconstructive base width (full size: 128).")
  _SIZE = flags.DEFINE_integer("image_size", 256, "Square input size.")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per contender and batch size.")
  app.run(main)
