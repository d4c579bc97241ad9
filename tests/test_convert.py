"""PyTorch DRAEM weights -> pouta_jax: the name mapping (numpy, always run), its errors, and
parity with anomalib's network (only with the bench extra installed: torch + anomalib)."""

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pouta_jax import checkpoint, config as config_lib, convert, errors, train
from pouta_jax.models.draem import DRAEM
from tests.conftest import perturb_batch_norm

REPO = Path(__file__).resolve().parents[1]
WIDTH = 4


def _template(width: int = WIDTH):
  """The config and a fresh state (a stack of one run)."""
  config = config_lib.load("draem", "weave,tiny")
  config.model.base_width = width
  config.data.image_size = 32
  return config, train.setup(config, [1]).state


def _variables(state) -> dict:
  """The one run's variables of a state."""
  return train.run_variables(state.variables, 0)


def _torch_named(variables) -> dict[str, dict[str, np.ndarray]]:
  """The inverse mapping: pouta_jax variables under torch's names and layouts."""
  out = {convert.RECON: {}, convert.SEG: {}}
  for subnetwork in out:
    for prefix, path in convert._torch_module_paths(subnetwork).items():
      p, s = variables["params"][subnetwork], variables["batch_stats"][subnetwork]
      for part in path:
        p, s = p[part], s.get(part, {})
      conv = p["Conv_0"] if "Conv_0" in p else p["Conv3x3_0"]["Conv_0"]
      out[subnetwork][f"{prefix}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)
      out[subnetwork][f"{prefix}.bias"] = np.asarray(conv["bias"])
      if "BatchNorm_0" in p:
        bn = convert._bn_prefix(prefix)
        out[subnetwork][f"{bn}.weight"] = np.asarray(p["BatchNorm_0"]["scale"])
        out[subnetwork][f"{bn}.bias"] = np.asarray(p["BatchNorm_0"]["bias"])
        out[subnetwork][f"{bn}.running_mean"] = np.asarray(s["BatchNorm_0"]["mean"])
        out[subnetwork][f"{bn}.running_var"] = np.asarray(s["BatchNorm_0"]["var"])
        out[subnetwork][f"{bn}.num_batches_tracked"] = np.asarray(3)
  return out


def test_mapping_covers_every_variable_once():
  _, state = _template()
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(np.float32), _variables(state)
  )
  back = convert.to_variables(_torch_named(variables), False, _variables(state))
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  # Full size: the torch names cover the official 69,048,579 + 28,374,146 parameters.
  model = DRAEM(128)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  named = _torch_named(jax.tree.map(lambda s: np.empty(s.shape, np.float32), shapes))
  counts = {
    k: sum(v.size for n, v in sd.items() if "running" not in n and "num_batches" not in n)
    for k, sd in named.items()
  }
  assert counts == {convert.RECON: 69_048_579, convert.SEG: 28_374_146}


def test_bad_weights_list_every_offending_key_and_write_nothing(tmp_path):
  config, state = _template()
  named = _torch_named(_variables(state))
  del named[convert.SEG]["decoder_segment.db2.3.weight"]
  named[convert.RECON]["encoder.block9.0.weight"] = np.zeros(1)
  named[convert.RECON]["decoder.fin_out.0.bias"] = np.zeros(5)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(named, False, config, tmp_path / "run")
  message = str(error.value)
  assert "missing discriminative decoder_segment.db2.3.weight (4, 4, 3, 3)" in message
  assert "extra reconstructive encoder.block9.0.weight" in message
  assert "mis-shaped reconstructive decoder.fin_out.0.bias: (5,), expected (3,)" in message
  assert not (tmp_path / "run").exists()
  with pytest.raises(convert.ConversionError, match="not anomalib DRAEM keys:\n  optimizer"):
    convert.split_anomalib({"model.reconstructive_subnetwork.x": 1, "optimizer": 2})


def test_converted_workdir_restores_like_a_trained_one(tmp_path):
  config, state = _template()
  rng = np.random.default_rng(1)
  variables = jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(np.float32), _variables(state)
  )
  workdir = convert.convert(_torch_named(variables), False, config, tmp_path / "run")
  mngr = checkpoint.manager(workdir, 2)
  restored = checkpoint.restore_latest(mngr, state)
  mngr.close()
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(_variables(restored))):
    np.testing.assert_array_equal(a, b)
  assert config_lib.from_workdir(workdir).model.base_width == WIDTH
  with pytest.raises(FileExistsError, match="not empty"):
    convert.convert(_torch_named(variables), False, config, workdir)


@pytest.mark.parametrize("layout", ["official", "anomalib"])
def test_parity_with_anomalib_draem(layout, tmp_path):
  reason = "parity needs the bench extra: pip install -e '.[bench]'"
  torch = pytest.importorskip("torch", reason=reason)
  pytest.importorskip("anomalib", reason=reason)
  from anomalib.models.image.draem.torch_model import (
    DiscriminativeSubNetwork,
    ReconstructiveSubNetwork,
  )

  torch.manual_seed(0)
  recon = ReconstructiveSubNetwork(base_width=WIDTH)
  seg = DiscriminativeSubNetwork(in_channels=6, out_channels=2, base_width=WIDTH // 2)
  for module in (recon, seg):
    perturb_batch_norm(module)
    module.eval()
  x = torch.rand(2, 3, 32, 32)
  with torch.no_grad():
    reconstruction = recon(x)
    joined = (
      torch.cat([reconstruction, x], 1)
      if layout == "official"
      else torch.cat([x, reconstruction], 1)
    )
    anomaly_map = torch.softmax(seg(joined), dim=1)[:, 1]

  config, state = _template()
  if layout == "official":  # through the command line, as the release's files are given
    torch.save(recon.state_dict(), tmp_path / "recon.pckl")
    torch.save(seg.state_dict(), tmp_path / "seg.pckl")
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pouta_jax.convert",
        "--from=draem_torch",
        f"--recon={tmp_path / 'recon.pckl'}",
        f"--seg={tmp_path / 'seg.pckl'}",
        f"--workdir={tmp_path / 'run'}",
        "--config=configs/draem.py:weave,tiny",
      ],
      cwd=REPO,
      check=True,
      capture_output=True,
    )
    workdir = tmp_path / "run"
  else:
    full = {
      **{f"model.reconstructive_subnetwork.{k}": v for k, v in recon.state_dict().items()},
      **{f"model.discriminative_subnetwork.{k}": v for k, v in seg.state_dict().items()},
    }
    torch.save(
      {"state_dict": full, "hyper_parameters": {"beta": (0.1, 1.0)}}, tmp_path / "model.ckpt"
    )
    state_dicts = convert.split_anomalib(convert._load_torch(tmp_path / "model.ckpt"))
    workdir = convert.convert(state_dicts, True, config, tmp_path / "run")
  mngr = checkpoint.manager(workdir, 2)
  restored = checkpoint.restore_latest(mngr, state)
  mngr.close()
  out = DRAEM(WIDTH).apply(
    _variables(restored), jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False
  )
  np.testing.assert_allclose(
    out["reconstruction"], reconstruction.numpy().transpose(0, 2, 3, 1), atol=1e-4
  )
  np.testing.assert_allclose(out["anomaly_map"], anomaly_map.numpy(), atol=1e-4)


class _Payload:
  """What a crafted checkpoint carries: unpickling it would create `marker` via os.system."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    import os

    return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
  torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[bench]'")
  weights = {"model.reconstructive_subnetwork.w": torch.zeros(2)}
  plain = tmp_path / "plain.ckpt"  # a Lightning-style dict of tensors and plain values loads
  torch.save({"state_dict": weights, "hyper_parameters": {"beta": (0.1, 1.0)}}, plain)
  assert set(convert._load_torch(plain)) == set(weights)

  marker = tmp_path / "pwned"
  crafted = tmp_path / "model.ckpt"
  torch.save({"state_dict": weights, "hyper_parameters": _Payload(marker)}, crafted)
  process = subprocess.run(
    [sys.executable, "-m", "pouta_jax.convert", f"--ckpt={crafted}", f"--workdir={tmp_path / 'w'}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
  assert process.stderr.strip().splitlines()[-1].startswith(f"FATAL: {crafted}: refused to load")
  assert not marker.exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("kind", ["random_bytes", "legacy_tar", "non_string_keys", "fifo"])
def test_unreadable_pytorch_files_are_named_for_what_they_are(tmp_path, kind):
  torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[bench]'")
  path = tmp_path / "weights.pth"
  expected = "not a readable PyTorch file"
  if kind == "random_bytes":  # not "pickles more than tensors": it is no pickle at all
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif kind == "legacy_tar":
    with tarfile.open(path, "w") as archive:  # torch's legacy format is a tar of pickles
      member = tarfile.TarInfo("storages")
      member.size = 4
      archive.addfile(member, io.BytesIO(b"junk"))
  elif kind == "non_string_keys":
    torch.save({0: torch.zeros(2), 1: torch.ones(2)}, path)
    expected = r"keys \[0, 1\] are not names"
  else:
    os.mkfifo(path)
    expected = "a FIFO"
  with pytest.raises(errors.Error, match=rf"{re.escape(str(path))}: {expected}"):
    convert._load_torch(path)


def test_bfloat16_and_float16_tensors_convert_to_float32_exactly(tmp_path):
  torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[bench]'")
  values = torch.tensor([0.5, -1.25, 3.0e-3, 65504.0])
  path = tmp_path / "half.pth"
  torch.save({"a": values.bfloat16(), "b": values.half(), "n": torch.tensor(3)}, path)
  loaded = convert._load_torch(path)
  assert loaded["a"].dtype == np.float32 and loaded["b"].dtype == np.float32
  np.testing.assert_array_equal(loaded["a"], values.bfloat16().float().numpy())
  np.testing.assert_array_equal(loaded["b"], values.half().float().numpy())
  assert loaded["n"].dtype == np.int64
