"""The GPU check, in two parts of at most 6 minutes each on one H200, runnable offline.

    python benchmarks/gpu_check.py --part tests|measure|all [--kit .device-kit] [--cpu] [--out DIR] [--data DIR]

--part tests    `pytest -m gpu` (tests/test_gpu.py): training with bf16 + channels_last + compile
                learns, evaluate agrees with predict, the CAM fast path equals pytorch-grad-cam on
                CUDA, and jobs.pipeline end to end on a local Ray (trials on the GPU, row counts,
                CAM rows against predictions).
--part measure  training images/s and MFU (resnet50, bf16); fit() against a DataLoader + PIL loop;
                the CAM fast path against pytorch-grad-cam and its limit on 10,000 test images; the
                Ray Data stage against a plain loop; one paper-config epoch, the GPU memory a trial
                holds, and the combined images/s of 1, 4 and 8 trials sharing the GPU.
--part all      both (a GPU machine with the time; `make gpu-check`).

Each section (benchmarks/gpu_sections.py, or pytest) runs as a child in its own session, with a
timeout inside the part's budget. When it ends or overruns, whatever is left of its session (the
pipeline's Ray included) is killed, so nothing holds the GPU into the next section. After every
section the part writes <part>.json and <part>.md to --out, and this process prints unbuffered.
The exit status is 1 when a correctness check fails (a GPU test, the stage's row count) or a
section crashes or runs out of time; performance goals are reported as met or unmet, never fatal.

--kit DIR   first install DIR's wheels offline (pip --no-index; `make device-kit` builds it) and
            read DIR's data: what the device tool's GPU machine needs, which downloads nothing.
--cpu       the same code at small sizes on the CPU, the GPU tests included (the rehearsal);
            its figures say nothing about a GPU.

This parent imports neither torch nor the project: it holds no CUDA context, so each section has
the GPU to itself, and the kit can be installed before anything needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT))  # cifarcam.ray_env (standard library only)

from device_kit import install  # noqa: E402

PARTS = {
    "tests": ("environment", "gpu_tests"),
    "measure": ("environment", "training", "baseline", "cam", "stage", "paper_epoch", "packing"),
}
# A part's budget: the 6 minutes on the GPU with margin (the kit's install and the
# machine's start are outside it); the rehearsal's CPU sizes on 2 cores need longer.
PART_BUDGET_S = {"gpu": 335, "cpu": 900}
# Measured on one H200 (README): gpu_tests 257 s with its pipeline cut off at 200 s, training 74,
# baseline 17, cam 34, stage 63, paper_epoch 31; packing ran out of its 75 s before 8 trials.
SECTION_TIMEOUT_S = {"environment": 60, "gpu_tests": 320, "training": 110, "cam": 60, "stage": 75, "paper_epoch": 45, "packing": 90, "baseline": 40}
CPU_TIMEOUT_SCALE = 4
GOALS = {
    "mfu": ("MFU of the bf16 resnet50 training step at batch >= 256", 0.35),
    "train_vs_pil": ("training / DataLoader + PIL baseline (same precision)", 5.0),
    "cam_vs_per_image": ("CAM fast path / per-image pytorch-grad-cam loop", 20.0),
    "cam_vs_batched": ("CAM fast path / batched pytorch-grad-cam", 3.0),
    "stage_over_loop": ("Ray Data stage time / plain loop time (at most)", 1.3),
}


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process but this one and zombies, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                state, ppid, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]  # after "pid (comm)"
            except (OSError, ValueError):
                continue  # gone meanwhile
            if state != "Z":
                table[int(entry.name)] = (int(ppid), int(session))
    return table


def sessions_under(pid: int) -> set[int]:
    """The sessions of ``pid`` and of every process below it: a test that starts a job in a
    session of its own (tests/helpers.run_job) puts that job, and its Ray, there."""
    table, found, frontier = live_processes(), {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent and p not in found]
        found.update(children)
        frontier += children
    return {pid} | {table[p][1] for p in found if p in table}


def kill_sessions(sessions: set[int], wait_s: float = 10) -> int:
    """SIGKILL every process in ``sessions`` and wait until they are gone (their GPU memory with
    them); how many there were."""
    members = {p for p, (_, sid) in live_processes().items() if sid in sessions}
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and members & live_processes().keys():
        time.sleep(0.1)
    return len(members)


def run_child(command: list[str], timeout: float, env: dict) -> tuple[str, int | None]:
    """Run ``command`` in a session of its own; then kill whatever it left there, and in the
    sessions its descendants made (found before anything is killed, while they are still below it)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "crashed"
        sessions = {proc.pid}
    except subprocess.TimeoutExpired:
        sessions = sessions_under(proc.pid)
        status = "timed out"
    left = kill_sessions(sessions)
    proc.wait()
    if left:
        print(f"  killed {left} process(es) the section left behind")
    return status, proc.returncode


def gpu_tests(timeout: float, env: dict, data: Path, scratch: Path) -> dict:
    junit = scratch / "gpu_tests.xml"
    test_env = {**env, "CIFARCAM_DATA": str(data.parent)}
    # Each test's own limit (pytest-timeout) stays inside the section's, so that a slow test fails
    # alone and pytest still writes its report; test_gpu.py sizes its pipeline's limit likewise.
    per_test = int(max(timeout - 40, 30))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", "-o", f"timeout={per_test}"]
    command += ["--junitxml", str(junit), "tests/test_gpu.py"]
    status, code = run_child(command, timeout, test_env)
    if not junit.exists():
        return {"status": status, "returncode": code, "failed_checks": [f"GPU tests: {status}, no report"]}
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"] = outcome
    failed = [name for name, outcome in outcomes.items() if outcome in ("failure", "error")]
    status = "ok" if status == "ok" else ("failed" if status == "crashed" else status)
    counts = {k: list(outcomes.values()).count(k) for k in ("passed", "failure", "error", "skipped")}
    print(f"GPU tests: {counts}")
    return {
        "status": status,
        "returncode": code,
        "figures": {"counts": counts, "outcomes": outcomes},
        "failed_checks": [f"GPU test failed: {name}" for name in failed] or ([f"GPU tests: {status}"] if status != "ok" else []),
    }


def section(name: str, timeout: float, env: dict, data: Path, scratch: Path) -> dict:
    """A measurement section. One that crashes fails the check; one that runs out of time only
    reports it, with what it had measured by then: speed is reported, never fatal."""
    fragment = scratch / f"{name}.json"
    status, code = run_child([sys.executable, "benchmarks/gpu_sections.py", name, "--data", str(data), "--fragment", str(fragment)], timeout, env)
    measured = json.loads(fragment.read_text()) if fragment.exists() else {}
    if status == "timed out":
        return {"status": status, "figures": measured.get("figures"), "failed_checks": []}
    if status != "ok" or not measured or measured.get("partial"):
        return {"status": status, "returncode": code, "figures": measured.get("figures"), "failed_checks": [f"{name}: {status} (exit status {code})"]}
    return {"status": "ok", **measured}


def run_part(part: str, mode: str, env: dict, data: Path, out: Path) -> bool:
    figures: dict = {"part": part, "mode": mode, "sections": {}}
    started = time.monotonic()
    deadline = started + PART_BUDGET_S[mode]
    scale = CPU_TIMEOUT_SCALE if mode == "cpu" else 1
    print(f"== part {part} ({mode} mode): budget {PART_BUDGET_S[mode]} s", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in PARTS[part]:
            timeout = min(SECTION_TIMEOUT_S[name] * scale, deadline - time.monotonic())
            began = time.monotonic()
            print(f"-- {name} (at most {timeout:.0f} s)", flush=True)
            if timeout < 5:  # a test that cannot run fails the check; a measurement only says so
                result = {"status": "skipped: no time left", "failed_checks": [f"{name}: no time left"] if name == "gpu_tests" else []}
            elif name == "gpu_tests":
                result = gpu_tests(timeout, env, data, Path(scratch))
            else:
                result = section(name, timeout, env, data, Path(scratch))
            result["seconds"] = time.monotonic() - began
            print(f"-- {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
            figures["sections"][name] = result
            figures["seconds"] = time.monotonic() - started
            figures["goals"] = goals(figures["sections"])
            (out / f"{part}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
            (out / f"{part}.md").write_text(markdown(figures))
    failed = [check for result in figures["sections"].values() for check in result.get("failed_checks", [])]
    print((out / f"{part}.md").read_text())
    for check in failed:
        print(f"FAILED: {check}")
    print(f"part {part}: {'failed' if failed else 'passed'} in {figures['seconds']:.0f} s; wrote {out / f'{part}.json'} and {out / f'{part}.md'}")
    return not failed


def _figures(sections: dict, name: str) -> dict | None:
    return sections.get(name, {}).get("figures")


def goals(sections: dict) -> dict:
    training, baseline, cam, stage = (_figures(sections, n) for n in ("training", "baseline", "cam", "stage"))
    return {
        "mfu": max((r["mfu"] for r in training["runs"] if r.get("mfu") is not None and r["batch"] >= 256), default=None) if training else None,
        "train_vs_pil": baseline["ratio"] if baseline else None,
        "cam_vs_per_image": cam["vs_per_image"] if cam else None,
        "cam_vs_batched": cam["vs_batched"] if cam else None,
        "stage_over_loop": stage["stage_over_loop"] if stage else None,
    }


def markdown(figures: dict) -> str:
    sections = figures["sections"]
    env = _figures(sections, "environment") or {}
    lines = [
        f"GPU check, part {figures['part']}, on {env.get('device_name', '?')} ({figures['mode']} mode), torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda')}, Python {env.get('python', '?')}, {env.get('date', '?')}.",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {result['status']} | {result['seconds']:.0f} |" for name, result in sections.items()]
    tests = _figures(sections, "gpu_tests")
    if tests:
        lines += ["", "| GPU test | outcome |", "|---|---|"] + [f"| {name} | {outcome} |" for name, outcome in tests["outcomes"].items()]
    training = _figures(sections, "training")
    if training:
        lines += ["", "| training | batch | compile | images/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
        for r in training["runs"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['compile']} | failed: {r['error'][:120]} | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(
                f"| {r['model']} (CIFAR stem, {r['precision']}, channels_last) | {r['batch']} | {r['compile']} | {r['images_per_s']:.0f} | {r['tflops']:.1f} | {mfu} |"
            )
    rows = _measurement_rows(sections)
    if rows:
        lines += ["", "| measurement | figure |", "|---|---|", *rows]
    if figures["part"] == "measure":
        lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
        for key, (text, target) in GOALS.items():
            value = figures["goals"].get(key)
            if value is None or figures["mode"] == "cpu":
                met = "n/a"
            else:
                met = "yes" if (value <= target if key == "stage_over_loop" else value >= target) else "no"
            shown = "n/a" if value is None else (f"{100 * value:.1f}%" if key == "mfu" else f"{value:.2f}")
            target_shown = f"{100 * target:.0f}%" if key == "mfu" else f"{target:g}"
            lines.append(f"| {text} | {target_shown} | {shown} | {met} |")
    if figures["mode"] == "cpu":
        lines += ["", "CPU mode: small sizes on the CPU, to prove the check and its kit; the goals are for a GPU and are not judged here."]
    return "\n".join(lines) + "\n"


def _measurement_rows(sections: dict) -> list[str]:
    rows = []
    b, c, s, p, k = (_figures(sections, n) for n in ("baseline", "cam", "stage", "paper_epoch", "packing"))
    if b:
        rows.append(
            f"| training vs DataLoader + PIL ({b['baseline_workers']} workers, same precision), batch {b['batch']} | "
            f"{b['ours_images_per_s']:.0f} / {b['baseline_images_per_s']:.0f} images/s = {b['ratio']:.2f}x |"
        )
    if c:
        rows += [
            f"| CAM fast path, {c['images']} test images | {c['ours_images_per_s']:.0f} images/s |",
            f"| vs per-image pytorch-grad-cam / batched / activation-only limit | {c['vs_per_image']:.1f}x / {c['vs_batched']:.2f}x / limit at {c['limit_over_ours']:.2f}x ours |",
            f"| CAM actor, faithfulness off / on (16 steps, 128-image sample) | {c['actor_faithfulness_0_steps_images_per_s']:.0f} / {c['actor_faithfulness_16_steps_images_per_s']:.0f} images/s |",
        ]
    if s:
        rows.append(
            f"| Ray Data stage / plain loop, {s['stage_images']} images ({s['rows_written']} rows) | {s['stage_s']:.1f} s / {s['plain_loop_s']:.1f} s = "
            f"{s['stage_over_loop']:.2f}; {s['stage_over_loop_without_fixed']:.2f} without its fixed {s['stage_fixed_s']:.1f} s (the stage on one batch) |"
        )
    if p:
        held = (
            f", {p['process_footprint_gib']:.2f} GiB held on the GPU, {p['trials_that_fit_in_memory']} fit in memory" if p.get("process_footprint_gib") else ""
        )
        rows.append(
            f"| paper-config epoch ({p['model']}, ImageNet stem, 32 px, batch 64, {p['images']} images) | {p['epoch_s']:.1f} s, {p['images_per_s']:.0f} images/s{held} |"
        )
    for r in (k or {}).get("rows", []):
        shown = (
            f"{r['combined_images_per_s']:.0f} images/s combined ({r['speedup_over_one']:.2f}x one)"
            if r.get("combined_images_per_s")
            else f"failed ({r.get('failed')})"
        )
        rows.append(f"| {r['trials']} paper trial(s) sharing the GPU | {shown} |")
    return rows


def _has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("tests", "measure", "all"), default="all")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-check", help="folder for <part>.json and <part>.md")
    p.add_argument("--cpu", action="store_true", help="the small CPU mode even where CUDA exists (the rehearsal)")
    p.add_argument("--kit", type=Path, help="install this device kit's wheels offline first, and read its data")
    p.add_argument("--data", type=Path, help="CIFAR-10 Parquet folder (default: the kit's, else ../shared/data/cifar10-jpeg)")
    args = p.parse_args()
    from cifarcam.ray_env import JOB_ENV

    env = {**JOB_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu:  # hide the GPUs from every section, the local Ray it starts included
        env |= {"CUDA_VISIBLE_DEVICES": "", "CIFARCAM_CHECK_DEVICE": "cpu"}
    mode = "cpu" if args.cpu or not _has_gpu() else "gpu"
    with tempfile.TemporaryDirectory(prefix="cifarcam-kit-") as scratch:  # 200 MB installed: gone when the check ends
        if args.kit:
            site = Path(scratch)
            began = time.monotonic()
            install(args.kit, site)
            print(f"kit: installed {args.kit}'s wheels offline (pip --no-index) into {site} in {time.monotonic() - began:.0f} s", flush=True)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT), env.get("PYTHONPATH")]))
            env["PATH"] = os.pathsep.join([str(site / "bin"), env["PATH"]])  # the `ray` command, for the tests that call it
        data = args.data or (args.kit / "data" / "cifar10-jpeg" if args.kit else ROOT.parent / "shared" / "data" / "cifar10-jpeg")
        args.out.mkdir(parents=True, exist_ok=True)
        parts = ("tests", "measure") if args.part == "all" else (args.part,)
        passed = [run_part(part, mode, env, data.resolve(), args.out) for part in parts]
    sys.exit(0 if all(passed) else 1)


if __name__ == "__main__":
    main()
