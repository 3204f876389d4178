"""torch.compile(fullgraph=True) traces through every op thanks to the fake kernels in ops.py."""
import pytest
import torch

import fedtreelora
from fedtreelora.core import ops, reference

pytestmark = pytest.mark.skipif(not fedtreelora.native_available(), reason="needs the native core (fake kernels)")


def pipeline(x, offsets, weights, candidates):
    per_layer, mean = ops.layer_distances(x, offsets)
    z = ops.linkage(mean, "average")
    labels = ops.cut_tree(z, candidates)                                   # [M, N]
    scores = ops.silhouette(per_layer, labels.expand(per_layer.shape[0], -1, -1))
    cluster, external = ops.tree_reduce(x, offsets, labels[-1:].expand(offsets.shape[0] - 1, -1).contiguous(),
                                        weights, n_clusters=x.shape[0])
    return z, labels, scores, cluster, external


def test_compiled_pipeline_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(7, 20)
    offsets = torch.tensor([0, 5, 12, 20])
    weights = torch.rand(7) + 0.5
    candidates = torch.tensor([2, 3])
    compiled = torch.compile(pipeline, fullgraph=True, dynamic=False)
    got = compiled(x, offsets, weights, candidates)
    expected = pipeline(x, offsets, weights, candidates)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, equal_nan=True)
    # and the eager path agrees with the reference
    z_ref = reference.linkage(ops.layer_distances(x, offsets)[1].double(), "average")
    torch.testing.assert_close(expected[0], z_ref)


@pytest.mark.parametrize("name", ["layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows"])
def test_fake_kernels_registered_and_consistent(name):
    """opcheck: schema, fake kernel and real kernel agree (shapes, dtypes, no aliasing or mutation)."""
    torch.manual_seed(1)
    x = torch.randn(6, 10)
    offsets = torch.tensor([0, 4, 10])
    d = ops.layer_distances(x, offsets)[1].double()
    z = ops.linkage(d)
    args = {
        "layer_distances": (x, offsets, "frobenius"),
        "linkage": (d, "ward"),
        "cut_tree": (z, torch.tensor([1, 3, 6])),
        "silhouette": (d.float()[None], torch.tensor([[[0, 0, 1, 1, 2, 2]]])),
        "tree_reduce": (x, offsets, torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]]), torch.rand(6, dtype=torch.float64) + 1, 3),
        "pack_rows": ([x[i, :4].clone() for i in range(6)] + [x[i, 4:].clone() for i in range(6)], torch.empty(6, 10)),
    }[name]
    torch.library.opcheck(getattr(torch.ops.fedtreelora, name), args)


@pytest.mark.parametrize("name", ["layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows"])
def test_opcheck_on_every_sample_input(name):
    """opcheck over the shared samples (tests/op_samples.py), which tests/cuda also runs on the device."""
    from op_samples import sample_inputs
    op = getattr(torch.ops.fedtreelora, name)
    for args in sample_inputs(name, "cpu"):
        out = op(*args)
        if name == "silhouette" and bool(out.isnan().any()):
            continue  # opcheck compares with NaN != NaN; those samples run in tests/cuda (equal_nan there)
        torch.library.opcheck(op, args)


def test_compiled_pack_rows_writes_its_out():
    """pack_rows mutates out (Tensor(a!)): traced through its fake kernel, functionalised, same bits."""
    def gather(a, b):
        out = torch.empty(2, 5)
        ops.pack_rows([a[0], a[1], b[0], b[1]], out)
        return out * 2

    a, b = torch.randn(2, 3), torch.randn(2, 2)
    assert torch.equal(torch.compile(gather, fullgraph=True)(a, b), gather(a, b))
