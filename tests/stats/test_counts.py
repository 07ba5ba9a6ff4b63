"""CodeCounts and UsageEMA: hits per code and their moving average."""

import numpy as np
import pytest
import torch

from collapse_monitor.stats import CodeCounts, UsageEMA
from tests.stats.battery import run_battery


def batches(seed=0, heads=2, K=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (5, 0, 13, 1, 30):
        idx = torch.randint(-1, K + 1, (n, heads), generator=g)  # -1 and K: not codes
        valid = torch.rand(n, heads, generator=g) > 0.2
        out.append((idx, valid))
    return out


def test_counts_equal_a_bincount_of_the_valid_indices():
    data = batches()
    st = CodeCounts(2, 7)
    for idx, valid in data:
        st.update(idx, valid)
    idx = torch.cat([b[0] for b in data]).numpy()
    valid = torch.cat([b[1] for b in data]).numpy()
    for h in range(2):
        ok = valid[:, h] & (idx[:, h] >= 0) & (idx[:, h] < 7)
        assert st.counts[h].tolist() == np.bincount(idx[ok, h], minlength=7).tolist()
        assert int(st.rows[h]) == ok.sum()
        assert int(st.skipped[h]) == (~valid[:, h]).sum()
        assert int(st.out_of_range[h]) == (valid[:, h] & ~ok).sum()


def test_any_integer_dtype_and_any_out_of_range_index_count_the_same():
    """Indices far outside [0, K) on either side (the int64 extremes too) are out of range;
    uint8 / int16 / int32 indices count as their int64 values (uint8 has no -1: 255 is out of
    range, not a wrap to a code); floating or boolean indices are refused."""
    K = 7
    idx = torch.tensor([0, 6, 7, -1, -2, 3, 300, 2**62, -(2**63), 2**63 - 1, 255, 5])[:, None]
    want = CodeCounts(1, K)
    for i in idx.tolist():  # one by one, by hand
        if 0 <= i[0] < K:
            want.counts[0, i[0]] += 1
            want.rows[0] += 1
        else:
            want.out_of_range[0] += 1
    got = CodeCounts(1, K)
    got.update(idx)
    for name in ("counts", "rows", "out_of_range", "skipped"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    small = torch.tensor([0, 6, 7, 3, 255, 5, 200])[:, None]
    ref = CodeCounts(1, K)
    ref.update(small)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        st = CodeCounts(1, K)
        st.update(small.to(dtype))
        assert torch.equal(st.counts, ref.counts) and torch.equal(st.out_of_range, ref.out_of_range)
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match="must be integers"):
            CodeCounts(1, K).update(small.to(dtype))


def test_counts_battery():
    run_battery(lambda: CodeCounts(2, 7), batches(1), lambda st, b: st.update(*b))


def test_usage_ema_equals_a_loop_and_restarts_replaced_codes():
    steps = [torch.tensor([[0], [0], [2]]), torch.tensor([[1]]), torch.tensor([[2], [2]])]
    ema, step = UsageEMA(1, 3), CodeCounts(1, 3)
    hits, rows = np.zeros(3), 0.0
    for idx in steps:
        step.reset()
        step.update(idx)
        ema.advance(step, 0.75)
        hits = 0.75 * hits + 0.25 * np.bincount(idx[:, 0].numpy(), minlength=3)
        rows = 0.75 * rows + 0.25 * len(idx)
    np.testing.assert_allclose(ema.hits[0].numpy(), hits, rtol=1e-12)
    assert float(ema.rows[0]) == rows and int(ema.steps) == 3
    ema.restart(torch.tensor([[True, False, False]]))
    assert float(ema.hits[0, 0]) == rows / 3 and float(ema.hits[0, 2]) == hits[2]


def test_usage_ema_battery():
    def update(st, idx):
        step = CodeCounts(1, 4)
        step.update(idx)
        st.advance(step, 0.5)

    data = [(torch.tensor([[0], [3]]),), (torch.tensor([[1]]),), (torch.tensor([[3], [3]]),)]
    # an EMA does not merge over time (it decays): one step per statistic, merged over ranks
    run_battery(lambda: UsageEMA(1, 4), data[:1], lambda st, b: update(st, *b))
