"""AISD as a TensorFlow Datasets builder (no TensorFlow needed).

Importing this package registers the ``aisd`` builder (configs ``png`` and
``dicom``) with TFDS, so ``import tfds_aisd`` must come before
``tfds.data_source("aisd/png", data_dir=...)``. Build with
``python -m tfds_aisd --manual_dir M --data_dir D``. See docs/aisd.md.
"""

from tfds_aisd.aisd import REPORT_FILENAME
from tfds_aisd.aisd import TEST_IDS
from tfds_aisd.aisd import Aisd
from tfds_aisd.aisd import split_of
from tfds_aisd.readers import AisdBuildError

__all__ = ["Aisd", "AisdBuildError", "REPORT_FILENAME", "TEST_IDS", "split_of"]
