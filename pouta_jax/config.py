"""Defaults shared by every model's config file, size presets, and start-up validation.

A config file in configs/ calls `base_config(model)` and `apply_args(config, arg)`; absl flags
override any key afterwards (`--config.optim.lr=2e-4`). `validate` runs before anything is read
or written, so a config that cannot work fails at once, naming the key.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import ml_collections
from absl import flags

from pouta_jax import errors, files, metrics, models
from pouta_jax.data.synthesis import TEXTURE_COLORS
from pouta_jax.models.layers import CONV_WEIGHT_GRAD_MODES

# Size presets. `full` is the published setting; `tiny` trains on 2 CPU cores in about a minute.
PRESETS = {
  "full": {},
  "tiny": {
    "model.base_width": 16,
    "data.image_size": 64,
    "data.num_workers": 1,
    "optim.lr": 5e-4,  # a short schedule needs a larger step than the paper's 1e-4
    "train.num_steps": 300,
    "train.log_every": 25,
    "train.checkpoint_every": 100,
    "eval.score_filter_size": 5,
  },
}

# `--config=configs/<model>.py:all` trains these in one program (MVTec AD's 15 categories).
MVTEC_AD_CATEGORIES = (
  "bottle",
  "cable",
  "capsule",
  "carpet",
  "grid",
  "hazelnut",
  "leather",
  "metal_nut",
  "pill",
  "screw",
  "tile",
  "toothbrush",
  "transistor",
  "wood",
  "zipper",
)

# Downsampling of the deepest network: the discriminative U-Net pools 5 times.
SIZE_MULTIPLE = 32
# data.val_defects: the kinds of validation anomaly (data/validation.py makes them).
VALIDATION_DEFECTS = ("synthetic", "removed", "misplaced", "spot")


def base_config(model: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # conv_weight_grad: how the 3x3 convolutions' gradients are computed ("auto": shifted matmuls
  # where XLA:CPU is slow, on the CPU backend; XLA's on accelerators; see models/layers.py).
  config.model = dict(name=model, base_width=128, conv_weight_grad="auto")
  config.data = dict(
    root="",  # an MVTec-AD-layout folder; empty: the embedded dataset under embedded_dir
    # Or a TFDS dataset built by `python -m pouta_jax.data.build`, e.g. "mvtec_ad/all_256",
    # read from tfds_data_dir (takes precedence over root).
    tfds_dataset="",
    tfds_data_dir="",
    embedded_dir="outputs/data/embedded",
    # The embedded dataset's draw: 0 (the README's) under embedded_dir, N under
    # embedded_dir + "_seed<N>": new images of the same categories and defect kinds, data no
    # setting was chosen on (a check of the study's choices on independent test sets).
    embedded_seed=0,
    category="weave",
    # Two or more: one program trains them all, parameters stacked over a category axis
    # (`category` is then the first of them).
    categories=(),
    few_shot=0,  # K > 0: train on K normal images chosen by train.seed; 0: all of them
    # A validation split without test labels (data/validation.py): this share of train/good,
    # chosen by val_seed, is held out of training (before few_shot draws from the rest) and
    # scored as it is and with an anomaly of each kind in val_defects (data/validation.py:
    # the training synthesis's, and kinds it never makes). Its F1-max thresholds are the
    # deployment thresholds; 0: no split (thresholds from the test set only, labelled as
    # oracle values).
    val_fraction=0.0,
    val_seed=0,
    val_defects=VALIDATION_DEFECTS,
    # A dataset whose defect images have no masks is image-level (pixel metrics n/a). With
    # masks for some and not others it is refused, unless this is False.
    require_masks=True,
    image_size=256,
    # A DTD-layout texture folder, or "tfds:dtd_textures" (built into tfds_data_dir); empty:
    # procedural textures.
    anomaly_source="",
    anomaly_prob=0.5,
    rotate_prob=0.3,
    beta_max=0.8,
    # "rgb": the texture as it is (DRAEM's); "match": grey on grayscale images (see
    # data/synthesis.py SynthesisConfig).
    texture_color="rgb",
    perlin_max_scale_log2=5,
    num_augmenters=3,
    # "Seen" anomalies: this many defect images (with masks) of the test set, chosen by
    # train.seed, are trained on (pasted onto normal images) and never scored; of the
    # synthesised anomalies, real_anomaly_prob are pasted ones, the rest DRAEM's.
    num_real_anomalies=0,
    real_anomaly_prob=0.5,
    batch_size=8,
    num_workers=2,
  )
  # Device mesh: ("auto",) (--config.mesh.axes=auto) lays the devices out from the stacked
  # runs and the batch (sharding.layouts), or (axis name, size) pairs, one size may be -1 ("the
  # rest"). The batch is split over "data"; parameters are replicated, or, with
  # data.categories, split over a "category" axis. num_devices: how many of the devices the
  # run uses (0: all). require_platform: "tpu", "gpu" or "cpu" refuses to start on any other
  # (a TPU VM or GPU node whose jax lacks the accelerator's plugin falls back to its CPU).
  config.mesh = dict(axes=("auto",), num_devices=0, require_platform="")
  # weight_decay: added to the gradients before Adam (PyTorch's Adam weight_decay).
  config.optim = dict(lr=1e-4, milestones=(0.8, 0.9), decay=0.2, weight_decay=0.0)
  config.train = dict(
    seed=0,
    num_steps=0,  # 0: num_epochs epochs of ceil(#train images / batch) steps
    num_epochs=700,
    log_every=50,
    checkpoint_every=1000,
    keep_checkpoints=2,
    # With stacked runs: "vmap" (accelerators, runs split over devices), "unroll" (CPU) or
    # "auto" (by platform and mesh: train.category_loop).
    category_loop="auto",
    # Which model a run evaluates and exports: "last" (the last step's) or "best_val" (each
    # run's best validation `select_metric` so far, kept in the train state; needs
    # data.val_fraction, and costs a copy of the parameters and BatchNorm statistics).
    select="last",
    select_metric="pixel_ap",
  )
  # num_heatmaps: test images drawn as heatmap panels (-1: every one). val_every: validation
  # metrics (with data.val_fraction) every this many steps in the training scalars, besides
  # the last step (0: the last step only). flops_by_part: the profile's FLOPs of the
  # reconstructive network, the discriminative part and the scoring (metrics.json `flops`),
  # three more programs compiled at evaluation; False: the total alone. reconstruction_error:
  # the trained model's reconstruction error (mean |x - reconstruction| over the channels) is
  # evaluated too, as `<model>_recon_error`: what the reconstructive network finds alone, per
  # category and defect type, so the tables show what the discriminative part adds or loses.
  # error_weight: the anomaly map is the model's map plus this times that reconstruction error
  # (the error finds removed structure the discriminative part misses: README), in the
  # validation and test metrics, the thresholds and exported artifacts alike.
  # fuse_levels: a coarse-to-fine model's (POUTA's) map is the mean of its final map and every
  # level's map (resized bilinearly), as HED fuses its side outputs, before error_weight adds
  # the reconstruction error; everywhere the map is used, as error_weight.
  # level_maps: each of a coarse-to-fine model's level maps (POUTA: the softmax of each level's
  # head, resized bilinearly to the image; finest level 0) evaluated too, as `<model>_level<i>`,
  # without error_weight: which level holds the evidence and which refinement loses it.
  config.eval = dict(
    batch_size=16,
    score_filter_size=21,
    num_heatmaps=8,
    val_every=0,
    flops_by_part=True,
    reconstruction_error=False,
    error_weight=0.0,
    fuse_levels=False,
    level_maps=False,
  )
  # Runs stacked in this program besides data.categories (see runs.py), in the launchers'
  # syntax: sweep ("optim.lr=1e-4,3e-4": one product axis each), zip (axes whose i-th values go
  # together) and seeds (train.seed 0..N-1). pouta_jax.main's --sweep, --zip and --seeds set it.
  config.stack = dict(sweep=(), zip=(), seeds=1)
  return config


def expand_categories(names: Sequence[str]) -> list[str]:
  """Category names with `all` standing for MVTec AD's 15."""
  return [c for name in names for c in (MVTEC_AD_CATEGORIES if name == "all" else (name,))]


def apply_args(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies `categories[,preset]` from `--config=configs/<model>.py:bottle,tiny`.

  One category sets `data.category`; several (or `all`: MVTec AD's 15) also set
  `data.categories`, for one program that trains them all.
  """
  categories = []
  for part in (p for p in (arg or "").split(",") if p):
    if part in PRESETS:
      for key, value in PRESETS[part].items():
        section, name = key.split(".")
        config[section][name] = value
    else:
      categories.append(part)
  categories = expand_categories(categories)
  if categories:
    config.data.category = categories[0]
  if len(categories) > 1:
    config.data.categories = tuple(categories)
  return config


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load(model: object, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/<model>.py`'s get_config(arg), as `--config=configs/<model>.py:arg` would give.

  `model` often comes from a stored config (a workdir's config.json, an artifact's manifest):
  data, not a path. Only a name of the model registry is looked up, before anything is
  imported, so no file a workdir names is ever executed."""
  if not isinstance(model, str) or model not in models.REGISTRY:
    raise errors.ConfigError(
      f"config.model.name={model!r}: expected one of {sorted(models.REGISTRY)}"
    )
  return load_file(CONFIG_DIR / f"{model}.py", arg)


def _config_module(path: str | Path):
  path = Path(path)
  if not path.is_file():
    raise errors.ConfigError(f"no config file {path}")
  spec = importlib.util.spec_from_file_location(f"pouta_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """A config file's get_config(arg)."""
  return _config_module(path).get_config(arg)


def load_study(path: str | Path) -> dict:
  """A study file's get_study() (configs/pouta_study.py: the questions launch/study.py runs)."""
  module = _config_module(path)
  if not hasattr(module, "get_study"):
    raise errors.ConfigError(f"{path} defines no get_study()")
  return module.get_study()


def load_sweep(path: str | Path, arg: str | None = None) -> dict[str, dict[str, list]]:
  """A config file's get_sweep(arg): {"product": {key: values}, "zip": {key: values}}."""
  module = _config_module(path)
  if not hasattr(module, "get_sweep"):
    raise errors.ConfigError(f"config file {path} defines no get_sweep(arg)")
  sweep = module.get_sweep(arg)
  unknown = set(sweep) - {"product", "zip"}
  if unknown:
    raise errors.ConfigError(
      f"{path}: get_sweep returned {sorted(unknown)}; expected the keys 'product' and/or 'zip'"
    )
  return sweep


def categories_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The categories a config trains: `data.categories`, or the one `data.category`."""
  return tuple(config.data.categories) or (config.data.category,)


def from_workdir(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run stored in its workdir (`config.json`), as today's code reads it."""
  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise errors.NotFoundError(f"{workdir}: no config.json; not a pouta_jax workdir")
  if why := files.not_a_file(path):
    raise errors.ConfigError(f"{path}: {why}; not a stored config")
  try:
    stored = json.loads(path.read_text())
    name = stored["model"]["name"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
    raise errors.ConfigError(f"{path}: not a stored config ({type(e).__name__}: {e})") from None
  if not isinstance(name, str) or name not in models.REGISTRY:
    raise errors.ConfigError(
      f"{path}: config.model.name={name!r} is not a model of this version (expected one of "
      f"{sorted(models.REGISTRY)})"
    )
  try:
    config = upgrade(stored)
    validate(config)
  except errors.ConfigError as e:
    raise errors.ConfigError(f"{path}: {e}") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a stored tree of other types
    raise errors.ConfigError(f"{path}: not a stored config ({type(e).__name__}: {e})") from None
  return config


# Keys added after runs were stored, each with the value a config stored before it existed ran
# with (the behaviour before the option). A stored config without such a key reads (`upgrade`)
# and compares (`differences`) as that value, not as today's default, so a changed default
# never changes an older run's model. List a key here before its default changes.
VALUES_BEFORE_KEYS = {
  "model.compare": "both",
  "model.guidance_gate": True,
  "model.discriminative_width": 0,
  "model.discriminative_fraction": 0.5,
  "model.level_multipliers": (1, 1, 2, 4),
  "model.fuse_kernel": 3,
  "model.detach_features": False,
  "model.pixel_input": False,
  "loss.level_weights": (1.0, 1.0, 1.0, 1.0),
  "loss.level_decay": 0.0,
  "eval.error_weight": 0.0,
  "eval.fuse_levels": False,
}


def _as_stored(stored: dict, keys: Iterable[str]) -> dict[str, object]:
  """`stored` flattened, with the `VALUES_BEFORE_KEYS` of those `keys` (today's) it lacks, as
  JSON values."""
  before = {k: json.loads(json.dumps(v)) for k, v in VALUES_BEFORE_KEYS.items() if k in keys}
  return {**before, **flatten(stored)}


def upgrade(stored: dict) -> ml_collections.ConfigDict:
  """A config stored by any version, as today's code reads it: the stored values laid over
  the defaults of its model's config file, so a key added since (say data.real_anomaly_prob)
  has its default, or the value it had before it existed (`VALUES_BEFORE_KEYS`). The one place
  that knows older workdirs; code reads keys plainly."""
  config = load(stored["model"]["name"])
  for key, value in _as_stored(stored, flatten(config.to_dict())).items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      if section not in node:  # a section this version no longer has
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[name] = tuple(value) if isinstance(value, list) else value
  return config


# Keys that change only what is written, or how the same computation is laid out, never the
# trained state, the data stream or the evaluation: a run may resume in a workdir with other
# values of these (every other key must equal the stored one; experiment.store_config).
OUTPUT_ONLY_KEYS = frozenset(
  {
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "eval.num_heatmaps",
    "eval.batch_size",  # memory only; float rounding aside, the same maps
    "eval.flops_by_part",
    "eval.reconstruction_error",  # one more model evaluated, the trained one unchanged
    "eval.level_maps",  # more maps of the trained model evaluated, the model unchanged
    "mesh.axes",  # a resumed job may land on another slice shape
    "mesh.num_devices",
    "mesh.require_platform",  # a check at start, not a setting of the run
    "train.category_loop",  # vmap and unroll compute the same steps
    "model.conv_weight_grad",  # two ways to the same gradients
  }
)


# Keys that change only how a trained model is scored: with train.select=last (best_val picks
# its checkpoint by the scores), runs that differ only in these and the output-only keys train
# the same model (`training_identity`), so one's checkpoints serve the others.
SCORING_KEYS = frozenset({"eval.error_weight", "eval.fuse_levels", "eval.score_filter_size"})


def training_identity(config: dict) -> str:
  """What a run's trained model depends on, as text: its config (JSON, as stored and upgraded)
  without the output-only keys and, with train.select=last, the scoring keys."""
  flat = flatten(config)
  ignored = OUTPUT_ONLY_KEYS | (SCORING_KEYS if flat["train.select"] == "last" else frozenset())
  return json.dumps({k: v for k, v in flat.items() if k not in ignored}, sort_keys=True)


# Keys whose values may differ between the runs of one program, besides data.category and the
# numeric loss.* weights (`is_stackable`).
STACKABLE_KEYS = frozenset(
  {
    "train.seed",
    "optim.lr",
    "optim.milestones",  # a traced step each (train.hyperparameters)
    "optim.decay",
    "optim.weight_decay",
    "data.few_shot",
    "data.anomaly_source",
    "data.anomaly_prob",
    "data.rotate_prob",
    "data.beta_max",
    "data.texture_color",
    "data.perlin_max_scale_log2",
    "data.num_augmenters",
    "data.num_real_anomalies",
    "data.real_anomaly_prob",
  }
)


def is_stackable(config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether runs of one program may have different values of `key` (a dotted config key)."""
  if key in STACKABLE_KEYS:
    return True
  section, _, name = key.partition(".")
  return section == "loss" and name in config.get("loss", {}) and is_number(config.loss[name])


def is_number(value: object) -> bool:
  """A number, or a tuple of numbers (bools are not)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
  """Nested dicts as one level of dotted keys ("optim.lr")."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


# Keys that hold a path: compared as the same place however it is written (`same_path`).
PATH_KEYS = frozenset(
  {
    "data.root",
    "data.tfds_data_dir",
    "data.embedded_dir",
    "data.anomaly_source",
    "backbone.weights",
  }
)


def same_path(a: object, b: object) -> bool:
  """Whether two path values name one place: `x/`, `./x` and `x` alike (an URL keeps its `//`)."""
  if not (isinstance(a, str) and isinstance(b, str)):
    return a == b

  def normal(p: str) -> str:
    if files.is_remote(p):
      return p.rstrip("/")
    if not p or ":" in p.split("/")[0]:  # unset, or a name such as tfds:dtd_textures
      return p
    return os.path.normpath(p)

  return normal(a) == normal(b)


def differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
  """(dotted key, stored value, current value) for each key whose values differ between two
  configs as JSON. Keys only one side has are skipped: an older version's config lacks keys
  added since (but one of `VALUES_BEFORE_KEYS` compares as its value before), and another
  model's sections differ (model.name tells those apart). Paths compare normalised."""
  new = flatten(current)
  old = _as_stored(stored, new)
  return [
    (k, old[k], new[k])
    for k in sorted(old.keys() & new.keys())
    if not (same_path(old[k], new[k]) if k in PATH_KEYS else old[k] == new[k])
  ]


def has_key(config: dict, key: str) -> bool:
  return key in flatten(config)


PLATFORMS = ("cpu", "gpu", "tpu")
SELECTIONS = ("last", "best_val")  # train.select


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key when a setting cannot work."""
  errors.check(
    config,
    config.mesh.require_platform in ("", *PLATFORMS),
    "mesh.require_platform",
    f"'' (any platform) or one of {PLATFORMS}",
  )
  errors.check(
    config, config.mesh.num_devices >= 0, "mesh.num_devices", "0 (all devices) or a count"
  )
  size = config.data.image_size
  errors.check(
    config,
    size > 0 and size % SIZE_MULTIPLE == 0,
    "data.image_size",
    f"a positive multiple of {SIZE_MULTIPLE} (the network downsamples 5 times)",
  )
  errors.check(
    config,
    config.model.base_width >= 2 and config.model.base_width % 2 == 0,
    "model.base_width",
    "an even number >= 2 (the discriminative width is half of it)",
  )
  errors.check(
    config,
    config.model.conv_weight_grad in CONV_WEIGHT_GRAD_MODES,
    "model.conv_weight_grad",
    f"one of {CONV_WEIGHT_GRAD_MODES}",
  )
  categories = tuple(config.data.categories)
  errors.check(
    config, len(set(categories)) == len(categories), "data.categories", "distinct category names"
  )
  errors.check(
    config, config.data.few_shot >= 0, "data.few_shot", "0 (all images) or a positive count"
  )
  errors.check(
    config,
    config.data.embedded_seed >= 0 and not (config.data.embedded_seed and config.data.root),
    "data.embedded_seed",
    "a draw >= 0 of the embedded dataset, and 0 when data.root names another dataset",
  )
  errors.check(
    config,
    0 <= config.data.val_fraction < 1,
    "data.val_fraction",
    "a share of train/good in [0, 1) to hold out for validation",
  )
  val_defects = tuple(config.data.val_defects)
  errors.check(
    config,
    bool(val_defects)
    and len(set(val_defects)) == len(val_defects)
    and set(val_defects) <= set(VALIDATION_DEFECTS),
    "data.val_defects",
    f"distinct kinds of validation anomaly among {VALIDATION_DEFECTS}",
  )
  errors.check(config, config.data.batch_size > 0, "data.batch_size", "a positive batch size")
  errors.check(config, config.data.num_workers >= 0, "data.num_workers", ">= 0 worker processes")
  errors.check(
    config, 0 <= config.data.anomaly_prob <= 1, "data.anomaly_prob", "a probability in [0, 1]"
  )
  errors.check(
    config, 0 <= config.data.rotate_prob <= 1, "data.rotate_prob", "a probability in [0, 1]"
  )
  errors.check(config, 0 <= config.data.beta_max <= 1, "data.beta_max", "an opacity in [0, 1]")
  errors.check(
    config,
    config.data.texture_color in TEXTURE_COLORS,
    "data.texture_color",
    f"one of {TEXTURE_COLORS}",
  )
  errors.check(
    config,
    0 <= config.data.perlin_max_scale_log2 <= 8,
    "data.perlin_max_scale_log2",
    "an integer in [0, 8]",
  )
  errors.check(
    config, 0 <= config.data.num_augmenters <= 10, "data.num_augmenters", "0 to 10 augmenters"
  )
  errors.check(
    config,
    config.data.num_real_anomalies >= 0,
    "data.num_real_anomalies",
    "0 or a number of test-set defect images to train on",
  )
  errors.check(
    config,
    0 <= config.data.real_anomaly_prob <= 1,
    "data.real_anomaly_prob",
    "a probability in [0, 1]",
  )
  errors.check(config, config.optim.lr > 0, "optim.lr", "a positive learning rate")
  errors.check(config, config.optim.weight_decay >= 0, "optim.weight_decay", ">= 0")
  milestones = tuple(config.optim.milestones)
  errors.check(
    config,
    all(0 < m < 1 for m in milestones) and list(milestones) == sorted(milestones),
    "optim.milestones",
    "increasing fractions of training in (0, 1)",
  )
  errors.check(
    config,
    config.train.num_steps > 0 or config.train.num_epochs > 0,
    "train.num_steps",
    "a positive number of steps (or train.num_epochs > 0)",
  )
  errors.check(config, config.stack.seeds >= 1, "stack.seeds", "at least 1 seed")
  errors.check(config, config.train.log_every > 0, "train.log_every", "a positive interval")
  errors.check(
    config, config.train.checkpoint_every > 0, "train.checkpoint_every", "a positive interval"
  )
  errors.check(config, config.train.keep_checkpoints > 0, "train.keep_checkpoints", "at least 1")
  errors.check(
    config,
    config.train.category_loop in ("auto", "vmap", "unroll"),
    "train.category_loop",
    "'auto', 'vmap' or 'unroll'",
  )
  errors.check(
    config,
    config.eval.score_filter_size % 2 == 1,
    "eval.score_filter_size",
    "an odd filter size (centred mean filter)",
  )
  errors.check(
    config, config.eval.val_every >= 0, "eval.val_every", "0 (the last step) or an interval"
  )
  errors.check(config, config.eval.error_weight >= 0, "eval.error_weight", "a weight >= 0")
  errors.check(config, config.train.select in SELECTIONS, "train.select", f"one of {SELECTIONS}")
  errors.check(
    config,
    config.train.select != "best_val" or config.data.val_fraction > 0,
    "train.select",
    "'last' without a validation split (best_val needs data.val_fraction > 0)",
  )
  errors.check(
    config,
    config.train.select_metric in metrics.METRIC_NAMES,
    "train.select_metric",
    f"one of {metrics.METRIC_NAMES}",
  )
  errors.check(
    config,
    config.eval.num_heatmaps >= -1,
    "eval.num_heatmaps",
    "a count of test images, or -1 for every one",
  )


class UnknownConfigKeyError(errors.ConfigError):
  """A `--config.<key>=...` flag names a key the config does not have."""


def parse_flags(
  argv: list[str], flag_values: flags.FlagValues = flags.FLAGS, name: str = "config"
) -> list[str]:
  """absl's flag parsing, but an unknown config key is reported by its full name.

  ml_collections raises a bare AttributeError/KeyError for `--config.optim.learning_rate=1`;
  this finds the flag and says which section lacks which key.
  """
  try:
    return flag_values(argv)
  except (AttributeError, KeyError):
    # The config flag failed while applying overrides: load the file again to find the key.
    files = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    if not files:
      raise
    config = flag_values[name].parser.parse(files[-1])
    prefix = f"--{name}."
    for arg in argv[1:]:
      if not arg.startswith(prefix):
        continue
      path = arg[len(prefix) :].split("=", 1)[0].split(".")
      node, seen = config, name
      for part in path:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
          raise UnknownConfigKeyError(
            f"{arg}: {seen} has no key {part!r} (its keys: {', '.join(known)})"
          ) from None
        node, seen = node[part], f"{seen}.{part}"
    raise
