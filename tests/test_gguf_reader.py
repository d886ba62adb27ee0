"""souverain's GGUF reader (gguf's `GGUFReader` over a plain view of the memory map, for speed)
reads exactly what gguf's own reader reads: every metadata field and every tensor."""

from __future__ import annotations

import gguf
import numpy as np

from souverain import weights
from souverain.weights.gguf_file import open_gguf_reader


def test_same_fields_and_tensors_as_gguf_reader() -> None:
    path = weights.resolve("smollm2-135m-instruct")
    ours, theirs = open_gguf_reader(path), gguf.GGUFReader(path)
    assert type(ours) is not gguf.GGUFReader  # the fast path is the one tested
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].contents() == field.contents(), name
        assert ours.fields[name].types == field.types, name
    assert len(ours.tensors) == len(theirs.tensors) > 0
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape), a.n_elements, a.data_offset) == \
               (b.name, b.tensor_type, list(b.shape), b.n_elements, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name
        assert not a.data.flags.writeable  # still the read-only map, not a copy
    tokens = ours.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 49152 and tokens[0] == theirs.fields["tokenizer.ggml.tokens"].contents()[0]
