"""POUTA against DRAEM at the same base width and image size, measured in one run.

    .venv/bin/python bench/pouta_vs_draem.py [--base_width=128] [--image_size=256] [--repeats=5] \
        [--pouta.model.discriminative_width=32 --pouta.model.fuse_kernel=1 ...]

Prints parameters and XLA FLOPs per image (reconstructive / discriminative / total; FLOPs
split as `evaluate.profile` does) and the median inference latency at batch 1 (the two models
timed interleaved, A/B/A/B, after warm-up), then the ratios POUTA / DRAEM as `name=value` lines.
With --train_repeats > 0, also the median seconds per train step at --batch_size (each model in
its own process, in turns; bench/train_step.py's step): `train_step_ratio`, POUTA's over DRAEM's,
is what equal training time means (DRAEM's N steps take as long as N / ratio of POUTA's; the
study's `equal_time` question). The tiny preset's: --base_width=16 --image_size=64.
Targets: discriminative params and discriminative FLOPs <= 0.25, total params <= 0.75 (a total
FLOP count or latency below 0.75 cannot be had while the reconstructive network is shared).
"""

from __future__ import annotations

import json
import time

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import train_step
from absl import flags
from etils.epath import Path
from ml_collections import config_flags

from pouta_jax import config as config_lib, errors, evaluate, models, train
from pouta_jax.models.pouta import unit_width

_WIDTH = flags.DEFINE_integer("base_width", 128, "Reconstructive base width of both models.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Square input size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed inferences per model.")
_TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 0, "Timed train steps per model (0: none).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Train step batch size.")
# POUTA's settings as the training command takes them (--pouta.model.<key>=...); the base width
# is --base_width's, for both models.
_POUTA = config_flags.DEFINE_config_file(
  "pouta", str(Path(__file__).resolve().parents[1] / "configs" / "pouta.py"), "POUTA's config."
)
_FILTER = 21


def main(argv: list[str]) -> None:
  del argv
  setups = {}
  for name in ("draem", "pouta"):
    config = _POUTA.value if name == "pouta" else config_lib.load(name)
    config.model.base_width = _WIDTH.value
    models.get(name).validate(config)
    model = models.get(name).build(config)
    state = train.fresh_state(model, optax.identity(), _SIZE.value, seed=0)
    profile = evaluate.profile(model, state.variables, _SIZE.value, _FILTER, repeats=1)
    setups[name] = (evaluate.make_predict_fn(model, _FILTER), state.variables, profile)

  image = jnp.zeros((1, _SIZE.value, _SIZE.value, 3), jnp.float32)
  times = {name: [] for name in setups}
  for _ in range(_REPEATS.value):  # interleaved, so drifts in machine load hit both alike
    for name, (predict_fn, variables, _) in setups.items():
      start = time.perf_counter()
      jax.block_until_ready(predict_fn(variables, image))
      times[name].append(time.perf_counter() - start)

  model = _POUTA.value.model
  print(
    f"base width {_WIDTH.value} (POUTA's discriminative width "
    f"{unit_width(_WIDTH.value, model.discriminative_width, model.discriminative_fraction)}, "
    f"level multipliers {tuple(model.level_multipliers)}, fuse kernel {model.fuse_kernel}), "
    f"{_SIZE.value} px, batch 1, {_REPEATS.value} repeats"
  )
  print(
    "| model | params recon. | params discr. | params total | GFLOPs recon. | GFLOPs discr. "
    "| GFLOPs total | latency ms |"
  )
  print("|---|---|---|---|---|---|---|---|")
  latency = {name: 1000 * float(np.median(t)) for name, t in times.items()}
  for name, (_, _, profile) in setups.items():
    p, f = profile["params"], profile["flops"]
    print(
      f"| {name} | {p['reconstructive']:,} | {p['discriminative']:,} | {p['total']:,} | "
      f"{f['reconstructive'] / 1e9:.2f} | {f['discriminative'] / 1e9:.2f} | "
      f"{f['total'] / 1e9:.2f} | {latency[name]:.1f} |"
    )
  draem, pouta = setups["draem"][2], setups["pouta"][2]
  print(
    f"discriminative_param_ratio="
    f"{pouta['params']['discriminative'] / draem['params']['discriminative']:.4f}"
  )
  print(f"total_param_ratio={pouta['params']['total'] / draem['params']['total']:.4f}")
  print(
    f"discriminative_flops_ratio="
    f"{pouta['flops']['discriminative'] / draem['flops']['discriminative']:.4f}"
  )
  print(f"flops_ratio={pouta['flops_per_image'] / draem['flops_per_image']:.4f}")
  print(f"latency_ratio={latency['pouta'] / latency['draem']:.4f}")
  if _TRAIN_REPEATS.value:
    setting = train_step.Setting("pouta_vs_draem", _WIDTH.value, _SIZE.value, _BATCH.value, False)
    stored = json.loads(_POUTA.value.to_json_best_effort())
    steps = harness.interleaved(
      {
        "draem": (train_step.jax_step, (setting, "auto")),
        "pouta": (train_step.jax_step, (setting, "auto", stored)),
      },
      _TRAIN_REPEATS.value,
    )
    for name, (seconds, facts) in steps.items():
      print(
        f"{name}: {1000 * seconds:.0f} ms per train step at batch {_BATCH.value} "
        f"(compiled in {facts['start_s']:.1f} s)"
      )
    print(f"train_step_ratio={steps['pouta'][0] / steps['draem'][0]:.4f}")


if __name__ == "__main__":
  errors.run(main)  # a bad --pouta.* value: one line naming the key
