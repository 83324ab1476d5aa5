"""Real data: the official CIFAR-100 format (20 real test images) and CIFAR-10 as Parquet."""

import io
import json
import pickle
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cifarcam.config import DataConfig
from cifarcam.data import sources
from cifarcam.data.splits import load_splits
from cifarcam.errors import DataError

FINE_LABELS_TEST20 = [49, 33, 72, 51, 71, 92, 15, 14, 23, 0, 71, 75, 81, 69, 40, 43, 92, 97, 70, 53]


def _raw(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # trusted: the shared test file itself, for comparison


def test_cifar100_pixels_labels_and_names_match_the_official_file(cifar100_test20):
    test = sources.read_cifar_split("cifar100", cifar100_test20, "test")
    raw = _raw(cifar100_test20 / "test")
    assert test.images.shape == (20, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.labels.tolist() == FINE_LABELS_TEST20
    assert test.coarse_labels.tolist() == list(raw["coarse_labels"])
    # R, G, B planes of 1024 bytes each, row-major: pixel (row 5, col 7) of image 3
    flat = raw["data"][3]
    assert test.images[3, 5, 7].tolist() == [flat[5 * 32 + 7], flat[1024 + 5 * 32 + 7], flat[2048 + 5 * 32 + 7]]
    assert len(test.class_names) == 100 and len(test.coarse_names) == 20
    assert [test.class_names[i] for i in test.labels[:3]] == ["mountain", "forest", "seal"]
    assert test.class_names[0] == "apple" and test.coarse_names[test.coarse_labels[0]] == "large_natural_outdoor_scenes"


def _tarball(folder, target, members=("meta", "test")):
    with tarfile.open(target, "w:gz") as tar:
        for name in members:
            tar.add(folder / name, arcname=f"cifar-100-python/{name}")
    return target


def test_cifar100_reads_from_tar_gz(cifar100_test20, tmp_path):
    archive = _tarball(cifar100_test20, tmp_path / "cifar-100-python.tar.gz")
    from_tar = sources.read_cifar_split("cifar100", archive, "test")
    from_dir = sources.read_cifar_split("cifar100", cifar100_test20, "test")
    np.testing.assert_array_equal(from_tar.images, from_dir.images)
    assert from_tar.class_names == from_dir.class_names


def test_truncated_archive_gives_a_clear_error(cifar100_test20, tmp_path):
    archive = _tarball(cifar100_test20, tmp_path / "cifar-100-python.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz: truncated or corrupt archive"):
        sources.read_cifar_split("cifar100", cut, "test")


def test_checksum_mismatch_is_reported(tmp_path):
    bad = tmp_path / "cifar-100-python.tar.gz"
    bad.write_bytes(b"not the archive")
    with pytest.raises(DataError, match=r"checksum mismatch \(md5 [0-9a-f]{32}, expected eb9058c3a382ffc7106e4002c42a8d85\)"):
        sources.verify_md5(bad, sources.CIFAR_RELEASES["cifar100"].md5)


def test_missing_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar100: not in .* put cifar-100-python\.tar\.gz"):
        sources.read_cifar("cifar100", None, str(tmp_path / "cache"), download=False)
    with pytest.raises(DataError, match=r"data\.path .*nowhere: not found"):
        sources.read_cifar("cifar100", str(tmp_path / "nowhere"), str(tmp_path), download=False)


def test_wrong_shape_in_a_cifar_file_is_reported(cifar100_test20, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    shutil.copy(cifar100_test20 / "meta", folder / "meta")
    raw = _raw(cifar100_test20 / "test")
    raw["data"] = raw["data"][:, :1000]
    (folder / "test").write_bytes(pickle.dumps(raw, protocol=2))
    with pytest.raises(DataError, match=r"data must be uint8 of shape \(N, 3072\), got uint8 \(20, 1000\)"):
        sources.read_cifar_split("cifar100", tmp_path, "test")


def test_malicious_meta_file_is_refused(cifar100_test20, tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    shutil.copy(cifar100_test20 / "test", folder / "test")
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": Evil()}))
    with pytest.raises(DataError, match=r"meta: not a CIFAR pickle \(refused global posix\.system\)"):
        sources.read_cifar_split("cifar100", tmp_path, "test")


def test_cifar10_parquet_is_the_real_dataset(cifar10_parquet):
    splits = load_splits(DataConfig(source="parquet", path=str(cifar10_parquet)))
    names = tuple(json.loads((cifar10_parquet / "classes.json").read_text()))
    assert splits.class_names == names and len(names) == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    assert splits.train.images.shape[1:] == (32, 32, 3)
    # official split: 5,000 train and 1,000 test images per class; the val split is stratified
    assert np.bincount(splits.val.labels).tolist() == [500] * 10
    assert np.bincount(splits.test.labels).tolist() == [1000] * 10
    assert 100 < splits.test.images.mean() < 150  # real photos, not blank decodes


def test_parquet_with_wrong_columns_is_rejected(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet: missing column\(s\) \['image'\]; expected image: binary"):
        sources.read_parquet_split(tmp_path / "train.parquet")


def test_parquet_with_undecodable_image_is_rejected(tmp_path):
    pq.write_table(pa.table({"image": [b"not a jpeg"], "label": [0]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: row 0 is not a decodable image"):
        sources.read_parquet_split(tmp_path / "t.parquet")


def test_parquet_images_of_the_wrong_shape_are_rejected(tmp_path):
    from PIL import Image

    def png(size):
        buf = io.BytesIO()
        Image.new("RGB", size).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"image": [png((32, 32)), png((16, 16))], "label": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"images must all have one shape"):
        sources.read_parquet_split(tmp_path / "t.parquet")


def test_empty_parquet_dataset_is_rejected(tmp_path):
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: the dataset is empty"):
        sources.read_parquet_split(tmp_path / "t.parquet")


def test_download_verifies_the_checksum_and_happens_once(cifar100_test20, tmp_path):
    """The real download path, served from a file:// URL (no network here)."""
    from dataclasses import replace

    (tmp_path / "served").mkdir()
    archive = _tarball(cifar100_test20, tmp_path / "served" / "cifar-100-python.tar.gz")
    release = replace(sources.CIFAR_RELEASES["cifar100"], url=archive.as_uri(), md5=sources.md5sum(archive))
    cache = tmp_path / "cache"
    first = sources.download_archive(release, cache)
    assert first == cache / "cifar-100-python.tar.gz" and first.read_bytes() == archive.read_bytes()
    archive.unlink()  # a second call must not fetch again
    assert sources.download_archive(release, cache) == first
    assert sources.read_cifar_split("cifar100", first, "test").labels.tolist() == FINE_LABELS_TEST20

    bad = replace(release, md5="0" * 32)
    with pytest.raises(DataError, match=r"checksum mismatch"):
        sources.download_archive(bad, cache)


def test_download_failure_says_where_to_put_the_files(tmp_path):
    from dataclasses import replace

    release = replace(sources.CIFAR_RELEASES["cifar10"], url=(tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(DataError, match=r"cannot download .* offline, put missing\.tar\.gz \(or the extracted cifar-10-batches-py/ folder\) in"):
        sources.download_archive(release, tmp_path / "cache")


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_masks_and_boxes_become_object_masks(tmp_path):
    """Users with segmentation masks or boxes get localisation scores: both columns are read."""
    image = _png(np.zeros((32, 32, 3), np.uint8))
    drawn = np.zeros((32, 32), np.uint8)
    drawn[4:9, 20:30] = 255
    pq.write_table(pa.table({"image": [image, image], "label": [0, 1], "mask": [_png(drawn), _png(np.zeros((32, 32), np.uint8))]}), tmp_path / "m.parquet")
    masks = sources.read_parquet_split(tmp_path / "m.parquet").masks
    assert masks.shape == (2, 32, 32) and (masks[0] == (drawn > 0)).all() and not masks[1].any()
    pq.write_table(pa.table({"image": [image], "label": [0], "box": [[20, 4, 30, 9]]}), tmp_path / "b.parquet")
    assert (sources.read_parquet_split(tmp_path / "b.parquet").masks[0] == (drawn > 0)).all()  # x0, y0, x1, y1
    # fractional pixels (a box scaled with its image) cover every pixel they touch; before, slicing with floats raised TypeError
    pq.write_table(pa.table({"image": [image], "label": [0], "box": [[20.4, 4.0, 29.2, 8.5]]}), tmp_path / "f.parquet")
    assert (sources.read_parquet_split(tmp_path / "f.parquet").masks[0] == (drawn > 0)).all()


@pytest.mark.parametrize(
    "column, value, expected",
    [
        ("box", [10, 4, 5, 9], r"b\.parquet: row 0: box \[10, 4, 5, 9\] is not \[x0, y0, x1, y1\] with 0 <= x0 < x1 <= 32"),
        ("box", [10.5, 4.0, 32.5, 9.0], r"b\.parquet: row 0: box \[10\.5, 4\.0, 32\.5, 9\.0\] is not \[x0, y0, x1, y1\] with 0 <= x0 < x1 <= 32"),
        ("box", [1, 2, 3], r"b\.parquet: row 0: box \[1, 2, 3\] is not \[x0, y0, x1, y1\]"),
        ("mask", "small", r"b\.parquet: row 0: mask is 8x8, expected the image's 32x32"),
    ],
)
def test_bad_masks_and_boxes_are_named(tmp_path, column, value, expected):
    value = _png(np.zeros((8, 8), np.uint8)) if value == "small" else value
    pq.write_table(pa.table({"image": [_png(np.zeros((32, 32, 3), np.uint8))], "label": [0], column: [value]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=expected):
        sources.read_parquet_split(tmp_path / "b.parquet")
