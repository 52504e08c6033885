"""Sphinx directive that shows a published benchmark run on the doc site.

``.. benchmark-results:: _static/benchmarks/ivfpq-latest.json`` renders the
machine and versions a run was measured on, its table of results and its
ratios to the peers, from the JSON that ``benchmarks/bench_*.py --publish``
writes, and the plot of the same run (the ``.png`` beside it) when there is
one. A missing file renders a note saying how to produce it.
"""

from __future__ import annotations

import json
import os

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList

# Columns of the results table: key in the JSON row -> (header, format).
_COLUMNS = {
    "level": ("recall@k >=", ".2f"),
    "system": ("system", "s"),
    "config": ("configuration", "s"),
    "nprobe": ("nprobe", "s"),
    "build_s": ("build s", ".1f"),
    "bytes_per_vector": ("bytes/vector", ".1f"),
    "qps": ("queries/s", ".0f"),
    "gflops": ("GFLOP/s", ".0f"),
    "p50_us": ("p50 latency (us)", ".0f"),
    "p99_us": ("p99 latency (us)", ".0f"),
    "recall": ("recall@k", ".4f"),
}


def _cell(value, fmt: str) -> str:
    if value is None:
        return "exact" if fmt == "s" else "-"
    if fmt == "s":
        return str(value)
    return format(value, fmt)


def _list_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return lines


def render(payload: dict, columns: list[str]) -> list[str]:
    """reStructuredText lines for one published run."""
    env = payload["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"Measured {env['date']} on **{env['cpu']}** ({env['n_cpus']} CPUs; "
        f"annlearn kernels: {env.get('annlearn_isa', '?')}, "
        f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}) with {versions}.",
        "",
    ]
    args = payload.get("args", {})
    if args:
        shown = ", ".join(f"{k}={v}" for k, v in args.items() if k != "publish")
        lines += [f"Arguments: ``{shown}``.", ""]
    rows = [r for r in payload["rows"] if all(c in r for c in columns)]
    lines += _list_table(
        [_COLUMNS[c][0] for c in columns],
        [[_cell(r[c], _COLUMNS[c][1]) for c in columns] for r in rows],
    )
    lines.append("")
    ratios = payload.get("ratios")
    if isinstance(ratios, dict):  # bench_flat: name -> value
        lines += ["Ratios, same run:", ""]
        lines += [f"- {name}: **{value:.2f}**" for name, value in ratios.items()]
    elif ratios:  # bench_ivfpq: annlearn / faiss at the same nprobe
        lines += _list_table(
            ["annlearn", "vs faiss", "nprobe", "QPS ratio", "recall (annlearn, faiss)"],
            [
                [
                    r["annlearn"],
                    r["faiss"],
                    str(r["nprobe"]),
                    f"**x{r['qps_ratio']:.2f}**",
                    f"{r['recall_annlearn']:.4f}, {r['recall_faiss']:.4f}",
                ]
                for r in ratios
            ],
        )
    lines.append("")
    return lines


class BenchmarkResults(Directive):
    required_arguments = 1
    option_spec = {"columns": directives.unchanged}

    def run(self):
        env = self.state.document.settings.env
        relative, path = env.relfn2path(self.arguments[0])
        columns = [
            c.strip()
            for c in self.options.get("columns", "system,qps,p50_us,recall").split(",")
        ]
        unknown = set(columns) - set(_COLUMNS)
        if unknown:
            raise self.error(
                f"unknown columns {sorted(unknown)}; known: {list(_COLUMNS)}"
            )
        if os.path.exists(path):
            env.note_dependency(relative)
            with open(path) as f:
                lines = render(json.load(f), columns)
            plot = os.path.splitext(path)[0] + ".png"
            if os.path.exists(plot):
                lines = [
                    f".. image:: {os.path.splitext(self.arguments[0])[0]}.png",
                    "   :alt: recall@k against queries per second",
                    "",
                    *lines,
                ]
        else:
            name = os.path.basename(path).split("-")[0]
            lines = [
                f"No published run yet: ``python benchmarks/bench_{name}.py "
                "--publish`` writes it.",
                "",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=path), 0, container)
        return container.children


def setup(app):
    app.add_directive("benchmark-results", BenchmarkResults)
    return {"parallel_read_safe": True, "version": "1"}
