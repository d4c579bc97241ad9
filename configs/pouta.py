"""POUTA: DRAEM's reconstructive network, its features reused by coarse-to-fine discriminative
layers with deep supervision.

    --config=configs/pouta.py:<category>[,tiny]   few-shot: --config.data.few_shot=K
    Ablations (one idea off each):  --config.model.compare=encoder|decoder
        --config.model.guidance=False  --config.loss.deep_supervision=False
    All of them: python launch/local.py --config=configs/pouta.py --config_sweep ...
"""

from pouta_jax import config as base


def get_config(arg: str | None = None):
  config = base.base_config("pouta")
  # Defaults chosen by the design study (configs/pouta_study.py, docs/pouta_study.md) on the
  # validation split: its `compact` question's setting, +4.7 +- 2.1 points of validation pixel
  # AP over our first reading (both, 3x3 fuse, half width, no pixels) at 0.24x DRAEM's
  # discriminative FLOPs (that reading: 0.66x).
  # FCM inputs: both (with |E - D|), encoder, decoder, difference (|E - D| only), cosine (the
  # projections' cosine distance instead of |E - D|); see models/pouta.py.
  config.model.compare = "difference"
  config.model.guidance = True  # HSG: calibrate each level by the refined coarser level
  config.model.guidance_gate = True  # HSG's sigmoid gate; False: plain concatenation
  config.model.discriminative_width = 0  # the levels' unit width; 0: the fraction below
  config.model.discriminative_fraction = 0.375  # of the base width: 6 at tiny, 48 at full size
  config.model.level_multipliers = (1, 1, 2, 4)  # each level's width / discriminative_width
  config.model.fuse_kernel = 1  # FCM's fuse per pixel; 3: a 3x3 convolution (far more FLOPs)
  config.model.detach_features = False  # True: the discriminative losses stop at the features
  config.model.pixel_input = True  # the finest level also sees x, its recon and |x - recon|
  # The study's `error` question (validation pixel AP +4.0 +- 0.9 points over the map alone;
  # 0.5: +3.8, 2: +1.5): the anomaly map is POUTA's map plus the reconstruction error. DRAEM's
  # config keeps its paper's scoring, the map alone; --config.eval.error_weight=1 gives it this.
  config.eval.error_weight = 1.0
  config.loss = dict(
    level_weights=(1.0, 1.0, 1.0, 1.0),  # MSS focal weight per level, finest (H) first
    level_decay=0.0,  # 1: the level weights fall linearly to 0 over training
    final_weight=1.0,  # focal weight of the final map
    deep_supervision=True,
  )
  return base.apply_args(config, arg)


def get_sweep(arg: str | None = None) -> dict:
  """The ablation study: the full model, then each idea switched off alone."""
  del arg
  return {
    "zip": {
      "model.compare": ["difference", "encoder", "decoder", "difference", "difference"],
      "model.guidance": [True, True, True, False, True],
      "loss.deep_supervision": [True, True, True, True, False],
    }
  }
