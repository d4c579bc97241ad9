"""Exact resume across real process deaths: SIGTERM and Ctrl-C save first, SIGKILL loses only
the steps since the newest checkpoint (and its grain worker ends with it); either way the
restarted run ends bitwise equal to a straight one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pouta_jax import checkpoint, preemption, train
from pouta_jax.errors import INTERRUPTED_EXIT_CODE
from tests.conftest import make_tiny_config, tiny_main_command

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(150)

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 36


def _command(root: Path, workdir: Path) -> list[str]:
  # One grain worker: it must die with its parent and restart.
  return [
    sys.executable,
    *tiny_main_command(
      root,
      workdir,
      num_workers=1,
      train__num_steps=NUM_STEPS,
      train__checkpoint_every=5,
      train__log_every=1,
    ),
  ]


def _start(command: list[str], env: dict) -> subprocess.Popen:
  # A session of its own, so a signal reaches the grain worker too, as a scheduler's would.
  return subprocess.Popen(
    command,
    cwd=REPO,
    env=env,
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _logged_steps(workdir: Path) -> int:
  path = workdir / "scalars.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _signal_after(process: subprocess.Popen, workdir: Path, step: int, sig: int) -> str:
  while _logged_steps(workdir) < step:
    assert process.poll() is None, process.stderr.read()
    time.sleep(0.05)
  os.killpg(process.pid, sig)
  _, stderr = process.communicate(timeout=120)
  return stderr


def _children(pid: int) -> list[int]:
  """The processes whose parent is `pid` (the grain worker, multiprocessing's helpers)."""
  found = []
  for stat_file in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat_file.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      found.append(int(stat_file.parent.name))
  return found


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie waiting for a parent to reap it does not)."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _final_state(config, workdir: Path) -> train.TrainState:
  template = train.setup(config, [8]).state
  mngr = checkpoint.manager(workdir, 2)
  state = checkpoint.restore_latest(mngr, template)
  mngr.close()
  return state


def test_sigterm_saves_and_sigkill_resumes_bitwise_equal(dataset_root, tmp_path):
  env = dict(os.environ)  # the session's compilation cache: the other CLI tests' programs
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  subprocess.run(
    _command(dataset_root, straight), cwd=REPO, env=env, check=True, capture_output=True
  )
  rng = np.random.default_rng()

  # Preemption at a random step between checkpoints: exit 143 after saving the step it was at.
  process = _start(_command(dataset_root, interrupted), env)
  target = int(rng.integers(6, 10))
  stderr = _signal_after(process, interrupted, target, signal.SIGTERM)
  assert process.returncode == preemption.EXIT_CODE, stderr
  assert "run the same command again" in stderr
  # The grain worker got the SIGTERM too, and waited to be stopped: none of its batches was left
  # in shared memory (multiprocessing's resource tracker warns of those it has to unlink).
  assert "leaked" not in stderr, stderr
  mngr = checkpoint.manager(interrupted, 2)
  preempted_at = mngr.latest_step()
  mngr.close()
  assert target <= preempted_at == _logged_steps(interrupted) < NUM_STEPS  # no step lost
  assert (interrupted / "checkpoints" / str(preempted_at) / "data").is_dir()

  # Ctrl-C (SIGINT to the terminal's process group) stops it as SIGTERM does: a checkpoint of
  # the step it was at, one line, exit 130.
  process = _start(_command(dataset_root, interrupted), env)
  stderr = _signal_after(process, interrupted, preempted_at + 2, signal.SIGINT)
  assert process.returncode == INTERRUPTED_EXIT_CODE, stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
  assert len([line for line in stderr.splitlines() if "interrupted (Ctrl-C): saved" in line]) == 1
  mngr = checkpoint.manager(interrupted, 2)
  interrupted_at = mngr.latest_step()
  mngr.close()
  assert preempted_at + 2 <= interrupted_at == _logged_steps(interrupted) < NUM_STEPS

  # SIGKILL of the main process alone later on: no warning; the steps since the newest
  # checkpoint are lost and redone; its grain worker, signalled by no one, ends by itself.
  # Ten steps to spare, so the run cannot finish before the signal lands.
  process = _start(_command(dataset_root, interrupted), env)
  target = int(rng.integers(interrupted_at + 6, NUM_STEPS - 10))
  while _logged_steps(interrupted) < target:
    assert process.poll() is None, process.stderr.read()
    time.sleep(0.05)
  children = _children(process.pid)
  assert children, "no grain worker to check"
  process.kill()
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  deadline = time.monotonic() + 10
  while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [pid for pid in children if _alive(pid)], "a worker outlived its parent"
  subprocess.run(
    _command(dataset_root, interrupted), cwd=REPO, env=env, check=True, capture_output=True
  )

  config = make_tiny_config("draem", dataset_root)
  config.train.num_steps = NUM_STEPS
  a, b = _final_state(config, straight), _final_state(config, interrupted)
  assert a.step.tolist() == b.step.tolist() == [NUM_STEPS]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The curves too: the records of the steps lost to SIGKILL were dropped on resume.
  assert _curve(interrupted) == _curve(straight)


def _curve(workdir: Path) -> list[tuple[int, float]]:
  lines = (workdir / "scalars.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


# A step made slow on the device (a host callback that sleeps): the host could queue dozens of
# steps ahead of it. STEPS_RUN counts the steps the device has started.
SLOW_RUN = """
import dataclasses, sys, time
import jax, jax.numpy as jnp
from pouta_jax import models, preemption, train
from pouta_jax.data import category_folder
from tests.conftest import make_tiny_config, tiny_main_command

root, workdir, started = sys.argv[1:]
spec = models.REGISTRY["draem"]

def slow_objective(config):
  objective = spec.objective(config)

  def sleep(x):
    with open(started, "a") as f:
      f.write(".")
    time.sleep(0.5)
    return x

  def run(outputs, batch, weights):
    loss, terms = objective(outputs, batch, weights)
    signal = jnp.sum(batch["augmented"])  # data, not parameters: no gradient through it
    terms["slow"] = jax.pure_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32), signal)
    return loss, terms
  return run

models.REGISTRY["draem"] = dataclasses.replace(spec, objective=slow_objective)
config = make_tiny_config("draem", root)
config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 200, 100, 100
try:
  train.train(config, workdir, [category_folder(config, "weave")])
except preemption.Preempted:
  sys.exit(preemption.EXIT_CODE)
"""


def test_preemption_saves_within_a_few_step_times(dataset_root, tmp_path):
  started = tmp_path / "started"
  process = subprocess.Popen(
    [sys.executable, "-c", SLOW_RUN, str(dataset_root), str(tmp_path / "run"), str(started)],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  while not started.exists() or len(started.read_text()) < 4:
    assert process.poll() is None, process.stderr.read()[-3000:]
    time.sleep(0.05)
  steps_started = len(started.read_text())
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == preemption.EXIT_CODE, stderr[-3000:]
  mngr = checkpoint.manager(tmp_path / "run", 2)
  saved = mngr.latest_step()
  mngr.close()
  # The step running at the signal, and at most two more (the one queued behind it and the
  # one whose batch was already taken); before the bound, the host ran up to 100 steps ahead.
  assert steps_started <= saved <= steps_started + 2
  assert len(started.read_text()) == saved  # no step ran after the save
