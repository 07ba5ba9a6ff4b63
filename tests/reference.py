"""An independent numpy implementation of the neural-collapse metrics, written from their
definitions (docs/metrics.md#neuralcollapse) with explicit loops over classes and pairs (small C
only)."""

import numpy as np


def nc_reference(X, y, C, W=None, b=None, n_min=2):
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    counts = np.bincount(y, minlength=C)
    used = [c for c in range(C) if counts[c] >= n_min]
    means = {c: X[y == c].mean(0) for c in range(C) if counts[c] > 0}
    D = X.shape[1]
    Sw = np.zeros((D, D))
    n_w = 0
    for c in range(C):
        if counts[c] >= 2:
            Z = X[y == c] - means[c]
            Sw += Z.T @ Z
            n_w += counts[c]
    Sw /= n_w
    M = np.stack([means[c] for c in used])
    Cu = len(used)
    Mt = M - M.mean(0)
    Sb = Mt.T @ Mt / Cu
    out = {"classes_used": Cu}
    lam, V = np.linalg.eigh(Sb)
    keep = np.argsort(lam)[::-1][: min(Cu - 1, D)]
    keep = [k for k in keep if lam[k] > D * np.finfo(float).eps * lam.max()]
    Sb_pinv = sum(np.outer(V[:, k], V[:, k]) / lam[k] for k in keep)
    out["nc1"] = np.trace(Sw @ Sb_pinv) / Cu
    out["nc1_quotient"] = np.trace(Sw) / np.trace(Sb)
    norms = np.linalg.norm(Mt, axis=1)
    out["equinorm_features"] = norms.std(ddof=1) / norms.mean()
    cos, cdnv = [], []
    var = {c: ((X[y == c] - means[c]) ** 2).sum(1).mean() for c in used}
    for i in range(Cu):
        for j in range(i + 1, Cu):
            cos.append(Mt[i] @ Mt[j] / (norms[i] * norms[j]))
            d2 = ((M[i] - M[j]) ** 2).sum()
            cdnv.append((var[used[i]] + var[used[j]]) / (2 * d2))
    cos = np.array(cos)
    out["equiangular"] = np.abs(cos + 1 / (Cu - 1)).mean()
    if len(cos) > 1:
        out["cos_std"] = cos.std(ddof=1)
    out["cdnv"] = np.mean(cdnv)
    if W is not None:
        W = np.asarray(W, dtype=np.float64)
        Wu = W[used]
        wn = np.linalg.norm(Wu, axis=1)
        out["equinorm_weights"] = wn.std(ddof=1) / wn.mean()
        out["self_duality"] = np.linalg.norm(Wu / np.linalg.norm(Wu) - Mt / np.linalg.norm(Mt))
        bias = np.zeros(C) if b is None else np.asarray(b, dtype=np.float64)
        mism = []
        for xi, yi in zip(X, y):
            if counts[yi] < n_min:
                continue
            ncc = used[int(np.argmin([((xi - means[c]) ** 2).sum() for c in used]))]
            mism.append(ncc != int(np.argmax(W @ xi + bias)))
        out["ncc_mismatch"] = float(np.mean(mism))
    return out


def assert_metrics_close(got, want, rtol=1e-6, keys=None):
    keys = keys or want.keys()
    for k in keys:
        assert k in got, f"missing {k}"
        g, w = float(got[k]), float(want[k])
        assert abs(g - w) <= rtol * max(abs(w), 1e-300) + 1e-12, f"{k}: got {g!r}, want {w!r}"
