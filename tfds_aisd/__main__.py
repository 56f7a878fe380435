"""Builds the AISD TFDS dataset from a manual download.

    python -m tfds_aisd --manual_dir M --data_dir D [--config png|dicom]

Exit status 0 on success (a summary of cases per split and of skipped cases is
printed), 1 when the build fails (one-line error on stderr), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m tfds_aisd",
      description="Build the 'aisd' TFDS dataset (array_record) from a manual "
      "AISD download: image.zip/mask.zip (or image/, mask/) and, for "
      "--config dicom, dicom-N.tar.gz (or dicom-N/).")
  p.add_argument("--manual_dir", required=True,
                 help="folder holding the downloaded archives or their "
                 "unpacked folders")
  p.add_argument("--data_dir", required=True,
                 help="TFDS data dir to write <data_dir>/aisd/<config>/<ver>")
  p.add_argument("--config", choices=("png", "dicom"), default="png",
                 help="png: 8-bit PNG images; dicom: HU from the CT DICOMs "
                 "(default: png)")
  p.add_argument("--overwrite", action="store_true",
                 help="rebuild even if the dataset already exists")
  p.add_argument("--tmp_dir", default=None,
                 help="where dicom-N.tar.gz CT series are extracted "
                 "temporarily (default: the system temp dir)")
  return p


def _summary(builder, report: dict) -> str:
  from tfds_aisd.aisd import format_report  # pylint: disable=g-import-not-at-top

  lines = [f"aisd/{builder.builder_config.name} {builder.version} at "
           f"{builder.data_dir}"]
  for name, split in sorted(builder.info.splits.items()):
    lines.append(f"  {name}: {split.num_examples} cases")
  if report:
    lines.append(format_report(report))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if not os.path.isdir(args.manual_dir):
    print(f"error: manual_dir {args.manual_dir!r} does not exist or is not a "
          "directory", file=sys.stderr)
    return 1

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tfds_aisd import aisd  # pylint: disable=g-import-not-at-top

  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  tfds.disable_progress_bar()
  try:
    builder = aisd.Aisd(config=args.config, data_dir=args.data_dir,
                        report_to_stderr=False)
    existed = builder.is_prepared()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=args.manual_dir, download_mode=mode,
            try_download_gcs=False, extract_dir=args.tmp_dir))
  except aisd.AisdBuildError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if existed and not args.overwrite:
    print(f"note: dataset already built at {builder.data_dir}; reusing it "
          "(pass --overwrite to rebuild)", file=sys.stderr)
  report_path = os.path.join(os.fspath(builder.data_dir), aisd.REPORT_FILENAME)
  report = {}
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
  print(_summary(builder, report))
  print(f"skipped cases listed in {report_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
