"""`tensors.json`: any grid of boxes that tiles a tensor (as ranks of any world size write it) parses back
as written, and a box missing, repeated, cut short or shifted is refused naming the tensor."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shadow.checkpoint import InvalidCheckpoint
from shadow.checkpoint.tensor_index import Chunk, StoredTensor, build_index, parse_index

FILE = "rank-00000.bin"


@st.composite
def tilings(draw):
    """A shape and the boxes of a grid cut along each dimension, each box's bytes one after another."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    cuts = [sorted(set(draw(st.lists(st.integers(1, max(1, d - 1)), max_size=2))) & set(range(1, d)))
            for d in shape]
    edges = [[0, *c, d] for c, d in zip(cuts, shape)]
    boxes = [((), ())]
    for dim_edges in edges:
        boxes = [(o + (a,), s + (b - a,)) for o, s in boxes for a, b in zip(dim_edges, dim_edges[1:])]
    chunks, offset = [], 0
    for offsets, sizes in boxes:
        num_bytes = math.prod(sizes) * 4
        chunks.append(Chunk(offsets, sizes, FILE, offset, num_bytes, "0" * 64))
        offset += num_bytes
    return shape, chunks, offset


@given(tilings())
def test_a_tiling_parses_back_as_written(tiling):
    shape, chunks, file_bytes = tiling
    tensors = {"model.w": StoredTensor(torch.float32, shape, tuple(chunks))}
    parsed = parse_index(build_index(tensors), "ckpt", {FILE: file_bytes})
    assert parsed["model.w"].shape == shape and set(parsed["model.w"].chunks) == set(chunks)


@given(tilings(), st.data())
def test_a_box_missing_repeated_cut_short_or_shifted_is_refused(tiling, data):
    shape, chunks, file_bytes = tiling
    shiftable = [i for i, box in enumerate(chunks) if any(box.offsets)]
    how = data.draw(st.sampled_from(["missing", "repeated"] + (["cut_short"] if shape else [])
                                    + (["shifted"] if shiftable else [])))
    victim = data.draw(st.sampled_from(shiftable) if how == "shifted" else st.integers(0, len(chunks) - 1))
    box = chunks[victim]
    if how == "missing":
        chunks = chunks[:victim] + chunks[victim + 1:]
    elif how == "repeated":
        chunks = chunks + [box]
    elif how == "shifted":  # as many values as before, over a neighbour's and leaving a gap: an overlap
        dim = data.draw(st.sampled_from([d for d, o in enumerate(box.offsets) if o]))
        offsets = tuple(o - (d == dim) for d, o in enumerate(box.offsets))
        chunks[victim] = Chunk(offsets, box.sizes, FILE, box.offset, box.num_bytes, box.sha256)
    else:
        longer = [d for d, s in enumerate(box.sizes) if s > 1]
        if not longer:  # a box of one value: cut it away
            chunks = chunks[:victim] + chunks[victim + 1:]
        else:
            dim = data.draw(st.sampled_from(longer))
            sizes = tuple(s - (d == dim) for d, s in enumerate(box.sizes))
            chunks[victim] = Chunk(box.offsets, sizes, FILE, box.offset, math.prod(sizes) * 4, box.sha256)
    tensors = {"model.w": StoredTensor(torch.float32, shape, tuple(chunks))}
    with pytest.raises(InvalidCheckpoint, match=r"^ckpt/tensors\.json: tensor 'model\.w'(: chunks (at|cover) |"
                                                r" chunks: array \[\]; expected a non-empty list)"):
        parse_index(build_index(tensors), "ckpt", {FILE: file_bytes})
