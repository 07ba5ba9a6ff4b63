"""LogitSums: softmax collapse, log Z and logit norms of logit rows."""

import torch

from collapse_monitor.stats import LogitSums
from tests.stats.battery import run_battery


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 0, 6):
        z = torch.randn(n, 5, generator=g) * 4
        if n:
            z[0, 1] = 300.0  # a collapsed row in float32
        targets = torch.randint(-1, 5, (n,), generator=g)
        out.append((z, targets))
    return out


def test_sums_equal_the_whole_tensor():
    data = batches()
    st = LogitSums()
    for z, t in data:
        st.update(z, torch.float32, "softmax", t)
    z = torch.cat([b[0] for b in data]).double()
    log_z = torch.logsumexp(z, 1)
    assert float(st.rows) == len(z) and float(st.collapsed) == 2
    torch.testing.assert_close(st.log_z, log_z.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(st.logit_norm, z.norm(dim=1).sum(), rtol=1e-12, atol=0)
    assert float(st.log_z_max) == float(log_z.max()) and float(st.logit_max) == float(z.max())
    t = torch.cat([b[1] for b in data])
    assert float(st.target_rows) == (t >= 0).sum()


def test_battery():
    run_battery(LogitSums, batches(), lambda st, b: st.update(b[0], torch.float32, "softmax", b[1]))
