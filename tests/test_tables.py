"""sean_jax.tables: the Tables 1/2 runner (aggregation, resuming, bad arguments)."""

import json

import numpy as np
import pytest

from sean_jax import tables


def _fake_run(workdir, variant, seed, dice, align=False, rot=None):
  run = workdir / variant / f"seed{seed}"
  run.mkdir(parents=True)
  metrics = {"dice_case_mean": dice, "dice_case_mean_lesion_cases": dice,
             "lesion_f1": 0.5, "lesion_recall": 0.5, "lesion_precision": 0.5}
  if rot is not None:
    metrics.update(rot_err_deg=rot, shift_err_px=0.5)
  (run / "eval.json").write_text(json.dumps({"metrics": metrics}))
  (run / "config.json").write_text(json.dumps({"model": {"align": align}}))


def test_tables_report_mean_and_std_over_seeds(tmp_path):
  _fake_run(tmp_path, "hybrid", 0, 0.2)
  _fake_run(tmp_path, "hybrid", 1, 0.4)
  _fake_run(tmp_path, "align", 0, 0.3, align=True, rot=1.0)
  _fake_run(tmp_path, "align", 1, 0.5, align=True, rot=3.0)
  results = tables.collect(tmp_path, [0, 1])
  text = tables.table("Table 2", tables.TABLE2, results, with_alignment=True)
  baseline = next(line for line in text.splitlines() if line.startswith("| Baseline"))
  assert f"{np.mean([0.2, 0.4]):.3f} ± {np.std([0.2, 0.4]):.3f}" in baseline
  assert baseline.rstrip().endswith("| 2 |")
  align = next(line for line in text.splitlines() if line.startswith("| +Align |"))
  assert "2.000 ± 1.000" in align  # rotation error of the aligned runs
  missing = next(line for line in text.splitlines() if line.startswith("| +Align+Self |"))
  assert "–" in missing and missing.rstrip().endswith("| 0 |")


@pytest.mark.parametrize("argv, match", [
    (["--rows", "resnet"], "unknown rows"), (["--seeds", "a"], "seeds"),
    (["--steps", "0"], "positive"), (["--image-size", "48"], "multiple of 32")])
def test_bad_arguments_exit_with_one_line(tmp_path, argv, match, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tables.main(["--workdir", str(tmp_path)] + argv)
  assert exit_info.value.code == 2
  assert match in capsys.readouterr().err


def test_one_row_trains_evaluates_and_is_skipped_when_done(tmp_path, capsys):
  argv = ["--workdir", str(tmp_path), "--seeds", "0", "--rows", "unet", "--steps", "2",
          "--align-steps", "1", "--test-cases", "2"]
  assert tables.main(argv) == 0
  result = json.loads((tmp_path / "unet" / "seed0" / "eval.json").read_text())
  assert result["metrics"]["num_cases"] == 2 and result["step"] == 2
  assert (tmp_path / "tables.md").exists() and (tmp_path / "figure3.png").exists()
  capsys.readouterr()
  assert tables.main(argv) == 0
  assert "0 runs to do" in capsys.readouterr().out
