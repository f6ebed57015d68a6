"""IDX parsing, the TFDS builders and the download path (local server only)."""

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.idx_files import STEMS, idx_bytes, make_dataset, write_dataset
from trainer import data


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
  array = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
  raw = idx_bytes(array)
  path = tmp_path / ("a.gz" if gz else "a")
  path.write_bytes(gzip.compress(raw) if gz else raw)
  np.testing.assert_array_equal(data.read_idx(path), array)


def test_read_idx_other_element_types(tmp_path):
  values = np.arange(6, dtype=">i4").reshape(2, 3)
  (tmp_path / "ints").write_bytes(bytes([0, 0, 0x0C, 2]) + np.array([2, 3], ">u4").tobytes() + values.tobytes())
  out = data.read_idx(tmp_path / "ints")
  np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5]])
  assert out.dtype == np.int32


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "magic")
  (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 3), np.uint8))[:-2])
  with pytest.raises(ValueError, match=r"IDX header says shape \(4, 3\)"):
    data.read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [True, False])
def test_builder_from_idx_dir(tmp_path, gz):
  generated = make_dataset(n_train=50, n_test=20)
  idx_dir = write_dataset(tmp_path / "idx", generated, gz=gz)
  ds = data.load("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(idx_dir))
  assert ds.train_images.shape == (50, 28, 28, 1) and ds.test_labels.shape == (20,)  # grey: one channel
  assert ds.num_classes == 10
  # Same examples (TFDS stores them in its own order): compare as sorted sets.
  for images, labels, (want_images, want_labels) in (
    (ds.train_images, ds.train_labels, generated["train"]),
    (ds.test_images, ds.test_labels, generated["test"]),
  ):
    got = sorted(zip(labels.tolist(), [im[..., 0].tobytes() for im in images], strict=True))
    want = sorted(zip(want_labels.tolist(), [im.tobytes() for im in want_images], strict=True))
    assert got == want
  # Prepared data is reused: the IDX files are no longer needed.
  for f in idx_dir.iterdir():
    f.unlink()
  again = data.load("mnist", data_dir=str(tmp_path / "tfds"))
  np.testing.assert_array_equal(np.sort(again.train_labels), np.sort(ds.train_labels))


class _Server:
  """Serves a directory on 127.0.0.1, counting requests."""

  def __init__(self, directory):
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(directory), **kw)
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def _checksums(directory):
  return {
    stem + ".gz": hashlib.sha256((directory / (stem + ".gz")).read_bytes()).hexdigest()
    for pair in STEMS.values()
    for stem in pair
  }


def test_download_path_with_checksums(tmp_path):
  generated = make_dataset(n_train=40, n_test=10, seed=3)
  served = write_dataset(tmp_path / "served", generated)
  with _Server(served) as server:
    ds = data.load("mnist", data_dir=str(tmp_path / "tfds"), url_base=server.url, sha256=_checksums(served))
  assert sorted(ds.train_labels.tolist()) == sorted(generated["train"][1].tolist())


def test_download_rejects_wrong_checksum(tmp_path):
  served = write_dataset(tmp_path / "served", make_dataset(n_train=20, n_test=10))
  wrong = dict.fromkeys(_checksums(served), "0" * 64)
  with _Server(served) as server, pytest.raises(ValueError, match=r"SHA-256 .* does not match"):
    data.load("mnist", data_dir=str(tmp_path / "tfds"), url_base=server.url, sha256=wrong)


def test_missing_dataset_says_how_to_get_it(tmp_path):
  # The server serves nothing: every file is a 404.
  with _Server(tmp_path) as server, pytest.raises(data.DatasetNotFoundError, match="--idx-dir DIR") as error:
    data.load("mnist", data_dir=str(tmp_path / "tfds"), url_base=server.url)
  # The directory where it would be prepared, not TFDS's temporary one of the failed attempt.
  assert f"--dataset mnist: not prepared under {tmp_path / 'tfds' / 'mnist' / '1.0.0'}," in str(error.value)
  assert "incomplete" not in str(error.value)


def test_idx_dir_missing_files(tmp_path):
  (tmp_path / "idx").mkdir()
  with pytest.raises(data.DatasetNotFoundError, match=r"idx_dir: .* lacks the IDX files"):
    data.load("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(tmp_path / "idx"))


def test_unknown_dataset(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="--dataset: TFDS knows no dataset 'no_such_dataset'") as error:
    data.load("no_such_dataset", data_dir=str(tmp_path))
  assert "did you mean" not in str(error.value)
  with pytest.raises(data.DatasetNotFoundError, match=r"'fashionmnist' \(did you mean fashion_mnist\? "):
    data.load("fashionmnist", data_dir=str(tmp_path))


def test_export_image_folder_offline_is_one_line(tmp_path):
  """examples/export_image_folder.py where the dataset cannot be had: one line, no traceback."""
  import subprocess
  import sys

  script = Path(__file__).resolve().parents[1] / "examples" / "export_image_folder.py"
  result = subprocess.run(
    [
      sys.executable,
      str(script),
      "--dataset",
      "fashionmnist",
      "--data-dir",
      str(tmp_path),
      "--out",
      str(tmp_path / "o"),
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines() == [
    "error: --dataset: TFDS knows no dataset 'fashionmnist' (did you mean fashion_mnist? see tfds.list_builders()); "
    "for your own images use --image-folder DIR."
  ]


@pytest.mark.slow
def test_export_image_folder_of_some_classes(tmp_path):
  """--classes 1,3: only those classes' folders, evenly over the split; a bad list is one line."""
  import subprocess
  import sys

  generated = make_dataset(n_train=80, n_test=40)
  data.load("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(write_dataset(tmp_path / "idx", generated)))
  script = Path(__file__).resolve().parents[1] / "examples" / "export_image_folder.py"
  base = [sys.executable, str(script), "--dataset", "mnist", "--data-dir", str(tmp_path / "tfds")]
  done = subprocess.run([*base, "--classes", "3,1", "--train", "10", "--test", "4", "--out", str(tmp_path / "o")],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
  assert done.returncode == 0, done.stderr
  for split, count in (("train", 10), ("test", 4)):
    folders = {p.name: len(list(p.iterdir())) for p in (tmp_path / "o" / split).iterdir()}
    labels = generated[split][1]
    assert set(folders) <= {"1", "3"} and sum(folders.values()) == min(count, int(np.isin(labels, [1, 3]).sum()))
  bad = subprocess.run([*base, "--classes", "3,10", "--out", str(tmp_path / "p")], capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
    f"{Path(script).name}: error: --classes: expected class indices from 0 to 9, comma-separated, got '3,10' "
    f"(see {Path(script).name} --help)"
  ]
