"""UnitActivity: sum of |activation| per unit."""

import torch

from collapse_monitor.stats import UnitActivity
from tests.stats.battery import run_battery


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (4, 0, 9, 1):
        a = torch.randn(n, 5, generator=g)
        valid = torch.rand(n, generator=g) > 0.25
        a[~valid, 0] = float("nan")
        out.append((a, valid))
    return out


def test_sums_equal_the_whole_tensor_and_skip_invalid_rows():
    data = batches()
    st = UnitActivity()
    for a, valid in data:
        st.update(a, valid)
    a = torch.cat([b[0] for b in data]).double()
    valid = torch.cat([b[1] for b in data])
    torch.testing.assert_close(st.abs_sum, a[valid].abs().sum(0), rtol=1e-12, atol=0)
    assert float(st.rows) == valid.sum() and int(st.skipped) == (~valid).sum()


def test_battery():
    run_battery(UnitActivity, batches(), lambda st, b: st.update(*b))
