"""sean_jax.evaluate (evaluate_cases and the CLI) and sean_jax.compare."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import helpers  # tests/ is on sys.path under pytest
from sean_jax import compare, evaluate, metrics

REPO = Path(__file__).resolve().parent.parent
ALPHA = (0.1, 0.05, -0.03)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return helpers.make_tiny_workdir(tmp_path_factory.mktemp("eval"), alpha=ALPHA)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
  """Three phantom cases as the phantom CLI writes them (two with a lesion)."""
  from sean_jax import phantom as phantom_cli
  out = tmp_path_factory.mktemp("phantom")
  for index in range(3):
    case = helpers.tiny_phantom_case(index, seed=3)
    phantom_cli.write_case(case, str(out), 3, index)
  return out


@pytest.fixture(scope="module")
def model():
  m = helpers.fast_train_state(helpers.tiny_config("sean")).model
  m.eval()
  return m


def error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.strip()
          and not line.startswith("warning:")]


# -------------------------------------------------------------- evaluate_cases


def fake_cases():
  """Three 4x32x32 cases: two lesions (one found), no lesion, no pose."""
  shape = (4, 32, 32)
  ref1 = np.zeros(shape, np.uint8); ref1[1, 4:8, 4:8] = 1; ref1[2, 20:24, 20:24] = 1
  ref2 = np.zeros(shape, np.uint8)
  ref3 = np.zeros(shape, np.uint8); ref3[0, 0:2, 0:2] = 1
  pose = np.array([0.2, -0.1, 0.05], np.float32)
  image = np.zeros(shape, np.float32)
  return [
      {"case_id": "a", "image": image, "mask": ref1, "pose": pose,
       "spacing_mm": np.array([5, 2, 2], np.float32)},
      {"case_id": "b", "image": image, "mask": ref2, "pose": pose,
       "spacing_mm": np.full(3, np.nan, np.float32)},
      {"case_id": "c", "image": image, "mask": ref3, "pose": np.full(3, np.nan)},
  ]


def fake_predictions():
  shape = (4, 32, 32)
  p1 = np.zeros(shape, np.float32); p1[1, 4:8, 4:6] = 0.9     # half of lesion 1
  p2 = np.zeros(shape, np.float32); p2[3, 10:12, 10:12] = 0.7  # a false positive
  p3 = np.zeros(shape, np.float32); p3[0, 0:2, 0:2] = 0.5      # not > 0.5: nothing
  return [p1, p2, p3]


def test_evaluate_cases_aggregates(model, monkeypatch):
  from sean_jax.models import sean
  preds = iter(fake_predictions())
  est_alpha = np.array([0.25, -0.05, 0.05], np.float32)
  monkeypatch.setattr(sean, "segment_volume",
                      lambda m, v, w, batch_size=8, refine=False: (next(preds), est_alpha))
  cases = fake_cases()
  result = evaluate.evaluate_cases(model, cases)
  p = [x > 0.5 for x in fake_predictions()]
  dices = [metrics.dice(pi, c["mask"]) for pi, c in zip(p, cases)]
  assert dices == [pytest.approx(2 * 8 / (8 + 32)), 0.0, 0.0]
  assert result["num_cases"] == 3 and result["num_lesion_cases"] == 2
  assert result["dice_case_mean"] == pytest.approx(np.mean(dices))
  assert result["dice_case_mean_lesion_cases"] == pytest.approx((dices[0] + dices[2]) / 2)
  assert result["dice_global"] == pytest.approx(2 * 8 / (8 + 4 + 32 + 4))
  # Lesions: case a has 2 (1 found), c has 1 (missed); predictions: 1 TP, 1 FP.
  assert (result["tp_ref"], result["fn_ref"], result["tp_pred"], result["fp_pred"]) == \
      (1, 2, 1, 1)
  assert result["lesion_recall"] == pytest.approx(1 / 3)
  assert result["lesion_precision"] == pytest.approx(1 / 2)
  assert result["lesion_f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
  # Alignment: two cases with a pose, the same error each; c has none.
  rot = abs(math.degrees(0.25 - 0.2))
  x0 = lambda th, tx, ty: tx * 16 + ty * 16 * math.tan(th)  # W = H = 32
  dx = abs(x0(0.25, -0.05, 0.05) - x0(0.2, -0.1, 0.05))
  assert result["num_posed_cases"] == 2
  assert result["rot_err_deg"] == pytest.approx(rot, rel=1e-5)
  assert result["shift_err_px"] == pytest.approx(dx, rel=1e-5)
  assert result["shift_err_mm"] == pytest.approx(dx * 2, rel=1e-5)  # only case a
  rows = result["cases"]
  assert [r["case_id"] for r in rows] == ["a", "b", "c"]
  assert rows[2]["rot_err_deg"] is None and rows[1]["shift_err_mm"] is None
  assert evaluate.summarize(rows) == {k: v for k, v in result.items()
                                      if k in evaluate.summarize(rows)}
  json.dumps(result, allow_nan=False)


def test_evaluate_cases_threshold_and_options(model, monkeypatch):
  from sean_jax.models import sean
  preds = iter(fake_predictions())
  monkeypatch.setattr(sean, "segment_volume",
                      lambda m, v, w, batch_size=8, refine=False: (next(preds), np.zeros(3)))
  result = evaluate.evaluate_cases(model, fake_cases(), threshold=0.4,
                                   overlap="fraction", min_overlap=0.6)
  # At 0.4 case c's prediction counts; lesion 1 of case a is only half covered.
  assert (result["tp_ref"], result["fn_ref"]) == (1, 2)
  assert result["threshold"] == 0.4 and result["overlap"] == "fraction"
  with pytest.raises(ValueError, match="connectivity"):
    evaluate.evaluate_cases(model, fake_cases(), connectivity=4)
  with pytest.raises(ValueError, match="no cases"):
    evaluate.evaluate_cases(model, [])


def test_no_alignment_error_without_aligner(monkeypatch):
  from sean_jax.models import sean
  m = helpers.fast_train_state(helpers.tiny_config("hybrid")).model
  assert m.aligner is None
  preds = iter(fake_predictions())
  monkeypatch.setattr(sean, "segment_volume",
                      lambda m, v, w, batch_size=8, refine=False: (next(preds), np.zeros(3)))
  result = evaluate.evaluate_cases(m, fake_cases())
  assert result["rot_err_deg"] is None and result["num_posed_cases"] == 0


def test_evaluate_cases_real_model(model):
  """The real segment_volume: rows agree with metrics recomputed from the
  probabilities, a generator (the trainer's make_eval_cases) works, the caller's
  train mode is kept."""
  from sean_jax.data import pipeline, sources
  config = helpers.tiny_config("sean")
  source = sources.case_source(config, "validation")
  case = source[0]
  row, probs, alpha = evaluate.evaluate_case(model, case)
  pred = probs > 0.5
  assert probs.shape == case["image"].shape and probs.dtype == np.float32
  assert row["dice"] == metrics.dice(pred, case["mask"])
  assert row["pred_voxels"] == int(pred.sum())
  assert row["rot_err_deg"] == pytest.approx(
      metrics.alignment_error(alpha, case["pose"], 32, 32)[0])
  train_model = helpers.fast_train_state(config).model
  train_model.train()
  result = evaluate.evaluate_cases(train_model, pipeline.make_eval_cases(source))
  assert result["num_cases"] == 1
  assert result["cases"][0]["dice"] == pytest.approx(row["dice"])
  bn = train_model.segmenter.encoder.blocks[0].bn1
  assert bn.use_running_average is False


# -------------------------------------------------------------------------- CLI


def test_cli_config_split(workdir, capsys):
  assert evaluate.main(["--workdir", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert "| Method | Dice | F1 | Recall | Precision |" in out
  report = json.loads((workdir / "eval.json").read_text())
  assert report["split"] == "test" and report["step"] == 1
  assert report["variant"] == "sean" and report["checkpoint"] == "latest"
  assert report["metrics"]["num_cases"] == 2 and len(report["cases"]) == 2
  for key in ("dice_case_mean", "dice_case_mean_lesion_cases", "dice_global",
              "lesion_precision", "lesion_recall", "lesion_f1", "rot_err_deg",
              "shift_err_px", "num_cases"):
    assert key in report["metrics"]
  # The phantom's test cases follow the validation case: indices 3 and 4 of the seed.
  assert [r["case_id"] for r in report["cases"]] == [
      "phantom_1234_00003", "phantom_1234_00004"]
  assert evaluate.main(["--workdir", str(workdir), "--split", "validation",
                        "--checkpoint", "best"]) == 0
  report = json.loads((workdir / "eval_validation.json").read_text())
  assert report["split"] == "validation"
  assert report["checkpoint"] == "latest (no best checkpoint)"


def test_cli_nifti_folder_pose_error(workdir, phantom_dir, tmp_path, capsys):
  out = tmp_path / "e.json"
  assert evaluate.main(["--workdir", str(workdir), "--data", str(phantom_dir),
                        "--output", str(out), "--connectivity", "6",
                        "--no-refine"]) == 0
  report = json.loads(out.read_text())
  assert report["split"] is None and report["data"] == str(phantom_dir)
  assert report["metrics"]["num_cases"] == 3
  assert report["metrics"]["num_lesion_cases"] == 2
  assert report["metrics"]["connectivity"] == 6
  # The aligner outputs ALPHA for every case; the truth is in each case's JSON.
  for row in report["cases"]:
    truth = json.loads((phantom_dir / f"{row['case_id']}.json").read_text())
    want = abs((math.degrees(ALPHA[0]) - truth["rotation_deg"] + 180) % 360 - 180)
    assert row["rot_err_deg"] == pytest.approx(want, abs=1e-3)
  assert "Alignment error over 3 cases" in capsys.readouterr().out
  # The symmetry refinement is on by default (its accuracy: tests/test_refine.py).
  assert evaluate.main(["--workdir", str(workdir), "--data", str(phantom_dir),
                        "--output", str(out)]) == 0
  refined = json.loads(out.read_text())
  assert refined["postprocessing"]["refine"] and refined["postprocessing"]["brain_mask"]
  assert refined["cases"][0]["alpha"] != pytest.approx(list(ALPHA), abs=1e-4)


def test_cli_default_output_for_data(workdir, phantom_dir):
  assert evaluate.main(["--workdir", str(workdir), "--data", str(phantom_dir),
                        "--max-cases", "1"]) == 0
  report = json.loads((workdir / f"eval_{phantom_dir.name}.json").read_text())
  assert report["metrics"]["num_cases"] == 1


def test_cli_config_override(workdir, tmp_path):
  cfg = tmp_path / "override.py"
  cfg.write_text(
      "import helpers\n"
      "def get_config(arg=''):\n"
      "  c = helpers.tiny_config('sean')\n"
      "  c.data.num_test_cases = int(arg or 1)\n"
      "  return c\n")
  out = tmp_path / "o.json"
  assert evaluate.main(["--workdir", str(workdir), "--config", f"{cfg}:1",
                        "--output", str(out)]) == 0
  assert json.loads(out.read_text())["metrics"]["num_cases"] == 1
  cfg.write_text(
      "import helpers\n"
      "def get_config(arg=''):\n"
      "  c = helpers.tiny_config('sean')\n"
      "  c.model.width = 8\n"
      "  return c\n")
  assert evaluate.main(["--workdir", str(workdir), "--config", str(cfg),
                        "--output", str(out)]) == 1


@pytest.mark.parametrize("case", ["missing_workdir", "no_checkpoint", "corrupt_config",
                                  "incomplete_config", "missing_data", "no_output_dir"])
def test_cli_errors(case, workdir, tmp_path, capsys):
  args = ["--workdir", str(tmp_path / "nothing")]
  name = str(tmp_path / "nothing")
  if case in ("no_checkpoint", "corrupt_config", "incomplete_config"):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text((workdir / "config.json").read_text())
    args = ["--workdir", str(wd)]
    name = str(wd / "checkpoints")
    if case == "corrupt_config":
      (wd / "config.json").write_text('{"model": ')
      name = str(wd / "config.json")
    elif case == "incomplete_config":
      (wd / "config.json").write_text('{"variant": "sean"}')
      name = str(wd)
  elif case == "missing_data":
    args = ["--workdir", str(workdir), "--data", str(tmp_path / "nodata")]
    name = str(tmp_path / "nodata")
  elif case == "no_output_dir":
    args = ["--workdir", str(workdir), "--output", str(tmp_path / "no" / "e.json")]
    name = str(tmp_path / "no")
  assert evaluate.main(args) == 1
  lines = error_lines(capsys.readouterr().err)
  assert len(lines) == 1 and name in lines[0], lines


def test_cli_usage_errors(workdir, phantom_dir):
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--workdir", str(workdir), "--split", "test", "--data",
                   str(phantom_dir)])
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--workdir", str(workdir), "--threshold", "1.5"])
  assert e.value.code == 2


def test_cli_subprocess_exit_code(tmp_path):
  """The real entry point: exit code and the one-line message of a missing workdir."""
  r = subprocess.run([sys.executable, "-m", "sean_jax.evaluate", "--workdir",
                      str(tmp_path / "missing")], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 1
  assert error_lines(r.stderr) == [f"error: {tmp_path / 'missing'}: workdir not found"]


# ---------------------------------------------------------------------- compare


def fake_eval(path, variant, dice, f1, rot=None, split="test", data=None):
  metrics_ = {"num_cases": 5, "dice_case_mean": dice, "lesion_f1": f1,
              "lesion_recall": f1, "lesion_precision": f1, "dice_global": dice,
              "rot_err_deg": rot, "shift_err_px": None if rot is None else 2 * rot}
  path.mkdir(parents=True, exist_ok=True)
  evaluate.write_json_atomic({"variant": variant, "workdir": str(path), "split": split,
                              "data": data, "data_source": "phantom",
                              "metrics": metrics_}, path / "eval.json")
  return path


def test_compare_table(tmp_path, capsys):
  runs = [fake_eval(tmp_path / "sean_s0", "sean", 0.5, 0.6, rot=2.0),
          fake_eval(tmp_path / "sean_s1", "sean", 0.7, 0.8, rot=4.0),
          fake_eval(tmp_path / "unet_s0", "unet", 0.3, 0.4)]
  out = tmp_path / "table.md"
  assert compare.main([str(r) for r in runs] + ["--output", str(out)]) == 0
  table = out.read_text()
  assert table.strip() == capsys.readouterr().out.strip()
  lines = [line for line in table.splitlines()
           if line.startswith("| ") and not line.startswith("| ---")]
  assert lines[0].startswith("| Method | Dice | F1 | Recall | Precision |")
  assert lines[1].startswith("| Unet | 0.3000 | 0.4000 |")
  sd = np.std([0.5, 0.7], ddof=1)
  assert lines[2].startswith(f"| SEAN | 0.6000 ± {sd:.4f} | 0.7000 ± {sd:.4f} |")
  assert f"3.00 ± {np.std([2.0, 4.0], ddof=1):.2f}" in lines[2]
  assert "2: sean_s0, sean_s1" in lines[2]
  assert "| – |" in lines[1]  # no alignment error for the Unet


def test_compare_keeps_different_data_apart(tmp_path):
  a = fake_eval(tmp_path / "a", "sean", 0.5, 0.5)
  b = fake_eval(tmp_path / "b", "sean", 0.9, 0.9, split="validation")
  rows = compare.collect([a, b / "eval.json"])
  assert [r["n"] for r in rows] == [1, 1]
  assert {r["name"] for r in rows} == {"SEAN (phantom test)", "SEAN (phantom validation)"}


def test_compare_errors(tmp_path, capsys):
  assert compare.main([str(tmp_path / "none")]) == 1
  lines = error_lines(capsys.readouterr().err)
  assert len(lines) == 1 and str(tmp_path / "none") in lines[0]
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "eval.json").write_text("{not json")
  assert compare.main([str(bad)]) == 1
  lines = error_lines(capsys.readouterr().err)
  assert len(lines) == 1 and str(bad / "eval.json") in lines[0]


def test_compare_same_workdir_names(tmp_path):
  a = fake_eval(tmp_path / "seed0" / "run", "unet", 0.2, 0.2)
  b = fake_eval(tmp_path / "seed1" / "run", "unet", 0.4, 0.4)
  (row,) = compare.collect([a, b])
  assert row["runs"] == [str(a), str(b)] and row["n"] == 2
  assert row["dice_case_mean"] == (pytest.approx(0.3), pytest.approx(np.std([0.2, 0.4],
                                                                           ddof=1)))


def test_choose_postprocessing_then_every_evaluation_uses_it(tmp_path, capsys):
  """--choose-postprocessing writes postprocessing.json from the validation split; a
  later evaluate applies that size (removing components, so fewer voxels than without
  it), --min-size-ml overrides it, and a corrupt file is one error line."""
  wd = helpers.make_tiny_workdir(tmp_path, alpha=ALPHA)
  assert evaluate.main(["--workdir", str(wd), "--choose-postprocessing",
                        "--threshold", "0.3"]) == 0
  chosen = json.loads((wd / "postprocessing.json").read_text())
  assert chosen["split"] == "validation" and chosen["num_cases"] == 1
  assert [row["min_ml"] for row in chosen["candidates"]][0] == 0.0
  assert sum(row["chosen"] for row in chosen["candidates"]) == 1
  capsys.readouterr()
  runs = {}
  for name, extra in (("chosen", []), ("none", ["--min-size-ml", "0"]),
                      ("all", ["--min-size-ml", "1000"])):
    out = tmp_path / f"{name}.json"
    assert evaluate.main(["--workdir", str(wd), "--threshold", "0.3", "--output",
                          str(out), *extra]) == 0
    runs[name] = json.loads(out.read_text())
  assert runs["chosen"]["postprocessing"]["min_size_ml"] == chosen["min_ml"]
  assert "postprocessing.json" in runs["chosen"]["postprocessing"]["min_size_from"]
  voxels = {k: sum(r["pred_voxels"] for r in v["cases"]) for k, v in runs.items()}
  assert voxels["all"] == 0 and voxels["none"] > 0
  assert voxels["all"] <= voxels["chosen"] <= voxels["none"]
  (wd / "postprocessing.json").write_text("{")
  assert evaluate.main(["--workdir", str(wd)]) == 1
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "postprocessing.json" in err[0]
