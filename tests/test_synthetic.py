"""Synthetic weather: deterministic, in range, and physically what it claims to be."""
import numpy as np
import pytest

from m2restore.data.synthetic import DEGRADATIONS, degrade


@pytest.fixture(scope="module")
def photo():
    import skimage.data

    return np.ascontiguousarray(skimage.data.chelsea()[:96, :128].astype(np.float32) / 255.0)


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_deterministic_in_range_and_visible(photo, kind):
    a, b, c = degrade(photo, kind, 7), degrade(photo, kind, 7), degrade(photo, kind, 8)
    assert a.shape == photo.shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - photo).mean() > 1e-3


def test_haze_follows_the_atmospheric_scattering_model(photo):
    """I = J·t + A(1 − t): for two scenes J1, J2 hazed with the same seed (same t and A),
    (I1 − I2) / (J1 − J2) = t, the same for the three channels, within (0, 1]."""
    other = photo[::-1, ::-1].copy()
    i1, i2 = degrade(photo, "haze", 3), degrade(other, "haze", 3)
    dj = photo - other
    ok = np.all(np.abs(dj) > 0.05, axis=-1)
    t = (i1 - i2)[ok] / dj[ok]
    assert ok.sum() > 1000
    np.testing.assert_allclose(t, t[:, :1].repeat(3, 1), atol=1e-4)
    assert t.min() > 0.0 and t.max() <= 1.0 + 1e-4
    airlight = (i1[ok] - photo[ok] * t) / (1.0 - t)  # the same A for every pixel
    assert np.ptp(airlight[t[:, 0] < 0.9], axis=0).max() < 1e-2


def test_rain_only_brightens_and_raindrops_leave_most_pixels(photo):
    assert np.all(degrade(photo, "rain", 0) >= photo - 1e-6)  # screen blend
    unchanged = np.all(degrade(photo, "raindrop", 0) == photo, axis=-1).mean()
    assert 0.3 < unchanged < 1.0


def test_rejects_bad_arguments(photo):
    with pytest.raises(ValueError, match="kind"):
        degrade(photo, "fog", 0)
    with pytest.raises(ValueError, match="clean"):
        degrade(photo[..., 0], "rain", 0)
