"""Snakemake adapter: the report's figures (mofo.evaluation.curves) and copies of the
pictures the stages wrote outside their declared outputs (confusion matrix, reconstructions)."""

import shutil
from pathlib import Path

from mofo.evaluation.curves import draw_table_figure, draw_training_curves
from mofo.logs import job_log

sm = snakemake
with job_log(sm.log[0]) as log:
    if sm.rule == "table_figure":
        draw_table_figure(sm.input.csv, sm.output.figure, sm.config["dataset"]["name"])
    elif sm.rule == "pretrain_figures":
        out = Path(sm.output.reconstructions)
        out.mkdir(parents=True, exist_ok=True)
        pictures = sorted(Path(sm.params.reconstructions).glob("*.png"))
        for picture in pictures:
            shutil.copy2(picture, out / picture.name)
        log.info("copied %d reconstruction pictures to %s", len(pictures), out)
    else:  # variant_figures
        draw_training_curves(sm.params.pretrain_metrics, sm.params.finetune_metrics,
                             sm.input.metrics, sm.output.curves,
                             title=f"{sm.wildcards.masking} pretraining, {sm.wildcards.head} head")
        confusion = Path(sm.params.confusion)
        if confusion.exists():
            shutil.copy2(confusion, sm.output.confusion)
        else:  # a dataset without labelled test clips draws none: an empty picture says so
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(3, 1))
            fig.text(0.5, 0.5, "no confusion matrix", ha="center")
            fig.savefig(sm.output.confusion)
        log.info("wrote %s and %s", sm.output.curves, sm.output.confusion)
