"""Distances, speed estimates and ETAs (bloomwire.contract.geo)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from bloomwire.contract.geo import (
    DEFAULT_ROAD_FACTOR,
    DEFAULT_SPEED_KMH,
    EARTH_RADIUS_M,
    Fix,
    distance_m,
    distance_matrix_m,
    estimate_speed_kmh,
    eta,
    travel_seconds,
    travel_seconds_array,
)

NOW = datetime(2027, 2, 14, 9, 30, tzinfo=UTC)

BRANDENBURG_GATE = (52.5163, 13.3777)
FERNSEHTURM = (52.5208, 13.4094)
HAUPTBAHNHOF = (52.5251, 13.3694)

M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180


def test_distance_known_pairs() -> None:
    # Figure from the haversine package's documentation (Lyon -> Paris).
    assert distance_m(45.7597, 4.8422, 48.8567, 2.3508) == pytest.approx(392_217.26, abs=1)
    # Berlin landmarks, checked against a flat-earth hand calculation (good to ~0.1% at 2 km):
    # Brandenburg Gate -> TV tower: 0.0045 deg lat = 500 m, 0.0317 deg lon x 67.7 km = 2147 m.
    assert distance_m(*BRANDENBURG_GATE, *FERNSEHTURM) == pytest.approx(2205, rel=0.01)
    # Brandenburg Gate -> Hauptbahnhof: 979 m north, 562 m west.
    assert distance_m(*BRANDENBURG_GATE, *HAUPTBAHNHOF) == pytest.approx(1128, rel=0.01)


def test_distance_symmetric_and_zero() -> None:
    d = distance_m(*BRANDENBURG_GATE, *FERNSEHTURM)
    assert distance_m(*FERNSEHTURM, *BRANDENBURG_GATE) == pytest.approx(d)
    assert distance_m(*FERNSEHTURM, *FERNSEHTURM) == 0.0


def test_distance_matrix_matches_scalar() -> None:
    rng = np.random.default_rng(1)
    lat_a, lon_a = rng.uniform(52.34, 52.68, 3), rng.uniform(13.09, 13.76, 3)
    lat_b, lon_b = rng.uniform(52.34, 52.68, 4), rng.uniform(13.09, 13.76, 4)
    m = distance_matrix_m(lat_a, lon_a, lat_b, lon_b)
    assert m.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            expected = distance_m(lat_a[i], lon_a[i], lat_b[j], lon_b[j])
            assert m[i, j] == pytest.approx(expected, rel=1e-9)


def test_travel_seconds() -> None:
    # 1 km straight line x 1.3 = 1300 m of road at 18 km/h (5 m/s) = 260 s.
    assert travel_seconds(1000, 18.0, 1.3) == pytest.approx(260.0)
    assert travel_seconds(0, 18.0) == 0.0
    arr = travel_seconds_array([0.0, 1000.0], [18.0, 36.0], 1.3)
    assert arr.tolist() == pytest.approx([0.0, 130.0])
    for bad_speed in (0.0, -5.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            travel_seconds(1000, bad_speed)
    with pytest.raises(ValueError):
        travel_seconds(1000, 18.0, road_factor=0.8)
    with pytest.raises(ValueError):
        travel_seconds_array([1000.0], [0.0])


def test_eta_adds_travel_and_dwell() -> None:
    d = distance_m(*BRANDENBURG_GATE, *FERNSEHTURM)
    t = eta(*BRANDENBURG_GATE, *FERNSEHTURM, NOW, DEFAULT_SPEED_KMH)
    expected = travel_seconds(d, DEFAULT_SPEED_KMH, DEFAULT_ROAD_FACTOR)
    assert (t - NOW).total_seconds() == pytest.approx(expected)
    t2 = eta(*BRANDENBURG_GATE, *FERNSEHTURM, NOW, DEFAULT_SPEED_KMH, dwell_s=120)
    assert (t2 - t).total_seconds() == pytest.approx(120)
    assert eta(*FERNSEHTURM, *FERNSEHTURM, NOW, 18.0) == NOW
    with pytest.raises(ValueError):
        eta(*BRANDENBURG_GATE, *FERNSEHTURM, NOW, 0.0)


def test_eta_monotonic_in_distance_and_speed() -> None:
    lat, lon = BRANDENBURG_GATE
    etas = [eta(lat, lon, lat + k * 0.005, lon, NOW, 18.0) for k in range(10)]
    assert etas == sorted(etas)
    assert len(set(etas)) == len(etas)
    slow = eta(*BRANDENBURG_GATE, *FERNSEHTURM, NOW, 10.0)
    fast = eta(*BRANDENBURG_GATE, *FERNSEHTURM, NOW, 25.0)
    assert fast < slow


def _track(kmh: float, seconds: int, every: int = 5, noise_m: float = 0.0, seed: int = 0) -> list[Fix]:
    """A rider riding due north at ``kmh`` starting at the Brandenburg Gate."""
    rnd = random.Random(seed)
    lat0, lon0 = BRANDENBURG_GATE
    m_per_deg_lon = M_PER_DEG_LAT * math.cos(math.radians(lat0))
    out = []
    for t in range(0, seconds + 1, every):
        north = kmh / 3.6 * t + rnd.uniform(-noise_m, noise_m)
        east = rnd.uniform(-noise_m, noise_m)
        out.append(
            Fix(
                lat0 + north / M_PER_DEG_LAT,
                lon0 + east / m_per_deg_lon,
                NOW + timedelta(seconds=t),
            )
        )
    return out


def test_speed_steady() -> None:
    assert estimate_speed_kmh(_track(20, 60)) == pytest.approx(20, rel=0.01)


def test_speed_with_jitter() -> None:
    assert estimate_speed_kmh(_track(20, 120, noise_m=5)) == pytest.approx(20, rel=0.15)


def test_standing_still_with_jitter_gives_min_speed_and_finite_eta() -> None:
    still = _track(0, 120, noise_m=8, seed=3)
    speed = estimate_speed_kmh(still)
    assert speed == 5.0
    arrival = eta(*BRANDENBURG_GATE, *FERNSEHTURM, NOW, speed)
    assert arrival - NOW < timedelta(hours=1)


def test_red_light_lowers_but_does_not_zero_the_speed() -> None:
    moving = _track(20, 60)
    last = moving[-1]
    stopped = [Fix(last.lat, last.lon, last.at + timedelta(seconds=s)) for s in (10, 20, 30)]
    speed = estimate_speed_kmh(moving + stopped)
    # 333 m in 90 s is 13.3 km/h.
    assert speed == pytest.approx(20 * 60 / 90, rel=0.02)


def test_zero_time_gaps_and_order_are_ignored() -> None:
    track = _track(20, 60)
    dupes = [*track, *(Fix(f.lat + 1e-4, f.lon, f.at) for f in track[1::2])]
    random.Random(0).shuffle(dupes)
    assert estimate_speed_kmh(dupes) == pytest.approx(estimate_speed_kmh(track))
    same_instant = [Fix(52.5, 13.4, NOW), Fix(52.51, 13.4, NOW)]
    assert estimate_speed_kmh(same_instant) == DEFAULT_SPEED_KMH


def test_too_little_history_gives_default() -> None:
    assert estimate_speed_kmh([]) == DEFAULT_SPEED_KMH
    assert estimate_speed_kmh(_track(20, 0)) == DEFAULT_SPEED_KMH
    assert estimate_speed_kmh(_track(20, 4, every=2)) == DEFAULT_SPEED_KMH
    assert estimate_speed_kmh([], default_kmh=12.0) == 12.0


def test_gps_glitch_is_skipped() -> None:
    track = _track(20, 60)
    g = track[6]
    track[6] = Fix(g.lat + 0.02, g.lon, g.at)  # a 2 km jump and back within 10 s
    assert estimate_speed_kmh(track) == pytest.approx(20, rel=0.05)


def test_clamped_to_max() -> None:
    assert estimate_speed_kmh(_track(100, 60)) == 60
    assert estimate_speed_kmh(_track(100, 60), max_kmh=80) == 80


def test_only_recent_window_counts() -> None:
    old = [Fix(f.lat, f.lon, f.at - timedelta(hours=1)) for f in _track(50, 60)]
    lat, lon = old[-1].lat, old[-1].lon
    recent = [Fix(lat + k * 1e-3, lon, NOW + timedelta(seconds=20 * k)) for k in range(4)]
    # 3 x 111 m in 60 s = 20 km/h; the fast ride an hour ago does not count.
    assert estimate_speed_kmh(old + recent) == pytest.approx(20.0, rel=0.01)
