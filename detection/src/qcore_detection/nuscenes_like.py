"""A nuScenes-like synthetic world (``world="nuscenes"``): streets, parked rows, buildings, uneven ground,
moving objects and several stacked sweeps with a time feature.

Selected with ``SyntheticSplit(..., world="nuscenes")`` (or :func:`make_nuscenes_scene`); the original world of
:mod:`qcore_detection.synthetic` (``world="classic"``) and the ``zoo:voxelnext_lite`` detector trained on it
are unchanged. Frame and box conventions are those of :mod:`qcore_detection.synthetic` (sensor at the origin
of the *current* sweep, x forward, y left, z up), with nuScenes' extras:

* ``points`` float32 ``[N, 5]``: x, y, z, intensity, time lag (s) of the sweep that produced the point (0 for
  the current one), all sweeps motion-compensated into the current sensor frame (as nuScenes' multi-sweep
  loader does);
* ``gt_boxes`` float32 ``[K, 9]``: x, y, z, dx, dy, dz, heading, vx, vy (m/s, current frame), labels 1-based
  into :data:`NUSCENES_CLASS_NAMES`.

What a scene holds (road frame: a straight street through the sensor's lane, rotated by a few degrees; an
optional cross street):

* **road layout**: 1-3 lanes per direction (3.5 m, drive on the right), parking lanes with rows of parked
  cars/trucks (static), curbs (low boxes) along the road edges, sidewalks with pedestrians, poles and trees,
  then rows of buildings with gaps (they occlude everything behind them);
* **traffic**: cars, trucks and buses in the lanes, heading along them, each lane with its own speed (0 = a
  queue); cyclists along the road edge; work zones with rows of traffic cones and barriers; pedestrians
  walking along sidewalks or standing, some crossing at the cross street;
* **ground**: a tilted plane (up to 1.5 % per axis) plus gentle bumps (three sinusoids of 2-8 cm);
  objects stand on it; lane markings are brighter than the asphalt, sidewalks brighter still;
* **sensor**: an HDL-32E-like spinning LiDAR (32 beams, -30.67..+10.67 degrees, 1,024 azimuth steps, 70 m),
  ``sweeps`` sweeps 0.05 s apart while the ego car drives (0-12 m/s, slight yaw); each sweep is ray-cast
  (the slab test of :mod:`qcore_detection.synthetic`, nearest hit wins: occlusion by boxes and buildings)
  from the sensor's pose at its time with the moving objects at their positions at that time, then moved into
  the current frame. Range noise, dropout and intensity (reflectance, incidence, range falloff) as in the
  classic world;
* **classes** (sizes after nuScenes' means, with overlapping jitter): car, truck, bus, pedestrian, cyclist,
  traffic_cone, barrier. Objects are labelled when their centre lies within ``label_range`` (48 m, the
  detector grid) in x and y and at least ``min_points`` returns (all sweeps) hit them.

Speed: see ``python bench/detection_synthetic.py --world nuscenes`` (numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from qcore_detection.synthetic import (
    CLASS_NAMES,
    Scene,
    SensorConfig,
    _bev_overlaps,
    _cast,
    _object_parts,
    _ray_pattern,
)

log = logging.getLogger(__name__)

NUSCENES_CLASS_NAMES: tuple[str, ...] = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_cone", "barrier")
#: mean (dx, dy, dz) per class (nuScenes-like) and the relative sigma of the size jitter
CLASS_SIZES: dict[str, tuple[tuple[float, float, float], float]] = {
    "car": ((4.6, 1.95, 1.73), 0.11),
    "truck": ((6.9, 2.5, 2.85), 0.2),
    "bus": ((10.9, 2.95, 3.45), 0.12),
    "pedestrian": ((0.72, 0.67, 1.75), 0.1),
    "cyclist": ((1.8, 0.65, 1.72), 0.08),
    "traffic_cone": ((0.42, 0.42, 0.95), 0.18),
    "barrier": ((2.4, 0.55, 0.98), 0.15),
}
_REFLECTANCE: dict[str, tuple[float, float]] = {
    "car": (0.3, 0.9), "truck": (0.3, 0.8), "bus": (0.35, 0.8), "pedestrian": (0.1, 0.5), "cyclist": (0.2, 0.7),
    "traffic_cone": (0.7, 1.0), "barrier": (0.4, 0.9)}
_CLUTTER = -2
_HUGE = 1e6  # sensor height given to the box-only cast so that its flat ground never wins


@dataclass(frozen=True)
class WorldConfig:
    """What a nuScenes-like scene contains; see the module docstring."""

    sweeps: int = 5  # stacked sweeps (nuScenes' detectors use 10)
    sweep_dt: float = 0.05  # s between sweeps (20 Hz)
    ego_speed: tuple[float, float] = (0.0, 12.0)  # m/s
    ego_yaw_rate: float = 0.1  # rad/s, uniform in +-
    road_angle: float = 0.12  # rad, uniform in +- (street direction in the sensor frame)
    lanes_per_direction: tuple[int, int] = (1, 3)
    lane_width: float = 3.5
    parking_prob: float = 0.7  # per side
    parking_width: float = 2.5
    sidewalk_width: tuple[float, float] = (2.5, 5.0)
    cross_street_prob: float = 0.5
    vehicle_gap: tuple[float, float] = (3.0, 30.0)  # m between vehicles in a lane
    vehicle_mix: tuple[float, float, float] = (0.8, 0.13, 0.07)  # car, truck, bus in lanes
    parked_fill: float = 0.75  # probability that a parking slot is taken
    pedestrians: tuple[int, int] = (6, 24)
    cyclists: tuple[int, int] = (1, 5)
    work_zones: tuple[int, int] = (0, 2)
    barrier_rows: tuple[int, int] = (0, 2)
    extent: float = 70.0  # objects and buildings are laid out along the street within +-extent (m)
    label_range: float = 48.0  # labelled objects have |x|, |y| below this (m)
    ground_slope: float = 0.015  # max tilt per axis
    bump_amplitude: tuple[float, float] = (0.02, 0.08)  # m, per sinusoid (3 of them)
    ground_reflectance: tuple[float, float] = (0.04, 0.12)
    sidewalk_reflectance: tuple[float, float] = (0.15, 0.3)
    marking_reflectance: tuple[float, float] = (0.5, 0.75)
    intensity_noise: float = 0.03
    min_points: int = 5
    object_gap: float = 0.25
    max_tries: int = 20


def nuscenes_sensor() -> SensorConfig:
    """The HDL-32E-like sensor of the nuScenes-like world (70 m range, sensor 1.84 m above the ground)."""
    return SensorConfig(beams=32, elevation_deg=(-30.67, 10.67), azimuth_steps=1024, max_range=70.0,
                        min_range=1.0, height=1.84, range_noise=0.02, dropout=0.05)


# --------------------------------------------------------------------------------------------------- ground


@dataclass(frozen=True)
class _Ground:
    """Height field ``z = g0 + a x + b y + sum_i A_i sin(k_i . (x, y) + phi_i)`` in the current sensor frame."""

    g0: float
    a: float
    b: float
    amp: np.ndarray  # [3]
    k: np.ndarray  # [3, 2]
    phase: np.ndarray  # [3]

    def bumps(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        arg = np.multiply.outer(x, self.k[:, 0]) + np.multiply.outer(y, self.k[:, 1]) + self.phase
        return (np.sin(arg) * self.amp).sum(-1)

    def height(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return self.g0 + self.a * x + self.b * y + self.bumps(x, y)

    def intersect(self, origin: np.ndarray, dirs: np.ndarray, iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Ray parameter (inf: no hit) and |cos| of the incidence on the tilted plane, for rays ``origin + t d``.
        The bumps are followed by a few fixed-point steps on the plane solution."""
        denom = dirs[:, 2] - self.a * dirs[:, 0] - self.b * dirs[:, 1]
        base = self.g0 + self.a * origin[0] + self.b * origin[1] - origin[2]
        down = denom < -1e-4
        t = np.full(len(dirs), np.inf)
        td = base / denom[down]
        for _ in range(iters):
            p = origin[:2] + td[:, None] * dirs[down, :2]
            td = (base + self.bumps(p[:, 0], p[:, 1])) / denom[down]
        td[td <= 0] = np.inf
        t[down] = td
        normal = np.array([-self.a, -self.b, 1.0]) / np.sqrt(self.a ** 2 + self.b ** 2 + 1)
        return t, np.abs(dirs @ normal)


def _make_ground(rng: np.random.Generator, cfg: WorldConfig, sensor_height: float) -> _Ground:
    a, b = rng.uniform(-cfg.ground_slope, cfg.ground_slope, 2)
    amp = rng.uniform(*cfg.bump_amplitude, 3)
    wavelength = rng.uniform(6.0, 40.0, 3)
    angle = rng.uniform(0, 2 * np.pi, 3)
    k = (2 * np.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    phase = rng.uniform(0, 2 * np.pi, 3)
    g0 = -sensor_height - float((amp * np.sin(phase)).sum())  # ground exactly sensor_height below the sensor
    return _Ground(g0, float(a), float(b), amp, k, phase)


# --------------------------------------------------------------------------------------------------- layout


@dataclass
class _Street:
    """The street cross-section in road coordinates (u along the street, v across, v = 0 the centre line)."""

    angle: float
    v_ego: float  # v of the sensor (centre of one of the forward lanes)
    lanes: int
    lane_width: float
    parking: tuple[bool, bool]  # right (v < 0), left (v > 0)
    parking_width: float
    sidewalk: tuple[float, float]
    cross_u: float | None  # u of the cross street's centre line
    cross_half: float

    def road_half(self, side: int) -> float:
        """|v| of the curb on side 0 (right, v < 0) or 1 (left)."""
        return self.lanes * self.lane_width + (self.parking_width if self.parking[side] else 0.0)

    def to_sensor(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64) - self.v_ego
        return c * u - s * v, s * u + c * v

    def to_road(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.angle), np.sin(self.angle)
        return c * x + s * y, -s * x + c * y + self.v_ego

    def in_cross(self, u: float, margin: float = 0.0) -> bool:
        return self.cross_u is not None and abs(u - self.cross_u) < self.cross_half + margin


@dataclass
class _Object:
    name: str
    box: np.ndarray  # [7] at the current time (sensor frame)
    velocity: np.ndarray  # [2] (sensor frame, m/s)
    reflectance: float


@dataclass
class _World:
    ground: _Ground
    street: _Street
    objects: list[_Object] = dataclasses.field(default_factory=list)
    static_parts: list[np.ndarray] = dataclasses.field(default_factory=list)  # clutter boxes [7]
    static_refl: list[float] = dataclasses.field(default_factory=list)
    static_noise: list[float] = dataclasses.field(default_factory=list)
    static_drop: list[float] = dataclasses.field(default_factory=list)
    occupied: list[np.ndarray] = dataclasses.field(default_factory=list)  # BEV (x, y, dx, dy, heading)
    asphalt_refl: float = 0.08
    sidewalk_refl: float = 0.2
    marking_refl: float = 0.6

    def free(self, x: float, y: float, dx: float, dy: float, heading: float, gap: float) -> bool:
        cand = np.array([x, y, dx, dy, heading])
        occ = np.array(self.occupied).reshape(-1, 5)
        # only footprints whose bounding circles come within the gap can overlap (same answer, much faster)
        near = np.hypot(occ[:, 0] - x, occ[:, 1] - y) <= 0.5 * (np.hypot(occ[:, 2], occ[:, 3]) + np.hypot(dx, dy)) + gap
        if _bev_overlaps(cand, occ[near], gap):
            return False
        self.occupied.append(cand)
        return True

    def add_object(self, rng: np.random.Generator, name: str, u: float, v: float, road_heading: float,
                   speed: float, gap: float, size: np.ndarray | None = None) -> bool:
        """Place ``name`` at road coordinates (u, v) heading ``road_heading`` (road frame) moving forward at
        ``speed``; False if the spot is taken."""
        mean, jitter = CLASS_SIZES[name]
        if size is None:
            size = np.asarray(mean) * np.clip(1 + jitter * rng.standard_normal(3), 0.6, 1.4)
        x, y = self.street.to_sensor(u, v)
        heading = road_heading + self.street.angle
        if not self.free(float(x), float(y), size[0], size[1], heading, gap):
            return False
        z = float(self.ground.height(x, y)) + size[2] / 2
        box = np.array([x, y, z, *size, heading])
        vel = speed * np.array([np.cos(heading), np.sin(heading)])
        self.objects.append(_Object(name, box, vel, float(rng.uniform(*_REFLECTANCE[name]))))
        return True

    def add_static(self, u: float, v: float, size: tuple[float, float, float], road_heading: float, refl: float,
                   noise: float = 0.0, drop: float = 0.0, gap: float | None = 0.1, z_base: float = 0.0) -> bool:
        x, y = self.street.to_sensor(u, v)
        heading = road_heading + self.street.angle
        if gap is not None and not self.free(float(x), float(y), size[0], size[1], heading, gap):
            return False
        z = float(self.ground.height(x, y)) + z_base + size[2] / 2
        self.static_parts.append(np.array([x, y, z, *size, heading]))
        self.static_refl.append(refl)
        self.static_noise.append(noise)
        self.static_drop.append(drop)
        return True


def _make_street(rng: np.random.Generator, cfg: WorldConfig) -> _Street:
    lanes = int(rng.integers(cfg.lanes_per_direction[0], cfg.lanes_per_direction[1] + 1))
    ego_lane = int(rng.integers(0, lanes))
    cross = rng.random() < cfg.cross_street_prob
    return _Street(
        angle=float(rng.uniform(-cfg.road_angle, cfg.road_angle)),
        v_ego=-(ego_lane + 0.5) * cfg.lane_width, lanes=lanes, lane_width=cfg.lane_width,
        parking=(bool(rng.random() < cfg.parking_prob), bool(rng.random() < cfg.parking_prob)),
        parking_width=cfg.parking_width,
        sidewalk=(float(rng.uniform(*cfg.sidewalk_width)), float(rng.uniform(*cfg.sidewalk_width))),
        cross_u=float(rng.uniform(-35, 35)) if cross else None,
        cross_half=float(rng.integers(1, 3) * cfg.lane_width + 0.5))


def _pick(rng: np.random.Generator, names: tuple[str, ...], probs: tuple[float, ...]) -> str:
    return names[int(rng.choice(len(names), p=np.asarray(probs) / np.sum(probs)))]


def _traffic(rng: np.random.Generator, cfg: WorldConfig, w: _World) -> None:
    st = w.street
    vehicles = ("car", "truck", "bus")
    for direction in (+1, -1):  # +1: forward lanes (v < 0), heading 0; -1: opposing (v > 0), heading pi
        for lane in range(st.lanes):
            v = -direction * (lane + 0.5) * st.lane_width
            speed = 0.0 if rng.random() < 0.2 else float(rng.uniform(3.0, 14.0))
            u = -cfg.extent + rng.uniform(0, cfg.vehicle_gap[1])
            while u < cfg.extent:
                name = _pick(rng, vehicles, cfg.vehicle_mix)
                length = CLASS_SIZES[name][0][0]
                u_c = u + length / 2
                if not st.in_cross(u_c, length / 2):
                    w.add_object(rng, name, u_c, v + rng.normal(0, 0.25), 0.0 if direction > 0 else np.pi,
                                 max(0.0, speed + rng.normal(0, 0.5)) if speed else 0.0, cfg.object_gap)
                u += length + rng.uniform(*cfg.vehicle_gap)
    if st.cross_u is not None:  # a few vehicles on the cross street
        for _ in range(int(rng.integers(0, 5))):
            side = rng.choice([-1, 1])
            u = st.cross_u + side * rng.uniform(0.5, st.cross_half - 1.5)
            v = side * rng.uniform(st.road_half(0 if side < 0 else 1) + 3, cfg.extent * 0.6)
            heading = np.pi / 2 if side > 0 else -np.pi / 2
            speed = 0.0 if rng.random() < 0.3 else float(rng.uniform(2.0, 10.0))
            w.add_object(rng, _pick(rng, vehicles, cfg.vehicle_mix), u, v, heading + rng.normal(0, 0.05), speed,
                         cfg.object_gap)
    for side in (0, 1):  # parked rows
        if not st.parking[side]:
            continue
        sign = -1 if side == 0 else 1
        v = sign * (st.lanes * st.lane_width + st.parking_width / 2)
        u = -cfg.extent
        while u < cfg.extent:
            name = "car" if rng.random() < 0.88 else "truck"
            length = CLASS_SIZES[name][0][0]
            u_c = u + length / 2
            if rng.random() < cfg.parked_fill and not st.in_cross(u_c, length / 2 + 2):
                w.add_object(rng, name, u_c, v + rng.normal(0, 0.15),
                             (0.0 if side == 0 else np.pi) + rng.normal(0, 0.04), 0.0, cfg.object_gap)
            u += length + rng.uniform(0.6, 3.0)


def _vulnerable(rng: np.random.Generator, cfg: WorldConfig, w: _World) -> None:
    st = w.street
    for _ in range(int(rng.integers(cfg.pedestrians[0], cfg.pedestrians[1] + 1))):
        for _ in range(cfg.max_tries):
            if st.cross_u is not None and rng.random() < 0.2:  # crossing the street
                u = st.cross_u + rng.choice([-1, 1]) * (st.cross_half + rng.uniform(0.5, 2.0))
                v = rng.uniform(-st.road_half(0), st.road_half(1))
                heading = rng.choice([-np.pi / 2, np.pi / 2]) + rng.normal(0, 0.2)
            else:
                side = int(rng.integers(0, 2))
                sign = -1 if side == 0 else 1
                v = sign * (st.road_half(side) + rng.uniform(0.6, st.sidewalk[side] - 0.4))
                u = rng.uniform(-cfg.extent, cfg.extent)
                heading = rng.choice([0.0, np.pi]) + rng.normal(0, 0.15)
            walking = rng.random() < 0.7
            if walking or rng.random() < 0.5:
                speed = float(rng.uniform(0.8, 1.8)) if walking else 0.0
            else:
                heading, speed = rng.uniform(-np.pi, np.pi), 0.0
            if w.add_object(rng, "pedestrian", u, v, heading, speed, 0.15):
                break
    for _ in range(int(rng.integers(cfg.cyclists[0], cfg.cyclists[1] + 1))):
        for _ in range(cfg.max_tries):
            direction = rng.choice([-1, 1])
            v = -direction * (st.lanes * st.lane_width - rng.uniform(0.5, 1.2))
            u = rng.uniform(-cfg.extent, cfg.extent)
            if w.add_object(rng, "cyclist", u, v, (0.0 if direction > 0 else np.pi) + rng.normal(0, 0.08),
                            float(rng.uniform(2.5, 7.0)), cfg.object_gap):
                break
    for _ in range(int(rng.integers(cfg.work_zones[0], cfg.work_zones[1] + 1))):  # rows of cones on a lane line
        lane = int(rng.integers(0, 2 * st.lanes)) - st.lanes
        v = lane * st.lane_width + rng.normal(0, 0.2)
        u = rng.uniform(-cfg.extent * 0.7, cfg.extent * 0.7)
        for _ in range(int(rng.integers(4, 11))):
            w.add_object(rng, "traffic_cone", u, v + rng.normal(0, 0.1), rng.uniform(-np.pi, np.pi), 0.0, 0.1)
            u += rng.uniform(1.5, 4.0)
    for _ in range(int(rng.integers(cfg.barrier_rows[0], cfg.barrier_rows[1] + 1))):  # barriers end to end
        side = int(rng.integers(0, 2))
        sign = -1 if side == 0 else 1
        v = sign * (st.road_half(side) - rng.uniform(0.5, 1.5))
        u = rng.uniform(-cfg.extent * 0.7, cfg.extent * 0.7)
        for _ in range(int(rng.integers(2, 7))):
            mean, jitter = CLASS_SIZES["barrier"]
            size = np.asarray(mean) * np.clip(1 + jitter * rng.standard_normal(3), 0.6, 1.4)
            w.add_object(rng, "barrier", u + size[0] / 2, v, rng.normal(0, 0.05), 0.0, 0.05, size)
            u += size[0] + rng.uniform(0.1, 0.6)


def _buildings(rng: np.random.Generator, cfg: WorldConfig, w: _World) -> None:
    """Curbs along both road edges, poles and trees on the sidewalks, rows of buildings behind them."""
    st = w.street
    for side in (0, 1):
        sign = -1 if side == 0 else 1
        curb_v = sign * (st.road_half(side) + 0.1)
        segments = [(-cfg.extent - 10, cfg.extent + 10)]
        if st.cross_u is not None:
            segments = [(-cfg.extent - 10, st.cross_u - st.cross_half), (st.cross_u + st.cross_half, cfg.extent + 10)]
        for u0, u1 in segments:
            if u1 - u0 > 1:
                w.add_static((u0 + u1) / 2, curb_v, (u1 - u0, 0.2, 0.15), 0.0, float(rng.uniform(0.2, 0.4)),
                             gap=None)
        back = st.road_half(side) + st.sidewalk[side]
        u = -cfg.extent - 10
        while u < cfg.extent + 10:  # poles (street lights, signs) and trees along the curb
            u += rng.uniform(8, 30)
            if st.in_cross(u, 1):
                continue
            v = sign * (st.road_half(side) + rng.uniform(0.4, 0.9))
            if rng.random() < 0.5:
                width = rng.uniform(0.15, 0.3)
                w.add_static(u, v, (width, width, rng.uniform(3.0, 8.0)), 0.0, float(rng.uniform(0.4, 0.9)), gap=0.1)
            else:
                trunk = rng.uniform(0.2, 0.4)
                if w.add_static(u, v, (trunk, trunk, rng.uniform(1.8, 3.0)), 0.0, float(rng.uniform(0.2, 0.5)),
                                gap=0.1):
                    crown = rng.uniform(2.0, 4.5)
                    w.add_static(u, v, (crown, crown, rng.uniform(1.5, 3.5)), rng.uniform(0, np.pi),
                                 float(rng.uniform(0.05, 0.3)), noise=0.08, drop=0.4, gap=None,
                                 z_base=rng.uniform(2.0, 3.0))
        u = -cfg.extent - 10
        while u < cfg.extent + 10:  # buildings
            length = rng.uniform(8, 35)
            if rng.random() < 0.8:
                u_c = u + length / 2
                cut = st.cross_u is not None and abs(u_c - st.cross_u) < st.cross_half + st.sidewalk[side] + length / 2
                if not cut:
                    depth, height = rng.uniform(8, 20), rng.uniform(4, 25)
                    w.add_static(u_c, sign * (back + rng.uniform(0, 1.5) + depth / 2), (length, depth, height), 0.0,
                                 float(rng.uniform(0.15, 0.6)), gap=None)
            u += length + rng.uniform(0, 10)


# --------------------------------------------------------------------------------------------------- sensor


def _pose(k: int, cfg: WorldConfig, speed: float, yaw_rate: float) -> tuple[np.ndarray, float]:
    """Sensor (x, y) and yaw of sweep ``k`` (k = 0 current) in the current frame (constant speed and yaw rate)."""
    t = -k * cfg.sweep_dt
    yaw = yaw_rate * t
    return speed * t * np.array([np.cos(yaw / 2), np.sin(yaw / 2)]), yaw


def _sweep(w: _World, cfg: WorldConfig, sens: SensorConfig, k: int, speed: float, yaw_rate: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sweep as points [M, 5] in the current frame and the owning object index of each point (-1 none)."""
    (ox, oy), yaw = _pose(k, cfg, speed, yaw_rate)
    oz = float(w.ground.height(ox, oy)) + sens.height
    t_lag = k * cfg.sweep_dt
    obj = np.array([o.box for o in w.objects]).reshape(-1, 7).copy()
    if len(obj):
        obj[:, :2] -= t_lag * np.array([o.velocity for o in w.objects])
    # parts of every object at this time: (box [7], owner, reflectance)
    parts, owner, refl, noise, drop = [], [], [], [], []
    for i, (o, box) in enumerate(zip(w.objects, obj, strict=True)):
        c, s = np.cos(box[6]), np.sin(box[6])
        z_ground = box[2] - box[5] / 2
        if o.name in CLASS_NAMES:  # the classic world's part shapes
            shapes = _object_parts(CLASS_NAMES.index(o.name) + 1, *box[3:6])
        else:
            shapes = _vehicle_parts(o.name, *box[3:6])
        for cx, cy, z0, z1, lx, ly in shapes:
            parts.append([box[0] + c * cx - s * cy, box[1] + s * cx + c * cy, z_ground + (z0 + z1) / 2, lx, ly,
                          z1 - z0, box[6]])
            owner.append(i)
            refl.append(o.reflectance)
            noise.append(0.0)
            drop.append(0.0)
    boxes = np.concatenate([np.array(parts).reshape(-1, 7), np.array(w.static_parts).reshape(-1, 7)])
    owner = np.r_[np.asarray(owner, dtype=np.int64), np.full(len(w.static_parts), _CLUTTER)]
    refl = np.r_[refl, w.static_refl]
    noise = np.r_[noise, w.static_noise]
    drop = np.r_[drop, w.static_drop]
    # into the sweep's sensor frame; skip what cannot be reached
    local = boxes.copy()
    cy_, sy_ = np.cos(yaw), np.sin(yaw)
    dx, dy = boxes[:, 0] - ox, boxes[:, 1] - oy
    local[:, 0], local[:, 1] = cy_ * dx + sy_ * dy, -sy_ * dx + cy_ * dy
    local[:, 2] -= oz
    local[:, 6] -= yaw
    reach = np.hypot(local[:, 0], local[:, 1]) - 0.5 * np.hypot(local[:, 3], local[:, 4]) < sens.max_range
    idx = np.nonzero(reach)[0]
    t, hit, cos_inc = _cast(local[idx], dataclasses.replace(sens, height=_HUGE))
    dirs_local, _, _ = _ray_pattern(sens)
    dirs = np.c_[cy_ * dirs_local[:, 0] - sy_ * dirs_local[:, 1], sy_ * dirs_local[:, 0] + cy_ * dirs_local[:, 1],
                 dirs_local[:, 2]]
    origin = np.array([ox, oy, oz])
    t_g, cos_g = w.ground.intersect(origin, dirs)
    ground = t_g < t
    t = np.where(ground, t_g, t)
    cos_inc = np.where(ground, cos_g, cos_inc)
    part = np.where(ground | (hit < 0), -1, idx[np.maximum(hit, 0)])

    keep = (t >= sens.min_range) & (t <= sens.max_range)
    p_drop = np.where(part >= 0, drop[np.maximum(part, 0)], 0.0)
    keep &= rng.random(len(t)) < (1 - sens.dropout) * (1 - p_drop)
    part, t, cos_inc, dirs = part[keep], t[keep], cos_inc[keep], dirs[keep]
    sigma = np.hypot(sens.range_noise, np.where(part >= 0, noise[np.maximum(part, 0)], 0.0))
    r = t + rng.standard_normal(len(t)) * sigma
    xyz = origin + dirs * r[:, None]
    # reflectance: the part's, or the ground's (asphalt, lane markings, sidewalk)
    u, v = w.street.to_road(xyz[:, 0], xyz[:, 1])
    st = w.street
    on_walk = (v < -st.road_half(0)) | (v > st.road_half(1))
    lane_pos = v / st.lane_width
    marking = (np.abs(lane_pos - np.round(lane_pos)) * st.lane_width < 0.08) & (np.abs(lane_pos) <= st.lanes)
    marking &= (np.round(lane_pos) == 0) | ((u % 9.0) < 3.0)  # solid centre line, dashed lane lines
    g_refl = np.where(on_walk, w.sidewalk_refl, np.where(marking, w.marking_refl, w.asphalt_refl))
    rho = np.where(part >= 0, refl[np.maximum(part, 0)], g_refl)
    falloff = 1.0 - 0.4 * np.clip(r / sens.max_range, 0, 1)
    intensity = np.clip(rho * (0.4 + 0.6 * cos_inc) * falloff + cfg.intensity_noise * rng.standard_normal(len(r)),
                        0.0, 1.0)
    points = np.c_[xyz, intensity, np.full(len(r), t_lag)]
    own = np.where(part >= 0, owner[np.maximum(part, 0)], -1)
    return points, np.where(own >= 0, own, -1)


def _vehicle_parts(name: str, dx: float, dy: float, dz: float) -> list[tuple[float, float, float, float, float, float]]:
    """Parts (cx, cy, z0, z1, lx, ly) of the classes the classic world lacks (local frame, z from the ground)."""
    m = 0.05
    length, width, height = dx - 2 * m, dy - 2 * m, dz - m
    if name == "truck":  # cab in front, taller cargo box behind
        cab = 0.28 * length
        return [(length / 2 - cab / 2, 0.0, 0.3, 0.8 * height, cab, width),
                (-cab / 2, 0.0, 0.3, height, length - cab - 0.2, width),
                (0.0, 0.0, 0.0, 0.35, 0.8 * length, 0.9 * width)]
    if name == "bus":
        return [(0.0, 0.0, 0.3, height, length, width), (0.0, 0.0, 0.0, 0.3, 0.85 * length, 0.9 * width)]
    if name == "traffic_cone":
        return [(0.0, 0.0, 0.0, 0.08, length, width), (0.0, 0.0, 0.08, 0.55 * height, 0.6 * length, 0.6 * width),
                (0.0, 0.0, 0.55 * height, height, 0.3 * length, 0.3 * width)]
    if name == "barrier":
        return [(0.0, 0.0, 0.0, height, length, 0.5 * width), (0.0, 0.0, 0.0, 0.15, length, width)]
    raise ValueError(f"no part shapes for class {name!r}")


# ---------------------------------------------------------------------------------------------------- scene


def make_nuscenes_scene(seed: int, world_cfg: WorldConfig | None = None, sensor_cfg: SensorConfig | None = None,
                        frame_id: str | None = None) -> Scene:
    """Generate one nuScenes-like scene (see the module docstring); deterministic in ``seed`` and the configs."""
    cfg = world_cfg or WorldConfig()
    sens = sensor_cfg or nuscenes_sensor()
    if not 1 <= cfg.sweeps <= 20:
        raise ValueError(f"sweeps must be in 1..20, got {cfg.sweeps}")
    rng = np.random.default_rng(seed)
    ground = _make_ground(rng, cfg, sens.height)
    w = _World(ground=ground, street=_make_street(rng, cfg), asphalt_refl=float(rng.uniform(*cfg.ground_reflectance)),
               sidewalk_refl=float(rng.uniform(*cfg.sidewalk_reflectance)),
               marking_refl=float(rng.uniform(*cfg.marking_reflectance)))
    speed = float(rng.uniform(*cfg.ego_speed))
    yaw_rate = float(rng.uniform(-cfg.ego_yaw_rate, cfg.ego_yaw_rate))
    # keep the ego car's swept footprint free
    ego_len = 5.0 + speed * cfg.sweep_dt * cfg.sweeps
    w.occupied.append(np.array([-(ego_len - 5.0) / 2, 0.0, ego_len, 2.2, 0.0]))
    _traffic(rng, cfg, w)
    _vulnerable(rng, cfg, w)
    _buildings(rng, cfg, w)

    sweeps, owners = [], []
    for k in range(cfg.sweeps):
        pts, own = _sweep(w, cfg, sens, k, speed, yaw_rate, rng)
        sweeps.append(pts)
        owners.append(own)
    points = np.concatenate(sweeps).astype(np.float32)
    own = np.concatenate(owners)
    n_obj = len(w.objects)
    counts = np.bincount(own[own >= 0], minlength=n_obj)[:n_obj].astype(np.int64)
    boxes = np.array([np.r_[o.box, o.velocity] for o in w.objects]).reshape(-1, 9)
    labels = np.array([NUSCENES_CLASS_NAMES.index(o.name) + 1 for o in w.objects], dtype=np.int64)
    keep = (counts >= cfg.min_points) & (np.abs(boxes[:, 0]) < cfg.label_range) & (
        np.abs(boxes[:, 1]) < cfg.label_range)
    boxes = boxes[keep].astype(np.float32)
    boxes[:, 6] = (boxes[:, 6] + np.pi) % (2 * np.pi) - np.pi
    boxes[boxes[:, 6] >= np.pi, 6] -= np.float32(2 * np.pi)
    log.debug("nuscenes-like scene %d: %d points, %d of %d objects labelled", seed, len(points), int(keep.sum()),
              n_obj)
    origins = np.array([[*_pose(k, cfg, speed, yaw_rate)[0], 0.0] for k in range(cfg.sweeps)])
    origins[:, 2] = ground.height(origins[:, 0], origins[:, 1]) + sens.height
    return Scene(points=points, gt_boxes=boxes, gt_labels=labels[keep], num_points_in_gt=counts[keep],
                 frame_id=frame_id if frame_id is not None else f"nus{seed}", seed=int(seed),
                 class_names=NUSCENES_CLASS_NAMES, sensor_origins=origins.astype(np.float32))
