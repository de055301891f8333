import pytest
import torch

from batchnorm import layout


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: torch.randn(4, 3), "mc"),
        (lambda: torch.randn(4, 3, 5), "ncl"),
        (lambda: torch.randn(2, 3, 4, 5), "ncl"),
        (lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), "mc"),
        (lambda: torch.randn(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d), "mc"),
        (lambda: torch.randn(2, 3, 8, 5)[:, :, ::2], None),
        # one value per row (after a global pooling): the (N, C) memory, as 2-D input
        (lambda: torch.randn(4, 3, 1, 1), "mc"),
        (lambda: torch.randn(4, 3, 1), "mc"),
        (lambda: torch.randn(4, 3, 1, 1).to(memory_format=torch.channels_last), "mc"),
    ],
)
def test_views_are_taken_without_copies_and_restore(make, kind):
    x = make()
    assert layout.kind_of(x) == kind
    view = layout.canonical(x)
    if kind is not None:
        assert view.data.data_ptr() == x.data_ptr(), "a viewable input was copied"
    c = x.shape[1]
    assert view.data.shape[1] == c
    back = layout.restore(view.data, x, view.kind)
    assert torch.equal(back, x)
    # channel c of the view holds channel c of the input
    flat = x.transpose(0, 1).reshape(c, -1)
    v = view.data.transpose(0, 1).reshape(c, -1) if view.kind == "ncl" else view.data.t()
    assert torch.equal(v.sort(1).values, flat.sort(1).values)
