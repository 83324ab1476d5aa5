"""Stage 4, the explanations: Grad-CAM and its kin on every test image (a Ray Data stage of actors),
their metrics, faithfulness and the sanity check, written as Parquet partitions. Imports training,
the data and the core, never the search: it reads the search's results from the run folder."""

from cifarcam.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "runner": ["actor_layout", "check_cam_job", "check_layers", "explain_run"],
        "settings": ["CLI", "CamSettings"],
    },
)
