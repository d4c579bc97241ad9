"""Converter parity: a random anomalib DRAEM, converted, gives the same maps in pouta_jax.

    .venv/bin/python bench/parity.py [--base_width=128] [--image_size=64]

anomalib's DraemModel with random weights and perturbed BatchNorm statistics (eval mode), its
state dict through `convert.split_anomalib` and `convert.to_variables` (what `python -m
pouta_jax.convert --from=draem_torch --ckpt=...` does), then both networks on the same images:
the largest absolute difference of the reconstruction and of the anomaly map. The test suite
checks the same at width 4 within 1e-4 (tests/test_convert.py).
"""

from __future__ import annotations

import harness
import jax
import numpy as np
from absl import app, flags

from pouta_jax import config as config_lib, convert, models


def run(base_width: int, size: int) -> harness.Report:
  torch = harness.require_peer()
  from anomalib.models.image.draem.torch_model import DraemModel

  torch.manual_seed(0)
  peer = DraemModel()
  if base_width != 128:
    from anomalib.models.image.draem.torch_model import (
      DiscriminativeSubNetwork,
      ReconstructiveSubNetwork,
    )

    peer.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=base_width)
    peer.discriminative_subnetwork = DiscriminativeSubNetwork(
      in_channels=6, out_channels=2, base_width=base_width // 2
    )
  for bn in (m for m in peer.modules() if isinstance(m, torch.nn.BatchNorm2d)):
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
  peer.eval()
  images = torch.rand(2, 3, size, size)
  with torch.no_grad():
    reconstruction = peer.reconstructive_subnetwork(images)
    anomaly_map = peer(images).anomaly_map

  config = config_lib.load("draem")
  config.model.base_width = base_width
  model = models.get("draem").build(config)
  template = jax.jit(model.init, static_argnames="train")(
    jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False
  )
  state_dict = {k: v.numpy() for k, v in peer.state_dict().items()}
  variables = convert.to_variables(convert.split_anomalib(state_dict), True, template)
  out = model.apply(variables, images.numpy().transpose(0, 2, 3, 1), train=False)
  recon_diff = float(
    np.abs(np.asarray(out["reconstruction"]) - reconstruction.numpy().transpose(0, 2, 3, 1)).max()
  )
  map_diff = float(
    np.abs(
      np.asarray(out["anomaly_map"]) - anomaly_map.numpy().reshape(out["anomaly_map"].shape)
    ).max()
  )
  lines = [
    "| output | max abs difference |",
    "|---|---|",
    f"| reconstruction | {recon_diff:.2e} |",
    f"| anomaly map | {map_diff:.2e} |",
    "",
    f"anomalib DraemModel, widths {base_width}/{base_width // 2}, {size} px, eval mode, "
    f"random weights and BatchNorm statistics; converted with convert.to_variables.",
  ]
  return harness.Report(
    "Checkpoint converter parity", lines, {"parity_max_abs_diff": max(recon_diff, map_diff)}
  )


def main(argv: list[str]) -> None:
  del argv
  run(_WIDTH.value, _SIZE.value).show()


if __name__ == "__main__":
  # Defined here, not on import: run_all.py imports every script.
  _WIDTH = flags.DEFINE_integer("base_width", 128, "Reconstructive base width (full size: 128).")
  _SIZE = flags.DEFINE_integer("image_size", 64, "Square input size.")
  app.run(main)
