"""Files that other processes (other nodes, over NFS) poll while they are written: ray-head.json,
driver-status.json, config.yaml, the CAM markers. A reader in another process must see the old
file or the whole new one, never an empty or half-written one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from cifarcam.results import write_text_atomic

READER = """
import json, sys
from pathlib import Path
path, stop = Path(sys.argv[1]), Path(sys.argv[2])
reads = torn = 0
while not stop.exists():
    try:
        text = path.read_text()
    except FileNotFoundError:
        continue
    reads += 1
    try:
        json.loads(text)
    except ValueError:
        torn += 1
print(reads, torn)
"""


def _torn_reads(tmp_path: Path, write: Callable[[Path, str], object], seconds: float) -> tuple[int, int]:
    """(reads, torn reads) by a polling process while ``write`` rewrites a 2 MB JSON file."""
    path, stop = tmp_path / "ray-head.json", tmp_path / "stop"
    stop.unlink(missing_ok=True)
    write(path, json.dumps({"address": "10.0.0.1:6379"}))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        write(path, json.dumps({"address": f"10.0.0.{i % 250}:6379", "padding": "x" * (2 << 20)}))
    stop.touch()
    reads, torn = map(int, reader.communicate(timeout=60)[0].split())
    return reads, torn


def test_a_polling_process_never_reads_a_half_written_file(tmp_path):
    reads, torn = _torn_reads(tmp_path, write_text_atomic, seconds=3)
    assert reads > 20 and torn == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_the_reader_does_see_torn_files_when_written_in_place(tmp_path):
    """The control: Path.write_text truncates first, and the same reader catches it."""
    reads, torn = _torn_reads(tmp_path, Path.write_text, seconds=3)
    assert torn > 0, f"{reads} reads, none torn"


def test_a_full_disk_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """ENOSPC half-way through a table: one line naming the file, the previous version intact, and
    no .partial file left behind (monkeypatched: a disk cannot be filled here)."""
    import errno

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from cifarcam import results
    from cifarcam.errors import UserError

    schema = pa.schema([("x", pa.int64())])
    path = results.write_table({"x": [1]}, schema, tmp_path / "trials.parquet")

    def half_then_full(table: pa.Table, where: Path) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", half_then_full)
    with pytest.raises(UserError) as info:
        results.write_table({"x": [2]}, schema, path)
    assert str(info.value) == f"{path}: cannot write it (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.parquet"]
    monkeypatch.undo()
    assert pq.read_table(path).column("x").to_pylist() == [1]
