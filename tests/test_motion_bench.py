"""`mofo bench motion` runs end to end on tiny clips and prints the robust mode's cost rows
beside half-size TV-L1 (no timing is asserted: timings are measured, not tested)."""

from __future__ import annotations

import json

from mofo.bench.motion import COST_ROWS
from mofo.cli import main


def test_bench_motion_prints_the_robust_cost_rows(tmp_path, capsys):
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text("dataset:\n  demo:\n    num_frames: 5\n    height: 48\n    width: 64\n")
    out = tmp_path / "bench.json"
    assert main(["bench", "motion", "--configfile", str(overlay), "--clips", "2", "--repeats",
                 "1", "--size", "48,64", "--cost-pairs", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "robust mode (residual + mass) vs half-size TV-L1: 48x64 frames, flow grid 24x32" in text
    for key, label in COST_ROWS:
        if key != "rule":
            assert label in text, label
    assert "configured rule after the flow (boundaries + contours)" in text
    assert "robust mode on top of half-size TV-L1:" in text
    cost = json.loads(out.read_text())["robust_cost"]
    assert cost["pairs"] == 4 and all(cost[k] > 0 for k, _ in COST_ROWS)
    assert cost["robust"] == cost["residual_map"] + cost["mass_boxes"] + cost["median"]
