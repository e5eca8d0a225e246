"""One haversine for the generator and the model's inputs, checked against known distances."""

import math

import numpy as np
import pytest

from flywheel.geo import haversine_km


@pytest.mark.parametrize(
    "a, b, km",
    [
        ((0.0, 0.0), (0.0, 90.0), math.pi / 2 * 6371.0),  # a quarter of the equator
        ((90.0, 0.0), (-90.0, 0.0), math.pi * 6371.0),  # pole to pole
        ((51.5074, -0.1278), (48.8566, 2.3522), 343.5),  # London - Paris, about 343.5 km
        ((40.7128, -74.0060), (40.7128, -74.0060), 0.0),
    ],
)
def test_known_distances(a, b, km):
    got = haversine_km(np.array([a[0]]), np.array([a[1]]), np.array([b[0]]), np.array([b[1]]))[0]
    assert got == pytest.approx(km, abs=1.0)


def test_missing_coordinates_give_nan_not_an_error():
    assert np.isnan(haversine_km(np.array([np.nan]), np.array([0.0]), np.array([1.0]), np.array([1.0]))[0])
