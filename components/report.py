"""Report microjob (CPU): every cell's logs and evaluations -> report.md, summary.json and plots, published
to the run's prefix (manifest last); shown in the KFP UI as HTML (plots inline) and success-rate Metrics. Titled by
the run's URI and the KFP run (kfp_run / kfp_run_id: the pipeline passes the run's name and id placeholders)."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("cpu"), install_kfp_package=False)
def report(cells: list, workdir: str, results: Input[List[Artifact]], html: Output[HTML], markdown: Output[Markdown],
           metrics: Output[Metrics], kfp_run: str = "", kfp_run_id: str = "") -> str:
    from vla_core.experiments import cells as matrix_cells

    run, local, summary = matrix_cells.report(cells, workdir, kfp_run, kfp_run_id)
    with open(html.path, "w") as f:
        f.write(matrix_cells.report_html(local))
    with open(markdown.path, "w") as f:
        f.write(matrix_cells.report_markdown(local))
    for name, value in matrix_cells.success_metrics(summary).items():
        metrics.log_metric(name, value)
    return run
