"""gs:// paths end to end, on epath's mocked backend: every read and write of a gs:// path lands
in a local folder that stands for the object store (tensorstore's gcs driver, which orbax uses
for arrays, is pointed there too), and nothing may treat a gs:// URL as a local path."""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

from pouta_jax import errors, experiment, export, files, predict, report
from tests.conftest import make_tiny_config, tensorboard_records

pytestmark = pytest.mark.heavy(16)


class FakeStore:
  """gs://<bucket>/<key> kept as <root>/<bucket>/<key>; a bucket is a folder made by `bucket`,
  and a path in any other bucket fails as GCS fails it (no such bucket)."""

  def __init__(self, root: Path):
    self.root = root

  def bucket(self, name: str) -> Path:
    (self.root / name).mkdir(parents=True, exist_ok=True)
    return self.root / name

  def local(self, path) -> str:
    path = os.fspath(path)
    if not path.startswith("gs://"):
      return path
    key = path[len("gs://") :]
    if not (self.root / key.split("/")[0]).is_dir():
      raise FileNotFoundError(f"gs://{key.split('/')[0]}: no such bucket")
    return str(self.root / key)

  def url(self, local: str) -> str:
    prefix = str(self.root) + "/"
    return "gs://" + local[len(prefix) :] if local.startswith(prefix) else local

  def mocks(self) -> dict:
    def one(original, path, *args, **kwargs):
      return original(self.local(path), *args, **kwargs)

    def two(original, path, destination, *args, **kwargs):
      return original(self.local(path), self.local(destination), *args, **kwargs)

    def glob(original, pattern):
      return [self.url(p) for p in original(self.local(pattern))]

    def walk(original, top, **kwargs):
      for root, folders, names in original(self.local(top), **kwargs):
        yield self.url(root), folders, names

    names = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
    return {
      **dict.fromkeys(names, one),
      **dict.fromkeys(("copy", "rename", "replace"), two),
      "glob": glob,
      "walk": walk,
    }


@pytest.fixture
def store(tmp_path, monkeypatch):
  """The fake object store; the test runs in an empty folder, checked afterwards for a local
  folder named gs: (what pathlib makes of gs://b/x)."""
  fake = FakeStore(tmp_path / "store")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(
    gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": fake.local(path)}
  )
  # What google-cloud-storage tells orbax of a bucket: a flat namespace.
  monkeypatch.setattr(
    gcs_utils,
    "get_bucket",
    lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False),
  )
  with epath_testing.mock_epath(**fake.mocks()):
    yield fake
  assert not [p for p in tmp_path.rglob("gs:*")], "a gs:// path was used as a local path"


def _files_under(folder: Path) -> set[str]:
  return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_train_eval_export_and_predict_on_gs_paths_only(store, dataset_root):
  data = store.bucket("data")
  shutil.copytree(dataset_root, data / "embedded")
  store.bucket("runs")
  config = make_tiny_config("draem", "gs://data/embedded")
  config.data.val_fraction = 0.25

  result = experiment.run(config, "gs://runs/draem")
  written = _files_under(store.root / "runs" / "draem")
  for name in ("config.json", "metrics.json", "results.md", "scalars.jsonl", "thresholds.json"):
    assert name in written
  assert any(n.startswith("checkpoints/6/") for n in written)
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in written)
  assert ("train/loss", 6, "simple_value") in tensorboard_records(
    store.root / "runs" / "draem" / "tensorboard"
  )
  logged = [json.loads(line)["step"] for line in (store.root / "runs/draem/scalars.jsonl").open()]
  assert logged == [2, 4, 6]
  assert not (store.root / "runs" / "draem" / files.LOCK_NAME).exists()  # released

  export.export("gs://runs/draem", "gs://runs/artifact")
  assert "artifact.json" in _files_under(store.root / "runs" / "artifact")
  from_artifact = experiment.run(
    config, "gs://runs/from_artifact", mode="eval", artifact_path="gs://runs/artifact"
  )
  (category,) = result["metrics"]["draem"]
  ours, theirs = result["metrics"]["draem"][category], from_artifact["metrics"]["draem"][category]
  assert ours["image_auroc"] == pytest.approx(theirs["image_auroc"], abs=1e-6)
  assert ours["pixel_ap"] == pytest.approx(theirs["pixel_ap"], abs=1e-4)

  summary = predict.predict(
    predict.from_artifact("gs://runs/artifact"),
    f"gs://data/embedded/{category}/test/*/*.png",
    "gs://runs/predicted",
  )
  scored = _files_under(store.root / "runs" / "predicted")
  assert summary["scored"] == summary["images"] > 0
  assert {"predict.json", "scores.csv", "errors.csv"} <= scored
  assert sum(n.startswith("maps/") for n in scored) == summary["images"]


def test_a_missing_bucket_is_named_before_training(store, dataset_root):
  store.bucket("data")
  shutil.copytree(dataset_root, store.root / "data" / "embedded")
  config = make_tiny_config("draem", "gs://data/embedded")
  with pytest.raises(errors.WorkdirError, match=r"gs://nobucket/run: cannot write the workdir"):
    experiment.run(config, "gs://nobucket/run")
  config.data.root = "gs://nodata/embedded"
  store.bucket("runs")
  with pytest.raises(errors.DataError, match=r"gs://nodata/embedded: cannot read the dataset"):
    experiment.run(config, "gs://runs/run")
  assert not (store.root / "runs" / "run").exists()  # nothing written


def test_a_missing_gcs_client_names_the_extra():
  error = files.storage_error("gs://b/x", ImportError("gcsfs"), "read it")
  assert "gs://b/x: cannot read it" in str(error) and "pouta_jax[gcs]" in str(error)


def test_object_store_writes_are_whole_and_folders_get_their_index_last(store, monkeypatch):
  store.bucket("b")
  files.write_json("gs://b/x/metrics.json", {"a": 1})
  assert json.loads((store.root / "b/x/metrics.json").read_text()) == {"a": 1}

  uploaded = []
  real_write = files.epath.Path.write_bytes

  def recorded(self, data):
    uploaded.append(self.name)
    return real_write(self, data)

  monkeypatch.setattr(files.epath.Path, "write_bytes", recorded)
  with files.atomic_folder("gs://b/art", index="manifest.json") as staging:
    assert not files.is_remote(staging)  # staged locally, uploaded when complete
    files.write_json(staging / "manifest.json", {})
    files.write_atomic(staging / "weights.npz", b"w")
    (staging / "sub").mkdir()
    files.write_atomic(staging / "sub" / "p.bin", b"p")
  assert uploaded[-1] == "manifest.json" and sorted(uploaded) == [
    "manifest.json",
    "p.bin",
    "weights.npz",
  ]
  assert _files_under(store.root / "b" / "art") == {"manifest.json", "weights.npz", "sub/p.bin"}

  with pytest.raises(RuntimeError, match="boom"):
    with files.atomic_folder("gs://b/half", index="manifest.json") as staging:
      files.write_atomic(staging / "weights.npz", b"w")
      raise RuntimeError("boom")
  assert not (store.root / "b" / "half").exists()
  with pytest.raises(errors.ExistsError, match="gs://b/art exists"):
    with files.atomic_folder("gs://b/art", index="manifest.json") as staging:
      files.write_json(staging / "manifest.json", {"new": 1})
  with files.atomic_folder("gs://b/art", index="manifest.json", replace=True) as staging:
    files.write_json(staging / "manifest.json", {"new": 1})
  assert _files_under(store.root / "b" / "art") == {"manifest.json"}  # the old files are gone


def test_logs_on_an_object_store_are_uploaded_whole(store, monkeypatch):
  store.bucket("b")
  log = files.AppendLog("gs://b/w/scalars.jsonl", "old\n", remote_interval_s=3600)
  assert (store.root / "b/w/scalars.jsonl").read_text() == "old\n"
  log.write("a\n")
  assert (store.root / "b/w/scalars.jsonl").read_text() == "old\n"  # within the interval
  log.flush()
  assert (store.root / "b/w/scalars.jsonl").read_text() == "old\na\n"
  log.write("b\n")
  log.close()
  assert (store.root / "b/w/scalars.jsonl").read_text() == "old\na\nb\n"

  # A failed upload (here: no such bucket) is retried at the next flush, and raised at close.
  events = files.ObjectLog("gs://gone/w/events", interval_s=None)
  events.write(b"x")
  events.flush()
  with pytest.raises(errors.Error, match="gs://gone/w/events"):
    events.close()

  writer = report.ScalarWriter("gs://b/w", start_step=0)  # a restart drops the earlier lines
  writer.write(1, {"loss": 0.5})
  writer.close()
  assert [json.loads(x) for x in (store.root / "b/w/scalars.jsonl").open()] == [
    {"step": 1, "loss": 0.5}
  ]
  assert tensorboard_records(store.root / "b/w/tensorboard") == [("train/loss", 1, "simple_value")]


def test_a_workdir_lock_on_an_object_store(store, monkeypatch):
  store.bucket("b")
  monkeypatch.setattr(files.WorkdirLock, "SETTLE_S", 0.0)
  with files.WorkdirLock("gs://b/w"):
    record = json.loads((store.root / "b/w" / files.LOCK_NAME).read_text())
    assert record["holder"].endswith(f"pid {os.getpid()}")
    with pytest.raises(errors.WorkdirError, match=r"gs://b/w is in use by host .* renewed"):
      files.WorkdirLock("gs://b/w").acquire()
  assert not (store.root / "b/w" / files.LOCK_NAME).exists()  # released

  # A run killed without releasing: its lock is taken over once it is stale.
  files.write_json("gs://b/w/.lock", {"holder": "host x pid 1", "token": "t", "time": 0.0})
  lock = files.WorkdirLock("gs://b/w")
  lock.acquire()
  assert json.loads((store.root / "b/w" / files.LOCK_NAME).read_text())["token"] != "t"
  lock.release()


def test_local_paths_are_unchanged_by_the_object_store_helpers(tmp_path):
  assert not files.is_remote(tmp_path) and files.is_remote("gs://b/x")
  assert str(files.path("gs://b/x") / "y") == "gs://b/x/y"
  assert str(files.absolute("gs://b/x")) == "gs://b/x"
  assert files.absolute("rel") == files.path(Path.cwd() / "rel")
