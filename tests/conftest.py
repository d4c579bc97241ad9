"""Shared fixtures: a small embedded dataset built once, a tiny config that trains in seconds."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# One persistent XLA compilation cache for this test session, its subprocesses and xdist
# workers included (they inherit the environment): the tests compile the same tiny programs in
# many processes. Set before jax is imported, which reads these at import. A fresh folder per
# session, removed at its end by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
    prefix="pouta_jax_test_compilation_cache_"
  )
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a test's subprocess: this session's (below) plus `extra`."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


# The tests compile their tiny programs without LLVM's optimisations (XLA's own HLO passes still
# run): compiling dominates them, and on 2 cores this halved a compile-bound test (PRN's frozen
# backbone, 44 -> 25 s) and shortened the training ones too (the tiny DRAEM step ran 8% slower,
# its compile took 25% less). Behaviour under test does not depend on it; the bench/ figures
# and every command outside the tests keep XLA's default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = xla_flags("--xla_backend_optimization_level=0")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from pouta_jax import config as config_lib  # noqa: E402
from pouta_jax.data import embedded  # noqa: E402

# grain reads absl flags; outside app.run they must be marked parsed.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

SMALL = embedded.BuildSpec(
  seed=0, image_size=64, num_train=8, num_test_good=4, num_test_per_defect=2
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Files marked `heavy(seconds)` first, longest first, then the others in their order:
  `make test`'s workers take whole files, and one that drew a long file last would keep
  running while the other idles (the seconds: `--durations` under `make test` on 2 cores)."""

  def seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("heavy")
    return marker.args[0] if marker else 0

  items.sort(key=seconds, reverse=True)


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
  return embedded.build(tmp_path_factory.mktemp("embedded"), SMALL)


def make_tiny_config(model: str, root):
  """`model` at width 4 (discriminative 2), 32 px, batch 4, 6 steps, synthesis in-process."""
  config = config_lib.load(model, "weave,tiny")
  config.data.root = str(root)
  config.model.base_width = 4
  config.data.image_size = 32
  config.data.batch_size = 4
  config.data.num_workers = 0
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.eval.batch_size = 8
  config.eval.score_filter_size = 3
  config.eval.num_heatmaps = 2
  # The FLOPs of each part cost three compilations per evaluation; test_experiment.py and
  # test_pouta.py check them.
  config.eval.flops_by_part = False
  return config


def tiny_main_command(
  root,
  workdir,
  mode: str = "train",
  num_workers: int = 0,
  config_arg: str = "configs/draem.py:weave,tiny",
  **overrides,
) -> list[str]:
  """`python -m pouta_jax.main` arguments (after the interpreter) that run `make_tiny_config`'s
  DRAEM sizes on `root`'s categories named in `config_arg`; `overrides`: more config keys, `_`
  for `.` ("train__num_steps")."""
  config = make_tiny_config("draem", root)
  keys = {
    "data.root": root,
    "model.base_width": config.model.base_width,
    "data.image_size": config.data.image_size,
    "data.batch_size": config.data.batch_size,
    "data.num_workers": num_workers,
    "eval.score_filter_size": config.eval.score_filter_size,
    "eval.flops_by_part": config.eval.flops_by_part,
    **{k.replace("__", "."): v for k, v in overrides.items()},
  }
  return [
    "-m",
    "pouta_jax.main",
    f"--config={config_arg}",
    f"--workdir={workdir}",
    f"--mode={mode}",
    *(f"--config.{k}={v}" for k, v in keys.items()),
  ]


def tensorboard_records(folder) -> list[tuple[str, int, str]]:
  """(tag, step, kind: "simple_value" or "image") of every value in a TensorBoard folder's event
  files (TFRecords of Event protos: length, its CRC, the record, its CRC)."""
  from tensorboardX.proto import event_pb2

  records = []
  for path in sorted(Path(folder).glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      records += [(v.tag, event.step, v.WhichOneof("value")) for v in event.summary.value]
      pos += 12 + length + 4
  return records


@pytest.fixture
def tiny_config(dataset_root):
  return make_tiny_config("draem", dataset_root)


def perturb_batch_norm(module) -> None:
  """Random running statistics and affine parameters in every BatchNorm2d of a torch module
  (torch only where the bench extra's parity tests use it), so parity tests exercise them."""
  import torch

  for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)


@pytest.fixture
def small_disk(tmp_path):
  """A 256 KiB filesystem (tmpfs; needs root), too small for a checkpoint of the tiny model."""
  mount = tmp_path / "small_disk"
  mount.mkdir()
  try:
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
      check=True,
      capture_output=True,
    )
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot mount a small tmpfs here ({e}); the in-process disk-full tests remain")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def untrained_artifact(root, folder) -> Path:
  """An artifact of `make_tiny_config`'s DRAEM at step 0, exported from a workdir in `folder`
  (no training: a test that needs an artifact file, not a trained model, spends one export)."""
  from pouta_jax import checkpoint, experiment, export, train

  config = make_tiny_config("draem", root)
  workdir = Path(folder) / "untrained"
  with experiment.claimed_workdir(workdir, config):
    mngr = checkpoint.manager(workdir, 1)
    checkpoint.save(mngr, 0, train.setup(config, [8]).state, block=True)
    mngr.close()
  return export.export(workdir, Path(folder) / "artifact")


def unlistable(monkeypatch, folder) -> None:
  """`folder` cannot be listed, as without read permission (root reads every folder, so the
  listing calls refuse it instead)."""
  for name in ("listdir", "scandir"):
    real = getattr(os, name)

    def refuse(path=".", real=real):
      if os.path.realpath(path) == os.path.realpath(folder):
        raise PermissionError(13, "Permission denied", os.fspath(path))
      return real(path)

    monkeypatch.setattr(os, name, refuse)


def npz_bomb(arrays: dict, key: str) -> bytes:
  """`arrays` as an .npz whose member `key` declares 2^30 float32 (4 GiB) in a few kilobytes of
  deflated zeros: what a reader trusting the header would allocate."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
    for name, array in arrays.items():
      with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        if name != key:
          np.lib.format.write_array(member, array)
          continue
        header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 30,)}
        np.lib.format.write_array_header_1_0(member, header)
        member.write(bytes(1 << 20))
  return buffer.getvalue()
