"""HeadEntropy: per-head sums of attention entropy over query rows."""

import math

import torch

from collapse_monitor.stats import HeadEntropy
from tests.stats.battery import run_battery


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for b in (2, 1, 3):
        keys = torch.randint(0, 6, (b, 3, 4), generator=g)  # allowed keys per row (0: padding)
        entropy = torch.rand(b, 3, 4, generator=g) * keys.clamp_min(1).log()
        out.append((entropy, keys, torch.rand((), generator=g) * 10, 1))
    return out


def test_sums_equal_a_loop_over_rows():
    data = batches()
    st = HeadEntropy()
    for batch in data:
        st.update(*batch)
    queries = [0.0] * 3
    total, norm_rows, norm = [0.0] * 3, [0.0] * 3, [0.0] * 3
    for entropy, keys, _, _ in data:
        for b, h, i in torch.cartesian_prod(*map(torch.arange, keys.shape)).tolist():
            n, e = int(keys[b, h, i]), float(entropy[b, h, i])
            if n >= 1:
                queries[h] += 1
                total[h] += e
            if n >= 2:
                norm_rows[h] += 1
                norm[h] += e / math.log(n)
    assert st.queries.tolist() == queries and st.queries_norm.tolist() == norm_rows
    torch.testing.assert_close(st.entropy, torch.tensor(total, dtype=torch.float64))
    torch.testing.assert_close(st.entropy_norm, torch.tensor(norm, dtype=torch.float64))
    assert float(st.max_logit) == max(float(b[2]) for b in data) and int(st.skipped) == 3


def test_battery():
    run_battery(HeadEntropy, batches(), lambda st, b: st.update(*b))
