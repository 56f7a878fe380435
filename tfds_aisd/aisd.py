"""TFDS builder for AISD (acute ischemic stroke dataset, Liang et al. 2021).

Built from a manual download, written as ``array_record``, read without
TensorFlow::

    import tensorflow_datasets as tfds
    import tfds_aisd  # registers the "aisd" builder

    ds = tfds.data_source("aisd/png", data_dir=D, split="train")
    ex = ds[0]  # dict of numpy arrays

See docs/aisd.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tfds_aisd import readers
from tfds_aisd.readers import AisdBuildError

# The 52 official test case ids (AISD README).
TEST_IDS = frozenset("""
0073410 0072723 0226290 0537908 0538058 0091415 0538780 0073540 0226188 0226258
0226314 0091507 0226298 0538975 0226257 0226142 0072681 0091538 0538983 0537961
0091646 0072765 0226137 0091621 0091458 0021822 0538319 0226133 0091657 0537925
0073489 0538502 0091476 0226136 0538532 0073312 0539025 0226309 0226307 0091383
0021092 0537990 0226299 0073060 0538505 0073424 0091534 0226125 0072691 0538425
0226199 0226261
""".split())
assert len(TEST_IDS) == 52

VALIDATION_MODULUS = 10  # ~10 % of the non-test cases
REPORT_FILENAME = "skipped_cases.json"


def split_of(case_id: str) -> str:
  """The split of a case: official test ids, else a hash of the id.

  validation iff int(sha256(case_id).hexdigest(), 16) % 10 == 0, so the rule
  does not depend on which other cases are present.
  """
  if case_id in TEST_IDS:
    return "test"
  h = int(hashlib.sha256(case_id.encode("utf-8")).hexdigest(), 16)
  return "validation" if h % VALIDATION_MODULUS == 0 else "train"


@dataclasses.dataclass
class AisdConfig(tfds.core.BuilderConfig):
  source: str = "png"  # "png" | "dicom"


class Aisd(tfds.core.GeneratorBasedBuilder):
  """AISD: non-contrast head CT with acute ischemic infarct masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      AisdConfig(
          name="png",
          source="png",
          description="Images from image.zip (8-bit PNG, an undocumented "
          "window, not HU), masks from mask.zip.",
      ),
      AisdConfig(
          name="dicom",
          source="dicom",
          description="Images in HU (int16) from the CT DICOM series of "
          "dicom-N.tar.gz, masks from mask.zip.",
      ),
  ]
  DEFAULT_CONFIG_NAME = "png"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download AISD by hand from its public release and put into the manual dir
  (zipped or unpacked): image.zip or image/, mask.zip or mask/, and for the
  'dicom' config dicom-0..3.tar.gz or dicom-0..3/. See docs/aisd.md.
  """

  def __init__(self, *args, file_format=None, report_to_stderr: bool = True,
               **kwargs):
    # array_record: written and read without TensorFlow (tfrecord needs it).
    super().__init__(*args, file_format=file_format or "array_record",
                     **kwargs)
    self._report_to_stderr = report_to_stderr
    self._report: dict[str, Any] = {}
    self._layout: readers.Layout | None = None
    self._manual_dir_path: str | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    image_dtype = np.uint8 if self.builder_config.source == "png" else np.int16
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(None, None, None), dtype=image_dtype,
                encoding=tfds.features.Encoding.ZLIB,
                doc="(S, H, W) slices; png: 8-bit PNG grey, dicom: HU"),
            "mask": tfds.features.Tensor(
                shape=(None, None, None), dtype=np.uint8,
                encoding=tfds.features.Encoding.ZLIB,
                doc="(S, H, W) raw labels 0-5"),
            "case_id": tfds.features.Text(doc="7-digit AISD case id"),
            "spacing_mm": tfds.features.Tensor(
                shape=(3,), dtype=np.float32,
                doc="(slice, row, col) mm; png: (5, nan, nan)"),
            "source": tfds.features.Text(doc='"png" or "dicom"'),
        }),
        supervised_keys=("image", "mask"),
        # One example per case, written in case id order.
        disable_shuffling=True,
    )

  # -- defaults that keep TensorFlow and the network out of the build --------

  def download_and_prepare(self, *, download_dir=None, download_config=None,
                           file_format=None, **kwargs):
    if download_config is None:
      download_config = tfds.download.DownloadConfig(try_download_gcs=False)
    return super().download_and_prepare(
        download_dir=download_dir, download_config=download_config,
        file_format=file_format, **kwargs)

  def _download_and_prepare(self, dl_manager, download_config):
    source = self.builder_config.source
    if source == "dicom":
      readers.import_pydicom()
    manual_dir = download_config.manual_dir or dl_manager._manual_dir  # pylint: disable=protected-access
    if manual_dir is None:
      raise AisdBuildError("no manual_dir given (DownloadConfig(manual_dir=...))")
    manual_dir = os.fspath(manual_dir)
    # The trees stay open (zips) / extracted (tars) while every split is
    # written, and are closed / deleted afterwards, also on failure.
    with readers.open_layout(manual_dir, want_dicom=source == "dicom",
                             extract_dir=download_config.extract_dir) as layout:
      self._layout = layout
      self._manual_dir_path = manual_dir
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._layout = None
    # Still inside TFDS's incomplete dir: the report is renamed with the data,
    # and a failed build leaves neither.
    with open(os.path.join(os.fspath(self.data_dir), REPORT_FILENAME),
              "w") as f:
      json.dump(self._report, f, indent=1, sort_keys=True)
    if self._report_to_stderr:
      print(format_report(self._report), file=sys.stderr)

  # -- generation ---------------------------------------------------------------

  def _split_generators(self, dl_manager):
    del dl_manager  # the manual dir is opened in _download_and_prepare
    source = self.builder_config.source
    layout, manual_dir = self._layout, self._manual_dir_path
    refs, skipped = readers.discover(layout, source)
    if not refs and not skipped:
      raise AisdBuildError(
          f"no case folders found in {manual_dir!r} ("
          + "; ".join(layout.notes) + ")")
    good, bad, notes = readers.validate(refs)
    skipped.update(bad)
    by_split: dict[str, list[readers.CaseRef]] = {}
    for ref in good:
      by_split.setdefault(split_of(ref.case_id), []).append(ref)
    found = {r.case_id for r in refs} | set(skipped)
    self._report = {
        "config": self.builder_config.name,
        "version": str(self.version),
        "manual_dir": os.path.abspath(manual_dir),
        "layout": layout.notes,
        "skipped": dict(sorted(skipped.items())),
        "missing_test_ids": sorted(TEST_IDS - found),
        "cases_per_split": {k: len(v) for k, v in sorted(by_split.items())},
        "case_notes": notes,
    }
    if not good:
      # Shown even when report_to_stderr is off: the error refers to it.
      print(format_report(self._report), file=sys.stderr)
      raise AisdBuildError(
          f"no usable case in {manual_dir!r}: all {len(skipped)} cases found "
          "were skipped (reasons above)")
    # A split without cases cannot be written (TFDS needs >= 1 example); it is
    # left out and shown with 0 cases in the report.
    return {name: self._generate_examples(refs)
            for name, refs in sorted(by_split.items())}

  def _generate_examples(self, refs: list[readers.CaseRef]):
    for ref in refs:
      try:
        data = readers.read_case(ref)
      except readers.CaseError as e:
        # It passed validation moments ago: the files changed under us.
        raise AisdBuildError(
            f"case {ref.case_id} became unreadable during the build: {e}"
        ) from e
      yield ref.case_id, readers.as_example(ref, data)


def format_report(report: dict[str, Any]) -> str:
  """Human readable build report (skipped cases with reasons)."""
  lines = [f"AISD '{report.get('config', '?')}' build report"]
  per = report.get("cases_per_split", {})
  for split in ("train", "validation", "test"):
    n = per.get(split, 0)
    extra = " (split left out: no case)" if n == 0 else ""
    if split == "test":
      extra += f" of {len(TEST_IDS)} official"
    lines.append(f"  {split}: {n} cases{extra}")
  missing = report.get("missing_test_ids", [])
  if missing:
    lines.append(f"  official test ids not in the download ({len(missing)}): "
                 + " ".join(missing))
  skipped = report.get("skipped", {})
  lines.append(f"  skipped cases: {len(skipped)}")
  for case_id, reason in sorted(skipped.items()):
    lines.append(f"    {case_id}: {reason}")
  for case_id, notes in sorted(report.get("case_notes", {}).items()):
    for n in notes:
      if n.startswith(("slice order reversed", "warning")):
        lines.append(f"  note {case_id}: {n}")
  return "\n".join(lines)
