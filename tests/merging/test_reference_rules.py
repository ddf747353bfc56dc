"""TIES and Breadcrumbs compute what their authors' released code computes (issue 19).

Expected values are worked out by hand from the references' definitions:
* TIES (github.com/prateeky2806/ties-merging, ``topk_values_mask`` / ``resolve_sign`` /
  ``disjoint_merge``): per task over the whole flattened task vector, the threshold is the
  (N − int(k·N))-th smallest |τ| and |τ| ≥ threshold is kept; γ = sign(Σ τ̂), zeros → sign(Σ γ)
  over the whole model; positive entries where γ > 0, negative ones elsewhere, mean over their count.
* Breadcrumbs (github.com/rezazzr/breadcrumbs, ``TaskVectorMiddleKeep``): per row of the last
  dimension, remove the int(d·gamma) largest |τ|, keep the next int(d·beta); θ0 + alpha Σ.
"""

from __future__ import annotations

import pytest
import torch

from mtl.merging import ModelBreadcrumbs, TIESMerging
from mtl.merging.breadcrumbs import breadcrumb_mask


def _merge(method, base, states):
    return method.merge(base=base, states=states, keys=list(states[0]))


# ----------------------------------------------------------------------------------------------- TIES


def test_ties_keeps_int_kn_plus_one_entries():
    base = {"w": torch.zeros(10)}
    tau = torch.tensor([3.0, -10.0, 1.0, 8.0, -2.0, 6.0, -9.0, 4.0, 5.0, -7.0])
    out = _merge(TIESMerging(k=0.2, lam=1.0), base, [{"w": tau}])["w"]
    # N = 10, int(0.2·10) = 2: threshold = 8th smallest |τ| = 8 → 8, −9, −10 kept (3 entries, not 2)
    torch.testing.assert_close(out, torch.tensor([0.0, -10.0, 0.0, 8.0, 0.0, 0.0, -9.0, 0.0, 0.0, 0.0]))
    # N = 5, k = 0.5: int(2.5) = 2 → the 3rd smallest |τ| is the threshold → 3 entries kept
    five = {"w": torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])}
    out = _merge(TIESMerging(k=0.5, lam=1.0), {"w": torch.zeros(5)}, [five])["w"]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 3.0, -4.0, 5.0]))


def test_ties_keeps_every_entry_tied_with_the_threshold():
    tau = {"w": torch.tensor([1.0, 2.0, -2.0, 2.0, 5.0])}
    out = _merge(TIESMerging(k=0.2, lam=1.0), {"w": torch.zeros(5)}, [tau])["w"]
    # int(0.2·5) = 1 → threshold = 4th smallest |τ| = 2 → every |τ| ≥ 2 kept (4 entries)
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0, -2.0, 2.0, 5.0]))


def test_ties_trims_over_the_whole_task_vector():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    s = {"a": torch.tensor([10.0, -9.0]), "b": torch.tensor([1.0, -2.0, 3.0])}
    out = _merge(TIESMerging(k=0.4, lam=1.0), base, [s])
    # N = 5 over both tensors, int(2) = 2 → threshold = 3rd smallest of {10, 9, 1, 2, 3} = 3
    torch.testing.assert_close(out["a"], torch.tensor([10.0, -9.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, 0.0, 3.0]))


def test_ties_cancelling_entry_takes_the_model_majority_sign():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    t1 = {"a": torch.tensor([2.0, 5.0]), "b": torch.tensor([-1.0, -1.0, -4.0])}
    t2 = {"a": torch.tensor([-2.0, 1.0]), "b": torch.tensor([-3.0, -1.0, -2.0])}
    out = _merge(TIESMerging(k=1.0, lam=1.0), base, [t1, t2])
    # γ: a = [0, +], b = [−, −, −] → majority sign(1 − 3) = − over the whole model (within "a" alone it
    # would be +): a[0] takes −, the mean of its negative entries = −2
    torch.testing.assert_close(out["a"], torch.tensor([-2.0, 3.0]))
    torch.testing.assert_close(out["b"], torch.tensor([-2.0, -1.0, -3.0]))
    # a positive majority: the cancelling entry averages its positive entries
    t1 = {"a": torch.tensor([2.0, 5.0]), "b": torch.tensor([1.0, 1.0, 4.0])}
    t2 = {"a": torch.tensor([-2.0, 1.0]), "b": torch.tensor([3.0, 1.0, 2.0])}
    out = _merge(TIESMerging(k=1.0, lam=0.5), base, [t1, t2])
    torch.testing.assert_close(out["a"], 0.5 * torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(out["b"], 0.5 * torch.tensor([2.0, 1.0, 3.0]))


def test_ties_without_any_majority_takes_the_negative_entries():
    base = {"a": torch.zeros(2), "b": torch.zeros(1)}
    t1 = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([-1.0])}
    t2 = {"a": torch.tensor([-2.0, 1.0]), "b": torch.tensor([-3.0])}
    out = _merge(TIESMerging(k=1.0, lam=1.0), base, [t1, t2])
    # γ = [0, +, −] → sign(Σ γ) = 0 → a[0] keeps γ = 0, and γ > 0 fails: the negative entry −2
    torch.testing.assert_close(out["a"], torch.tensor([-2.0, 1.0]))
    torch.testing.assert_close(out["b"], torch.tensor([-2.0]))


def test_ties_matches_the_flat_vector_definition_on_random_models():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 5), "b": (11,), "c": (3, 2, 4)}
    base = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    taus = [{k: torch.randn(*s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    taus[1]["b"][0], taus[2]["b"][0] = 50.0, -50.0  # kept in both and cancelling exactly
    taus[0]["b"][0], base["b"][0] = 0.0, 0.0
    states = [{k: base[k] + t[k] for k in shapes} for t in taus]
    out = _merge(TIESMerging(k=0.3, lam=0.7), base, states)
    # the definition on the flattened model: rows = tasks
    flat = torch.stack([torch.cat([(s[k] - base[k]).flatten() for k in shapes]) for s in states])
    n = flat.shape[1]
    kth = flat.abs().sort(dim=1).values[:, n - int(0.3 * n) - 1 : n - int(0.3 * n)]  # 1-based n − int(kn)
    kept = flat * (flat.abs() >= kth)
    sign = kept.sum(dim=0).sign()
    cancelling = shapes["a"][0] * shapes["a"][1]  # "b"[0]
    assert sign[cancelling] == 0 and kept[:, cancelling].abs().sum() == 100
    sign[sign == 0] = sign.sum().sign()
    chosen = kept * torch.where(sign > 0, kept > 0, kept < 0)
    merged = chosen.sum(dim=0) / (chosen != 0).sum(dim=0).clamp(min=1)
    expected = torch.cat([base[k].flatten() for k in shapes]) + 0.7 * merged
    torch.testing.assert_close(torch.cat([out[k].flatten() for k in shapes]), expected)
    assert sign[cancelling] != 0  # the cancelling entry was given the majority sign


def test_ties_percent_k_is_refused_with_the_fraction():
    with pytest.raises(ValueError, match="K = 20 \\(percent\\) is k = 0.2"):
        TIESMerging(k=20)


# ----------------------------------------------------------------------------------------- Breadcrumbs

ROWS = torch.tensor(
    [
        [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0],
        [0.5, 20.0, -0.1, 4.0, -3.0, 2.0, 1.0, -7.0, 6.0, 0.2],
    ]
)


def test_breadcrumbs_masks_each_row_of_the_last_dimension():
    # d = 10, gamma = 0.1 → the largest entry of each row removed, beta = 0.3 → the next 3 kept
    expected = torch.zeros(2, 10)
    expected[0, [6, 7, 8]] = ROWS[0, [6, 7, 8]]  # 7, −8, 9 (−10 removed)
    expected[1, [3, 7, 8]] = ROWS[1, [3, 7, 8]]  # 4, −7, 6 (20 removed)
    assert torch.equal(ROWS * breadcrumb_mask(ROWS, beta=0.3, gamma=0.1), expected)
    out = _merge(ModelBreadcrumbs(alpha=0.2, beta=0.3, gamma=0.1), {"w": torch.zeros(2, 10)}, [{"w": ROWS}])
    torch.testing.assert_close(out["w"], 0.2 * expected)
    # the same numbers over the whole tensor (d = 20: remove 2, keep 6) keep a different set
    whole = torch.zeros(2, 10)
    whole[0, [5, 6, 7, 8]] = ROWS[0, [5, 6, 7, 8]]  # −6, 7, −8, 9
    whole[1, [7, 8]] = ROWS[1, [7, 8]]  # −7, 6
    assert torch.equal(ROWS * breadcrumb_mask(ROWS, beta=0.3, gamma=0.1, granularity="tensor"), whole)


def test_breadcrumbs_matches_the_two_step_definition_on_random_tensors():
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 40), (4, 3, 25), (33,)]:
        tau = torch.randn(*shape, generator=g)
        d = shape[-1]
        rows = tau.reshape(-1, d)
        # step 1: zero the int(d·γ) largest |τ| per row; step 2: keep the int(d·β) largest of what is left
        drop = torch.zeros_like(rows).scatter_(1, rows.abs().topk(int(d * 0.05), dim=1).indices, 1.0)
        left = rows * (1 - drop)
        keep = torch.zeros_like(rows).scatter_(1, left.abs().topk(int(d * 0.15), dim=1).indices, 1.0)
        expected = (left * keep).reshape(shape)
        assert torch.equal(tau * breadcrumb_mask(tau, beta=0.15, gamma=0.05), expected), shape


def test_breadcrumbs_sums_masked_task_vectors_over_tasks():
    base = {"w": torch.ones(2, 10)}
    other = torch.arange(20, dtype=torch.float32).view(2, 10)  # rows 0..9 and 10..19
    out = _merge(ModelBreadcrumbs(alpha=0.5, beta=0.2, gamma=0.1), base, [{"w": 1 + ROWS}, {"w": 1 + other}])
    # task 1: remove 1, keep 2 per row: row 0 keeps −8, 9; row 1 keeps −7, 6
    # task 2: row 0 = 0..9 keeps 8, 7; row 1 = 10..19 keeps 18, 17
    expected = torch.zeros(2, 10)
    expected[0, 7], expected[0, 8] = -8.0 + 7.0, 9.0 + 8.0
    expected[1, 7], expected[1, 8] = -7.0 + 17.0, 6.0 + 18.0
    torch.testing.assert_close(out["w"], 1 + 0.5 * expected)


def test_breadcrumbs_counts_are_truncated_as_the_authors():
    row = torch.tensor([7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    # d = 7: int(7·0.2) = 1 removed, int(7·0.3) = 2 kept
    assert breadcrumb_mask(row, beta=0.3, gamma=0.2).tolist() == [False, True, True] + [False] * 4
    # beta + gamma > 1 is allowed there: everything below the removed top is kept
    ten = torch.arange(1.0, 11.0)
    assert breadcrumb_mask(ten, beta=0.9, gamma=0.2).tolist() == [True] * 8 + [False] * 2


def test_breadcrumbs_keeps_scalars_and_drops_rows_too_short_for_beta():
    base = {"s": torch.tensor(1.0), "conv": torch.zeros(2, 3, 1, 1)}
    conv = torch.tensor([1.0, -5.0, 2.0, 4.0, 3.0, -1.0]).view(2, 3, 1, 1)
    state = {"s": torch.tensor(3.0), "conv": conv}
    # a 1×1 conv's rows (last dimension) have 1 entry: int(0.34) = 0 kept → the task vector is dropped
    with pytest.warns(UserWarning, match=r"keeps no entry of 1 tensors .*conv \(2, 3, 1, 1\)"):
        out = _merge(ModelBreadcrumbs(alpha=0.5, beta=0.34, gamma=0.0), base, [state])
    torch.testing.assert_close(out["s"], torch.tensor(2.0))  # 0-dim: kept whole, 1 + 0.5·2
    torch.testing.assert_close(out["conv"], torch.zeros(2, 3, 1, 1))
    # granularity=channel ranks each output channel's 3 entries: int(3·0.34) = 1 kept, the largest
    out = _merge(ModelBreadcrumbs(alpha=1.0, beta=0.34, gamma=0.0, granularity="channel"), base, [state])
    torch.testing.assert_close(out["conv"].flatten(), torch.tensor([0.0, -5.0, 0.0, 4.0, 0.0, 0.0]))


def test_breadcrumbs_old_keys_are_refused_and_a_large_beta_warned():
    with pytest.raises(ValueError, match="alpha=0.5 beta=0.14 gamma=0.01 granularity=tensor"):
        ModelBreadcrumbs(beta=0.85, gamma=0.01, lam=0.5)
    with pytest.warns(UserWarning, match="beta=0.85 keeps 85% of each row"):
        ModelBreadcrumbs(beta=0.85)


def test_method_configs_use_the_authors_rules_and_refuse_the_old_breadcrumbs_key():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        crumbs = instantiate(compose("merge", overrides=["method=breadcrumbs", "ckpts=[a]"]).method)
        assert (crumbs.alpha, crumbs.beta, crumbs.gamma, crumbs.granularity) == (0.5, 0.14, 0.01, "row")
        ties = instantiate(compose("merge", overrides=["method=ties", "ckpts=[a]"]).method)
        assert (ties.k, ties.lam) == (0.2, 1.0)
        old = compose("merge", overrides=["method=breadcrumbs", "ckpts=[a]", "method.lam=1.0"])
        with pytest.raises(InstantiationException, match="now method.alpha"):
            instantiate(old.method)
