"""`shadow calibrate` and `shadow sweep` at a tiny size: they produce their outputs, and the numbers
in them are the ones the runs show."""

import json

import pytest

from shadow.cli import main
from shadow.config.policy import load_policy


def test_calibrate_finds_a_zero_floor_on_cpu_and_uses_the_seed_spread(tmp_path, small_job_file, capsys):
    out = tmp_path / "calibrated.yaml"
    assert main(["calibrate", "--job", str(small_job_file), "--start-step", "8", "--window", "8", "--repeats", "2",
                 "--seeds", "3,4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("repeat ") == 2 and "seed 4" in printed and "seed 3 " not in printed  # 3 is the job's
    policy = load_policy(out)  # a valid policy file
    header = out.read_text().splitlines()[1]
    assert "noise floor" in header and "from seeds" in header
    floor = float(header.split("noise floor ")[1].split()[0])
    assert floor > 0  # another initialisation does not train identically
    assert policy.thresholds.warn == pytest.approx(floor, rel=1e-5)
    assert policy.thresholds.switch == pytest.approx(3 * floor, rel=1e-5)
    assert "(repeats: [0.0, 0.0]" in out.read_text()  # CPU replays are bit-exact


def test_calibrate_without_seeds_keeps_the_base_thresholds(tmp_path, small_job_file):
    out = tmp_path / "p.yaml"
    assert main(["calibrate", "--job", str(small_job_file), "--start-step", "16", "--window", "4",
                 "--repeats", "1", "--out", str(out)]) == 0
    assert load_policy(out).thresholds == load_policy("policies/default.yaml").thresholds
    assert main(["calibrate", "--job", str(small_job_file), "--start-step", "20", "--window", "8",
                 "--out", str(out)]) == 2  # the window would end after the job's last step


def test_sweep_writes_table_heatmap_and_flags_divergence(tmp_path, small_job_file):
    out = tmp_path / "sweep"
    assert main(["sweep", "--job", str(small_job_file), "--steps", "6", "--formats", "e4m3,e8m5",
                 "--lr-scale", "1,1000", "--seeds", "0", "--out", str(out)]) == 0
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "sweep.json").read_text())
    cells = {(c["format"], c["lr_scale"]): c for c in result["cells"]}
    assert set(cells) == {(f, s) for f in ("bf16", "e4m3", "e8m5") for s in (1.0, 1000.0)}
    runs = {(r["format"], r["lr_scale"]): r for r in result["runs"]}
    for fmt in ("e4m3", "e8m5"):  # the gap is the run's final loss against BF16's
        reference = runs[("bf16", 1.0)]["final_loss"]
        assert runs[(fmt, 1.0)]["rel_gap"] == pytest.approx((runs[(fmt, 1.0)]["final_loss"] - reference) / reference)
        assert runs[(fmt, 1.0)]["rel_gap"] != 0.0 and not runs[(fmt, 1.0)]["diverged"]
    assert cells[("e8m5", 1.0)]["scaling"] == "none" and cells[("e4m3", 1.0)]["scaling"] == "delayed"
    assert all(cells[(f, 1000.0)]["num_diverged"] == 1 for f in ("bf16", "e4m3", "e8m5"))  # lr x1000 blows up
    table = (out / "sweep.md").read_text()
    assert "| e4m3 | 1 | delayed |" in table and "| e8m5 | 1000 | none | diverged |" in table


def test_sweep_compares_fp8_layer_selections(tmp_path, small_job_file):
    """Each format with every block layer in FP8, and with the first block kept in BF16: two rows, two gaps
    against one BF16 reference; keeping a block in BF16 changes the trajectory."""
    out = tmp_path / "selections"
    assert main(["sweep", "--job", str(small_job_file), "--steps", "6", "--formats", "e4m3", "--lr-scale", "1",
                 "--fp8-layers", "all", "--fp8-layers", "{bf16_first_layers: 1}", "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["fp8_layers"] == ["all", "{bf16_first_layers: 1}"]
    runs = {(r["format"], r["fp8_layers"]): r for r in result["runs"]}
    assert set(runs) == {("bf16", ""), ("e4m3", "all"), ("e4m3", "{bf16_first_layers: 1}")}
    assert runs[("e4m3", "all")]["final_loss"] != runs[("e4m3", "{bf16_first_layers: 1}")]["final_loss"]
    assert "| e4m3 [{bf16_first_layers: 1}] | 1 | delayed |" in (out / "sweep.md").read_text()
    assert main(["sweep", "--job", str(small_job_file), "--steps", "2", "--formats", "e4m3",
                 "--fp8-layers", "{bf16_first_layer: 1}", "--out", str(tmp_path / "bad")]) == 2  # a typo: refused
