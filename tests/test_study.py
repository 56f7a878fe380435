"""sean_jax.study: the threshold sweep and FROC interpolation by hand, paired bootstrap
differences on constructed cases, and the study of a (tiny) tables workdir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import helpers  # tests/ is on sys.path under pytest
from sean_jax.study import normal_head, report, stats, sweep

TEMPLATE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct_template"
            / "template_with_skull_2mm.nii.gz")


def test_sweep_case_by_hand():
  probs = np.zeros((1, 10, 10), np.float32)
  probs[0, 1:3, 1:3] = 0.9  # on the lesion
  probs[0, 6:8, 6:8] = 0.4  # a false positive at low thresholds only
  ref = np.zeros_like(probs, bool)
  ref[0, 1:4, 1:4] = True
  rows = sweep.sweep_case(probs, ref, None, (5.0, 2.0, 2.0), thresholds=(0.3, 0.5, 0.95))
  low, mid, high = rows
  assert (low["tp_ref"], low["fp_pred"], low["tp_pred"]) == (1, 1, 1)
  assert (mid["tp_ref"], mid["fp_pred"]) == (1, 0)
  assert (high["tp_ref"], high["fn_ref"], high["pred_ml"]) == (0, 1, 0.0)
  assert low["pred_ml"] == pytest.approx(8 * 0.02) and low["fp_ml"] == pytest.approx(4 * 0.02)
  assert mid["dice"] == pytest.approx(2 * 4 / (4 + 9))
  brain = np.zeros_like(ref)
  brain[0, :5] = True  # the false positive lies outside the brain
  assert sweep.sweep_case(probs, ref, brain, (5, 2, 2), thresholds=(0.3,))[0]["fp_pred"] == 0


def test_distractors_flagged_by_hand():
  """Distractor voxels predicted as lesion, counted per threshold and pooled per case."""
  probs = np.zeros((1, 4, 6), np.float32)
  probs[0, 0, :2] = 0.9  # half of the symmetric hypodensity (left)
  probs[0, 3, 5] = 0.3
  sym = np.zeros((1, 4, 6), bool)
  sym[0, 0, :2] = sym[0, 0, 4:] = True
  old = np.zeros((1, 4, 6), bool)
  old[0, 3, 5] = True
  rows = sweep.sweep_case(probs, np.zeros((1, 4, 6)), None, (5.0, 1.0, 1.0), (0.2, 0.5),
                          distractors={"symmetric_hypodensity": sym, "old_infarct": old,
                                       "calcification": np.zeros((1, 4, 6), bool)})
  assert rows[0]["distractors"]["old_infarct"] == {"voxels": 1, "flagged": 1}
  assert rows[1]["distractors"]["old_infarct"] == {"voxels": 1, "flagged": 0}
  assert rows[1]["distractors"]["symmetric_hypodensity"] == {"voxels": 4, "flagged": 2}
  cases = [{"case_id": "a", "has_lesion": False, "rows": rows},
           {"case_id": "b", "has_lesion": False, "rows": [
               {**r, "distractors": {}} for r in rows]}]  # a case without any
  flagged = sweep.distractors_flagged(cases, 0.5)
  assert flagged["symmetric_hypodensity"] == {"cases": 1, "cases_flagged": 1,
                                              "voxel_share": 0.5}
  assert flagged["old_infarct"]["cases_flagged"] == 0
  assert flagged["calcification"] == {"cases": 0, "cases_flagged": 0, "voxel_share": None}


def test_curve_and_recall_at_matched_false_positives():
  def case(has_lesion, rows):
    return {"has_lesion": has_lesion, "rows": [dict(r, fp_ml=r["pred_ml"] * (not has_lesion),
                                                   dice=0.5) for r in rows]}
  cases = [case(True, [{"threshold": 0.3, "tp_ref": 1, "fn_ref": 0, "tp_pred": 1,
                        "fp_pred": 2, "pred_ml": 3.0},
                       {"threshold": 0.7, "tp_ref": 0, "fn_ref": 1, "tp_pred": 0,
                        "fp_pred": 0, "pred_ml": 0.0}]),
           case(False, [{"threshold": 0.3, "tp_ref": 0, "fn_ref": 0, "tp_pred": 0,
                         "fp_pred": 2, "pred_ml": 1.5},
                        {"threshold": 0.7, "tp_ref": 0, "fn_ref": 0, "tp_pred": 0,
                         "fp_pred": 0, "pred_ml": 0.0}])]
  points = sweep.curve(cases)
  assert points[0]["recall"] == 1.0 and points[0]["fp_per_case"] == 2.0
  assert points[0]["fp_ml_lesion_free"] == 1.5 and points[1]["recall"] == 0.0
  assert sweep.recall_at_fp(points, 1.0) == pytest.approx(0.5)  # half way along
  assert sweep.recall_at_fp(points, 3.0) is None


def eval_run(values, counts=None):
  rows = []
  for k, v in enumerate(values):
    c = counts[k] if counts else (1, 0, 1, 0)
    rows.append({"case_id": f"c{k}", "dice": v, "tp_ref": c[0], "fn_ref": c[1],
                 "tp_pred": c[2], "fp_pred": c[3]})
  return {"cases": rows}


def test_paired_difference():
  rng = np.random.default_rng(0)
  a = rng.uniform(0.2, 0.6, 30)
  shifted = stats.paired_difference([eval_run(a)], [eval_run(a + 0.1)], "dice", n_boot=500)
  assert shifted["diff"] == pytest.approx(0.1) and shifted["real"]
  assert shifted["ci95"] == pytest.approx([0.1, 0.1])
  # Seeds are averaged per case first: B's two seeds straddle A.
  noise = rng.normal(0, 0.05, 30)
  even = stats.paired_difference([eval_run(a)], [eval_run(a + noise), eval_run(a - noise)],
                                 "dice", n_boot=500)
  assert even["diff"] == pytest.approx(0.0, abs=1e-12) and not even["real"]
  # Recall from summed counts: A finds 10 of 20 lesions, B 20 of 20.
  ca = [(1, 1, 1, 0)] * 10
  cb = [(2, 0, 1, 0)] * 10
  recall = stats.paired_difference([eval_run([0.0] * 10, ca)], [eval_run([0.0] * 10, cb)],
                                   "recall", n_boot=500)
  assert recall["diff"] == pytest.approx(0.5) and recall["real"]
  with pytest.raises(ValueError, match="share no test case"):
    stats.paired_difference([eval_run([0.1])], [{"cases": []}], "dice")


def test_study_of_a_tables_workdir(tmp_path, capsys):
  """Two rows (the same tiny run under two names): the sweep, the normal head when the
  template is here, the tables and a difference of exactly zero."""
  from sean_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "tables"
  run = helpers.make_tiny_workdir(workdir / "hybrid", name="seed0")
  assert evaluate.main(["--workdir", str(run), "--no-refine"]) == 0
  (run / "metrics.jsonl").write_text(  # as training writes it: steps and evaluations
      '{"step": 1, "loss": 0.9}\n{"step": 2, "eval": {"dice_case_mean": 0.25}}\n'
      '{"step": 4, "eval": {"dice_case_mean": 0.5}}\n')
  argv = ["--workdir", str(workdir), "--seeds", "0", "--angles", "7"]
  if TEMPLATE.exists():
    argv += ["--template", str(TEMPLATE)]
  assert report.main(argv + ["--rows", "hybrid"]) == 0
  # The second row reuses what the first computed (kept in the run's folder).
  shutil.copytree(run, workdir / "sean" / "seed0")
  capsys.readouterr()
  assert report.main(argv + ["--rows", "hybrid,sean"]) == 0
  out = json.loads((workdir / "study.json").read_text())
  assert set(out["table"]) == {"hybrid", "sean"}
  pair = next(p for p in out["pairs"] if (p["a"], p["b"]) == ("hybrid", "sean"))
  assert pair["Dice"]["diff"] == 0.0 and not pair["Dice"]["real"]
  assert (workdir / "study.png").exists() and (run / "sweep.json").exists()
  numbers = out["table"]["hybrid"][0]
  sweep_cases = json.loads((run / "sweep.json").read_text())["cases"]
  assert len(sweep_cases) == 2 and len(sweep_cases[0]["rows"]) == len(sweep.DEFAULT_THRESHOLDS)
  assert set(sweep_cases[0]["rows"][0]["distractors"]) == set(sweep.DISTRACTORS)
  assert "symmetric_hypodensity_voxel_share" in numbers
  assert out["validation"]["hybrid"] == [[[2, 0.25], [4, 0.5]]]
  if TEMPLATE.exists():
    head = json.loads((run / "normal_head.json").read_text())["angles"]
    assert [a["angle_deg"] for a in head] == [7.0]
    assert numbers["normal_head_ml"] >= 0.0 and numbers["normal_head_components"] >= 0.0
  assert "Baseline (HybridUnet)" in capsys.readouterr().out
  assert report.main(["--workdir", str(tmp_path / "none")]) == 1

  # Other test cases (a config file's test split; the rows' model settings unchanged):
  # tagged files beside the run's own, which stay as they were.
  other = tmp_path / "other.py"
  other.write_text("import helpers\n\ndef get_config(row):\n"
                   "  c = helpers.tiny_config('sean')\n"
                   "  c.data.num_train_cases = 5  # test cases 6 and 7\n  return c\n")
  own = (run / "eval.json").read_text()
  assert report.main(argv + ["--rows", "hybrid", "--test-config", str(other),
                             "--tag", "other"]) == 0
  ids = [r["case_id"] for r in json.loads((run / "eval_other.json").read_text())["cases"]]
  assert ids == ["phantom_1234_00006", "phantom_1234_00007"]
  assert [c["case_id"] for c in json.loads((run / "sweep_other.json").read_text())
          ["cases"]] == ids
  assert (workdir / "study_other.md").exists() and (run / "eval.json").read_text() == own
  with pytest.raises(SystemExit):
    report.main(argv + ["--tag", "other"])  # without --test-config


def test_mirrored_fraction_of_a_posed_head():
  """A blob and its mirror about the centre column count as mirrored, a one-sided blob
  does not, also after the head was posed (the pose is undone first)."""
  shape = (2, 40, 40)
  zz, yy, xx = np.mgrid[:2, :40, :40]
  right = (yy - 15) ** 2 + (xx - 10) ** 2 < 9
  left = (yy - 15) ** 2 + (xx - 29) ** 2 < 9  # columns mirror as x -> 39 - x
  assert normal_head.mirrored_fraction(np.zeros(shape, bool), 0.0) is None
  assert normal_head.mirrored_fraction(right, 0.0) == 0.0
  assert normal_head.mirrored_fraction(right | left, 0.0) == 1.0
  both = normal_head.posed(np.where(right | left, 1000.0, -1000.0), 10.0,
                           np.random.default_rng(0), noise_hu=0.0) > 0
  one = normal_head.posed(np.where(right, 1000.0, -1000.0), 10.0,
                          np.random.default_rng(0), noise_hu=0.0) > 0
  assert normal_head.mirrored_fraction(both, 10.0) > 0.9
  assert normal_head.mirrored_fraction(one, 10.0) == 0.0
