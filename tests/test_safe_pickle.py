import os
import pickle

import numpy as np
import pytest

from cifarcam.errors import DataError
from cifarcam.safe_pickle import UnsafePickleError, safe_load


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/cifarcam-pwned",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    blob = pickle.dumps({"data": _RunsCode()})
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: not a CIFAR pickle \(refused global posix\.system\)"):
        safe_load(blob, "evil.pkl")
    assert not os.path.exists("/tmp/cifarcam-pwned")


def test_numpy_arrays_lists_and_strings_load():
    value = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2], "names": ["a", "b"]}
    loaded = safe_load(pickle.dumps(value, protocol=2), "ok.pkl")
    np.testing.assert_array_equal(loaded[b"data"], value[b"data"])
    assert loaded["labels"] == [1, 2] and loaded["names"] == ["a", "b"]


def test_truncated_pickle_gives_a_clear_error():
    blob = pickle.dumps({"data": np.zeros((10, 10), np.uint8)})
    with pytest.raises(DataError, match=r"cut\.pkl: corrupt or truncated pickle"):
        safe_load(blob[: len(blob) // 2], "cut.pkl")
