import pytest
import torch

from batchnorm import layout


LAYOUTS = pytest.mark.parametrize(
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


@LAYOUTS
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


@LAYOUTS
def test_the_fake_output_has_the_real_outputs_shape_and_strides(make, kind):
    """empty_output (what the custom ops' fake implementations return) is laid out as the
    output `restore` makes from a kernel's canonical result, for every layout."""
    x = make()
    view = layout.canonical(x)
    real = layout.restore(torch.empty_like(view.data), x, view.kind)
    fake = layout.empty_output(x)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == x.dtype
