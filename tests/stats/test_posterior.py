"""PosteriorSums: per-dimension KL to the prior and polarity counts."""

import torch

from collapse_monitor.stats import PosteriorSums
from tests.stats.battery import run_battery


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (4, 0, 7):
        mu, logvar = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        out.append((mu, logvar, torch.rand(n, generator=g) > 0.3))
    return out


def test_kl_equals_the_closed_form_of_each_valid_row():
    data = batches()
    st = PosteriorSums()
    for mu, logvar, valid in data:
        st.update(mu, logvar, valid, 0.1, 0.5)
    mu, logvar, valid = (torch.cat([b[i] for b in data]).double() for i in range(3))
    valid = valid.bool()
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)  # KL(N(mu, s^2) || N(0, 1)) per dimension
    torch.testing.assert_close(st.kl, kl[valid].sum(0), rtol=1e-12, atol=1e-12)
    var = logvar.exp()
    assert st.passive_like.tolist() == (var[valid] > 0.9).sum(0).tolist()
    assert st.active_like.tolist() == (var[valid] < 0.5).sum(0).tolist()
    assert int(st.skipped) == (~valid).sum()


def test_battery():
    run_battery(PosteriorSums, batches(), lambda st, b: st.update(*b, 0.1, 0.5))
