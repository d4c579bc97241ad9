"""Converts PyTorch weights: DRAEM into a pouta_jax workdir that evaluates (or fine-tunes) as
usual, and torchvision ResNets into the backbone file PRN reads.

    python -m pouta_jax.convert --from=draem_torch --recon=DRAEM_bottle.pckl \
        --seg=DRAEM_bottle_seg.pckl --workdir=runs/converted/bottle \
        [--config=configs/draem.py:bottle]
    python -m pouta_jax.convert --from=draem_torch --ckpt=anomalib/.../model.ckpt --workdir=...
    python -m pouta_jax.main --config=configs/draem.py:bottle --workdir=runs/converted/bottle \
        --mode=eval

Reads the official release's two state dicts (reconstructive and segmentation subnetworks) or an
anomalib checkpoint (a Lightning `.ckpt`, or its state dict). The base width is read from the
weights. anomalib feeds its discriminative subnetwork concat(input, reconstruction) where the
official code (and pouta_jax) feed concat(reconstruction, input); the first discriminative
convolution's input channels are swapped accordingly. Any missing, extra or mis-shaped key fails
with the list of them and nothing is written. Needs torch only to read the files (the `bench`
extra); the mapping itself is plain numpy.

    python -m pouta_jax.convert --from=torchvision_resnet --weights=resnet18-f37072fd.pth \
        --backbone=resnet18 --out=weights/resnet18.npz

reads a torchvision ResNet18 / Wide-ResNet-50-2 state dict (its classifier `fc.*` is dropped)
into an .npz that `models.backbone.load_weights` reads.
"""

from __future__ import annotations

import functools
import io
import pickle

import jax
import ml_collections
import numpy as np
from absl import flags
from etils.epath import Path

from pouta_jax import checkpoint, config as config_lib, errors, experiment, files, train
from pouta_jax.models import backbone as backbone_lib

RECON, SEG = "reconstructive", "discriminative"
ANOMALIB_PREFIXES = {
  "model.reconstructive_subnetwork.": RECON,
  "reconstructive_subnetwork.": RECON,
  "model.discriminative_subnetwork.": SEG,
  "discriminative_subnetwork.": SEG,
}


class ConversionError(errors.Error, ValueError):
  """Weights that do not fit the model; the message lists the offending keys."""


def _torch_module_paths(subnetwork: str) -> dict[str, tuple[str, ...]]:
  """torch module prefix -> pouta_jax module path, for every conv (+ its BatchNorm) of DRAEM.

  In torch's nn.Sequential blocks a double conv is (conv 0, bn 1, relu, conv 3, bn 4, relu) and
  an up stage is (upsample, conv 1, bn 2, relu).
  """
  paths = {}
  if subnetwork == RECON:
    encoder, decoder, blocks = "encoder", "decoder", 5
    ups = [f"up{k}" for k in range(1, 5)]  # up1 is the deepest: pouta_jax's up_3
    dbs = [f"db{k}" for k in range(1, 5)]
  else:
    encoder, decoder, blocks = "encoder_segment", "decoder_segment", 6
    ups = ["up_b"] + [f"up{k}" for k in range(1, 5)]
    dbs = ["db_b"] + [f"db{k}" for k in range(1, 5)]
  for i in range(blocks):
    for j, index in enumerate((0, 3)):
      paths[f"{encoder}.block{i + 1}.{index}"] = ("encoder", f"block_{i}", f"ConvBNReLU_{j}")
  levels = len(ups)
  for stage, (up, db) in enumerate(zip(ups, dbs)):
    level = levels - 1 - stage
    paths[f"{decoder}.{up}.1"] = (f"up_{level}", "ConvBNReLU_0")
    for j, index in enumerate((0, 3)):
      paths[f"{decoder}.{db}.{index}"] = (f"decoder_{level}", f"ConvBNReLU_{j}")
  paths[f"{decoder}.fin_out.0"] = ("head",)
  return paths


def _bn_prefix(conv_prefix: str) -> str:
  """The BatchNorm that follows a conv in the same nn.Sequential (index + 1)."""
  head, index = conv_prefix.rsplit(".", 1)
  return f"{head}.{int(index) + 1}"


def to_variables(
  state_dicts: dict[str, dict[str, np.ndarray]], swap_seg_input: bool, template: dict
) -> dict:
  """{"reconstructive": sd, "discriminative": sd} (torch names, numpy arrays) -> pouta_jax
  variables shaped like `template`; ConversionError lists every missing, extra or mis-shaped
  key (BatchNorm counters are ignored)."""
  params = jax.tree.map(np.asarray, template["params"])
  stats = jax.tree.map(np.asarray, template["batch_stats"])
  # "<subnetwork> <torch key>" -> (its torch shape, the dict and key it fills, a layout change)
  targets = {}
  for subnetwork in (RECON, SEG):
    for prefix, path in _torch_module_paths(subnetwork).items():
      node_p, node_s = params[subnetwork], stats[subnetwork]
      for part in path:
        node_p, node_s = node_p[part], node_s.get(part, {})
      conv = node_p["Conv_0"] if "Conv_0" in node_p else node_p["Conv3x3_0"]["Conv_0"]
      kh, kw, cin, cout = conv["kernel"].shape
      swap = swap_seg_input and subnetwork == SEG and prefix.endswith("block1.0")
      targets[f"{subnetwork} {prefix}.weight"] = (
        (cout, cin, kh, kw),
        conv,
        "kernel",
        functools.partial(_torch_kernel, swap_input_halves=swap),
      )
      targets[f"{subnetwork} {prefix}.bias"] = ((cout,), conv, "bias", None)
      if "BatchNorm_0" in node_p:
        bn = _bn_prefix(prefix)
        for ours, theirs, tree in (
          ("scale", "weight", node_p),
          ("bias", "bias", node_p),
          ("mean", "running_mean", node_s),
          ("var", "running_var", node_s),
        ):
          targets[f"{subnetwork} {bn}.{theirs}"] = ((cout,), tree["BatchNorm_0"], ours, None)
  given = {
    f"{subnetwork} {k}": np.shape(v)
    for subnetwork, sd in state_dicts.items()
    for k, v in sd.items()
    if not k.endswith("num_batches_tracked")
  }
  problems = errors.key_problems({k: t[0] for k, t in targets.items()}, given)
  if problems:
    raise ConversionError(f"the weights do not fit DRAEM {errors.listing(problems, limit=50)}")
  for name, (_, tree, leaf, change) in targets.items():
    subnetwork, key = name.split(" ")
    value = np.asarray(state_dicts[subnetwork][key], np.float32)
    tree[leaf] = change(value) if change else value
  return {"params": params, "batch_stats": stats}


def _torch_kernel(kernel: np.ndarray, swap_input_halves: bool) -> np.ndarray:
  """OIHW -> HWIO; anomalib's first discriminative convolution takes (input, reconstruction)
  where ours takes (reconstruction, input): its input channels' halves swap."""
  kernel = kernel.transpose(2, 3, 1, 0)
  if swap_input_halves:
    half = kernel.shape[2] // 2
    kernel = np.concatenate([kernel[:, :, half:], kernel[:, :, :half]], axis=2)
  return kernel


def split_anomalib(state_dict: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """An anomalib DraemModel state dict (with or without Lightning's `model.`) per subnetwork."""
  parts: dict[str, dict[str, np.ndarray]] = {RECON: {}, SEG: {}}
  unknown = []
  for key, value in state_dict.items():
    prefix = next((p for p in ANOMALIB_PREFIXES if key.startswith(p)), None)
    if prefix is None:
      unknown.append(key)
    else:
      parts[ANOMALIB_PREFIXES[prefix]][key[len(prefix) :]] = value
  if unknown:
    raise ConversionError("not anomalib DRAEM keys:\n  " + "\n  ".join(sorted(unknown)))
  return parts


def base_width(state_dicts: dict[str, dict[str, np.ndarray]]) -> int:
  key = "encoder.block1.0.weight"
  if key not in state_dicts[RECON]:
    raise ConversionError(f"missing reconstructive {key}: not a DRAEM reconstructive network")
  return int(np.shape(state_dicts[RECON][key])[0])


def _torchvision_key(flat_key: str) -> str:
  """ "params/layer2_0/downsample_bn/scale" -> "layer2.0.downsample.1.weight"."""
  collection, *modules, leaf = flat_key.split("/")
  names = [m.replace("_", ".") if m.startswith("layer") else m for m in modules]
  names = [
    {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m) for m in names
  ]
  torch_leaf = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
  }[(collection, leaf)]
  return ".".join(names + [torch_leaf])


def torchvision_to_variables(state_dict: dict[str, np.ndarray], backbone: str) -> dict:
  """A torchvision ResNet state dict as `backbone`'s variables; ConversionError lists every
  missing, extra or mis-shaped key (the classifier fc.* and BatchNorm counters are ignored)."""
  template = jax.eval_shape(lambda: backbone_lib.init_variables(backbone))
  ours = backbone_lib.flatten(template)
  torch_keys = {key: _torchvision_key(key) for key in ours}
  # torch's shapes: kernels are OIHW where ours are HWIO
  expected = {
    torch_keys[k]: (s.shape[3], s.shape[2], *s.shape[:2]) if len(s.shape) == 4 else s.shape
    for k, s in ours.items()
  }
  given = {
    k: np.shape(v)
    for k, v in state_dict.items()
    if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
  }
  problems = errors.key_problems(expected, given)
  if problems:
    raise ConversionError(f"not a torchvision {backbone} state dict {errors.listing(problems)}")

  def ours_of(key: str) -> np.ndarray:
    value = np.asarray(state_dict[torch_keys[key]], np.float32)
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO

  leaves = [
    ours_of("/".join(k.key for k in path))
    for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]
  ]
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _load_torch(path: str | Path) -> dict[str, np.ndarray]:
  """The tensors of a state dict, or of a checkpoint's "state_dict" entry.

  A downloaded file is untrusted: torch's weights-only unpickler reads tensors and plain
  containers and refuses every other global, so a crafted pickle never runs code here.
  """
  try:
    import torch
  except ImportError as e:
    raise errors.Error("reading PyTorch files needs torch: pip install -e '.[bench]'") from e
  path = Path(path)
  if not path.exists():
    raise errors.NotFoundError(f"{path}: no such weights file")
  if why := files.not_a_file(path):
    raise errors.DataError(f"{path}: {why}; expected a PyTorch weights file")
  try:
    loaded = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # The weights-only unpickler refuses a global (code to import and call) by name; any other
    # refusal (an unknown opcode, a bad load key) means the bytes are no pickle it can read.
    if not any(word in str(e) for word in ("Unsupported global", "GLOBAL", "reduce")):
      raise ConversionError(f"{path}: not a readable PyTorch file ({reason})") from None
    raise ConversionError(
      f"{path}: refused to load: it pickles more than tensors and plain containers ({reason}). "
      f"Unpickling it could run code. If you trust the file, save its state dict alone with "
      f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'state_dict.pt') and "
      f"convert that"
    ) from None
  except Exception as e:  # torch raises many types for a damaged or legacy (tar) file
    raise ConversionError(
      f"{path}: not a readable PyTorch file ({type(e).__name__}: {e}); a legacy tar-format "
      f"checkpoint must be saved again with a current torch.save"
    ) from None
  state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
  if not isinstance(state_dict, dict):
    raise ConversionError(f"{path}: not a state dict or a checkpoint holding one")
  keys = [k for k in state_dict if not isinstance(k, str)]
  if keys:
    raise ConversionError(f"{path}: keys {keys[:5]} are not names; not a state dict")
  return {k: _array(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _array(tensor) -> np.ndarray:
  """A tensor as numpy; bfloat16 and float16 (which numpy cannot hold or PyTorch keeps in
  half) as float32, which holds them exactly."""
  import torch

  tensor = tensor.detach().cpu()
  if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
    tensor = tensor.float()
  return tensor.numpy()


def convert(
  state_dicts: dict[str, dict[str, np.ndarray]],
  swap_seg_input: bool,
  config: ml_collections.ConfigDict,
  workdir: str | Path,
) -> Path:
  """Writes config.json and a step-0 checkpoint of the converted weights into `workdir`
  (which must hold no checkpoint yet); returns it."""
  config.model.base_width = base_width(state_dicts)
  config_lib.validate(config)
  if config.model.name != "draem":
    raise ConversionError(f"config.model.name={config.model.name!r}: these are DRAEM weights")
  workdir = Path(workdir)
  if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
    raise errors.ExistsError(f"{workdir}/checkpoints is not empty; convert into a new --workdir")
  state = train.setup(config, [1]).state  # a stack of one run
  # Converted before any write.
  variables = train.stack_runs(
    [to_variables(state_dicts, swap_seg_input, train.run_variables(state.variables, 0))]
  )
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  with experiment.claimed_workdir(workdir, config) as workdir:
    mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
    checkpoint.save(mngr, 0, state)
    mngr.close()
  return workdir


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if f["from"].value == "torchvision_resnet":
    if not f.weights or not f.out:
      raise errors.ConfigError("--from=torchvision_resnet needs --weights and --out")
    variables = torchvision_to_variables(_load_torch(f.weights), f.backbone)
    print(f"Wrote {backbone_lib.save_weights(variables, f.out)}")
    return
  if not f.workdir:
    raise errors.ConfigError("--from=draem_torch needs --workdir")
  if f.ckpt and (f.recon or f.seg) or not f.ckpt and not (f.recon and f.seg):
    raise errors.ConfigError("give --ckpt (anomalib), or --recon and --seg (the official release)")
  if f.ckpt:
    state_dicts, swap = split_anomalib(_load_torch(f.ckpt)), True
  else:
    state_dicts = {RECON: _load_torch(f.recon), SEG: _load_torch(f.seg)}
    swap = False
  path, _, arg = f.config.partition(":")
  workdir = convert(state_dicts, swap, config_lib.load_file(path, arg or None), f.workdir)
  print(
    f"Converted into {workdir}; evaluate with python -m pouta_jax.main --mode=eval "
    f"--config={f.config} --workdir={workdir}"
  )


if __name__ == "__main__":
  flags.DEFINE_enum(
    "from", "draem_torch", ["draem_torch", "torchvision_resnet"], "What the weights are."
  )
  flags.DEFINE_string("recon", None, "Official release: the reconstructive state dict.")
  flags.DEFINE_string("seg", None, "Official release: the segmentation state dict.")
  flags.DEFINE_string("ckpt", None, "anomalib: a Lightning .ckpt (or its state dict).")
  flags.DEFINE_string("workdir", None, "draem_torch: new workdir for the converted run.")
  flags.DEFINE_string("weights", None, "torchvision_resnet: the state dict (.pth).")
  flags.DEFINE_enum(
    "backbone", "resnet18", sorted(backbone_lib.BACKBONES), "torchvision_resnet: which ResNet."
  )
  flags.DEFINE_string("out", None, "torchvision_resnet: the .npz to write.")
  flags.DEFINE_string("config", "configs/draem.py", "Config file[:category,preset].")
  errors.run(main)
