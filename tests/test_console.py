"""A quiet terminal: the README's demo shows the project's own lines, and Ray's go to the run."""

from cifarcam.config import load_config
from helpers import assert_quiet


def test_the_demo_terminal_shows_the_projects_lines_and_ray_logs_go_to_the_run(demo_run):
    terminal = (demo_run.parent / "terminal.txt").read_text()
    assert_quiet(terminal, demo_run)
    test_images = load_config(demo_run / "config.yaml").data.synthetic.test_size
    # the project's own lines: what was loaded, the search, the CAM stage, the report, warnings
    for expected in (
        "data: synthetic: ",
        f"val / {test_images} test, 10 classes",
        "search: trial ",
        "best trial per model",
        "cams: 1 CPU actor(s) of 1 CPU, 2 thread(s) each",  # --num-cpus 2: the writer's core computes too
        f"cams resnet_tiny (gradcam): {test_images}/{test_images} images",
        f"report: {demo_run}",
    ):
        assert expected in terminal, expected
    assert terminal.count("warning: no GPU in this Ray cluster") == 1  # once, though search and CAM stage both met it
    (logs,) = (demo_run / "logs").iterdir()
    assert logs.name.startswith("pipeline-")
    # Ray Data's block log and the driver's own C++ error line went to files, not away
    assert "Execution plan of Dataset" in (logs / "ray-driver.log").read_text()
    assert "core_worker.cc" in (logs / "driver-stderr.log").read_text() and "core_worker.cc" not in terminal
