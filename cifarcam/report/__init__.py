"""Stage 5, the report: DuckDB over a run's Parquet, figures, report.md and report.html, and any
query. Imports the data (test images for figures) and the core; neither the search, nor the CAM
stage, nor torch."""

from cifarcam.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "console": ["rich_table"],
        "views": ["connect", "run_sql"],
        "writer": ["write_report"],
    },
)
