"""A trainable subset of a torch model (spec ``trainable``), the rest frozen and pinned.

Known answers and fixed seeds; the statistical tolerance is stated with its assertion.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from confide import SecureRng  # noqa: E402
from confide.client.training import sample_ddg_step  # noqa: E402
from confide.data.images import ArrayDataset  # noqa: E402
from confide.errors import IntegrityError, ManifestError  # noqa: E402
from confide.privacy.distributed_dpsgd import (  # noqa: E402
    SampleDDGConfig,
    calibrate,
    decode_sum,
    site_step,
)
from confide.protocol.manifest import Manifest  # noqa: E402
from confide.training import TrainConfig  # noqa: E402
from confide.training.torch_engine import TorchTrainer  # noqa: E402
from confide.training.trainable import (  # noqa: E402
    check_frozen,
    frozen_digest,
    trainable_index,
    trainable_size,
    with_trainable,
)

SHAPE = (1, 8, 8)
HEAD = 2 * 16 + 2  # small_cnn's head.weight (2, 16) + head.bias (2,)


def _pinned(seed: int = 0) -> TorchTrainer:
    base = TorchTrainer.create("small_cnn", 2, SHAPE, seed=seed)
    manifest = with_trainable(base.manifest, ["head"], base.get_weights())
    return TorchTrainer.from_manifest(manifest, base.get_weights())


def _data(n: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.normal(0.0, 1.0, (n, *SHAPE)).astype(np.float32)
    x[:, 0, 2:6, 2:6] += 2.0 * y[:, None, None]  # a learnable square
    return ArrayDataset(x, y, np.array([f"p{i // 2}" for i in range(n)]), ["a", "b"])


def test_manifest_round_trip_and_flat_vector(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = _pinned()
    path = tmp_path / "model.json"
    t.manifest.save(path)
    loaded = Manifest.load(path)
    assert loaded == t.manifest
    index = trainable_index(loaded)
    assert index is not None
    assert trainable_size(loaded) == HEAD == t.trainable_manifest.size
    # The head is the last two tensors: its indices are the last HEAD coordinates.
    assert index.tolist() == list(range(loaded.size - HEAD, loaded.size))
    assert t.trainable_names == ["head.weight", "head.bias"]
    w = t.get_weights()
    rebuilt = TorchTrainer.from_manifest(loaded, w)
    assert np.array_equal(rebuilt.get_weights(), w)
    check_frozen(loaded, w)  # the pinned digest is the initial model's


def test_bad_subsets_are_refused() -> None:
    base = TorchTrainer.create("small_cnn", 2, SHAPE, seed=0)
    w = base.get_weights()
    with pytest.raises(ManifestError, match="matches no parameter"):
        with_trainable(base.manifest, ["nope"], w)
    with pytest.raises(ManifestError, match="matches every parameter"):
        with_trainable(base.manifest, ["features", "head"], w)
    no_digest = Manifest(base.manifest.tensors, {**base.manifest.spec, "trainable": ["head"]})
    with pytest.raises(ManifestError, match="frozen_sha256"):
        trainable_index(no_digest)


def test_fit_leaves_the_frozen_part_unchanged() -> None:
    t = _pinned()
    before = t.get_weights()
    t.fit(_data(32), TrainConfig(epochs=2, batch_size=8, learning_rate=0.5), seed=0)
    after = t.get_weights()
    index = trainable_index(t.manifest)
    assert index is not None
    frozen = np.ones(t.manifest.size, bool)
    frozen[index] = False
    assert np.array_equal(after[frozen], before[frozen])
    assert not np.array_equal(after[index], before[index])


def test_head_per_sample_gradients_equal_a_per_example_loop() -> None:
    t = _pinned(seed=3)
    data = _data(6, seed=1)
    x, y = data.batch(np.arange(6, dtype=np.int64))
    head = t.per_sample_gradients(x, y, trainable_only=True).numpy()
    full = t.per_sample_gradients(x, y).numpy()
    index = trainable_index(t.manifest)
    assert index is not None
    assert head.shape == (6, HEAD)
    assert np.array_equal(full[:, index], head)
    assert not np.delete(full, index, axis=1).any()  # frozen columns: exactly zero
    for i in range(6):
        _, g = t.loss_and_gradient(x[i : i + 1], y[i : i + 1])
        np.testing.assert_allclose(head[i], g.numpy()[index], rtol=1e-5, atol=1e-6)


def _ddg(dim: int, z: float = 1.0):  # type: ignore[no-untyped-def]
    return calibrate(
        SampleDDGConfig(
            dim=dim,
            clip_norm=1.0,
            noise_multiplier=z,
            sampling_rate=0.5,
            num_sites=1,
            min_survivors=1,
            site_clip_norm=4.0,
        )
    )


def test_a_dp_step_has_the_trainable_dimension_and_moves_only_the_head() -> None:
    t = _pinned()
    w = t.get_weights()
    params = _ddg(HEAD)
    ring = sample_ddg_step(t, w, _data(16), params, rng=SecureRng(bytes(32)))
    assert ring.shape == (HEAD,)
    # What the server does with it (engine/rounds.py): scatter the step into the subset.
    step = (-0.1 / 4.0) * decode_sum(ring, params)
    index = trainable_index(t.manifest)
    assert index is not None
    new = w.copy()
    new[index] += step.astype(np.float32)
    check_frozen(t.manifest, new)  # the next round's model passes the site's check
    assert frozen_digest(t.manifest, new) == t.manifest.spec["frozen_sha256"]
    with pytest.raises(Exception, match="parameters"):
        site_step(t, _data(4), _ddg(t.manifest.size))  # a full-model round is refused


def test_noise_dimension_is_the_trainable_count_with_the_accounted_variance() -> None:
    # z = 50: the noise (std ~ 50 * Delta) swamps the clipped sum (<= 4 / gamma in L2 over
    # 34 coordinates). Over 400 steps x 34 coordinates = 13600 draws, the sample variance
    # of the decoded vector is within 5 % of gamma^2 Var(DG) with probability > 1 - 1e-6
    # (relative std sqrt(2 / 13600) = 1.2 %, plus the signal's <= 0.03 %).
    t = _pinned()
    w = t.get_weights()
    params = _ddg(HEAD, z=50.0)
    rng = SecureRng(bytes(range(32)))
    draws = np.stack(
        [decode_sum(sample_ddg_step(t, w, _data(4), params, rng=rng), params) for _ in range(400)]
    )
    assert draws.shape == (400, HEAD)
    ratio = draws.var() / (params.gamma**2 * params.local_variance)
    assert 0.95 < ratio < 1.05, ratio


def test_a_site_refuses_a_changed_frozen_trunk() -> None:
    t = _pinned()
    w = t.get_weights()
    params = _ddg(HEAD)
    moved_head = w.copy()
    moved_head[-1] += 1.0  # head.bias: trainable, allowed to change
    sample_ddg_step(t, moved_head, _data(4), params, rng=SecureRng(bytes(32)))
    smuggled = w.copy()
    smuggled[0] += 1e-6  # features.0.weight: frozen
    with pytest.raises(IntegrityError, match="frozen"):
        sample_ddg_step(t, smuggled, _data(4), params, rng=SecureRng(bytes(32)))


def test_federated_dp_training_of_the_head_learns_at_fixed_seeds() -> None:
    # Three sites, one distributed DP-SGD step per round on the head of a random (frozen,
    # pinned) small CNN, decoded and applied as the server does (step -lr * g / E into the
    # trainable coordinates, momentum 0.9). A bright square is linearly visible in the
    # random features, so the head learns under DP; seeds fixed (data, init, SecureRng).
    t = _pinned(seed=1)
    sites = [_data(40, seed=10 + k) for k in range(3)]
    test = _data(200, seed=99)
    q, lr, mom = 0.5, 2.0, 0.9
    params = calibrate(
        SampleDDGConfig(
            dim=HEAD,
            clip_norm=1.0,
            noise_multiplier=1.0,
            sampling_rate=q,
            num_sites=3,
            min_survivors=3,
            site_clip_norm=40.0,
        )
    )
    expected_batch = q * 60  # 3 sites x 20 patients
    index = trainable_index(t.manifest)
    assert index is not None
    w = t.get_weights()
    start = t.evaluate(test)["accuracy"]
    velocity = np.zeros(HEAD, np.float64)
    modulus = 1 << params.bits
    for r in range(15):
        rings = [
            sample_ddg_step(t, w, d, params, rng=SecureRng(bytes([r, k]) * 16))
            for k, d in enumerate(sites)
        ]
        total = np.zeros(HEAD, np.uint64)
        for ring in rings:
            total = ((total.astype(object) + ring.astype(object)) % modulus).astype(np.uint64)
        g = decode_sum(total, params)
        velocity = mom * velocity + g / expected_batch
        w = w.copy()
        w[index] -= (lr * velocity).astype(np.float32)
    t.set_weights(w)
    end = t.evaluate(test)["accuracy"]
    assert end >= start + 0.2, (start, end)
    assert end >= 0.75, end


def test_local_dp_sgd_refuses_a_trainable_subset() -> None:
    from confide.client.training import check_trainable
    from confide.errors import PrivacyUnsupportedError
    from confide.protocol.tasks import DPSGDConfig

    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.5, steps=1)
    cfg = TrainConfig(dp=dp)
    with pytest.raises(PrivacyUnsupportedError, match="subset"):
        check_trainable(_pinned(), cfg)
