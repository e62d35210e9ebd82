"""Distances, speed estimates and ETAs. Pure functions, no I/O.

Used by dispatch (rider -> shop travel time), by the persister (the ETA in an order's state
snapshot and location events) and by the alerts service (ETA slipping past the promise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt
from haversine import Unit, haversine
from haversine.haversine import get_avg_earth_radius

FloatArray = npt.NDArray[np.float64]

#: Road distance / great-circle distance. City street grids, one-way streets and detours around
#: blocks typically make a route 1.2-1.4x the straight line; 1.3 is the usual urban figure.
DEFAULT_ROAD_FACTOR = 1.3

#: A cargo bike or small scooter in city traffic averages ~15-20 km/h door to door once
#: lights, junctions and parking are included (not its cruising speed); 18 km/h is that average.
DEFAULT_SPEED_KMH = 18.0

#: Same mean Earth radius as the ``haversine`` package, so scalar and matrix distances agree.
EARTH_RADIUS_M: float = float(get_avg_earth_radius(Unit.METERS))

_KMH_TO_MS = 1 / 3.6


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS84 points (degrees)."""
    return float(haversine((lat1, lon1), (lat2, lon2), unit=Unit.METERS))


def distance_matrix_m(
    lat_a: npt.ArrayLike, lon_a: npt.ArrayLike, lat_b: npt.ArrayLike, lon_b: npt.ArrayLike
) -> FloatArray:
    """Great-circle distances in metres, shape ``(len(a), len(b))``: row i is point a[i]."""
    la = np.radians(np.asarray(lat_a, dtype=np.float64).reshape(-1, 1))
    oa = np.radians(np.asarray(lon_a, dtype=np.float64).reshape(-1, 1))
    lb = np.radians(np.asarray(lat_b, dtype=np.float64).reshape(1, -1))
    ob = np.radians(np.asarray(lon_b, dtype=np.float64).reshape(1, -1))
    h = np.sin((lb - la) * 0.5) ** 2 + np.cos(la) * np.cos(lb) * np.sin((ob - oa) * 0.5) ** 2
    out: FloatArray = (2.0 * EARTH_RADIUS_M) * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    return out


def _check_travel_args(speed_kmh: float, road_factor: float) -> None:
    if not (math.isfinite(speed_kmh) and speed_kmh > 0):
        raise ValueError(f"speed_kmh must be a positive finite number, got {speed_kmh!r}")
    if not (math.isfinite(road_factor) and road_factor >= 1.0):
        raise ValueError(f"road_factor must be >= 1 (a road is never shorter), got {road_factor!r}")


def travel_seconds(distance_m: float, speed_kmh: float, road_factor: float = DEFAULT_ROAD_FACTOR) -> float:
    """Seconds to cover a straight-line ``distance_m`` by road at ``speed_kmh``.

    Raises ``ValueError`` for a non-positive speed (an infinite ETA is never returned).
    """
    _check_travel_args(speed_kmh, road_factor)
    if not (math.isfinite(distance_m) and distance_m >= 0):
        raise ValueError(f"distance_m must be >= 0, got {distance_m!r}")
    return distance_m * road_factor / (speed_kmh * _KMH_TO_MS)


def travel_seconds_array(
    distance_m: npt.ArrayLike,
    speed_kmh: npt.ArrayLike,
    road_factor: float = DEFAULT_ROAD_FACTOR,
) -> FloatArray:
    """Vectorised :func:`travel_seconds` (``speed_kmh`` broadcasts against ``distance_m``)."""
    d = np.asarray(distance_m, dtype=np.float64)
    v = np.asarray(speed_kmh, dtype=np.float64)
    if not (math.isfinite(road_factor) and road_factor >= 1.0):
        raise ValueError(f"road_factor must be >= 1 (a road is never shorter), got {road_factor!r}")
    if v.size and not (np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("speed_kmh must be positive and finite everywhere")
    out: FloatArray = d * road_factor / (v * _KMH_TO_MS)
    return out


def eta(
    lat: float,
    lon: float,
    dest_lat: float,
    dest_lon: float,
    now: datetime,
    speed_kmh: float,
    road_factor: float = DEFAULT_ROAD_FACTOR,
    dwell_s: float = 0,
) -> datetime:
    """When a rider at (lat, lon) moving at ``speed_kmh`` reaches the destination.

    ``dwell_s`` adds fixed time on top (e.g. picking up at the shop, finding the door).
    """
    if not (math.isfinite(dwell_s) and dwell_s >= 0):
        raise ValueError(f"dwell_s must be >= 0, got {dwell_s!r}")
    seconds = travel_seconds(distance_m(lat, lon, dest_lat, dest_lon), speed_kmh, road_factor)
    return now + timedelta(seconds=seconds + dwell_s)


@dataclass(frozen=True, slots=True)
class Fix:
    """One reported position of a rider."""

    lat: float
    lon: float
    at: datetime


def estimate_speed_kmh(
    fixes: Sequence[Fix],
    default_kmh: float = DEFAULT_SPEED_KMH,
    min_kmh: float = 5,
    max_kmh: float = 60,
    *,
    window_s: float = 300.0,
    min_span_s: float = 10.0,
    jitter_m: float = 20.0,
    glitch_kmh: float = 150.0,
) -> float:
    """Average speed over the recent fixes, clamped to ``[min_kmh, max_kmh]``.

    - Only fixes within ``window_s`` of the newest one count; order of ``fixes`` does not matter.
    - Fixes at the same instant as (or before) the previous one are ignored (no zero-time gaps).
    - GPS jitter: movement is counted only once the rider is more than ``jitter_m`` from the last
      counted point, so a rider standing still adds at most ``jitter_m`` in total, not per fix.
    - A fix implying more than ``glitch_kmh`` from the previous one is a glitch and is skipped.
    - Standing still gives ``min_kmh`` (never 0, so an ETA stays finite); fewer than two usable
      fixes or less than ``min_span_s`` of history gives ``default_kmh``.
    """
    if not 0 < min_kmh <= max_kmh:
        raise ValueError("need 0 < min_kmh <= max_kmh")
    if len(fixes) < 2:
        return float(default_kmh)
    ordered = sorted(fixes, key=lambda f: f.at)
    newest = ordered[-1].at
    recent = [f for f in ordered if (newest - f.at).total_seconds() <= window_s]

    first = prev = anchor = recent[0]
    path_m = 0.0
    for fix in recent[1:]:
        dt = (fix.at - prev.at).total_seconds()
        if dt <= 0:
            continue
        step = distance_m(prev.lat, prev.lon, fix.lat, fix.lon)
        if step / dt * 3.6 > glitch_kmh:
            continue
        prev = fix
        from_anchor = distance_m(anchor.lat, anchor.lon, fix.lat, fix.lon)
        if from_anchor > jitter_m:
            path_m += from_anchor
            anchor = fix
    # The tail since the last counted point: bounded by jitter_m, so at most one jitter's worth.
    path_m += distance_m(anchor.lat, anchor.lon, prev.lat, prev.lon)

    span_s = (prev.at - first.at).total_seconds()
    if span_s < min_span_s:
        return float(default_kmh)
    kmh = path_m / span_s * 3.6
    return float(min(max(kmh, min_kmh), max_kmh))
