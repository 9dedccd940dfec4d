"""Flow layers (docs/flows.md, "Invariants the tests check"): exact inverses, log-dets against
brute-force Jacobians, ActNorm data init, the 1x1 conv cache, and the once-per-LR-image
conditioning path."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from sr_lib.models.flow_layers import (
    ActNorm,
    CondAffine,
    CouplingNet,
    FlowStep,
    InvConv1x1,
    ResidualCouplingNet,
    Split,
    ZeroConv2d,
    coupling_conv,
    squeeze,
    unsqueeze,
)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: zero convs and ActNorms randomised, ActNorms initialised, 1x1 convs
    neither orthogonal nor symmetric. At construction every coupling outputs a constant and each
    1x1 conv is a rotation (W⁻¹ = Wᵀ, log|det| = 0): many bugs would be invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, InvConv1x1):
                set_matrix(m, well_conditioned(m.matrix().shape[0], g))
            if isinstance(m, ZeroConv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.logs.copy_(torch.randn(m.logs.shape, generator=g) * 0.05)
            elif isinstance(m, ActNorm):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.logs.copy_(torch.randn(m.logs.shape, generator=g) * 0.1)
                m.initialized = True
    return module


def well_conditioned(c: int, g: torch.Generator) -> torch.Tensor:
    """U·diag(s)·Vᵀ, U and V random rotations, s in [e^-0.3, e^0.3]: condition number under 1.9,
    W, Wᵀ and W⁻¹ all different (for c > 1), log|det| = Σ log s."""
    u, v = (torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0] for _ in "uv")
    s = (0.6 * torch.rand(c, generator=g, dtype=torch.float64) - 0.3).exp()
    return u @ torch.diag(s) @ v.T


def set_matrix(conv: InvConv1x1, w: torch.Tensor) -> None:
    """The 1x1 conv's matrix := w (an LU conv: its P, L, U, sign and log of U's diagonal)."""
    if not conv.lu:
        conv.weight.copy_(w)
        return
    p, lower, upper = torch.linalg.lu(w)
    conv.p.copy_(p)
    conv.sign_s.copy_(upper.diagonal().sign())
    conv.log_s.copy_(upper.diagonal().abs().log())
    conv.lower.copy_(lower.tril(-1))
    conv.upper.copy_(upper.triu(1))


def nets():
    return {
        "srflow": lambda i, o: CouplingNet(i, o, 8),
        "da": lambda i, o: CouplingNet(i, o, 8, deep=4),
        "da_r": lambda i, o: ResidualCouplingNet(i, o, 8, blocks=1, per_block=4),
        "da_d": lambda i, o: ResidualCouplingNet(i, o, 8, blocks=2, per_block=2),
    }


def layer_case(name: str):
    """(module, forward(x, logdet) -> (y, logdet), reverse(y, logdet) -> (x, logdet)) on C = 4."""
    g = torch.Generator().manual_seed(3)
    ft = torch.randn(1, 5, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64)
    if name == "actnorm":
        m = ActNorm(4)
    elif name in ("invconv", "invconv_lu"):
        m = InvConv1x1(4, lu=name == "invconv_lu")  # perturb: away from a rotation
    elif name == "split":
        m = Split(4)
        fwd = lambda x, ld: (lambda z1, e, ld: (torch.cat([z1, e], 1), ld))(*m(x, ld))  # noqa: E731
        rev = lambda y, ld: m.reverse(y[:, : m.keep], y[:, m.keep :], ld)  # noqa: E731
        return perturb(m).double().eval(), fwd, rev
    elif name == "affine_noise":
        m = CondAffine(4, 5, nets()["srflow"], noise_channels=3)
        m.noise_conditional = True
    elif name.startswith("affine_"):
        m = CondAffine(4, 5, nets()[name[7:]])
    elif name == "step":
        m = FlowStep(4, CondAffine(4, 5, nets()["srflow"]))
    perturb(m).double().eval()
    if isinstance(m, CondAffine):
        kw = dict(noise=noise) if name == "affine_noise" else {}
        return m, lambda x, ld: m(x, ft, ld, **kw), lambda y, ld: m.reverse(y, ft, ld, **kw)
    if isinstance(m, FlowStep):
        return m, lambda x, ld: m(x, ld, ft), lambda y, ld: m.reverse(y, ld, ft)
    return m, m.forward, m.reverse


LAYERS = ["actnorm", "invconv", "invconv_lu", "split", "step", "affine_noise"]
LAYERS += [f"affine_{k}" for k in ("srflow", "da", "da_r", "da_d")]


def test_squeeze_is_pixel_unshuffle():
    x = torch.randn(2, 3, 6, 8)
    y = squeeze(x)
    assert torch.equal(y, F.pixel_unshuffle(x, 2))
    assert y[1, 2 * 4 + 1 * 2 + 0, 2, 3] == x[1, 2, 2 * 2 + 1, 2 * 3 + 0]  # c·4 + dy·2 + dx
    assert torch.equal(unsqueeze(y), x)
    assert torch.equal(unsqueeze(squeeze(x[..., :6], 3), 3), x[..., :6])


@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_and_logdet(name):
    m, fwd, rev = layer_case(name)
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, ld = fwd(x, x.new_zeros(1))
    back, ld_back = rev(y, x.new_zeros(1))
    assert (back - x).abs().max() < 1e-10
    assert torch.allclose(ld_back, -ld, rtol=1e-12, atol=1e-12)  # reverse log-det = -forward
    # log|det J| against the brute-force 16x16 Jacobian, in float64.
    J = jacobian(lambda v: fwd(v.view_as(x), None)[0].flatten(), x.flatten())
    brute = torch.linalg.slogdet(J)[1]
    assert abs(ld.item()) > 1e-3  # non-trivial weights
    assert ld.item() == pytest.approx(brute.item(), rel=1e-8)
    if name.startswith("invconv"):  # y_i = Σ_j W_ij x_j, as the released weights (out, in)
        w = m.matrix()
        assert (w @ w.T - torch.eye(4)).abs().max() > 0.1 and (w - w.T).abs().max() > 0.1
        assert (y - torch.einsum("ij,bjhw->bihw", w, x)).abs().max() < 1e-12
    # float32 round trip on a larger input (reverse of forward).
    m.float()
    x32 = torch.randn(1, 4, 6, 6)
    if name.startswith(("affine", "step")):  # the conditioning must match the input size
        return
    y32, _ = fwd(x32, None)
    assert (rev(y32, None)[0] - x32).abs().max() < 1e-4


def test_actnorm_data_init_once_and_not_after_loading():
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    an = ActNorm(3).train()
    y, _ = an(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.pow(2).mean((0, 2, 3)).sqrt(), torch.ones(3), atol=1e-5)
    state = {k: v.clone() for k, v in an.state_dict().items()}
    an(torch.randn(4, 3, 5, 5))  # a second batch does not re-initialise
    assert all(torch.equal(v, an.state_dict()[k]) for k, v in state.items())
    fresh = ActNorm(3).train()
    fresh.load_state_dict(state)
    fresh(torch.randn(4, 3, 5, 5) * 7)  # loaded weights are never data-initialised
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    off = ActNorm(3).eval()
    off(x)  # no init in eval mode
    assert not off.initialized and off.bias.abs().sum() == 0


def test_invconv_init_and_eval_cache():
    ic = InvConv1x1(6)
    w = ic.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(6), atol=1e-5)  # a rotation: log|det| = 0
    x = torch.randn(2, 6, 3, 3)
    ic.train()
    ic(x)
    assert ic._cache is None  # never cached while training
    ic.eval()
    with torch.no_grad():
        y, _ = ic(x)
        assert ic.reverse(y)[0].sub(x).abs().max() < 1e-5
        inv = ic._cache[3]
        assert inv is not None and ic.reverse(y)[0] is not None and ic._cache[3] is inv  # reused
        ic.weight.mul_(2.0)  # a parameter change invalidates the cache
        y2, ld = ic(x, torch.zeros(2))
        assert torch.allclose(y2, 2 * y, atol=1e-5)
        assert ld[0].item() == pytest.approx(9 * 6 * math.log(2), rel=1e-5)
        assert ic.reverse(y2)[0].sub(x).abs().max() < 1e-5
    with torch.enable_grad():  # autograd on: computed fresh, gradients flow
        ic(x, torch.zeros(2))[1].sum().backward()
    assert ic.weight.grad is not None


def test_lu_invconv_matches_its_matrix():
    ic = InvConv1x1(5, lu=True)
    assert torch.allclose(ic.matrix() @ ic.matrix().T, torch.eye(5), atol=1e-5)
    ld = ic(torch.randn(1, 5, 2, 3), torch.zeros(1))[1]
    assert ld.item() == pytest.approx(6 * torch.linalg.slogdet(ic.matrix())[1].item(), abs=1e-5)


def test_fresh_step_log_det_is_the_init_contraction():
    """At construction each coupling scales by s0 = sigmoid(2) + 1e-4 (C = 12, 5x7)."""
    step = FlowStep(12, CondAffine(12, 5, nets()["srflow"])).eval()
    _, ld = step(torch.randn(1, 12, 5, 7), torch.zeros(1), torch.randn(1, 5, 5, 7))
    s0 = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)) + 1e-4
    assert s0.item() == pytest.approx(0.880897, abs=1e-6)
    assert ld.item() == pytest.approx((12 + 6) * 35 * math.log(s0), rel=1e-6)
    assert ld.item() == pytest.approx(-79.8931, abs=1e-4)


@pytest.mark.parametrize("kind", list(nets()))
def test_cond_part_equals_concat_input(kind):
    """The LR-only half of a coupling net's first conv, computed once per image (batch B) and
    broadcast over n samples, equals running the net on the concatenated input."""
    net = perturb(nets()[kind](3 + 5, 6)).eval()
    x, cond = torch.randn(2 * 3, 3, 4, 5), torch.randn(2, 5, 4, 5)
    full = net(torch.cat([x, cond.repeat_interleave(3, 0)], 1))
    assert (net.with_cond(x, net.cond_part(cond)) - full).abs().max() < 1e-6


def test_affine_reverse_shares_lr_features_over_samples():
    m = perturb(CondAffine(4, 5, nets()["srflow"])).eval()
    ft, z = torch.randn(2, 5, 3, 3), torch.randn(2 * 4, 4, 3, 3)
    a, lda = m.reverse(z, ft, torch.zeros(8))
    b, ldb = m.reverse(z, ft.repeat_interleave(4, 0), torch.zeros(8))
    assert (a - b).abs().max() < 1e-6 and torch.allclose(lda, ldb, rtol=1e-6)


def test_coupling_networks_start_at_zero_and_split_is_standard_normal():
    net = CouplingNet(7, 6, 8)
    assert net(torch.randn(2, 7, 4, 4)).abs().max() == 0
    split = Split(6)
    x = torch.randn(2, 6, 4, 4)
    z1, eps, ld = split(x, torch.zeros(2))
    assert torch.equal(z1, x[:, :3]) and torch.equal(eps, x[:, 3:]) and ld.abs().max() == 0
    assert split.conv.in_channels == 3  # the prior sees z1 only, never the LR


def test_logdet_stays_float32_under_autocast():
    m = perturb(FlowStep(4, CondAffine(4, 5, nets()["srflow"]))).eval()
    x, ft = torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ld = m(x, torch.zeros(2), ft)
    assert y.dtype == torch.float32 and ld.dtype == torch.float32
    assert torch.allclose(ld, m(x, torch.zeros(2), ft)[1], rtol=1e-4)


def test_affine_casts_bfloat16_net_outputs_to_float32():
    """A coupling net may return bfloat16 under autocast (here: one ending in a plain conv; SRFlow's
    end in ZeroConv2d's float32 gain): CondAffine's scales, affine arithmetic and log-det are then
    computed in float32 from those outputs, forward and reverse, with a bfloat16 condition too.
    Checked against the same formulas in float64 from the nets' recorded bfloat16 outputs."""

    def plain(cin, cout):  # SRFlow-DA's net with a plain last conv: bfloat16 out under autocast
        net = CouplingNet(cin, cout, 8, deep=1)
        net[-1] = coupling_conv(8, cout)
        return net

    m = CondAffine(4, 5, plain).eval()
    outs = []
    for net in (m.fFeatures, m.fAffine):  # the last conv runs in forward and in reverse's tail
        net[-1].register_forward_hook(lambda mod, args, out: outs.append(out))
    g = torch.Generator().manual_seed(0)
    x, ft = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 5, 3, 5, generator=g)

    def by_hand(z, h, sign):  # float64: z -> (z + shift)·scale or z / scale - shift, log-det
        h = h.double()
        shift, scale = h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2) + m.eps
        z = (z + shift) * scale if sign > 0 else z / scale - shift
        return z, sign * scale.log().sum((1, 2, 3))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ld = m(x, ft.bfloat16(), torch.zeros(2))
        (inj, aff), outs[:] = outs, []
        back, ld_back = m.reverse(y, ft.bfloat16(), torch.zeros(2))
        (inj_r, aff_r), outs[:] = outs, []
    assert {inj.dtype, aff.dtype, inj_r.dtype, aff_r.dtype} == {torch.bfloat16}  # the case
    assert {y.dtype, ld.dtype, back.dtype, ld_back.dtype} == {torch.float32}
    # float32 rounding, measured: 2.3e-7 on z, 2.8e-6 on the log-dets (the cast removed: 1e-2, 5e-2)
    z, ld_inj = by_hand(x.double(), inj, 1)
    z2, ld_aff = by_hand(z[:, 2:], aff, 1)
    assert (y - torch.cat([z[:, :2], z2], 1)).abs().max() < 1e-6
    assert (ld - (ld_inj + ld_aff)).abs().max() < 2e-5
    y64 = y.double()
    z2, ld_aff = by_hand(y64[:, 2:], aff_r, -1)
    z, ld_inj = by_hand(torch.cat([y64[:, :2], z2], 1), inj_r, -1)
    assert (back - z).abs().max() < 1e-6
    assert (ld_back - (ld_inj + ld_aff)).abs().max() < 2e-5
