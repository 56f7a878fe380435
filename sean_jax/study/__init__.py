"""Does a row of Table 2 beat another? Both sides of the operating point, on the
phantom and on a real normal head, with statistics over test cases.

- :mod:`sweep`: every test case segmented once, scored at many probability
  thresholds: lesions found against false-positive components and ml (a FROC curve),
  so methods are compared at matched false positives, not at one threshold, and how
  much of the phantom's distractors (bilateral hypodensities among them) is flagged;
- :mod:`normal_head`: a real normal head CT posed at several angles, where every
  predicted ml is a false positive, and how much of it is mirrored on the other side;
- :mod:`stats`: paired differences between two rows over the same test cases, with
  bootstrap confidence intervals;
- ``python -m sean_jax.study``: all of it for a ``sean_jax.tables`` workdir.
"""
