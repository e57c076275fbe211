"""jaxcrit's safetensors reader against the safetensors library's own writer, and its header checks
at their exact bounds (a header that fills the file, a file one byte short, a tensor one byte past
the end): each bound is where a wrong comparison would let a bad file through or refuse a good one."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxcrit.convert.safetensors_io import Checkpoint, SafetensorsFile
from jaxcrit.errors import JaxcritError


def raw_file(path, header: dict, data: bytes = b"", length: int | None = None):
    """A .safetensors file built by hand: the 8-byte header length (default: the header's own), the
    JSON header, then `data`."""
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def test_tensors_and_slices_equal_what_safetensors_wrote(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.integers(0, 9, (4,)).astype(np.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.names() == {"a", "b"}
    for name, want in tensors.items():
        assert ckpt.shape(name) == want.shape and ckpt.dtype(name) == want.dtype
        np.testing.assert_array_equal(ckpt.read(name), want)
    np.testing.assert_array_equal(ckpt.read("a", (slice(1, 3),)), tensors["a"][1:3])
    np.testing.assert_array_equal(ckpt.read("a", (slice(None),)), tensors["a"])


def test_a_header_that_fills_the_file_is_read(tmp_path):
    assert SafetensorsFile(raw_file(tmp_path / "x.safetensors", {})).entries == {}


@pytest.mark.parametrize("size, words", [(7, "too short"), (8, "corrupt safetensors header (")])
def test_files_at_the_length_field_bound(tmp_path, size, words):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 0)[:size])
    with pytest.raises(JaxcritError, match=re.escape(words)):
        SafetensorsFile(path)


def test_a_header_length_one_past_the_file_is_refused(tmp_path):
    body = len(json.dumps({}).encode())
    with pytest.raises(JaxcritError, match=rf"corrupt safetensors header \(length {body + 1}\)"):
        SafetensorsFile(raw_file(tmp_path / "x.safetensors", {}, length=body + 1))


@pytest.mark.parametrize("offsets, data", [((0, 16), 15), ((0, 8), 16)], ids=["past the end", "wrong size"])
def test_a_tensor_outside_its_bytes_is_refused(tmp_path, offsets, data):
    header = {"t": {"dtype": "F32", "shape": [4], "data_offsets": list(offsets)}}
    with pytest.raises(JaxcritError, match="lies outside the file"):
        SafetensorsFile(raw_file(tmp_path / "x.safetensors", header, bytes(data)))
