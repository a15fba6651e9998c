"""The Snakemake HTML report of the tiny CI run, opened in a headless Chromium.

The report is a single-page app: its results appear only after clicks. The test injects a
small script into a copy of ``report.html`` that clicks through the categories as a reader
would, then records the page's rendered text and every image's decoded size into a ``<pre>``
that ``chromium --dump-dom`` returns. So it checks what a browser shows (the variant table's
rows, pictures that decoded), not only that files exist. Figures unit-tested without
Snakemake at the end.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster import pipeline
from tests.smkwork import run_snakemake, snakemake_cmd

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".test" / "config" / "tiny.yaml"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Clicks through the report: each visit is a path of menu entries from "Results", then the
# first result's eye button (show it) or, for "info", the named result's information button.
HARNESS = r"""
<script>
(function () {
  const VISITS = %s;
  const out = {visits: []};
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  function clickText(t) {
    for (const sel of ["a", "button", "span"]) {
      for (const e of document.querySelectorAll(sel)) {
        if (e.textContent.trim() === t) { (e.closest("a,button") || e).click(); return true; }
      }
    }
    return false;
  }
  function clickRow(name, icon) {
    for (const tr of document.querySelectorAll("tr")) {
      const td = tr.querySelector("td");
      if (td && (name === null || td.textContent.trim() === name)) {
        const b = tr.querySelector(`[iconname="${icon}"]`);
        if (b) { b.click(); return true; }
      }
    }
    return false;
  }
  async function run() {
    await sleep(500);
    out.home_text = document.body.innerText;
    for (const [path, name, icon] of VISITS) {
      const visit = {path: path, clicks: []};
      visit.clicks.push(clickText("Results"));
      await sleep(300);
      for (const entry of path) { visit.clicks.push(clickText(entry)); await sleep(300); }
      visit.clicks.push(clickRow(name, icon));
      await sleep(1200);
      visit.text = document.body.innerText;
      visit.images = Array.from(document.images)
        .filter((i) => i.src.startsWith("data:image/png"))
        .map((i) => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
      out.visits.push(visit);
    }
    const pre = document.createElement("pre");
    pre.id = "mofo-check";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", run);
})();
</script>
"""

VISITS = [
    [["5. Variant table"], "table.csv", "information-circle"],
    [["5. Variant table"], "table.png", "eye"],
    [["3. Training curves"], None, "eye"],
    [["4. Confusion matrices"], None, "eye"],
    [["2. Pretraining", "mofo masking, seed 0"], None, "eye"],
    [["1. Motion boxes", "Motion pictures"], None, "eye"],
]


def chromium(*args: str, user_dir: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={user_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


#: The rules that draw the report's figures (localrules): all that `figures` runs on a finished run.
FIGURE_RULES = {"figures", "pretrain_figures", "variant_figures", "table_figure"}


def job_stats(output: str) -> dict[str, int]:
    """The "Job stats" table Snakemake prints before it runs (or dry-runs) the jobs."""
    table = output.split("Job stats:", 1)[1].strip().split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def no_tracking(folder: Path) -> Path:
    path = folder / "no-tracking.yaml"
    path.write_text(yaml.safe_dump({"tracking": {"mlflow": {"enabled": False}}}))
    return path


@pytest.fixture(scope="module")
def tiny_report(tiny_local_pipeline, tmp_path_factory) -> tuple[Path, Path]:
    """The report of the tiny pipeline with the docs' command (docs/PIPELINE.md "Report"):
    ``snakemake --cores 2 figures --report <html> --report-after-run``, on a private copy of
    the session's finished tiny pipeline, where it only draws the figures and writes the
    report (checked: no stage job runs). That the same command runs the whole pipeline on a
    fresh checkout is checked by its dry run below."""
    root = tmp_path_factory.mktemp("report")
    work = pipeline.private_copy(tiny_local_pipeline, root / "work")
    report = work / "results" / "demo" / "report.html"
    result = subprocess.run(
        snakemake_cmd(work, "--cores", "2", "figures", "--configfile", str(TINY),
                      str(no_tracking(root)), "--report", str(report), "--report-after-run"),
        cwd=work, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = set(job_stats(result.stdout + result.stderr)) - {"total"}
    assert ran and ran <= FIGURE_RULES, ran  # a finished run: only the figures are drawn
    return work, report


def test_report_command_runs_the_whole_pipeline_on_a_fresh_checkout(tmp_path: Path):
    """docs/PIPELINE.md "Report": the same command on a fresh checkout runs what is missing,
    every stage of the pipeline, and then draws the figures (a dry run)."""
    result = run_snakemake("-n", "figures", "--configfile", str(TINY), str(no_tracking(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_stats(result.stdout)
    # Every rule that becomes a job, but MME's trajectories (no MME pretraining in the tiny
    # config); the figures once per pretraining, per variant and for the table.
    assert set(counts) - {"total"} == (pipeline.PIPELINE_RULES - {"trajectories"}) | FIGURE_RULES
    assert counts["pretrain_figures"] == counts["pretrain"] == 2, counts
    assert counts["variant_figures"] == counts["evaluate"] == 5, counts
    assert counts["table_figure"] == counts["figures"] == 1, counts


@pytest.mark.slow
@pytest.mark.browser
# A skipif mark is decided before the fixtures are set up: no pipeline run without a browser.
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (tools/install.sh installs it as "
                    "root: apt-get install chromium)")
def test_report_renders_the_table_and_the_pictures(tiny_report):
    root, report = tiny_report
    res = root / "results" / "demo"
    for variant in ("scratch-mean", "tube-mean", "mofo-mean", "tube-mca", "mofo-mca"):
        assert (res / "report" / variant / "s0" / "curves.png").stat().st_size > 10_000
    page = root / "probe.html"
    text = report.read_text()
    cut = text.rfind("</body>")
    page.write_text(text[:cut] + HARNESS % json.dumps(VISITS) + text[cut:])
    result = chromium("--virtual-time-budget=20000", "--dump-dom", page.as_uri(),
                      user_dir=root / "chromium")
    match = re.search(r'<pre id="mofo-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert match, f"the page never finished its clicks: {result.stderr[-2000:]}"
    seen = json.loads(html.unescape(match[1]))
    home = seen["home_text"]
    for entry in ("Statistics", "1. Motion boxes", "2. Pretraining", "3. Training curves",
                  "4. Confusion matrices", "5. Variant table", "MOtion FOcused"):
        assert entry in home, entry
    for visit in seen["visits"]:  # the first click ("Results") does nothing on the home page
        assert all(visit["clicks"][1:]), (visit["path"], visit["clicks"])
    # The variant table, rendered (the caption reads table.csv): the header and five rows.
    table_text = seen["visits"][0]["text"]
    assert re.search(r"variant\s+pretrain_masking\s+finetune_head\s+label_fraction\s+n_seeds"
                     r"\s+top1_mean\s+top1_std", table_text)
    for row in (r"Scratch\s+scratch\s+mean", r"VideoMAE\s+tube\s+mean", r"MOFO\*\s+mofo\s+mean",
                r"MOFO\*\*\s+tube\s+mca", r"MOFO†\s+mofo\s+mca"):
        # all labels (1.000), one seed, top1_mean
        assert re.search(row + r"\s+1\.000\s+1\s+\d+\.\d\d\d", table_text), row
    # Every picture visit shows a PNG that the browser decoded (natural size > 0).
    for visit in seen["visits"][1:]:
        images = visit["images"]
        assert images and all(i["complete"] and i["width"] > 100 and i["height"] > 50
                              for i in images), (visit["path"], images)
    shot = root / "report.png"
    chromium("--virtual-time-budget=20000", "--window-size=1400,900", f"--screenshot={shot}",
             page.as_uri(), user_dir=root / "chromium")
    assert shot.stat().st_size > 20_000  # the last visit: a motion picture on screen


def test_curves_and_table_figure(tmp_path: Path):
    from mofo.evaluation.curves import (
        accuracy_keys,
        draw_table_figure,
        draw_training_curves,
        read_metrics,
    )

    pre, ft = tmp_path / "pre.jsonl", tmp_path / "ft.jsonl"
    lines = []
    for epoch in range(3):
        for step in range(2):
            lines.append({"type": "step", "stage": "pretrain", "epoch": epoch,
                          "step": epoch * 2 + step + 1, "loss": 1.0 / (epoch + 1), "lr": 1e-4})
        lines.append({"type": "epoch", "stage": "pretrain", "epoch": epoch,
                      "step": epoch * 2 + 2, "loss": 1.0 / (epoch + 1), "lr": 1e-4})
    pre.write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut")
    ft.write_text(json.dumps({"type": "epoch", "epoch": 0, "step": 2, "loss": 2.0, "lr": 1e-3,
                              "val_top1": 40.0}) + "\n")
    assert len(read_metrics(pre)) == 9 and accuracy_keys(read_metrics(ft)) == ["val_top1"]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"top1": 55.0, "top5": 90.0}))
    out = draw_training_curves(pre, ft, metrics, tmp_path / "curves.png", "t")
    assert out.stat().st_size > 10_000
    # The scratch variant has no pretraining: no path, an empty panel, no error.
    assert read_metrics("") == [] and read_metrics(None) == []
    assert draw_training_curves("", ft, metrics, tmp_path / "scratch.png").stat().st_size > 10_000
    table = tmp_path / "table.csv"
    table.write_text("variant,pretrain_masking,finetune_head,n_seeds,top1_mean,top1_std,top5_mean,top5_std\n"
                     "VideoMAE,tube,mean,3,70.0,1.5,90.0,0.5\nMOFO†,mofo,mca,1,75.0,,95.0,\n"
                     "Random init,random,,3,,,,\n")
    assert draw_table_figure(table, tmp_path / "table.png", "ssv2").stat().st_size > 10_000
