"""The checkerboard context: anchors first, then the other half coded with parameters corrected from
the decoded anchors, all in exact integers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared.neural.coder import ImageCoder  # noqa: E402
from shared.neural.intnet import ACT_BITS, integer_context  # noqa: E402
from shared.neural.models import CheckerboardHyperprior, MeanScaleHyperprior, anchor_mask  # noqa: E402


def test_the_anchors_are_half_the_latents_in_a_checkerboard():
    m = anchor_mask(3, 4)[0, 0]
    assert m.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]


def test_a_zero_context_is_the_hyperprior_it_started_from():
    torch.manual_seed(0)
    hp = MeanScaleHyperprior(16, 24, 8).eval()
    cb = CheckerboardHyperprior(16, 24, 8).eval()
    missing, unexpected = cb.load_state_dict(hp.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("ctx.") for k in missing)
    x, level = torch.rand(2, 3, 64, 64), torch.tensor([1, 6])
    with torch.no_grad():
        a, b = hp(x, level), cb(x, level)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_context_reads_only_anchors_and_changes_only_the_others():
    torch.manual_seed(0)
    cb = CheckerboardHyperprior(16, 24, 8)
    torch.nn.init.normal_(cb.ctx[1].weight, std=0.1)
    y = torch.randn(1, 24, 6, 6) * 5
    hyper = torch.randn(1, 48, 6, 6)
    mean, scale = cb.entropy_parameters(y, hyper)
    anchor = anchor_mask(6, 6).bool().expand_as(mean)
    hm, hs = hyper.chunk(2, dim=1)
    assert torch.equal(mean[anchor], hm[anchor]) and torch.equal(scale[anchor], hs[anchor])
    assert not torch.equal(mean[~anchor], hm[~anchor])
    # Changing a non-anchor latent changes nothing; changing an anchor moves its neighbours.
    y2 = y.clone()
    y2[0, :, 0, 1] += 10  # (0, 1) is not an anchor
    assert torch.equal(cb.entropy_parameters(y2, hyper)[0], mean)
    y2 = y.clone()
    y2[0, :, 2, 2] += 10  # an anchor
    assert not torch.equal(cb.entropy_parameters(y2, hyper)[0], mean)


def test_the_integer_context_follows_the_float_one_and_ignores_batch_composition():
    torch.manual_seed(0)
    cb = CheckerboardHyperprior(16, 24, 8)
    torch.nn.init.normal_(cb.ctx[1].weight, std=0.1)
    net = integer_context(cb.ctx)
    y = (torch.randn(3, 24, 5, 7) * 8).round() * anchor_mask(5, 7)
    out = net.raw(y.double() * 2.0**ACT_BITS)
    for i in range(3):
        assert torch.equal(net.raw(y[i : i + 1].double() * 2.0**ACT_BITS)[0], out[i])
    with torch.no_grad():
        ref = cb.ctx(y)
    assert torch.allclose((out / 2.0**net.out_bits).float(), ref, atol=1e-3)


def test_the_context_pays_in_the_coded_bits_it_estimates(tiny_models_dir):
    """The coded size follows the coding tables' own estimate (ideal bits) under the context."""
    coder = ImageCoder(tiny_models_dir / "tiny-cb" / "weights.pt")
    assert coder.arch == "checkerboard" and coder.ctx is not None
    x = torch.rand(1, 3, 128, 128)
    streams, recon = coder.encode(x, 4)
    ideal = coder.ideal_bits(x, 4)
    assert abs(8 * len(streams[0]) - ideal) < 0.02 * ideal + 64
    assert torch.equal(coder.decode(streams, 4, 128, 128), recon)
    assert np.isfinite(recon.numpy()).all()
