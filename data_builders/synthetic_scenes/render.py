"""Numpy ray caster for the `synthetic_scenes` demo dataset: 3D scenes with exact labels.

A pinhole camera inside a closed box-shaped room looks down at primitives standing on the floor.
Every pixel's ray is cast against the room and the objects (vectorised over pixels, looping only
over primitives), which gives exact, mutually consistent labels for the six mtl_jax tasks
(mtl_jax/tasks.py; label formats of docs/datasets_metrics.md §1.2 and §2.1):

* ``semseg`` (H, W, 1) uint8, the 7 classes of `CLASS_NAMES`: 0 floor, 1 wall (walls and ceiling),
  2 sphere, 3 box, 4 cylinder, 5 cone, 6 figure.
* ``human_parts`` (H, W, 1) uint8, `PART_NAMES`: 0 not on a figure, 1 head, 2 torso, 3 arms,
  4 legs. All zero when the image has no figure (the input pipeline turns such maps into ignore,
  like PASCAL-Context, docs/datasets_metrics.md §1.2).
* ``sal`` (H, W, 1) uint8: 1 on objects (classes 2..6), 0 on floor and walls.
* ``depth`` (H, W, 1) float32: z-depth in metres (distance along the optical axis), > 0.
* ``normals`` (H, W, 3) float32: unit surface normals in the camera frame, x right, y up, z towards
  the camera (the datasets' convention: x is the R channel, a horizontal flip negates x). Every
  normal faces the camera (n . -ray > 0); z > 0 on ~99% of pixels, z < 0 only where perspective
  shows a surface turned away from the optical axis (the ceiling, a side wall, an object's limb
  near the image border), as in real depth-sensor normals.
* ``edge`` (H, W, 1) uint8 {0, 1}: pixel (i, j) is 1 when its right neighbour (i, j+1) or its bottom
  neighbour (i+1, j) differs in semantic class or in object instance, or lies on another primitive
  of the same object with a depth step above `DEPTH_JUMP` (self-occlusion inside a figure). So each
  boundary is one pixel thick, on its top/left side; room creases (wall/wall, wall/ceiling) are not
  edges.
* ``image`` (H, W, 3) uint8: textured albedo, Lambertian point light + ambient, hard shadows, sensor
  noise. Object colours are drawn independently of the class, so only shape tells classes apart.

World frame: metres, y up, floor y = 0. Camera frame: x right, y up, z backwards (the camera looks
along -z). Intrinsics use the OpenCV pixel convention (pixel (row i, column j) has its centre at
u = j, v = i): a pixel with depth z back-projects to ((u - cx) z / f, -(v - cy) z / f, -z).

Each example draws from its own generator seeded by (seed, split, index) (`example_rng`), so an
example does not depend on which examples were rendered before it.
"""

import dataclasses

import numpy as np

CLASS_NAMES = ('floor', 'wall', 'sphere', 'box', 'cylinder', 'cone', 'figure')
FLOOR, WALL, SPHERE, BOX, CYLINDER, CONE, FIGURE = range(len(CLASS_NAMES))
PART_NAMES = ('none', 'head', 'torso', 'arms', 'legs')
HEAD, TORSO, ARMS, LEGS = 1, 2, 3, 4
SPLITS = ('train', 'validation')  # index = the split's seed stream

HFOV_DEG = 60.0  # horizontal field of view
FIGURE_PROB = 0.58  # scenes that place a figure (~55% of images show one)
DEPTH_JUMP = 0.03  # relative depth step between two primitives of one object that is an edge
_EPS = 1e-6  # minimum ray distance (metres)
_SHADOW_OFFSET = 1e-4  # shadow rays start this far off the surface (metres)


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera: `rotation` is camera-to-world (columns = camera x, y, z axes in world)."""
  height: int
  width: int
  focal: float  # pixels
  position: np.ndarray  # (3,) world coordinates, metres
  rotation: np.ndarray  # (3, 3)

  @property
  def intrinsics(self) -> np.ndarray:
    """K (3, 3) in the OpenCV pixel convention (pixel centres at integer u = column, v = row)."""
    return np.array([[self.focal, 0.0, (self.width - 1) / 2],
                     [0.0, self.focal, (self.height - 1) / 2],
                     [0.0, 0.0, 1.0]])

  def pixel_rays(self) -> np.ndarray:
    """(H, W, 3) rays in the camera frame with z = -1 (unnormalised): depth * ray = 3D point."""
    k = self.intrinsics
    v, u = np.meshgrid(np.arange(self.height), np.arange(self.width), indexing='ij')
    x = (u - k[0, 2]) / self.focal
    y = -(v - k[1, 2]) / self.focal
    return np.stack([x, y, -np.ones_like(x)], axis=-1)


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One rendered scene: the task maps plus the geometry needed to check them."""
  maps: dict[str, np.ndarray]  # image, semseg, human_parts, sal, normals, depth, edge
  camera: Camera
  room: tuple[float, float, float]  # (half_x, ceiling_height, half_z); room spans [-hx, hx] etc.
  instance: np.ndarray  # (H, W) int32: 0 room, k >= 1 the k-th object
  # (H, W) int32: 0..5 the room's faces (-x, +x, floor, ceiling, -z, +z), 6+ the primitives.
  surface: np.ndarray


# ------------------------------------------------------------------------------------------------
# Ray / primitive intersections. o: (3,) or (M, 3) origins, d: (M, 3) unit directions. Each returns
# t (M,) (np.inf on a miss; only the entering hit, origins are outside every primitive) and the
# outward unit normal (M, 3) (meaningless where t is inf).


def _points(o, d, t):
  return o + np.where(np.isfinite(t), t, 0.0)[:, None] * d


@dataclasses.dataclass(frozen=True)
class _Sphere:
  center: np.ndarray
  radius: float

  def intersect(self, o, d):
    oc = o - self.center
    b = np.sum(oc * d, -1)
    disc = b * b - (np.sum(oc * oc, -1) - self.radius ** 2)
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    return t, (_points(o, d, t) - self.center) / self.radius


@dataclasses.dataclass(frozen=True)
class _Box:
  """Box of half extents `half`, rotated by `yaw` about the vertical axis through `center`."""
  center: np.ndarray
  half: np.ndarray
  yaw: float

  def intersect(self, o, d):
    c, s = np.cos(self.yaw), np.sin(self.yaw)
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # local -> world
    ol = (o - self.center) @ rot
    dl = d @ rot
    inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    t1, t2 = (-self.half - ol) * inv, (self.half - ol) * inv
    t_near = np.minimum(t1, t2)
    axis = np.argmax(t_near, -1)
    t_in, t_out = np.max(t_near, -1), np.min(np.maximum(t1, t2), -1)
    t = np.where((t_in <= t_out) & (t_in > _EPS), t_in, np.inf)
    rows = np.arange(len(d))
    n_local = np.zeros_like(dl)
    n_local[rows, axis] = -np.sign(dl[rows, axis])
    return t, n_local @ rot.T


@dataclasses.dataclass(frozen=True)
class _Cylinder:
  """Vertical capped cylinder: axis at (x, z), y in [y0, y1]."""
  x: float
  z: float
  radius: float
  y0: float
  y1: float

  def intersect(self, o, d):
    ox, oy, oz = o[..., 0] - self.x, o[..., 1], o[..., 2] - self.z
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - self.radius ** 2)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-12)
    y = oy + t * dy
    t = np.where((disc >= 0) & (a > 1e-12) & (t > _EPS) & (y >= self.y0) & (y <= self.y1),
                 t, np.inf)
    cap_ny = np.zeros_like(t)
    dy_safe = np.where(np.abs(dy) < 1e-12, 1e-12, dy)
    for y_cap, ny in ((self.y1, 1.0), (self.y0, -1.0)):
      tc = (y_cap - oy) / dy_safe
      px, pz = ox + tc * dx, oz + tc * dz
      cap = (tc > _EPS) & (px * px + pz * pz <= self.radius ** 2) & (tc < t)
      t = np.where(cap, tc, t)
      cap_ny = np.where(cap, ny, cap_ny)
    p = _points(o, d, t)
    side = np.stack([(p[:, 0] - self.x) / self.radius, np.zeros_like(t),
                     (p[:, 2] - self.z) / self.radius], -1)
    cap_n = np.stack([np.zeros_like(t), cap_ny, np.zeros_like(t)], -1)
    return t, np.where((cap_ny != 0)[:, None], cap_n, side)


@dataclasses.dataclass(frozen=True)
class _Cone:
  """Vertical cone: base disk of `radius` at y = 0 centred on (x, z), apex at y = height."""
  x: float
  z: float
  radius: float
  height: float

  def intersect(self, o, d):
    k2 = (self.radius / self.height) ** 2
    x0, z0, y0 = o[..., 0] - self.x, o[..., 2] - self.z, self.height - o[..., 1]  # y0: below apex
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dz * dz - k2 * dy * dy
    b = x0 * dx + z0 * dz + k2 * y0 * dy
    c = x0 * x0 + z0 * z0 - k2 * y0 * y0
    disc = b * b - a * c
    q = -(b + np.copysign(np.sqrt(np.maximum(disc, 0.0)), b))
    t = np.full_like(a, np.inf)
    with np.errstate(divide='ignore', invalid='ignore'):
      for root in (q / a, c / q):
        below_apex = y0 - root * dy
        ok = ((disc >= 0) & np.isfinite(root) & (root > _EPS) & (below_apex >= 0)
              & (below_apex <= self.height) & (root < t))
        t = np.where(ok, root, t)
      tb = -o[..., 1] / np.where(np.abs(dy) < 1e-12, 1e-12, dy)  # base cap, y = 0
    bx, bz = x0 + tb * dx, z0 + tb * dz
    base = (tb > _EPS) & (bx * bx + bz * bz <= self.radius ** 2) & (tb < t)
    t = np.where(base, tb, t)
    p = _points(o, d, t)
    side = np.stack([p[:, 0] - self.x, k2 * (self.height - p[:, 1]), p[:, 2] - self.z], -1)
    side /= np.maximum(np.linalg.norm(side, axis=-1, keepdims=True), 1e-12)
    return t, np.where(base[:, None], np.array([0.0, -1.0, 0.0]), side)


@dataclasses.dataclass(frozen=True)
class _Object:
  """One object: its class, primitives with their part ids, bounding sphere and colour."""
  cls: int
  primitives: tuple  # ((primitive, part id), ...)
  center: np.ndarray  # bounding sphere
  radius: float
  color: np.ndarray  # (3,) albedo in [0, 1]


def _bound_hits(o, d, center, radius, t_max):
  """Rays that may hit the bounding sphere before t_max (a cheap cull before the exact tests)."""
  oc = o - center
  b = np.sum(oc * d, -1)
  disc = b * b - (np.sum(oc * oc, -1) - radius ** 2)
  sq = np.sqrt(np.maximum(disc, 0.0))
  return (disc >= 0) & (sq - b > _EPS) & (-b - sq < t_max)


def _hit_room(o, d, half_x, ceiling, half_z):
  """Camera rays against the inside of the room: t, inward normals, face id 0..5."""
  lo, hi = np.array([-half_x, 0.0, -half_z]), np.array([half_x, ceiling, half_z])
  with np.errstate(divide='ignore'):
    tt = np.where(d != 0, (np.where(d > 0, hi, lo) - o) / d, np.inf)
  axis = np.argmin(tt, -1)
  rows = np.arange(len(d))
  positive = d[rows, axis] > 0
  normal = np.zeros_like(d)
  normal[rows, axis] = np.where(positive, -1.0, 1.0)
  return tt[rows, axis], normal, 2 * axis + positive


# ------------------------------------------------------------------------------------------------
# Scene sampling.


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split`: independent of every other example."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; known: {", ".join(SPLITS)}')
  return np.random.default_rng([seed, SPLITS.index(split), index])


def _random_color(rng, sat=(0.25, 0.9), val=(0.35, 0.95)):
  """A random RGB albedo in [0, 1] from HSV."""
  h, s, v = rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)
  k = (np.array([5.0, 3.0, 1.0]) + 6 * h) % 6
  return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _noise_params(rng, n=4, freq=(1.0, 5.0)):
  """Random sum-of-sinusoids noise: (3, n) spatial frequencies (rad/m) and n phases."""
  dirs = rng.normal(size=(3, n))
  dirs *= 2 * np.pi * rng.uniform(*freq, n) / np.linalg.norm(dirs, axis=0)
  return dirs, rng.uniform(0, 2 * np.pi, n)


def _noise(p, params):
  """Smooth noise in [-1, 1] at world points p (M, 3)."""
  dirs, phases = params
  return np.sin(p @ dirs + phases).mean(-1)


def _make_object(rng, cls, x, z, size):
  """The primitives of an object of class `cls` on the floor at (x, z); size = (footprint, h)."""
  radius, height = size
  color = _random_color(rng)
  yaw = rng.uniform(0, 2 * np.pi)
  if cls == SPHERE:
    prims = ((_Sphere(np.array([x, radius, z]), radius), 0),)
  elif cls == BOX:
    half = np.array([radius / np.sqrt(2), height / 2, radius / np.sqrt(2)])
    half[[0, 2]] *= rng.uniform(0.7, 1.0, 2)
    prims = ((_Box(np.array([x, height / 2, z]), half, yaw), 0),)
  elif cls == CYLINDER:
    prims = ((_Cylinder(x, z, radius, 0.0, height), 0),)
  elif cls == CONE:
    prims = ((_Cone(x, z, radius, height), 0),)
  else:  # FIGURE, facing local +z, built from the proportions below (s = height / 1.67).
    s = height / 1.67
    c, sn = np.cos(yaw), np.sin(yaw)

    def at(lx):  # local x offset -> world (x, z); rotation about the vertical axis by yaw
      return x + c * lx, z - sn * lx

    prims = [(_Sphere(np.array([x, 1.53 * s, z]), 0.14 * s), HEAD),
             (_Box(np.array([x, 1.1 * s, z]), np.array([0.2, 0.3, 0.12]) * s, yaw), TORSO)]
    for side in (-1, 1):
      prims.append((_Cylinder(*at(side * 0.275 * s), 0.065 * s, 0.72 * s, 1.38 * s), ARMS))
      prims.append((_Cylinder(*at(side * 0.1 * s), 0.085 * s, 0.0, 0.8 * s), LEGS))
    prims = tuple(prims)
  center = np.array([x, height / 2, z])
  return _Object(cls, prims, center, float(np.hypot(radius, height / 2)) + 1e-3, color)


def _object_size(rng, cls):
  """(footprint radius, height) in metres."""
  if cls == SPHERE:
    r = rng.uniform(0.25, 0.55)
    return r, 2 * r
  if cls == BOX:
    return rng.uniform(0.3, 0.65), rng.uniform(0.4, 1.2)
  if cls == CYLINDER:
    return rng.uniform(0.2, 0.45), rng.uniform(0.4, 1.4)
  if cls == CONE:
    return rng.uniform(0.25, 0.5), rng.uniform(0.6, 1.5)
  height = rng.uniform(1.3, 1.9)  # FIGURE
  return 0.36 * height / 1.67, height


def _project(camera, p):
  """World point -> (u, v, depth) in pixels (OpenCV convention) and metres."""
  q = (p - camera.position) @ camera.rotation
  k = camera.intrinsics
  return k[0, 2] + camera.focal * q[0] / -q[2], k[1, 2] - camera.focal * q[1] / -q[2], -q[2]


def _sample_camera(rng, height, width, half_x, half_z):
  """Camera 1.2-2 m high, pitched 15-45 deg down, with at least 5 m of floor ahead."""
  while True:
    cam_h = rng.uniform(1.2, 2.0)
    yaw = rng.uniform(0, 2 * np.pi)
    pitch = -np.deg2rad(rng.uniform(15, 45))
    xz = rng.uniform(-1, 1, 2) * (np.array([half_x, half_z]) - 0.5)
    ahead = np.array([np.sin(yaw), -np.cos(yaw)])
    with np.errstate(divide='ignore'):
      free = np.where(ahead != 0, (np.sign(ahead) * [half_x, half_z] - xz) / ahead, np.inf)
    if free.min() >= 5.0:
      break
  forward = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), -np.cos(pitch) * np.cos(yaw)])
  right = np.array([np.cos(yaw), 0.0, np.sin(yaw)])
  up = np.cross(right, forward)
  focal = (width / 2) / np.tan(np.deg2rad(HFOV_DEG) / 2)
  return Camera(height, width, float(focal), np.array([xz[0], cam_h, xz[1]]),
                np.stack([right, up, -forward], axis=1))


def _sample_objects(rng, camera, half_x, half_z):
  """2-6 objects 1.5-6 m ahead on visible floor, not overlapping; figures are placed first."""
  count = int(rng.integers(2, 7))
  figures = int(rng.random() < FIGURE_PROB) * (1 + int(rng.random() < 0.3))
  classes = [FIGURE] * figures + list(rng.choice([SPHERE, BOX, CYLINDER, CONE], count - figures))
  yaw = np.arctan2(-camera.rotation[0, 2], camera.rotation[2, 2])  # heading of -z (forward)
  objects, placed = [], []
  for cls in classes:
    size = _object_size(rng, cls)
    for _ in range(50):
      dist, angle = rng.uniform(1.5, 6.0), yaw + np.deg2rad(rng.uniform(-28, 28))
      x = camera.position[0] + dist * np.sin(angle)
      z = camera.position[2] - dist * np.cos(angle)
      if abs(x) + size[0] + 0.1 > half_x or abs(z) + size[0] + 0.1 > half_z:
        continue
      if any(np.hypot(x - px, z - pz) < size[0] + pr + 0.15 for px, pz, pr in placed):
        continue
      u, v, _ = _project(camera, np.array([x, 0.0, z]))
      if 1 <= u <= camera.width - 2 and 1 <= v <= camera.height - 2:
        placed.append((x, z, size[0]))
        objects.append(_make_object(rng, cls, x, z, size))
        break
  return objects


# ------------------------------------------------------------------------------------------------
# Rendering.


def edge_map(semseg, instance, surface, depth, depth_jump=DEPTH_JUMP):
  """(H, W) uint8 edges by the rule of the module docstring (right/bottom neighbour differs)."""

  def differs(a, b):  # a, b: index tuples of the pixel and its neighbour
    z_a, z_b = depth[a], depth[b]
    occlusion = ((instance[a] > 0) & (surface[a] != surface[b])
                 & (np.abs(z_a - z_b) > depth_jump * np.minimum(z_a, z_b)))
    return (semseg[a] != semseg[b]) | (instance[a] != instance[b]) | occlusion

  edge = np.zeros(semseg.shape, bool)
  edge[:, :-1] |= differs(np.s_[:, :-1], np.s_[:, 1:])
  edge[:-1, :] |= differs(np.s_[:-1, :], np.s_[1:, :])
  return edge.astype(np.uint8)


def _trace(o, d, room, objects):
  """Nearest hit of rays (o, d) over the room and every primitive: per-ray t and labels."""
  t, normal, surface = _hit_room(o, d, *room)
  semseg = np.where(surface == 2, FLOOR, WALL)
  instance, part = np.zeros_like(surface), np.zeros_like(surface)
  uid = 6  # surface id of the next primitive
  for k, obj in enumerate(objects, start=1):
    idx = np.flatnonzero(_bound_hits(o, d, obj.center, obj.radius, t))
    for prim, part_id in obj.primitives:
      if idx.size:
        tp, n_prim = prim.intersect(o, d[idx])
        closer = tp < t[idx]
        sel = idx[closer]
        t[sel], normal[sel], surface[sel] = tp[closer], n_prim[closer], uid
        semseg[sel], instance[sel], part[sel] = obj.cls, k, part_id
      uid += 1
  return t, normal, surface, semseg, instance, part


def _albedo(rng, points, surface, instance, objects):
  """Tiled floor, striped or mottled walls, plain ceiling, one noisy colour per object."""
  albedo = np.empty_like(points)
  floor, walls = surface == 2, np.isin(surface, (0, 1, 4, 5))
  grid_angle, tile = rng.uniform(0, np.pi / 2), rng.uniform(0.4, 1.0)
  floor_colors = (_random_color(rng), _random_color(rng))
  grout = rng.random() < 0.5
  p = points[floor]
  cu = (np.cos(grid_angle) * p[:, 0] + np.sin(grid_angle) * p[:, 2]) / tile
  cv = (-np.sin(grid_angle) * p[:, 0] + np.cos(grid_angle) * p[:, 2]) / tile
  checker = ((np.floor(cu) + np.floor(cv)) % 2)[:, None]
  albedo[floor] = checker * floor_colors[0] + (1 - checker) * floor_colors[1]
  if grout:
    lines = (cu % 1 < 0.05) | (cv % 1 < 0.05)
    albedo[np.flatnonzero(floor)[lines]] = 0.85
  wall_colors = (_random_color(rng), _random_color(rng))
  stripe_period = rng.uniform(0.2, 0.8)
  p = points[walls]
  if rng.random() < 0.5:  # vertical stripes
    stripe = (np.sin(2 * np.pi * (p[:, 0] + p[:, 2]) / stripe_period) > 0)[:, None]
    albedo[walls] = np.where(stripe, wall_colors[0], wall_colors[1])
  else:
    mottle = 1 + 0.25 * _noise(p, _noise_params(rng, freq=(0.5, 3.0)))
    albedo[walls] = wall_colors[0] * mottle[:, None]
  albedo[surface == 3] = _random_color(rng, sat=(0.0, 0.15), val=(0.7, 0.95))
  colors = np.stack([np.zeros(3)] + [obj.color for obj in objects])
  objs = instance > 0
  albedo[objs] = colors[instance[objs]]
  return albedo * (1 + 0.08 * _noise(points, _noise_params(rng, freq=(2.0, 8.0))))[:, None]


def _direct_light(points, normal, light, objects):
  """Lambertian factor of a point light with hard shadows (only objects block it in the room)."""
  to_light = light - points
  dist = np.linalg.norm(to_light, axis=-1)
  to_light /= dist[:, None]
  lambert = np.maximum(np.sum(normal * to_light, -1), 0.0)
  lit = np.flatnonzero(lambert > 0)
  origin, ray, reach = points[lit] + _SHADOW_OFFSET * normal[lit], to_light[lit], dist[lit]
  blocked = np.zeros(len(lit), bool)
  for obj in objects:
    idx = np.flatnonzero(_bound_hits(origin, ray, obj.center, obj.radius, reach) & ~blocked)
    for prim, _ in obj.primitives:
      if idx.size:
        blocked[idx[prim.intersect(origin[idx], ray[idx])[0] < reach[idx]]] = True
  lambert[lit[blocked]] = 0.0
  return 1.15 * lambert / (1 + 0.01 * dist ** 2)


def render_scene(rng: np.random.Generator, height: int, width: int) -> Rendered:
  """Samples a scene from `rng` and renders it at height x width."""
  half_x, half_z = rng.uniform(4.0, 7.0, 2)
  ceiling = rng.uniform(2.6, 3.4)
  room = (float(half_x), float(ceiling), float(half_z))
  camera = _sample_camera(rng, height, width, half_x, half_z)
  objects = _sample_objects(rng, camera, half_x, half_z)
  light = np.array([np.clip(camera.position[0] + rng.uniform(-3, 3), 0.3 - half_x, half_x - 0.3),
                    ceiling - 0.2,
                    np.clip(camera.position[2] + rng.uniform(-3, 3), 0.3 - half_z, half_z - 0.3)])
  ambient = rng.uniform(0.25, 0.45)

  rays = camera.pixel_rays().reshape(-1, 3)
  ray_len = np.linalg.norm(rays, axis=-1)  # |(x, y, -1)| = distance / z-depth
  d = (rays / ray_len[:, None]) @ camera.rotation.T
  t, normal, surface, semseg, instance, part = _trace(camera.position, d, room, objects)
  points = camera.position + t[:, None] * d
  albedo = _albedo(rng, points, surface, instance, objects)
  shade = ambient + (1 - ambient) * _direct_light(points, normal, light, objects)
  rgb = albedo * shade[:, None] * 255 + rng.normal(0.0, 2.0, albedo.shape)  # + sensor noise
  image = np.clip(np.round(rgb), 0, 255).astype(np.uint8).reshape(height, width, 3)

  shape = (height, width)
  semseg, instance, surface, part = (a.reshape(shape).astype(np.int32)
                                     for a in (semseg, instance, surface, part))
  depth = (t / ray_len).reshape(shape)
  normals = (normal @ camera.rotation).reshape(height, width, 3)  # world -> camera frame
  maps = {
      'image': image,
      'semseg': semseg[..., None].astype(np.uint8),
      'human_parts': part[..., None].astype(np.uint8),
      'sal': (semseg >= SPHERE)[..., None].astype(np.uint8),
      'normals': normals.astype(np.float32),
      'depth': depth[..., None].astype(np.float32),
      'edge': edge_map(semseg, instance, surface, depth)[..., None],
  }
  return Rendered(maps, camera, room, instance, surface)


def render_example(seed: int, split: str, index: int, height: int, width: int) -> Rendered:
  """Example `index` of `split` (deterministic in (seed, split, index, height, width))."""
  return render_scene(example_rng(seed, split, index), height, width)
