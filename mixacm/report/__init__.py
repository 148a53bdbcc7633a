"""Tables, figures and the HTML report, built only from result files and the paper's numbers."""
from mixacm.report.figures import FIGURE_NAMES, make_figures
from mixacm.report.html import render_report
from mixacm.report.tables import (
    ATTACK_COLUMNS,
    PAPER_NUMBERS,
    TABLE_KINDS,
    ResultFileError,
    build_table,
    collect_costs,
    collect_results,
    load_paper_numbers,
    read_benchmark,
    read_table,
    write_table,
)

__all__ = [
    "ATTACK_COLUMNS", "FIGURE_NAMES", "PAPER_NUMBERS", "TABLE_KINDS", "ResultFileError", "build_table",
    "collect_costs", "collect_results", "load_paper_numbers", "make_figures", "read_benchmark", "read_table",
    "render_report", "write_table",
]
