import numpy as np
import optax
from scipy import ndimage

from pouta_jax import evaluate, train
from pouta_jax.models.draem import DRAEM


def test_mean_filter_max_matches_zero_padded_uniform_filter():
  maps = np.random.default_rng(0).random((3, 20, 17)).astype(np.float32)
  maps[1, 0, 0] = 50.0  # a corner peak: zero padding must dilute it
  got = np.asarray(evaluate.mean_filter_max(maps, 5))
  want = [ndimage.uniform_filter(m, 5, mode="constant", cval=0.0).max() for m in maps]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predict_pads_the_last_batch_and_matches_direct_apply():
  model = DRAEM(4)
  state = train.fresh_state(model, optax.adam(1e-3), 32, 0)
  images = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype(np.uint8)
  predict_fn = evaluate.model_predict_fn(model, state.variables, filter_size=3)
  maps, scores = evaluate.predict(predict_fn, images, batch_size=4)
  direct = model.apply(state.variables, images.astype(np.float32) / 255.0, train=False)
  assert maps.shape == (5, 32, 32) and scores.shape == (5,)
  np.testing.assert_allclose(maps, direct["anomaly_map"], atol=1e-5)
  np.testing.assert_allclose(scores, evaluate.mean_filter_max(direct["anomaly_map"], 3), atol=1e-5)
