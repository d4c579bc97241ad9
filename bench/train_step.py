"""DRAEM train step: pouta_jax against anomalib's DraemModel + DraemLoss, on this machine's CPU.

    .venv/bin/python bench/train_step.py [--repeats=5] [--settings=headline,tiny]

Same widths, image size, batch, losses (L2 + SSIM + focal) and optimizer (Adam, lr 1e-4) on both
sides; the contenders step in turns (A/B/A/B) after one warm-up step, so machine noise hits all
alike. Compile time (ours: XLA; the peer: its first, eager step) is reported apart.
Also our step with XLA's own convolution gradients (`model.conv_weight_grad=xla`), to show what
the CPU shifted-matmul gradients buy, and the FLOP utilisation of our step: XLA's FLOP count per
step / step time, against the speed of one large 3x3 convolution measured in the same run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import harness
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pouta_jax import config as config_lib, models, sharding, train


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  base_width: int  # reconstructive; discriminative is half
  image_size: int
  batch_size: int
  # Run both sides with harness.MALLOC_ENV: it pays where a step's temporaries take gigabytes
  # (headline: 7.7 -> 6.6 s ours, 4.2 -> 3.8 s anomalib's, run alone); at the tiny setting,
  # one malloc arena slowed our step by about a sixth.
  malloc_env: bool


SETTINGS = {
  "headline": Setting("headline", 128, 128, 4, malloc_env=True),  # the full architecture
  "tiny": Setting("tiny", 16, 64, 8, malloc_env=False),
}
# The reference convolution for FLOP utilisation: one large 3x3 'same' conv, forward only.
PEAK_CONV = (4, 128, 128, 128, 128)  # batch, height, width, in, out


def _batch(setting: Setting, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (setting.batch_size, setting.image_size, setting.image_size)
  return {
    "image": rng.random((*shape, 3), np.float32),
    "augmented": rng.random((*shape, 3), np.float32),
    "mask": (rng.random(shape) > 0.9).astype(np.float32),
  }


def jax_step(
  setting: Setting, conv_weight_grad: str, stored: dict | None = None
) -> tuple[Callable[[], None], dict]:
  """One step of our DRAEM, or of the model of a `stored` config (as config.json holds one:
  POUTA's, say); facts: compile seconds, XLA's FLOPs per step."""
  config = config_lib.upgrade(stored) if stored else config_lib.load("draem")
  config.model.base_width = setting.base_width
  config.model.conv_weight_grad = conv_weight_grad
  config.data.image_size = setting.image_size
  config.data.batch_size = setting.batch_size
  model, optimizer, state, hparams, _ = train.setup(config, [1])  # a stack of one run
  mesh = sharding.make_mesh(config)
  objective = models.get(config.model.name).objective(config)
  step = train.make_train_step(model, objective, optimizer, mesh)
  batch = {k: v[None] for k, v in _batch(setting).items()}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  compiled, compile_s = harness.timed(lambda: step.lower(state, batch, hparams).compile())
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  holder = {"state": state}

  def run() -> None:
    holder["state"], metrics = compiled(holder["state"], batch, hparams)
    jax.block_until_ready(metrics["loss"])

  return run, {"start_s": compile_s, "flops": flops}


def peer_step(setting: Setting) -> tuple[Callable[[], None], dict]:
  """One step of anomalib's DRAEM with its loss; facts: first (eager) step seconds."""
  torch = harness.require_peer()
  from anomalib.models.image.draem.loss import DraemLoss
  from anomalib.models.image.draem.torch_model import (
    DiscriminativeSubNetwork,
    ReconstructiveSubNetwork,
  )

  torch.manual_seed(0)
  recon = ReconstructiveSubNetwork(base_width=setting.base_width)
  seg = DiscriminativeSubNetwork(in_channels=6, out_channels=2, base_width=setting.base_width // 2)
  loss_fn = DraemLoss()
  optimizer = torch.optim.Adam([*recon.parameters(), *seg.parameters()], lr=1e-4)
  batch = {k: torch.from_numpy(v) for k, v in _batch(setting).items()}
  image = batch["image"].permute(0, 3, 1, 2).contiguous()
  augmented = batch["augmented"].permute(0, 3, 1, 2).contiguous()
  mask = batch["mask"][:, None]

  def run() -> None:
    optimizer.zero_grad(set_to_none=True)
    reconstruction = recon(augmented)
    prediction = seg(torch.cat([augmented, reconstruction], 1))
    loss = loss_fn(image, reconstruction, mask, prediction)
    loss.backward()
    optimizer.step()

  _, first_s = harness.timed(run)
  return run, {"start_s": first_s}


def peak_conv() -> tuple[Callable[[], None], dict]:
  """The reference convolution; facts: XLA's FLOPs per call."""
  b, h, w, cin, cout = PEAK_CONV
  x = jnp.ones((b, h, w, cin))
  kernel = jnp.ones((3, 3, cin, cout)) * 0.01
  conv = (
    jax.jit(
      lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    )
    .lower(x, kernel)
    .compile()
  )
  cost = conv.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  def run() -> None:
    conv(x, kernel).block_until_ready()

  return run, {"flops": flops}


def run(settings: list[str], repeats: int) -> harness.Report:
  harness.require_peer()
  lines = [
    "| setting | contender | images/s | ms/step | compile / first step s |",
    "|---|---|---|---|---|",
  ]
  figures: dict[str, float] = {}
  seconds, facts = harness.interleaved({"conv": (peak_conv, ())}, repeats, env=harness.MALLOC_ENV)[
    "conv"
  ]
  peak = facts["flops"] / seconds
  for name in settings:
    setting = SETTINGS[name]
    results = harness.interleaved(
      {
        "pouta_jax": (jax_step, (setting, "auto")),
        "pouta_jax (XLA conv gradients)": (jax_step, (setting, "xla")),
        "anomalib": (peer_step, (setting,)),
      },
      repeats,
      env=harness.MALLOC_ENV if setting.malloc_env else None,
    )
    label = (
      f"{name}: widths {setting.base_width}/{setting.base_width // 2}, "
      f"{setting.image_size} px, batch {setting.batch_size}"
    )
    for contender, (s, facts) in results.items():
      lines.append(
        f"| {label} | {contender} | {setting.batch_size / s:.2f} | {1000 * s:.0f} | "
        f"{facts['start_s']:.1f} |"
      )
    ours, ours_facts = results["pouta_jax"]
    speedup = results["anomalib"][0] / ours
    utilisation = ours_facts["flops"] / ours / peak
    lines.append(f"| {label} | speedup vs anomalib | {speedup:.2f}x | | |")
    lines.append(f"| {label} | FLOP utilisation | {100 * utilisation:.0f}% of the peak | | |")
    if name == "headline":
      figures["train_step_speedup"] = speedup
      figures["flop_utilisation"] = utilisation
    else:
      figures[f"train_step_speedup_{name}"] = speedup
      figures[f"flop_utilisation_{name}"] = utilisation
  b, h, w, cin, cout = PEAK_CONV
  lines += [
    "",
    f"Peak: one {b}x{h}x{w} 3x3 convolution {cin}->{cout}, forward: "
    f"{peak / 1e9:.1f} GFLOP/s. Utilisation = XLA's FLOPs per step / step time / peak. "
    f"Median of {repeats} interleaved steps after one warm-up step; each contender in "
    f"its own process, idle while another runs. The peak convolution and every contender "
    f"of the headline setting run with harness.MALLOC_ENV (glibc keeps freed memory "
    f"mapped).",
  ]
  return harness.Report("Train step (DRAEM)", lines, figures)


def main(argv: list[str]) -> None:
  del argv
  unknown = set(_SETTINGS.value) - set(SETTINGS)
  if unknown:
    raise app.UsageError(f"--settings: unknown {sorted(unknown)}; expected {list(SETTINGS)}")
  run(_SETTINGS.value, _REPEATS.value).show()


if __name__ == "__main__":
  # Defined here, not on import: run_all.py imports every script.
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per contender.")
  _SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), f"Any of {list(SETTINGS)}.")
  app.run(main)
