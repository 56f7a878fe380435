"""Synthetic non-contrast head CT phantom with known lesion and pose.

A case is ``S`` axial slices (5 mm apart) of ``H x W`` pixels in Hounsfield units, a
binary mask of the acute infarct and the head's pose, all deterministic from
``(seed, index)``. See ``docs/phantom.md`` for what is modelled and what is not.

Geometry
--------
Arrays are ``(S, H, W)``: slice 0 is the most inferior (skull base), the last the most
superior (vertex); rows run anterior (row 0) to posterior; columns run from the
patient's right (column 0) to the patient's left, i.e. the radiological display
convention.

The anatomy is built in *canonical* coordinates: millimetres ``(X, Y, Z)`` about the
head centre, ``X`` along the columns (patient right -> left), ``Y`` along the rows
(anterior -> posterior), ``Z`` up. The mid-sagittal plane ``X = 0`` falls on the image's
vertical centre line ``x = (W - 1) / 2``. The posed image is
``P(q) = C(c + R(theta)^T (q - c - t_px))`` for pixel ``q = (x, y)``, with
``c = ((W - 1) / 2, (H - 1) / 2)`` and ``R(theta) = [[cos, -sin], [sin, cos]]``, and
``PhantomCase.pose`` records ``(theta, t_px)``: the transform of
``sean_jax.models.sampler.warp`` that *aligns* the posed head, i.e.
``warp(P, pose_to_alpha(pose)) == C``. Every structure is an analytic shape evaluated
directly at the posed sampling positions, so posing adds no resampling blur.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["PhantomConfig", "PhantomCase", "generate_case", "LABELS"]

# Codes of ``PhantomCase.labels`` (the dominant tissue of each voxel, before noise).
LABELS = {
    "air": 0, "soft_tissue": 1, "bone": 2, "csf": 3, "grey_matter": 4,
    "white_matter": 5, "deep_grey_matter": 6, "acute_infarct": 7, "old_infarct": 8,
    "calcification": 9, "symmetric_hypodensity": 10, "falx": 11,
}
_L = LABELS

_DEFAULT_FOV_MM = 230.4  # 0.9 mm pixels at 256, 0.45 mm at 512: a head CT field.


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
  """Knobs of the generator. Ranges ``(lo, hi)`` are drawn uniformly per case."""

  size: int = 256  # H = W
  slices: int = 24  # S
  # In-plane pixel size; None means field_of_view_mm / size (0.9 mm at 256), so an
  # adult head (~145 x 180 mm) fills about 75% of the field, as on a real head CT.
  pixel_spacing_mm: float | None = None
  field_of_view_mm: float = _DEFAULT_FOV_MM
  slice_spacing_mm: float = 5.0
  # Height of the central slice above the level of the third ventricle (mm), and the
  # random per-case offset of the stack (mm).
  stack_centre_mm: float = 5.0
  stack_jitter_mm: float = 8.0
  # Pose: uniform rotation in [-max, max] degrees and shifts in [-max, max] * size px.
  max_rotation_deg: float = 15.0
  max_shift_frac: float = 0.10
  # Optional slice-to-slice pose drift (std of a centred random walk per slice).
  slice_drift_deg: float = 0.0
  slice_drift_px: float = 0.0
  # Lesions.
  lesion_free_fraction: float = 0.25
  lesion_contrast_hu: tuple[float, float] = (2.0, 8.0)
  second_lesion_prob: float = 0.25
  # Distractors (never in the mask).
  old_infarct_prob: float = 0.3
  calcification_prob: float = 0.6
  symmetric_hypodensity_prob: float = 0.4
  # Scale of the natural left-right asymmetries of the anatomy (0 = perfectly
  # symmetric anatomy, apart from lesions and distractors).
  asymmetry: float = 1.0
  # Image formation.
  noise_hu: tuple[float, float] = (2.5, 5.0)  # std of the (slightly correlated) noise
  drift_hu: float = 4.0  # peak-to-peak of the smooth scanner drift over the field
  blur_mm: float = 0.6  # Gaussian sigma of the partial-volume blur, in-plane
  # Bookkeeping: the spacing this config derived itself (so dataclasses.replace with a
  # new size or field of view derives it again instead of keeping a stale value).
  _derived_spacing: float | None = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    if self.size < 8 or self.slices < 1:
      raise ValueError(f"PhantomConfig: size {self.size} / slices {self.slices} too small")
    if self.pixel_spacing_mm is None or self.pixel_spacing_mm == self._derived_spacing:
      spacing = self.field_of_view_mm / self.size
      object.__setattr__(self, "pixel_spacing_mm", spacing)
      object.__setattr__(self, "_derived_spacing", spacing)
    else:
      object.__setattr__(self, "_derived_spacing", None)
    if not self.pixel_spacing_mm > 0:
      raise ValueError(f"PhantomConfig: pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")
    if not 0.0 <= self.lesion_free_fraction <= 1.0:
      raise ValueError("PhantomConfig: lesion_free_fraction must lie in [0, 1]")


@dataclasses.dataclass
class PhantomCase:
  case_id: str  # f"phantom_{seed:04d}_{index:05d}"
  ct_hu: np.ndarray  # (S, H, W) float32 HU
  mask: np.ndarray  # (S, H, W) uint8 0/1, acute infarct only
  pose: dict  # {"rotation_deg", "shift_x_px", "shift_y_px"}: aligns the posed head
  spacing_mm: tuple  # (slice, row, col)
  labels: np.ndarray | None = None  # (S, H, W) uint8 codes of LABELS
  slice_poses: list | None = None  # per-slice poses when slice drift is on
  info: dict = dataclasses.field(default_factory=dict)  # drawn parameters

  @property
  def has_lesion(self) -> bool:
    return bool(self.mask.any())


# --------------------------------------------------------------------------- helpers


def _ramp(d, width):
  """Soft occupancy from a signed distance (mm, positive inside)."""
  return np.clip(d * (1.0 / width) + 0.5, 0.0, 1.0)


def _smooth(d, width):
  """Smoothstep occupancy (softer shoulders than the ramp) over +-width/2."""
  t = np.clip(d * (1.0 / width) + 0.5, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _blend(dst, occ, value):
  """In-place alpha compositing ``dst = dst + occ (value - dst)``."""
  dst += occ * (value - dst)


def _f32(x):
  return np.asarray(x, np.float32)


class _Grid:
  """Canonical (X, Y, Z) mm of the output pixels inside a crop around the head.

  Everything is computed on the crop (rows/cols that can hold head), then pasted into
  the full field of air; ``window`` gives index windows relative to the crop.
  """

  def __init__(self, cfg: PhantomConfig, z_mm, angle_rad, shift_x, shift_y, head_semi_mm,
               margin_px):
    n = cfg.size
    self.size, self.sp = n, float(cfg.pixel_spacing_mm)
    self.c = (n - 1) / 2.0
    self.z = np.asarray(z_mm, np.float64)
    self.angle = np.asarray(angle_rad, np.float64)
    self.tx = np.asarray(shift_x, np.float64)
    self.ty = np.asarray(shift_y, np.float64)
    shared = (np.ptp(self.angle) == 0 and np.ptp(self.tx) == 0 and np.ptp(self.ty) == 0)
    self.shared = shared
    # Crop: bounding box of the (rotated, shifted) head ellipse over all slices.
    a, b = head_semi_mm[0] / self.sp, head_semi_mm[1] / self.sp
    cos, sin = np.cos(self.angle), np.sin(self.angle)
    ex, ey = np.hypot(a * cos, b * sin), np.hypot(a * sin, b * cos)
    self.r0 = int(np.clip(np.floor((self.c + self.ty - ey).min() - margin_px), 0, n - 1))
    self.r1 = int(np.clip(np.ceil((self.c + self.ty + ey).max() + margin_px) + 1, self.r0 + 1, n))
    self.c0 = int(np.clip(np.floor((self.c + self.tx - ex).min() - margin_px), 0, n - 1))
    self.c1 = int(np.clip(np.ceil((self.c + self.tx + ex).max() + margin_px) + 1, self.c0 + 1, n))
    self.crop = (slice(None), slice(self.r0, self.r1), slice(self.c0, self.c1))
    self.shape = (len(self.z), self.r1 - self.r0, self.c1 - self.c0)
    k = slice(0, 1) if shared else slice(None)
    cos32 = cos[k][:, None, None].astype(np.float32)
    sin32 = sin[k][:, None, None].astype(np.float32)
    cols = np.arange(self.c0, self.c1, dtype=np.float32) - np.float32(self.c)
    rows = np.arange(self.r0, self.r1, dtype=np.float32) - np.float32(self.c)
    dx = cols[None, None, :] - self.tx[k, None, None].astype(np.float32)
    dy = rows[None, :, None] - self.ty[k, None, None].astype(np.float32)
    sp = np.float32(self.sp)
    # p - c = R^T (q - c - t):  R^T = [[cos, sin], [-sin, cos]].
    self.X = (cos32 * dx + sin32 * dy) * sp  # (1 or S, h, w)
    self.Y = (-sin32 * dx + cos32 * dy) * sp
    self.Z = self.z.astype(np.float32)[:, None, None]  # (S, 1, 1)

  def window(self, xc, yc, radius_mm, z_lo, z_hi):
    """Crop-relative index window (slices, rows, cols) covering a canonical cylinder."""
    s0 = int(np.searchsorted(self.z, z_lo, side="left"))
    s1 = int(np.searchsorted(self.z, z_hi, side="right"))
    if s1 <= s0:
      return None
    k = slice(0, 1) if self.shared else slice(s0, s1)
    cos, sin = np.cos(self.angle[k]), np.sin(self.angle[k])
    px, py = xc / self.sp, yc / self.sp
    qx = self.c + self.tx[k] + cos * px - sin * py - self.c0
    qy = self.c + self.ty[k] + sin * px + cos * py - self.r0
    r = radius_mm / self.sp + 2.0
    h, w = self.shape[1:]
    r0, r1 = int(max(0, math.floor(qy.min() - r))), int(min(h, math.ceil(qy.max() + r) + 1))
    c0, c1 = int(max(0, math.floor(qx.min() - r))), int(min(w, math.ceil(qx.max() + r) + 1))
    if r1 <= r0 or c1 <= c0:
      return None
    return (slice(s0, s1), slice(r0, r1), slice(c0, c1))

  def coords(self, win=None):
    if win is None:
      return self.X, self.Y, self.Z
    s, r, c = win
    sx = slice(None) if self.shared else s
    return self.X[sx, r, c], self.Y[sx, r, c], self.Z[s]


def _ellipsoid_distance(X, Y, Z, centre, semi, yaw_deg=0.0):
  """First-order signed distance (mm, positive inside) to a yawed ellipsoid."""
  u, v, w = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
  if yaw_deg:
    yaw = math.radians(yaw_deg)
    ca, sa = np.float32(math.cos(yaw)), np.float32(math.sin(yaw))
    u, v = ca * u + sa * v, -sa * u + ca * v
  a, b, c = (np.float32(s) for s in semi)
  f = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
  g = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2 + (w / (c * c)) ** 2)
  eps = np.float32(1e-3)
  return (1.0 - f) * (f + eps) / (g + eps / min(a, b, c))


def _sphere_field(rng, n_terms, k):
  """A random field of unit vectors: plane waves of wavenumber ~k (1/radian)."""
  d = rng.normal(size=(n_terms, 3))
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  return {"k": d * k * rng.uniform(0.8, 1.25, size=(n_terms, 1)),
          "phase": rng.uniform(0, 2 * np.pi, n_terms), "amp": rng.uniform(0.6, 1.0, n_terms)}


def _random_field(rng, n_terms, wavelength_mm):
  """Parameters of a smooth random field: sum of random plane waves."""
  k = rng.normal(size=(n_terms, 3))
  k /= np.linalg.norm(k, axis=1, keepdims=True)
  k *= 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4, size=(n_terms, 1)))
  return {"k": k, "phase": rng.uniform(0, 2 * np.pi, n_terms),
          "amp": rng.uniform(0.5, 1.0, n_terms)}


def _eval_field(field, X, Y, Z):
  """Evaluates a random field at (broadcastable) coordinates; std about 1."""
  k, ph, amp = field["k"], field["phase"], field["amp"]
  norm = np.float32(math.sqrt(2.0 / float(np.sum(amp ** 2))))
  out = 0.0
  for i in range(len(ph)):
    out = out + np.float32(amp[i]) * np.cos(
        np.float32(k[i, 0]) * X + np.float32(k[i, 1]) * Y + np.float32(k[i, 2]) * Z
        + np.float32(ph[i]))
  return out * norm


# ------------------------------------------------------------------------ parameters


def _draw_pose(rng, cfg: PhantomConfig):
  s = cfg.slices
  theta = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
  tx, ty = rng.uniform(-cfg.max_shift_frac, cfg.max_shift_frac, size=2) * cfg.size
  drift = rng.normal(size=(3, s))  # always drawn, so toggling drift keeps the pose
  walk = np.cumsum(drift, axis=1)
  walk -= walk.mean(axis=1, keepdims=True)
  angles = theta + cfg.slice_drift_deg * walk[0]
  shift_x = tx + cfg.slice_drift_px * walk[1]
  shift_y = ty + cfg.slice_drift_px * walk[2]
  return float(theta), float(tx), float(ty), angles, shift_x, shift_y


def _draw_anatomy(rng, asym):
  """Per-case anatomy: sizes, thicknesses, tissue HU, natural asymmetries."""
  u = rng.uniform
  p: dict[str, Any] = {}
  scale = u(0.9, 1.05)
  p["AX"] = 72.0 * scale * u(0.95, 1.05)  # outer half-width (mm)
  p["AY"] = 88.0 * scale  # outer half-length
  p["AZ_up"] = u(66.0, 76.0)  # widest level -> vertex
  p["AZ_low"] = u(130.0, 170.0)
  p["Z_wide"] = u(10.0, 22.0)
  p["egg"] = u(0.03, 0.09)  # wider at the back
  p["harm"] = u(-0.02, 0.02, size=3)  # symmetric shape harmonics cos(2..4 phi)
  p["asym_shape"] = asym * u(-0.012, 0.012, size=2)  # sin(phi), sin(2phi)
  p["scalp"] = u(3.5, 6.5)
  p["skull"] = u(5.0, 7.5)
  p["skull_var"] = u(0.15, 0.35)  # thicker front/back, thinner temporal
  p["skull_asym"] = asym * u(-0.06, 0.06)
  p["gap"] = u(0.6, 2.5)  # subarachnoid CSF over the convexity (atrophy)
  p["cortex"] = u(2.8, 4.0)
  p["sulcus_w"] = u(1.0, 2.6)
  # Gyral pattern: sulci are the zero set of a random field of the direction from
  # the head centre (so in a lateral cut they run radially, at the vertex they meander).
  p["sulcus_k"] = u(17.0, 23.0)
  p["sulcus_field"] = _sphere_field(rng, 10, p["sulcus_k"])
  p["sulcus_depth_field"] = _sphere_field(rng, 4, 4.0)
  p["sulcus_asym_field"] = _sphere_field(rng, 6, p["sulcus_k"])
  p["sulcus_asym"] = asym * u(0.2, 0.45)
  p["fissure_w"] = u(1.0, 3.0)
  p["sylvian_w"] = u(2.0, 5.0)
  p["sylvian_phi"] = u(78.0, 92.0)
  p["sylvian_depth"] = u(16.0, 24.0)
  p["vent"] = u(0.75, 1.45)  # ventricle size
  p["vent_asym"] = asym * u(-0.12, 0.12)
  p["bg_shift"] = u(-2.0, 2.0, size=3)
  # Tissue HU.
  p["cupping_hu"] = u(0.5, 3.0)  # beam hardening: brighter next to the skull
  p["wm"] = u(24.0, 30.0)
  p["gm"] = float(np.clip(p["wm"] + u(9.0, 13.0), 35.0, 45.0 - p["cupping_hu"]))
  p["deep"] = float(np.clip(p["gm"] - u(0.0, 3.0), 33.0, 45.0))
  p["csf"] = u(3.0, 10.0)
  p["scalp_hu"] = u(25.0, 50.0)
  p["table_hu"] = u(1150.0, 1500.0)
  p["diploe_hu"] = u(700.0, 950.0)
  p["falx_hu"] = p["gm"] + u(15.0, 30.0)
  p["sinus_air"] = u(0.6, 1.2)
  p["floor_plate"] = u(4.0, 7.0)
  return p


_TERRITORIES = ("mca", "mca", "mca", "lacune", "lacune", "pca", "aca")


def _draw_lesions(rng, cfg: PhantomConfig, z_range):
  u = rng.uniform
  free = rng.random() < cfg.lesion_free_fraction
  side = 1.0 if rng.random() < 0.5 else -1.0  # +1: patient left (image right)
  n = 1 + int(rng.random() < cfg.second_lesion_prob)
  lesions = []
  for _ in range(n):
    kind = _TERRITORIES[int(rng.integers(len(_TERRITORIES)))]
    les: dict[str, Any] = {"kind": kind, "side": side,
                           "contrast": u(*cfg.lesion_contrast_hu),
                           "field": _random_field(rng, 4, 30.0),
                           "rough": u(0.1, 0.3)}
    if kind == "lacune":
      les["centre"] = (side * u(12.0, 26.0), u(-12.0, 16.0), u(-8.0, 12.0))
      les["semi"] = (u(2.5, 7.0), u(2.5, 7.0), u(3.0, 9.0))
      les["yaw"] = u(-30, 30)
      les["edge"] = u(1.5, 3.0)
      zc_lo, zc_hi = -8.0, 12.0
    else:
      if kind == "mca":
        les["phi"], les["half_phi"] = u(55.0, 125.0), u(12.0, 40.0)
        zc_lo, zc_hi = -15.0, 40.0
        les["depth"] = u(15.0, 45.0)
      elif kind == "pca":
        les["phi"], les["half_phi"] = u(140.0, 168.0), u(8.0, 22.0)
        zc_lo, zc_hi = -20.0, 20.0
        les["depth"] = u(12.0, 30.0)
      else:  # aca: medial frontal, high
        les["phi"], les["half_phi"] = u(10.0, 35.0), u(6.0, 15.0)
        zc_lo, zc_hi = 15.0, 55.0
        les["depth"] = u(10.0, 25.0)
      les["half_z"] = u(7.0, 22.0)
      les["soft"] = u(0.2, 0.45)  # soft edge width in normalised units
    lo, hi = max(zc_lo, z_range[0]), min(zc_hi, z_range[1])
    les["zc"] = u(lo, hi) if lo < hi else float(np.clip((zc_lo + zc_hi) / 2, *z_range))
    if kind == "lacune":
      les["centre"] = (les["centre"][0], les["centre"][1], les["zc"])
    lesions.append(les)
  return (not free), side, lesions


def _draw_distractors(rng, cfg: PhantomConfig, z_range):
  u = rng.uniform
  out: dict[str, Any] = {"old": None, "calc": [], "sym": None}
  if rng.random() < cfg.old_infarct_prob:
    side = 1.0 if rng.random() < 0.5 else -1.0
    if rng.random() < 0.5:
      out["old"] = {"kind": "lacune", "side": side,
                    "centre": (side * u(12.0, 26.0), u(-12.0, 16.0),
                               float(np.clip(u(-8.0, 14.0), *z_range))),
                    "semi": (u(2.0, 5.0), u(2.0, 5.0), u(2.5, 6.0)), "yaw": u(-30, 30)}
    else:
      out["old"] = {"kind": "cortical", "side": side, "phi": u(30.0, 160.0),
                    "half_phi": u(5.0, 14.0), "depth": u(8.0, 25.0),
                    "zc": float(np.clip(u(-10.0, 40.0), *z_range)), "half_z": u(5.0, 12.0)}
    out["old"]["hu_above_csf"] = u(2.0, 8.0)
  if rng.random() < cfg.calcification_prob:
    # Physiological, roughly symmetric: pineal (midline), choroid plexus (both atria).
    if rng.random() < 0.7:
      out["calc"].append({"centre": (0.0, u(18.0, 24.0), u(0.0, 6.0)),
                          "r": u(2.0, 3.5), "hu": u(150.0, 400.0)})
    if rng.random() < 0.5:
      y, z, r, hu = u(25.0, 32.0), u(4.0, 12.0), u(1.8, 3.5), u(120.0, 300.0)
      for s in (-1.0, 1.0):
        out["calc"].append({"centre": (s * u(16.0, 20.0), y, z),
                            "r": r * u(0.85, 1.15), "hu": hu * u(0.8, 1.2)})
  if rng.random() < 0.25:  # a unilateral vascular / basal ganglia calcification
    s = 1.0 if rng.random() < 0.5 else -1.0
    out["calc"].append({"centre": (s * u(14.0, 26.0), u(-10.0, 12.0), u(-6.0, 10.0)),
                        "r": u(1.0, 2.5), "hu": u(100.0, 300.0)})
  if rng.random() < cfg.symmetric_hypodensity_prob:
    if rng.random() < 0.6:
      out["sym"] = {"kind": "periventricular", "contrast": u(3.0, 8.0), "scale": u(0.8, 1.4)}
    else:
      blobs = []
      for _ in range(int(rng.integers(1, 3))):
        blobs.append({"centre": (u(15.0, 35.0), u(-40.0, 40.0), u(-5.0, 45.0)),
                      "semi": (u(3.0, 9.0), u(3.0, 9.0), u(4.0, 10.0)),
                      "jitter": u(0.9, 1.1, size=3)})
      out["sym"] = {"kind": "mirrored", "contrast": u(2.0, 8.0), "blobs": blobs}
  return out


# ------------------------------------------------------------------------- the case


def generate_case(seed: int, index: int, config: PhantomConfig = PhantomConfig()) -> PhantomCase:
  """Generates one phantom case, deterministic from ``(seed, index, config)``."""
  cfg = config
  seed, index = int(seed), int(index)
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
  rng_pose = np.random.default_rng([seed, index, 0])
  rng_anat = np.random.default_rng([seed, index, 1])
  rng_les = np.random.default_rng([seed, index, 2])
  rng_dis = np.random.default_rng([seed, index, 3])
  rng_img = np.random.default_rng([seed, index, 4])

  S, N, sp = cfg.slices, cfg.size, float(cfg.pixel_spacing_mm)
  theta, tx, ty, angles, shift_x, shift_y = _draw_pose(rng_pose, cfg)
  z0 = cfg.stack_centre_mm + rng_pose.uniform(-1, 1) * cfg.stack_jitter_mm
  z_mm = z0 + (np.arange(S) - (S - 1) / 2.0) * cfg.slice_spacing_mm
  z_range = (float(z_mm[0]), float(z_mm[-1]))
  A = _draw_anatomy(rng_anat, cfg.asymmetry)
  has_lesion, lesion_side, lesions = _draw_lesions(rng_les, cfg, z_range)
  dis = _draw_distractors(rng_dis, cfg, z_range)

  bound = 1.0 + float(np.abs(A["harm"]).sum() + np.abs(A["asym_shape"]).sum())
  head_semi = (A["AX"] * (1.0 + A["egg"]) * bound + 1.0, A["AY"] * bound + 1.0)
  grid = _Grid(cfg, z_mm, np.radians(angles), shift_x, shift_y, head_semi,
               margin_px=4.0 + 3.0 * cfg.blur_mm / sp)
  X, Y, Z = grid.coords()
  shape = grid.shape  # the crop; pasted into the full (S, N, N) field at the end
  aa = max(sp, 0.5)  # anti-aliasing edge width of sharp boundaries (mm)

  # ---- head outline: 3D implicit surface, first-order distance -------------------
  r2d = np.sqrt(X * X + Y * Y)
  phi = np.arctan2(X, -Y)  # 0 anterior, +pi/2 patient left, +-pi posterior
  aphi = np.abs(phi)
  cphi = np.cos(phi)
  shape_mod = (1.0 + A["harm"][0] * np.cos(2 * phi) + A["harm"][1] * np.cos(3 * phi)
               + A["harm"][2] * np.cos(4 * phi) + A["asym_shape"][0] * np.sin(phi)
               + A["asym_shape"][1] * np.sin(2 * phi))
  ax = _f32(A["AX"]) * (1.0 - _f32(A["egg"]) * cphi) * shape_mod
  ay = _f32(A["AY"]) * shape_mod
  zu = (Z - _f32(A["Z_wide"]))
  az = np.where(zu > 0, _f32(A["AZ_up"]), _f32(A["AZ_low"])).astype(np.float32)
  F = np.sqrt((X / ax) ** 2 + (Y / ay) ** 2 + (zu / az) ** 2)
  G = np.sqrt((X / (ax * ax)) ** 2 + (Y / (ay * ay)) ** 2 + (zu / (az * az)) ** 2)
  d_head = (1.0 - F) * (F + 1e-3) / (G + 1e-3 / 60.0)  # mm inside the outer scalp

  skull_t = _f32(A["skull"]) * (1.0 + _f32(A["skull_var"]) * np.cos(2 * phi)
                                + _f32(A["skull_asym"]) * np.sin(phi))
  skull_t = skull_t + np.clip(-Z - 20.0, 0, None) * 0.08  # thicker towards the base
  d_inner = d_head - _f32(A["scalp"]) - skull_t  # mm inside the inner table
  # Skull base: brain only above a floor made of fossae (anterior, middle, posterior).
  z_floor = _skull_floor(X, Y)
  dz = Z - z_floor  # > 0 above the floor
  db_conv = d_inner - _f32(A["gap"])  # depth below the convexity's brain surface (mm)
  db = np.minimum(db_conv, dz * 0.8)  # depth below the nearest brain surface (mm)

  # ---- extracranial layers ---------------------------------------------------------
  ct = np.full(shape, -1000.0, np.float32)
  labels = np.zeros(shape, np.uint8)
  occ = _ramp(d_head, aa)
  _blend(ct, occ, _f32(A["scalp_hu"]))
  labels[occ > 0.5] = _L["soft_tissue"]
  u_bone = np.clip((d_head - _f32(A["scalp"])) / skull_t, 0.0, 1.0)
  bone_hu = (_f32(A["table_hu"])
             - _f32(A["table_hu"] - A["diploe_hu"]) * np.sin(np.pi * u_bone) ** 2)
  occ = _ramp(d_head - _f32(A["scalp"]), aa)
  _blend(ct, occ, bone_hu)
  labels[occ > 0.5] = _L["bone"]
  del u_bone, bone_hu
  # Skull base below the floor: cancellous bone with air cells and orbits.
  base = _ramp(d_inner, aa) * _ramp(-dz, 2.0)
  base_hu = _skull_base_hu(grid, A, dz)
  intracranial = _ramp(d_inner, aa) * _ramp(dz, 2.0)

  # ---- brain tissue ------------------------------------------------------------------
  brain = _ramp(db, aa) * intracranial  # occupancy of brain (vs CSF) inside the skull
  # Sulci: zero set of a random field on the direction from the head centre; depth
  # measured from the convexity (the inner table), not from the cranial floor.
  # Evaluated only in the cortical shell (the random fields are the costly part).
  shell = (db_conv < 24.0) & (d_inner > -1.0) & (dz > -3.0)
  ds = np.full(shape, 1e3, np.float32)  # mm to the nearest sulcus plane
  sd = np.zeros(shape, np.float32)  # depth of that sulcus (mm)
  if shell.any():
    def pick(a):
      return np.broadcast_to(a, shape)[shell]
    Xs, Ys, zs = pick(X), pick(Y), pick(zu)
    inv = 1.0 / (F[shell] + 1e-3)
    nx, ny, nz = Xs / pick(ax) * inv, Ys / pick(ay) * inv, zs / pick(az) * inv
    r_surf = np.sqrt(Xs * Xs + Ys * Ys + zs * zs) * inv  # local radius of the convexity
    gf = _eval_field(A["sulcus_field"], np.abs(nx), ny, nz)
    gf = gf + _f32(A["sulcus_asym"]) * _eval_field(A["sulcus_asym_field"], nx, ny, nz)
    ds[shell] = np.abs(gf) * r_surf * _f32(1.0 / (0.75 * A["sulcus_k"]))
    sd[shell] = np.clip(12.0 + 5.0 * _eval_field(A["sulcus_depth_field"], np.abs(nx), ny, nz),
                        4.0, 22.0)
    del Xs, Ys, zs, inv, nx, ny, nz, r_surf, gf
  del F, G, shell

  # Acute lesions, as a soft occupancy (also narrows sulci: swelling).
  les_occ = np.zeros(shape, np.float32)
  les_drop = np.zeros(shape, np.float32)
  if has_lesion:
    for les in lesions:
      o = _lesion_occupancy(les, grid, X, Y, Z, aphi, phi, db_conv)
      if o is None:
        continue
      win, occ_l, het = o
      les_occ[win] = np.maximum(les_occ[win], occ_l)
      drop = np.minimum(occ_l * _f32(les["contrast"]) * np.clip(het, 0.8, 1.2),
                        _f32(cfg.lesion_contrast_hu[1]))
      les_drop[win] = np.maximum(les_drop[win], drop)

  half_w = (_f32(A["sulcus_w"] / 2) * (1.0 + 1.2 * np.exp(-np.maximum(db_conv, 0) / 2.5))
            * (1.0 - 0.6 * les_occ))  # wider at the surface, narrowed by swelling
  sulcus_d = np.maximum(ds - half_w, 0.0)
  fundus = np.sqrt(sulcus_d ** 2 + np.maximum(db_conv - sd, 0.0) ** 2)
  cortical_dist = np.minimum(np.maximum(db, 0.0), fundus)  # distance to the pial surface
  sulcus_occ = _ramp(half_w - ds, aa) * _ramp(sd - db_conv, aa)
  del ds, sd, sulcus_d, fundus
  # Sylvian fissure at mid levels: a lateral cleft curving forward as it deepens, and
  # the thin insular cistern along the insula at its bottom; lined by cortex.
  syl_phi = np.radians(_f32(A["sylvian_phi"]))
  syl_depth = _f32(A["sylvian_depth"])
  zs = np.flatnonzero(np.abs(grid.z + 2.0) < 21.0)  # slices where the fissure shows
  if zs.size:
    k = slice(int(zs[0]), int(zs[-1]) + 1)
    kx = slice(None) if grid.shared else k
    syl_z = _smooth(16.0 - np.abs(Z[k] + 2.0), 10.0)
    dbk, aphk = db_conv[k], aphi[kx]
    r_safe = np.maximum(r2d[kx], 1.0)
    syl_ds = np.abs(aphk - syl_phi + 0.012 * np.maximum(dbk, 0.0)) * r_safe
    syl_half = _f32(A["sylvian_w"] / 2) * (0.6 + np.exp(-np.maximum(dbk, 0) / 4.0))
    syl_dist = np.sqrt(np.maximum(syl_ds - syl_half, 0) ** 2
                       + np.maximum(dbk - syl_depth, 0) ** 2)
    ins_dist = np.sqrt(np.maximum(np.abs(dbk - syl_depth) - 1.0, 0) ** 2
                       + np.maximum(np.abs(aphk - syl_phi + 0.012 * syl_depth + 0.05) * r_safe
                                    - 14.0, 0) ** 2)
    syl_dist = np.minimum(syl_dist, ins_dist)
    cortical_dist[k] = np.where(syl_z > 0.5, np.minimum(cortical_dist[k], syl_dist),
                                cortical_dist[k])
    sulcus_occ[k] = np.maximum(sulcus_occ[k], _ramp(-syl_dist, aa) * syl_z)
    del syl_ds, syl_dist, syl_half, ins_dist, r_safe, dbk, aphk

  tissue = np.full(shape, _f32(A["wm"]), np.float32)
  gm_occ = _smooth(_f32(A["cortex"]) - cortical_dist, 1.5)
  _blend(tissue, gm_occ, _f32(A["gm"]))
  tis_label = np.where(gm_occ > 0.5, _L["grey_matter"], _L["white_matter"]).astype(np.uint8)
  del gm_occ, cortical_dist
  # Beam hardening: tissue next to the inner table a little brighter.
  tissue += _f32(A["cupping_hu"]) * np.exp(-np.clip(db, 0, None) / 8.0)

  # Deep grey matter: caudate heads, lentiform nuclei, thalami (mirrored pairs).
  vs, va = A["vent"], A["vent_asym"]
  bx, by, bz = A["bg_shift"]
  deep = [((14.0 + 0.2 * vs, -12.0 + by, 8.0 + bz), (4.5, 8.0, 9.0), -10.0),
          ((23.0 + bx, -2.0 + by, 0.0 + bz), (6.5, 14.0, 10.0), 18.0),
          ((9.0, 12.0 + by, 1.0 + bz), (7.0, 10.0, 9.0), 8.0)]
  for (cx, cy, cz), semi, yaw in deep:
    for s in (-1.0, 1.0):
      win = grid.window(s * cx, cy, max(semi[:2]) + 3, cz - semi[2] - 3, cz + semi[2] + 3)
      if win is None:
        continue
      Xw, Yw, Zw = grid.coords(win)
      o = _smooth(_ellipsoid_distance(Xw, Yw, Zw, (s * cx, cy, cz), semi, s * yaw), 2.0)
      _blend(tissue[win], o, _f32(A["deep"]))
      tis_label[win][o > 0.5] = _L["deep_grey_matter"]

  # Symmetric hypodensities (distractor): bilateral, mirror images of each other.
  sym_occ = np.zeros(shape, np.float32)
  if dis["sym"] is not None:
    sym_items = []
    if dis["sym"]["kind"] == "periventricular":
      k = dis["sym"]["scale"] * vs
      for s in (-1.0, 1.0):
        sym_items.append(((s * 13.0 * k, -30.0 * k, 12.0), (7.0 * k, 8.0 * k, 9.0), s * 25.0))
        sym_items.append(((s * 20.0 * k, 38.0 * k, 8.0), (8.0 * k, 9.0 * k, 10.0), -s * 25.0))
    else:
      for b in dis["sym"]["blobs"]:
        for s, j in ((-1.0, 1.0), (1.0, b["jitter"])):
          sym_items.append(((s * b["centre"][0], b["centre"][1], b["centre"][2]),
                            tuple(np.asarray(b["semi"]) * j), 0.0))
    for centre, semi, yaw in sym_items:
      win = grid.window(centre[0], centre[1], max(semi[:2]) + 4, centre[2] - semi[2] - 4,
                        centre[2] + semi[2] + 4)
      if win is None:
        continue
      Xw, Yw, Zw = grid.coords(win)
      o = _smooth(_ellipsoid_distance(Xw, Yw, Zw, centre, semi, yaw), 4.0)
      sym_occ[win] = np.maximum(sym_occ[win], o)
    tissue -= sym_occ * _f32(dis["sym"]["contrast"])
    tis_label[(sym_occ > 0.5) & (tis_label == _L["white_matter"])] = _L["symmetric_hypodensity"]

  # Acute infarct: hypodensity relative to the surrounding tissue.
  tissue -= les_drop
  del les_drop

  # Old infarct (distractor): sharply bounded, near CSF density.
  old_occ = np.zeros(shape, np.float32)
  if dis["old"] is not None:
    old = dis["old"]
    if old["kind"] == "lacune":
      c = old["centre"]
      win = grid.window(c[0], c[1], max(old["semi"][:2]) + 2, c[2] - old["semi"][2] - 2,
                        c[2] + old["semi"][2] + 2)
      if win is not None:
        Xw, Yw, Zw = grid.coords(win)
        old_occ[win] = _ramp(_ellipsoid_distance(Xw, Yw, Zw, c, old["semi"], old["yaw"]), aa)
    else:
      q = _wedge_q(aphi, phi, db_conv, Z, old["side"], old["phi"], old["half_phi"],
                   old["depth"], old["zc"], old["half_z"])
      old_occ = _ramp((1.0 - q) * 6.0, aa)  # ~ 1 mm edge: sharp
    _blend(tissue, old_occ, _f32(A["csf"] + old["hu_above_csf"]))

  # ---- CSF spaces -----------------------------------------------------------------
  csf_occ = sulcus_occ
  # Interhemispheric fissure except where the corpus callosum / deep nuclei bridge.
  bridge = np.maximum(
      _smooth(30.0 - np.abs(Y - 3.0), 6.0) * _smooth(24.0 - Z, 6.0) * _smooth(Z + 25.0, 6.0),
      _smooth(Y + 15.0, 6.0) * _smooth(-20.0 - Z, 6.0))  # posterior fossa: vermis
  fiss = _ramp(_f32(A["fissure_w"] / 2) - np.abs(X), aa) * (1.0 - bridge)
  csf_occ = np.maximum(csf_occ, fiss)
  # Lateral ventricles (frontal horns, bodies, atria with occipital horns), third and
  # fourth ventricles.
  vents = []
  for s in (-1.0, 1.0):
    f = vs * (1.0 + s * va)
    vents += [((s * (7.0 + 1.5 * f), -17.0, 10.0), (3.5 * f, 13.0, 8.0 * f ** 0.5), s * 18.0),
              ((s * (27.0 + f), -4.0, -14.0), (2.0 * f, 10.0, 4.0), s * 12.0),  # temporal horn
              ((s * (9.0 + 2.0 * f), 6.0, 20.0), (4.0 * f, 20.0, 6.0 * f ** 0.5), s * -8.0),
              ((s * (17.0 + 2.0 * f), 28.0, 10.0), (4.0 * f, 8.0 + 2 * f, 9.0), s * -25.0),
              ((s * (20.0 + 1.5 * f), 40.0, 6.0), (2.5 * f, 9.0 * f, 5.0), s * -20.0)]
  vents += [((0.0, 0.0, 0.0), (1.2 * vs + 0.6, 11.0, 9.0), 0.0),
            ((0.0, 30.0, -45.0), (3.5, 3.0, 9.0), 0.0),  # fourth ventricle
            ((0.0, -10.0, -16.0), (9.0, 6.0, 5.0), 0.0),  # suprasellar cistern
            ((0.0, 26.0, -8.0), (6.0, 5.0, 6.0), 0.0)]  # quadrigeminal cistern
  vent_occ = np.zeros(shape, np.float32)
  for centre, semi, yaw in vents:
    win = grid.window(centre[0], centre[1], max(semi[:2]) + 2, centre[2] - semi[2] - 2,
                      centre[2] + semi[2] + 2)
    if win is None:
      continue
    Xw, Yw, Zw = grid.coords(win)
    vent_occ[win] = np.maximum(vent_occ[win],
                               _ramp(_ellipsoid_distance(Xw, Yw, Zw, centre, semi, yaw), aa))
  # Perimesencephalic (ambient) cistern: a CSF ring around the midbrain.
  win = grid.window(0.0, 9.0, 20.0, -34.0, -4.0)
  if win is not None:
    Xw, Yw, Zw = grid.coords(win)
    ring = (_ramp(_ellipsoid_distance(Xw, Yw, Zw, (0.0, 9.0, -18.0), (15.5, 14.0, 11.0)), aa)
            * (1.0 - _ramp(_ellipsoid_distance(Xw, Yw, Zw, (0.0, 8.0, -18.0),
                                               (12.5 / max(vs, 1.0) ** 0.3, 10.5, 16.0)), aa)))
    vent_occ[win] = np.maximum(vent_occ[win], ring)
  csf_occ = np.maximum(csf_occ, vent_occ)
  # CSF replaces tissue (and with it any lesion or distractor hypodensity).
  brain_hu = tissue + csf_occ * (_f32(A["csf"]) - tissue)
  tis_label[csf_occ > 0.5] = _L["csf"]
  tis_label[(old_occ > 0.5) & (csf_occ <= 0.5)] = _L["old_infarct"]

  # ---- compose the intracranial content ------------------------------------------
  intra_hu = _f32(A["csf"]) + brain * (brain_hu - _f32(A["csf"]))
  _blend(ct, intracranial, intra_hu)
  _blend(ct, base, base_hu)
  inside = intracranial > 0.5
  labels[inside] = np.where(brain[inside] > 0.5, tis_label[inside], _L["csf"])
  del brain_hu, intra_hu, tissue
  # Falx: a thin slightly dense sheet in the fissure; superior sagittal sinus.
  falx = _ramp(_f32(0.7) - np.abs(X), aa) * fiss * intracranial
  _blend(ct, falx * 0.9, _f32(A["falx_hu"]))
  labels[(falx > 0.5)] = _L["falx"]
  sss = _ramp(4.0 - np.abs(X) - 0.8 * np.maximum(d_inner, 0), aa) * _ramp(d_inner + 0.5, aa)
  sss = sss * _smooth(np.abs(Y) - 20.0, 10.0) * _ramp(Z + 5.0, 5.0)
  _blend(ct, sss, _f32(A["falx_hu"] - 5.0))
  # Calcifications (distractor).
  calc_occ = np.zeros(shape, np.float32)
  for cal in dis["calc"]:
    c, r = cal["centre"], cal["r"]
    win = grid.window(c[0], c[1], r + 2, c[2] - r - 2, c[2] + r + 2)
    if win is None:
      continue
    Xw, Yw, Zw = grid.coords(win)
    o = _ramp(_ellipsoid_distance(Xw, Yw, Zw, c, (r, r, r), 0.0), aa) * intracranial[win]
    _blend(ct[win], o, _f32(cal["hu"]))
    calc_occ[win] = np.maximum(calc_occ[win], o)
    labels[win][o > 0.5] = _L["calcification"]

  # ---- the acute infarct mask ---------------------------------------------------
  tissue_here = ((brain > 0.5) & (intracranial > 0.5) & (csf_occ <= 0.5)
                 & (old_occ <= 0.5) & (calc_occ <= 0.5) & (falx <= 0.5) & (sss <= 0.5))
  mask = ((les_occ > 0.5) & tissue_here).astype(np.uint8)
  labels[mask.astype(bool)] = _L["acute_infarct"]
  del brain, csf_occ, old_occ, calc_occ, les_occ, intracranial, base, falx, sss

  # ---- image formation: blur, smooth drift, noise ---------------------------------
  sig = cfg.blur_mm / sp
  if sig > 0.05:
    ct = ndimage.gaussian_filter(ct, sigma=(0.0, sig, sig), mode="nearest", truncate=3.0)
  full = (S, N, N)
  ct_full = np.full(full, -1000.0, np.float32)
  ct_full[grid.crop] = ct
  ct = ct_full
  labels_full = np.zeros(full, np.uint8)
  labels_full[grid.crop] = labels
  mask_full = np.zeros(full, np.uint8)
  mask_full[grid.crop] = mask
  labels, mask, shape = labels_full, mask_full, full
  drift = _scanner_drift(rng_img, cfg, S, N)
  ct += drift
  noise_sd = float(rng_img.uniform(*cfg.noise_hu)) if cfg.noise_hu[1] > 0 else 0.0
  if noise_sd > 0:
    noise = rng_img.standard_normal(shape, dtype=np.float32)
    nsig = max(0.6 * 0.9 / sp, 0.0)  # correlated like reconstructed CT noise
    if nsig > 0.2:
      noise = ndimage.gaussian_filter(noise, sigma=(0.0, nsig, nsig), mode="wrap", truncate=3.0)
      noise *= np.float32(1.0 / max(float(noise.std()), 1e-6))
    ct += noise * np.float32(noise_sd)
  np.clip(ct, -1024.0, 3071.0, out=ct)

  pose = {"rotation_deg": theta, "shift_x_px": tx, "shift_y_px": ty}
  slice_poses = None
  if cfg.slice_drift_deg or cfg.slice_drift_px:
    slice_poses = [{"rotation_deg": float(a), "shift_x_px": float(x), "shift_y_px": float(y)}
                   for a, x, y in zip(angles, shift_x, shift_y)]
  info = {"lesion_planned": has_lesion, "lesion_side": lesion_side if has_lesion else 0.0,
          "lesions": ([{k: v for k, v in les.items() if k != "field"} for les in lesions]
                      if has_lesion else []),
          "old_infarct": dis["old"], "calcifications": dis["calc"],
          "symmetric_hypodensity": (dis["sym"] or {}).get("kind"),
          "z_mm": [float(z) for z in z_mm], "noise_sd_hu": noise_sd,
          "crop": (grid.r0, grid.r1, grid.c0, grid.c1),
          "tissue_hu": {k: float(A[k]) for k in ("wm", "gm", "deep", "csf", "scalp_hu")}}
  return PhantomCase(case_id=f"phantom_{seed:04d}_{index:05d}", ct_hu=ct,
                     mask=mask, pose=pose,
                     spacing_mm=(float(cfg.slice_spacing_mm), sp, sp), labels=labels,
                     slice_poses=slice_poses, info=info)


# ------------------------------------------------------------------ sub-components


def _skull_floor(X, Y):
  """Height (mm) of the cranial floor: anterior, middle and posterior fossae."""
  floor = np.full(np.broadcast_shapes(X.shape, Y.shape), -20.0, np.float32)
  basins = [((0.0, 42.0), (56.0, 38.0), -80.0),  # posterior fossa (cerebellum)
            ((0.0, 12.0), (15.0, 18.0), -80.0),  # brainstem / foramen magnum
            ((36.0, -6.0), (22.0, 30.0), -52.0),  # middle fossae (temporal lobes)
            ((-36.0, -6.0), (22.0, 30.0), -52.0),
            ((0.0, -48.0), (50.0, 40.0), -34.0)]  # anterior fossa (orbital roofs)
  for (cx, cy), (a, b), depth in basins:
    rho2 = ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2
    bowl = -20.0 + (depth + 20.0) * np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
    floor = np.minimum(floor, bowl)
  return floor


def _skull_base_hu(grid, A, dz):
  """HU below the cranial floor: the floor plate, petrous bones, clivus, sinuses, orbits."""
  hu = np.where(dz > -_f32(A["floor_plate"]), _f32(A["table_hu"]) * 0.85, _f32(40.0))
  hu = np.broadcast_to(hu, dz.shape).astype(np.float32)

  def put(centre, semi, value, yaw=0.0, edge=1.0):
    win = grid.window(centre[0], centre[1], max(semi[:2]) + 2, centre[2] - semi[2] - 2,
                      centre[2] + semi[2] + 2)
    if win is None:
      return
    Xw, Yw, Zw = grid.coords(win)
    _blend(hu[win], _ramp(_ellipsoid_distance(Xw, Yw, Zw, centre, semi, yaw), edge),
           np.float32(value))

  air = A["sinus_air"]
  for s in (-1.0, 1.0):
    put((s * 32.0, 6.0, -44.0), (8.0, 26.0, 9.0), A["table_hu"] * 1.05, -s * 45.0)  # petrous
    put((s * 44.0, 20.0, -50.0), (7.0 * air, 9.0 * air, 8.0 * air), -500.0)  # mastoid cells
    put((s * 32.0, -60.0, -44.0), (15.0, 18.0, 13.0), -80.0)  # orbit fat
    put((s * 32.0, -64.0, -44.0), (11.0, 11.0, 11.0), 15.0)  # globe
  put((0.0, -6.0, -50.0), (7.0, 9.0, 16.0), A["table_hu"] * 0.8)  # clivus
  put((0.0, -26.0, -42.0), (13.0 * air, 11.0 * air, 11.0 * air), -950.0)  # sphenoid sinus
  put((0.0, -60.0, -40.0), (9.0 * air, 9.0, 13.0), -900.0)  # ethmoid cells
  return hu


def _wedge_q(aphi, phi, db, Z, side, phi_c, half_phi, depth, zc, half_z):
  """Normalised radius (<1 inside) of a vascular-territory wedge on one side."""
  same_side = (np.sign(phi) == side) | (phi == 0)
  dphi = (aphi - np.radians(np.float32(phi_c))) / np.radians(np.float32(half_phi))
  dd = (db - np.float32(depth / 2 - 2.0)) / np.float32(depth / 2 + 2.0)
  dzz = (Z - np.float32(zc)) / np.float32(half_z)
  q = (np.abs(dphi) ** 3 + np.abs(dd) ** 3 + np.abs(dzz) ** 3) ** (1.0 / 3.0)
  return np.where(same_side, q, np.float32(9.0))


def _lesion_occupancy(les, grid, X, Y, Z, aphi, phi, db):
  """(window, soft occupancy, heterogeneity) of one acute lesion, or None."""
  if les["kind"] == "lacune":
    c, semi = les["centre"], les["semi"]
    m = les["edge"] + 2
    win = grid.window(c[0], c[1], max(semi[:2]) + m, c[2] - semi[2] - m, c[2] + semi[2] + m)
    if win is None:
      return None
    Xw, Yw, Zw = grid.coords(win)
    d = _ellipsoid_distance(Xw, Yw, Zw, c, semi, les["yaw"])
    d = d + _f32(les["rough"] * min(semi)) * _eval_field(les["field"], Xw, Yw, Zw)
    occ = _smooth(d, les["edge"])
  else:
    z_lo, z_hi = les["zc"] - les["half_z"] - 5, les["zc"] + les["half_z"] + 5
    s0 = int(np.searchsorted(grid.z, z_lo, side="left"))
    s1 = int(np.searchsorted(grid.z, z_hi, side="right"))
    if s1 <= s0:
      return None
    win = (slice(s0, s1), slice(None), slice(None))
    sx = slice(None) if grid.shared else win[0]
    Xw, Yw, Zw = X[sx], Y[sx], Z[win[0]]
    q = _wedge_q(aphi[sx], phi[sx], db[win], Zw, les["side"], les["phi"], les["half_phi"],
                 les["depth"], les["zc"], les["half_z"])
    near = q < 1.0 + 0.5 * les["soft"] + 2.5 * les["rough"]  # the rest stays outside
    Xn, Yn, Zn = (np.broadcast_to(a, q.shape)[near] for a in (Xw, Yw, Zw))
    qn = q[near] * (1.0 + _f32(les["rough"]) * _eval_field(les["field"], Xn, Yn, Zn))
    occ = np.zeros(q.shape, np.float32)
    occ[near] = _smooth(1.0 - qn, les["soft"])
    het = np.ones(q.shape, np.float32)
    het[near] = 1.0 + 0.2 * _eval_field(les["field"], Yn * 1.7, Zn, Xn * 1.3)
    return win, occ, het
  het = 1.0 + 0.2 * _eval_field(les["field"], Yw * 1.7, Zw, Xw * 1.3)
  return win, occ.astype(np.float32), het.astype(np.float32)


def _scanner_drift(rng, cfg, S, N):
  """Smooth low-frequency intensity drift over the field (HU), in image space."""
  t = np.linspace(-1.0, 1.0, N, dtype=np.float32)
  xn, yn = t[None, None, :], t[None, :, None]
  zn = np.linspace(-1.0, 1.0, S, dtype=np.float32)[:, None, None]
  c = rng.normal(size=7).astype(np.float32)
  f = (c[0] * xn + c[1] * yn + c[2] * (xn * xn - 0.33) + c[3] * xn * yn
       + c[4] * (yn * yn - 0.33) + c[5] * np.sin(2.3 * xn + c[6]) * zn)
  amp = float(np.ptp(f)) if np.ptp(f) > 0 else 1.0
  return (f * np.float32(cfg.drift_hu * rng.uniform(0.5, 1.0) / amp)).astype(np.float32)
