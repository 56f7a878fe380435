"""Shared test helpers: tiny training workdirs and tiny NIfTI volumes."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np

TINY_SIZE = 32
TINY_SLICES = 4


def tiny_config(variant: str = "sean"):
  """The demo config shrunk to a model that runs in milliseconds on 32x32 slices."""
  from sean_jax import config as config_lib
  c = config_lib.get_config(variant, "demo")
  c.model.width = 4
  c.model.partitions = (2, 2)
  c.model.align_input_size = TINY_SIZE
  c.data.image_size = TINY_SIZE
  c.data.phantom_size = TINY_SIZE
  c.data.phantom_slices = TINY_SLICES
  c.data.num_train_cases = 2
  c.data.num_val_cases = 1
  c.data.num_test_cases = 2
  return c


def make_tiny_workdir(tmp_path, variant: str = "sean", *, step: int = 1, config=None,
                      alpha=None, best: bool = False, name: str = "run") -> Path:
  """A workdir with ``config.json`` and one checkpoint of a freshly initialised model.

  ``alpha``: (theta, tx, ty) the alignment net is made to output for every input (its
  fc kernel zero, bias set), to test pose handling. ``best``: also write
  ``checkpoints_best``.
  """
  from flax import nnx
  from sean_jax import checkpointing

  workdir = Path(tmp_path) / name
  workdir.mkdir(parents=True, exist_ok=True)
  config = tiny_config(variant) if config is None else config
  state = fast_train_state(config)
  if alpha is not None:
    net = state.model.aligner
    raw = np.arctanh(np.asarray(alpha, np.float64) / np.asarray(net.max_alpha))
    net.fc.kernel[...] = np.zeros(net.fc.kernel.shape, np.float32)
    net.fc.bias[...] = np.asarray(raw, np.float32)
  checkpointing.save_config(config, workdir)
  dirs = ["checkpoints"] + (["checkpoints_best"] if best else [])
  for d in dirs:
    manager = checkpointing.make_manager(workdir / d, 3)
    checkpointing.save(manager, step, nnx.state(state), {"step": step})
    manager.wait_until_finished()
    manager.close()
  return workdir


def largest_file(directory) -> Path:
  return max((p for p in Path(directory).rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def truncate_checkpoint(step_dir) -> None:
  """Damage: the largest file of a checkpoint cut to half its size."""
  f = largest_file(step_dir)
  os.truncate(f, f.stat().st_size // 2)


def flip_bits(step_dir) -> None:
  """Bit rot: 8 bytes in the middle of a checkpoint's largest file, size unchanged."""
  f = largest_file(step_dir)
  data = bytearray(f.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0x04
  f.write_bytes(bytes(data))


def fast_train_state(config, seed: int = 0):
  """``TrainState(config, 1)`` with its arrays drawn by NumPy, not by JAX initialisers.

  Eager initialisation compiles one XLA program per parameter shape (a minute on a busy
  2-core machine); here the structure comes from ``nnx.eval_shape`` (no compilation) and
  the values from NumPy: He-normal kernels, BatchNorm scale/var 1, biases/means 0, the
  alignment fc zero (identity transform), optimizer moments 0.
  """
  import jax
  from flax import nnx
  from sean_jax import checkpointing

  abstract = nnx.eval_shape(lambda: checkpointing.TrainState(config, 1, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    shape, dtype = leaf.shape, leaf.dtype
    last = names[-1]
    if "opt_state" in names or last in ("bias", "mean") or "fc" in names:
      return np.zeros(shape, dtype)
    if last in ("scale", "var"):
      return np.ones(shape, dtype)
    if last == "kernel":
      fan_in = int(np.prod(shape[:-1])) or 1
      return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    return np.zeros(shape, dtype)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def write_nifti(path, array_file_order, affine=None, dtype=np.int16):
  """Writes an array as NIfTI exactly as given (file axis order)."""
  import nibabel as nib
  affine = np.diag([0.9, 0.9, 5.0, 1.0]) if affine is None else affine
  img = nib.Nifti1Image(np.asarray(array_file_order).astype(dtype), affine)
  img.header.set_data_dtype(dtype)
  nib.save(img, str(path))
  return Path(path)


def oblique_affine():
  """A non-canonical affine: axes permuted and flipped, rotated a little, offset."""
  perm = np.array([[0, 0, -5.0], [0.9, 0, 0], [0, -0.9, 0]])  # file axes -> (x, y, z)
  c, s = math.cos(0.1), math.sin(0.1)
  rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  a = np.eye(4)
  a[:3, :3] = rot @ perm
  a[:3, 3] = [12.0, -30.0, 40.0]
  return a


def tiny_phantom_case(index: int = 0, size: int = TINY_SIZE, slices: int = TINY_SLICES,
                      seed: int = 7):
  from sean_jax.data.phantom import PhantomConfig, generate_case
  return generate_case(seed, index, PhantomConfig(size=size, slices=slices))


def ct_slice_dataset(series_uid, rows: int, cols: int, *, study_uid=None,
                     modality: str | None = "CT", signed: bool = False):
  """A single-frame CT image dataset with its file meta, UIDs, modality (``None``:
  none) and a 16-bit monochrome pixel module of ``rows`` x ``cols``; the caller adds
  geometry, rescale and pixel data."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.SeriesInstanceUID = series_uid
  if study_uid is not None:
    ds.StudyInstanceUID = study_uid
  if modality is not None:
    ds.Modality = modality
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.Rows, ds.Columns = rows, cols
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  ds.PixelRepresentation = 1 if signed else 0
  return ds


def save_dicom(ds, path) -> None:
  """Writes ``ds`` as a DICOM file (pydicom 3, or 2.x)."""
  try:
    ds.save_as(path, enforce_file_format=True)
  except TypeError:  # pydicom 2.x
    ds.save_as(path, write_like_original=False)


def write_dicom_series(directory, volume_hu, spacing_mm, *, name: str = "IM") -> str:
  """Writes a model-orientation (S, H, W) HU volume as an axial CT series (standard
  orientation: columns towards the patient's left, rows towards posterior, slices
  towards superior, so the series reads back as the same array), stored unsigned with
  intercept -1024, files ``<name><k>`` in reverse slice order. Returns the series UID."""
  import os
  from pydicom.uid import generate_uid
  os.makedirs(directory, exist_ok=True)
  stored = np.clip(np.rint(np.asarray(volume_hu) + 1024.0), 0, 65535).astype(np.uint16)
  series_uid, study_uid = generate_uid(), generate_uid()
  s_mm, r_mm, c_mm = (float(v) for v in spacing_mm)
  for k in reversed(range(stored.shape[0])):
    ds = ct_slice_dataset(series_uid, *stored.shape[1:], study_uid=study_uid)
    ds.SeriesDescription, ds.InstanceNumber = "test head", k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100.0, -100.0, k * s_mm]
    ds.PixelSpacing = [r_mm, c_mm]
    ds.SliceThickness = s_mm
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
    save_dicom(ds, os.path.join(directory, f"{name}{k:03d}"))
  return str(series_uid)


def pydicom_data_file(name: str) -> str:
  """A file of PyPI's pydicom-data (``693_UNCR.dcm``: a real head CT slice); skips the
  test with the reason when the package is not installed."""
  import pytest
  try:
    from importlib import resources
    path = resources.files("data_store") / "data" / name
  except ModuleNotFoundError:
    pytest.skip("pip package pydicom-data (module data_store) is not installed: "
                "pip install pydicom-data for the real CT slice")
  if not path.is_file():
    pytest.skip(f"pydicom-data has no {name}")
  return str(path)


def write_phantom_atlas(directory, size: int = 160) -> Path:
  """An ASPECTS atlas in the NCCT atlas's file layout (``subcortical_*``/``cortical_*``
  ``_{image,label}_50_69.nii.gz``, 2D, axis codes L, P, S), made from a noiseless
  phantom head in the canonical pose: its brain at the true ganglionic and
  supraganglionic heights (``sean_jax.data.phantom_aspects``), labels from its true
  regions. For tests that cannot use the real atlas (a fresh clone has none)."""
  import nibabel as nib
  from scipy import ndimage
  from sean_jax.data import phantom, phantom_aspects

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = phantom.PhantomConfig(
      size=size, slices=25, slice_spacing_mm=2.5, stack_jitter_mm=0.0,
      max_rotation_deg=0.0, max_shift_frac=0.0, noise_hu=(0.0, 0.0), drift_hu=0.0,
      lesion_free_fraction=1.0, old_infarct_prob=0.0, calcification_prob=0.0,
      symmetric_hypodensity_prob=0.0, asymmetry=0.0)
  case = phantom.generate_case(0, 0, config)
  regions = phantom_aspects.true_regions(case, 0, 0, config)
  z = np.asarray(case.info["z_mm"])
  bz = phantom._draw_anatomy(np.random.default_rng([0, 0, 1]), 0.0)["bg_shift"][2]
  sp = config.pixel_spacing_mm
  for kind, height in (("subcortical", bz), ("cortical", bz + phantom_aspects.SUPRA_ABOVE_MM)):
    s = int(np.argmin(np.abs(z - height)))
    inside = ndimage.binary_fill_holes(case.labels[s] >= phantom.LABELS["csf"])
    image = np.where(inside, np.clip(case.ct_hu[s], 0, 80), 0).astype(np.uint8)
    labels = np.where(regions[s] > 10, regions[s] - 10, regions[s]).astype(np.uint8)
    affine = np.diag([-sp, -sp, 1.0, 1.0])
    for name, array in (("image", image), ("label", labels)):
      nib.save(nib.Nifti1Image(np.ascontiguousarray(array.T), affine),
               str(directory / f"{kind}_{name}_50_69.nii.gz"))
  return directory


@contextlib.contextmanager
def most_xla_passes_off():
  """Compile with most XLA optimisation passes off, restoring the setting after. At the
  tests' tiny shapes compiling, not computing, is a jitted test's time, and checks of
  the models' math (parity, finite gradients, two implementations agreeing) do not
  depend on the passes."""
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
