"""The watch's decision on the cluster's placement groups (as read_placement_groups returns them from
Ray's state API). The real thing, a search that cannot place its trial on a real cluster, is in
test_search_job.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cifarcam.config import load_config
from cifarcam.errors import ConfigError
from cifarcam.search.placement_watch import PlacementWatch, SearchStalled, cluster_summary, describe, poll_interval, train_start_timeout, worker_bundle


def group(state: str, *bundles: dict[str, float], job: str = "02000000") -> dict:
    return {"state": state, "job": job, "bundles": dict(enumerate(bundles))}


WORKER = {"CPU": 1.0}
TRIAL_GROUP = group("PENDING", WORKER, WORKER)  # Ray Train's group for a trial of 2 workers
TUNE_GROUP = group("CREATED", {"memory": 64.0 * 2**20})  # Tune's own group per trial: never a worker group
LEAK = group("CREATED", WORKER, job="01000000")  # what another job left behind


def watch(timeout_s: float = 30) -> PlacementWatch:
    w = PlacementWatch(worker_bundle(1, 0), workers=2, timeout_s=timeout_s, job="02000000")
    w.on_trial_start(0, [], SimpleNamespace(trial_id="a_00002", config={"model": "resnet_tiny"}))
    return w


def test_a_worker_group_waiting_past_the_timeout_ends_the_search():
    w = watch()
    assert not w.observe({"t": TUNE_GROUP, "w": TRIAL_GROUP}, now=100)
    assert not w.observe({"t": TUNE_GROUP, "w": TRIAL_GROUP}, now=129)
    # Train's retry replaces the group by another: the wait goes on
    assert w.observe({"t": TUNE_GROUP, "w2": TRIAL_GROUP}, now=130)


def test_a_search_space_without_a_model_names_the_configs():
    w = PlacementWatch(worker_bundle(1, 0), workers=2, timeout_s=30, model="resnet_tiny", job="02000000")
    w.on_trial_start(0, [], SimpleNamespace(trial_id="b_00000", config={"lr": 0.1}))
    assert w.message({}, {}, {}).startswith("search: trial b_00000 (resnet_tiny) could not place its 2 workers")


def test_a_reading_with_no_group_waiting_restarts_the_count():
    w = watch()
    w.observe({"w": TRIAL_GROUP}, now=0)
    assert not w.observe({"w": {**TRIAL_GROUP, "state": "CREATED"}}, now=20)  # placed: the trial trains
    assert not w.observe({"w3": TRIAL_GROUP}, now=40)  # the next trial starts waiting now
    assert not w.observe({"w3": TRIAL_GROUP}, now=69)
    assert w.observe({"w3": TRIAL_GROUP}, now=70)


def test_groups_of_other_shapes_are_not_this_searchs_workers():
    w = watch()
    others = {
        "tune": group("PENDING", {"memory": 1.0}),
        "gpu": group("PENDING", {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}),
        "one": group("PENDING", WORKER),
    }
    assert not w.observe(others, now=0) and not w.observe(others, now=1000)
    assert PlacementWatch(worker_bundle(1, 1), 2, 30, job="02000000").observe({"gpu": others["gpu"]}, now=0) is False  # counting starts


def test_another_jobs_waiting_group_is_not_this_searchs():
    """Two searches on one cluster: the one that waits must not stop the one that trains."""
    w = watch()
    theirs = {"w": group("PENDING", WORKER, WORKER, job="03000000")}
    assert not w.observe(theirs, now=0) and not w.observe(theirs, now=1000)


def test_the_line_names_the_trial_what_it_waits_for_and_what_the_cluster_holds():
    w = watch(20)
    table = {"t": TUNE_GROUP, "leak": LEAK, "w": TRIAL_GROUP}
    line = w.message(table, total={"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0, "CPU_group_0_9494d4": 1.0, "CPU_group_9494d4": 1.0}, free={"CPU": 1.0})
    assert line == (
        "search: trial a_00002 (resnet_tiny) could not place its 2 workers (1 CPU each) within scaling.start_timeout_s = 20 s; "
        "the cluster has 2 CPU, 1 CPU free, 1 CPU reserved by 1 placement group; the search stopped and kept its finished "
        "trials and checkpoints: free those resources (`ray status` shows who holds them), then run again with --resume "
        "(with a longer scaling.start_timeout_s if placement is merely slow here)"
    )
    w.on_trial_result(0, [], SimpleNamespace(trial_id="a_00002"), {})  # a trial that trains waits for nothing
    assert "a trial (restarting its workers)" in w.message(table, {}, {})
    for trial_id in ("a_00003", "a_00001"):
        w.on_trial_start(0, [], SimpleNamespace(trial_id=trial_id, config={"model": "resnet_tiny"}))
    assert w.message(table, {}, {}).startswith("search: one of trials a_00001 (resnet_tiny), a_00003 (resnet_tiny) could not place")


def test_off_the_main_thread_the_watch_ends_the_run_by_raising():
    import threading

    w = watch()
    w.verdict = "search: stalled"
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(SearchStalled, w.stop_search).value))
    thread.start()
    thread.join()
    assert str(raised[0]) == "search: stalled"


@pytest.mark.parametrize("timeout_s", [1, 20, 600])
def test_trains_own_timeout_comes_after_the_watchs_latest_decision(timeout_s):
    # a group is first read up to one poll after Train created it, and judged up to one poll late
    assert train_start_timeout(timeout_s) > timeout_s + 2 * poll_interval(timeout_s)
    assert describe({"CPU": 2.0, "GPU": 0.0, "object_store_memory": 1e9}) == "2 CPU"
    assert cluster_summary({}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}) == "the cluster has 4 CPU, 1 GPU, 4 CPU free, nothing reserved by 0 placement groups"


def test_the_timeout_is_a_config_value_checked_before_any_cluster(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nscaling: {start_timeout_s: 0}\n")
    with pytest.raises(ConfigError, match=r"^scaling.start_timeout_s: must be > 0 seconds, got 0$"):
        load_config(path)
    path.write_text("name: c\nscaling: {start_timeout_s: 90}\n")
    assert load_config(path).scaling.start_timeout_s == 90
