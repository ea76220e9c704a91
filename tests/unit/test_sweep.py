"""The sweep's table on synthetic cells: a format is "diverged" only from its own runs, never because
its BF16 reference diverged."""

from shadow.sweep import SweepCell, gap_label, table


def _cell(fmt, gap, num_diverged, num_seeds=2):
    return SweepCell(fmt, "", 1000.0, "-" if fmt == "bf16" else "delayed", gap, gap, num_diverged, num_seeds)


def test_a_format_whose_reference_diverged_is_not_reported_diverged():
    cells = [_cell("bf16", None, 2), _cell("e4m3", None, 0), _cell("e5m2", None, 2), _cell("e3m2", None, 1),
             _cell("e8m5", 0.012, 1)]
    lines = table(cells).splitlines()
    assert lines[3] == ("| e4m3 | 1000 | delayed | no reference (BF16 diverged) | no reference (BF16 diverged) "
                        "| 0/2 |")
    assert lines[4] == "| e5m2 | 1000 | delayed | diverged | diverged | 2/2 |"
    assert lines[5].startswith("| e3m2 | 1000 | delayed | no reference (BF16 diverged) |")  # one seed each
    assert lines[6] == "| e8m5 | 1000 | delayed | +1.20% | +1.20% | 1/2 |"
    assert gap_label(cells[1], None) != gap_label(cells[2], None)  # the heatmap's cell text too
