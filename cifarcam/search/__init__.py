"""Stage 3, the search: Ray Tune over the config's space, each trial a Ray Train (DDP) run; its
tables, its resource plan, and what it logs. Imports training, the data and the core."""

from cifarcam.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "mlflow_log": ["open_experiment"],
        "planning": ["check_resumable", "plan_resources", "plan_search"],
        "runner": ["run_search"],
        "summary": ["print_search_summary"],
    },
)
