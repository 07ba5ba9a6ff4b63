import dataclasses

import pytest

from collapse_monitor.rules import Rule, RuleEngine


def run(rule, values, start=1):
    eng = RuleEngine([rule])
    fired = []
    for i, v in enumerate(values):
        step = (start + i) * 10
        fired += [
            (a.step, a.value) for a in eng.check({"collapse/p/m": v, "collapse/q/m": 1.0}, step)
        ]
    return fired, eng


def test_fires_once_per_episode_by_default():
    fired, eng = run(Rule("collapse/p/m", 0.5, "below"), [1, 0.4, 0.3, 0.9, 0.2, 0.1])
    # fires at 20, stays quiet while it holds, clears at 40, fires again at 50
    assert fired == [(20, 0.4), (50, 0.2)]
    assert eng.counts[eng.rules[0].name] == 2


def test_repeat_with_patience_and_cooldown():
    fired, eng = run(
        Rule("collapse/p/m", 0.5, "below", patience=2, cooldown=25, repeat=True),
        [1, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1],
    )
    # holds from step 20; patience 2 -> fires at 30; held again for 2 logs by 50 but cooling
    # until 55 -> fires at the first log after the cooldown
    assert fired == [(30, 0.3), (60, 0.1)]
    assert eng.counts[eng.rules[0].name] == 2


def test_above_and_warmup():
    fired, _ = run(Rule("collapse/p/m", 2.0, "above", warmup_steps=20, repeat=True), [3, 3, 3])
    assert fired == [(30, 3)]


def test_relative_drop_from_running_max():
    fired, _ = run(Rule("collapse/p/m", 0.9, "drop"), [1.0, 5.0, 2.0, 0.6, 0.4])
    assert fired == [(50, 0.4)]  # 0.4 < 0.1 * 5.0; 0.6 is not


def test_relative_rise_from_running_min():
    fired, _ = run(Rule("collapse/p/m", 1.0, "rise"), [4.0, 2.0, 3.9, 4.1])
    assert fired == [(40, 4.1)]


def test_glob_tracks_each_key_separately():
    eng = RuleEngine([Rule("collapse/*/m", 0.5, "below")])
    alerts = eng.check({"collapse/p/m": 0.1, "collapse/q/m": 0.2, "collapse/q/other": 0.0}, 5)
    assert sorted(a.metric for a in alerts) == ["collapse/p/m", "collapse/q/m"]


def test_nan_never_fires():
    fired, _ = run(Rule("collapse/p/m", 0.5, "below"), [float("nan")] * 3)
    assert fired == []


def test_state_dict_resumes_patience_and_extremes():
    rule = Rule("collapse/p/m", 0.5, "drop", patience=2, repeat=True)
    values = [4.0, 1.0, 1.0, 1.0, 1.0]
    whole, _ = run(rule, values)
    first, eng = run(rule, values[:2])
    eng2 = RuleEngine([rule])
    eng2.load_state_dict(eng.state_dict())
    rest = []
    for i, v in enumerate(values[2:]):
        rest += [(a.step, a.value) for a in eng2.check({"collapse/p/m": v}, (3 + i) * 10)]
    assert first + rest == whole == [(30, 1.0), (50, 1.0)]


def test_message_names_rule_metric_and_advice():
    eng = RuleEngine([Rule("collapse/p/m", 0.5, "below", message="lower the learning rate")])
    (alert,) = eng.check({"collapse/p/m": 0.25}, 7)
    assert alert.rule == "p/m_below"
    assert "step 7" in alert.message and "collapse/p/m = 0.25 is below 0.5" in alert.message
    assert alert.message.endswith("lower the learning rate")


def test_invalid_rules_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        Rule("x", 1, "sideways")
    with pytest.raises(ValueError, match="action"):
        Rule("x", 1, action="explode")
    with pytest.raises(ValueError, match="unique"):
        RuleEngine([Rule("x", 1), Rule("x", 2)])
    with pytest.raises(ValueError, match="positive fraction"):
        Rule("x", 0, "drop")


def test_a_value_past_the_severe_bound_fires_at_once_one_near_the_threshold_waits():
    rule = Rule("collapse/p/m", 0.5, "below", patience=2, severe=0.1)
    assert run(rule, [1, 0.05])[0] == [(20, 0.05)]  # far past: one log suffices
    assert run(rule, [1, 0.4, 0.3])[0] == [(30, 0.3)]  # near: patience
    with pytest.raises(ValueError, match="severe"):
        Rule("collapse/p/m", 0.5, "below", severe=0.6)


def test_an_armed_rule_waits_for_a_stable_healthy_value():
    # starts at its collapsed end (uniform attention at initialisation): silent until two
    # healthy logs in a row, then it fires on the return of the condition
    rule = Rule("collapse/p/m", 0.5, "above", arm=True)
    assert run(rule, [1.0, 1.0, 0.2, 1.0, 0.2, 0.1, 0.9])[0] == [(70, 0.9)]
    # armed by the end of the warm-up when the metric never was healthy
    rule = Rule("collapse/p/m", 0.5, "above", arm=True, warmup_steps=30)
    assert run(rule, [1.0, 1.0, 1.0, 1.0])[0] == [(40, 1.0)]
    # armed by one healthy log (arm_logs=1): the lone 0.2 at step 30 arms it
    rule = Rule("collapse/p/m", 0.5, "above", arm=True, arm_logs=1)
    assert run(rule, [1.0, 1.0, 0.2, 1.0])[0] == [(40, 1.0)]
    with pytest.raises(ValueError, match="arm_logs >= 1"):
        Rule("collapse/p/m", 0.5, "above", arm=True, arm_logs=0)
    with pytest.raises(ValueError, match="arm_by needs arm=True"):
        Rule("collapse/p/m", 0.5, "above", arm_by="peak")


def test_an_armed_rule_resumes_armed():
    rule = Rule("collapse/p/m", 0.5, "above", arm=True)
    _, eng = run(rule, [0.1, 0.1])
    again = RuleEngine([rule])
    again.load_state_dict(eng.state_dict())
    assert [a.step for a in again.check({"collapse/p/m": 0.9}, 30)] == [30]


def test_a_rule_with_requires_is_evaluated_only_where_its_sibling_condition_holds():
    rule = Rule("collapse/*/norm_std", 0.5, "below", requires=("negative_mass", "above", 0.1))
    eng = RuleEngine([rule])
    relu = {"collapse/a/norm_std": 0.2, "collapse/a/negative_mass": 0.0}
    signed = {"collapse/b/norm_std": 0.2, "collapse/b/negative_mass": 0.4}
    assert [a.metric for a in eng.check({**relu, **signed}, 10)] == ["collapse/b/norm_std"]
    assert eng.check({"collapse/c/norm_std": 0.2}, 20) == []  # no sibling: not evaluated


def test_a_rule_with_latest_fires_at_once_when_the_windows_last_step_agrees():
    rule = Rule("collapse/*/m", 0.5, "below", patience=2, severe=0.1, latest="m_last_step")

    def first_alert(logs):
        eng = RuleEngine([rule])
        for i, (window, latest) in enumerate(logs):
            logged = {"collapse/p/m": window}
            if latest is not None:
                logged["collapse/p/m_last_step"] = latest
            alerts = eng.check(logged, 10 * (i + 1))
            if alerts:
                return alerts[0].step, alerts[0].message
        return None, ""

    # the window holds and so does its last step: the crossing lasted, no second log needed
    step, message = first_alert([(1.0, 1.0), (0.4, 0.3)])
    assert step == 20 and "m_last_step = 0.3 at the window's end" in message
    # the window holds but its last step has recovered: patience as without latest
    assert first_alert([(1.0, 1.0), (0.4, 0.8), (0.4, 0.8)])[0] == 30
    # an abrupt collapse inside the window: its mean still healthy, the last step far past
    step, message = first_alert([(1.0, 1.0), (0.9, 0.05)])
    assert step == 20 and "is not yet below 0.5, m_last_step = 0.05 (past the severe" in message
    assert first_alert([(1.0, 1.0), (0.9, 0.3), (0.9, 0.3)])[0] is None  # near: not enough
    assert first_alert([(1.0, None), (0.4, None), (0.4, None)])[0] == 30  # no latest: patience
    with pytest.raises(ValueError, match="latest"):
        Rule("collapse/p/m", 0.5, "drop", latest="m_last_step")


def test_latest_alone_fires_on_the_last_step_past_the_threshold_by_itself():
    # DormantUnits' and AttentionEntropy's latest values are a whole step's statistic over a
    # sample of their own: the window's mean only lags; CodebookUsage's usage_recent is not
    # trusted alone (a healthy codebook's first steps dip), its severe bound still applies
    alone = Rule("collapse/p/m", 0.4, "above", patience=2, severe=0.5, latest="m_last",
                 latest_alone=True)  # fmt: skip
    plain = dataclasses.replace(alone, latest_alone=False)
    logs = [(0.1, 0.1), (0.12, 0.45), (0.45, 0.46), (0.1, 0.1), (0.1, 0.45)]
    for rule, want in ((alone, [10, 40]), (plain, [20])):
        eng = RuleEngine([rule])
        fired = [
            a.step
            for i, (window, last) in enumerate(logs)
            for a in eng.check({"collapse/p/m": window, "collapse/p/m_last": last}, 10 * i)
        ]
        assert fired == want, rule.latest_alone
    eng = RuleEngine([alone])
    eng.check({"collapse/p/m": 0.1, "collapse/p/m_last": 0.1}, 10)
    (alert,) = eng.check({"collapse/p/m": 0.12, "collapse/p/m_last": 0.45}, 20)
    assert "0.12 is not yet above 0.4, and m_last = 0.45 at the window's end" in alert.message
    with pytest.raises(ValueError, match="latest_alone needs latest"):
        Rule("collapse/p/m", 0.4, "above", latest_alone=True)


def test_a_latest_episode_lasts_while_the_last_step_stays_past_the_threshold():
    rule = Rule("collapse/p/m", 0.4, "above", patience=2, severe=0.5, latest="m_last_step")
    eng = RuleEngine([rule])
    logs = [(0.1, 0.1), (0.3, 0.6), (0.35, 0.45), (0.45, 0.45), (0.1, 0.1), (0.3, 0.6)]
    fired = [
        a.step
        for i, (window, last) in enumerate(logs)
        for a in eng.check({"collapse/p/m": window, "collapse/p/m_last_step": last}, 10 * i)
    ]
    assert fired == [10, 50]  # one alert per episode; a new one after it clears


def test_several_requires_must_all_hold():
    rule = Rule(
        "collapse/p/m",
        0.5,
        "below",
        patience=2,
        requires=(("a", "above", 0.1), ("b", "above", 0.5)),
    )
    eng = RuleEngine([rule])
    logs = [
        {"a": 0.2, "b": 1.0},  # both hold: counted
        {"a": 0.2},  # b missing: skipped
        {"a": 0.0, "b": 1.0},  # a fails: skipped
        {"a": 0.2, "b": 1.0},  # counted: the second log in a row that holds
    ]
    fired = []
    for i, sib in enumerate(logs, 1):
        metrics = {"collapse/p/m": 0.1, **{f"collapse/p/{k}": v for k, v in sib.items()}}
        fired += [a.step for a in eng.check(metrics, i)]
    assert fired == [4]
    assert Rule("collapse/p/m", 0.5, requires=("a", "above", 0.1)).requires == (
        ("a", "above", 0.1),
    )


def test_a_drop_with_a_bound_needs_both_and_a_recovery_ends_its_episode():
    # TokenEntropy's policy_entropy_collapse: below a fifth of the highest value so far and
    # below an absolute 0.2; the highest value may come from any log
    rule = Rule("collapse/p/m", 0.8, "drop", bound=0.2)
    assert run(rule, [2.5, 1.0, 0.45, 0.15])[0] == [(40, 0.15)]  # 0.45: a fifth, not under 0.2
    # a policy that starts low (0.3) and stays near it: under 0.2 but not a fifth of 0.3
    assert run(rule, [0.3, 0.25, 0.19, 0.18])[0] == []
    assert run(rule, [0.3, 0.25, 0.19, 0.05])[0] == [(40, 0.05)]
    # a run that recovers and collapses again: two episodes, two alerts
    fired, _ = run(rule, [2.5, 0.15, 1.0, 1.2, 0.1, 0.05])
    assert fired == [(20, 0.15), (50, 0.1)]
    eng = RuleEngine([rule])
    eng.check({"collapse/p/m": 2.5}, 10)
    (alert,) = eng.check({"collapse/p/m": 0.1}, 20)
    assert "fell by more than 80% from its running max 2.5, below 0.2" in alert.message
    with pytest.raises(ValueError, match="bound"):
        Rule("collapse/p/m", 0.5, "below", bound=0.2)
