"""DRAEM (the official setting at full size).

--config=configs/draem.py:<category>[,tiny]
e.g. configs/draem.py:bottle (MVTec AD, with --config.data.root=/path/to/mvtec_ad)
     configs/draem.py:weave,tiny (embedded dataset, 16/8 widths, 64 px)
"""

from pouta_jax import config as base


def get_config(arg: str | None = None):
  return base.apply_args(base.base_config("draem"), arg)
