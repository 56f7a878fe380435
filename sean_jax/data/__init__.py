"""Input data: synthetic phantom (phantom), NIfTI I/O (nifti), preprocessing (preprocess)."""
