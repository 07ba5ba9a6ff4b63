"""TokenUniformitySums: rho and r_F of each sequence, summed."""

import torch

from collapse_monitor.stats import TokenUniformitySums
from tests.stats.battery import run_battery


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for b in (2, 1, 3):
        h = torch.randn(b, 5, 4, generator=g)
        mask = torch.ones(b, 5, dtype=torch.bool)
        mask[0, 3:] = False  # padding
        out.append((h, mask))
    return out


def test_sums_equal_a_loop_over_sequences():
    data = batches()
    st = TokenUniformitySums()
    for h, mask in data:
        st.update(h, mask)
    rho = r_f = 0.0
    for h, mask in data:
        for x, m in zip(h.double(), mask):
            x = x[m]
            unit = x / x.norm(dim=1, keepdim=True)
            cos = unit @ unit.T
            n = len(x)
            rho += float((cos.sum() - n) / (n * (n - 1)))
            r_f += float((x - x.mean(0)).norm() / x.norm())
    assert float(st.sequences) == 6
    assert abs(float(st.rho) - rho) < 1e-12 and abs(float(st.r_f) - r_f) < 1e-12


def test_battery():
    run_battery(TokenUniformitySums, batches(), lambda st, b: st.update(*b))


def test_tokens_nearly_equal_keep_their_residual_to_1e6_relative():
    """Tokens 1e3 from the origin and 1e-5 from each other: r_F of about 1e-8 per sequence (from
    ``1 - T ||xbar||^2 / sum ||x_i||^2`` it read 26% off, and 26 times too large at 1e-10)."""
    g = torch.Generator().manual_seed(0)
    h = 1e3 + 1e-5 * torch.randn(4, 32, 64, generator=g, dtype=torch.float64)
    st = TokenUniformitySums()
    st.update(h)
    want = sum(float((x - x.mean(0)).norm() / x.norm()) for x in h)
    assert want < 1e-7
    assert abs(float(st.r_f) - want) <= 1e-6 * want
