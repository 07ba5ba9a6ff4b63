"""GenerationDiversity: the streamed window equals the set-based reference over its groups."""

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as MF

KEYS = ("distinct_1", "distinct_2", "pairwise_overlap", "identical_fraction", "groups")


def lm():
    m = nn.Sequential()
    m.add_module("lm", nn.Identity())  # stands for a model called with token ids
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_equals_the_reference_over_every_group(seed):
    # 3 steps of 1-2 calls of whole groups, completions of random lengths (labels -100 on
    # prompts and padding), some groups collapsed onto one completion
    g = torch.Generator().manual_seed(seed)
    G, V = 4, 7
    calls, all_ids, all_labels = [], [], []
    for step in range(3):
        step_calls = []
        for _ in range(int(torch.randint(1, 3, (), generator=g))):
            n = int(torch.randint(1, 4, (), generator=g))
            ids = torch.randint(0, V, (n * G, 12), generator=g)
            labels = ids.clone()
            for r in range(n * G):
                start = int(torch.randint(0, 6, (), generator=g))
                stop = int(torch.randint(start, 13, (), generator=g))
                labels[r, :start] = -100
                labels[r, stop:] = -100
            if step == 1:  # one collapsed group: the same completion 4 times
                ids[:G], labels[:G] = ids[0], labels[0]
            step_calls.append((ids, labels))
            all_ids.append(ids)
            all_labels.append(labels)
        calls.append(step_calls)
    model = lm()
    probe = probes.GenerationDiversity(
        "lm", group_size=G, group_by="order", vocab_size=V, name="div"
    )
    mon = CollapseMonitor(model, [probe], 3, strict=True)
    out = None
    for step_calls in calls:
        for ids, labels in step_calls:
            with mon.observe(targets=labels):
                model.lm(ids)
        out = mon.step() or out
    mon.close()
    ids, labels = torch.cat(all_ids), torch.cat(all_labels)
    want = MF.generation_diversity(ids, labels != -100, torch.arange(len(ids)) // G)
    for key in KEYS:
        assert out[f"collapse/div/{key}"] == pytest.approx(want[key], rel=1e-12), key


def test_known_answers_collapsed_and_all_different():
    model = lm()
    probe = probes.GenerationDiversity("lm", group_size=3, vocab_size=100, name="div")
    mon = CollapseMonitor(model, [probe], 1)
    same = torch.tensor([[5, 6, 7, 8]] * 3)
    with mon.observe():
        model.lm(same)
    m = mon.step()
    assert m["collapse/div/identical_fraction"] == 1.0 and m["collapse/div/pairwise_overlap"] == 1
    assert m["collapse/div/distinct_1"] == pytest.approx(1 / 3)
    apart = torch.arange(12).view(3, 4)
    with mon.observe():
        model.lm(apart)
    m = mon.step()
    assert m["collapse/div/identical_fraction"] == 0.0 and m["collapse/div/pairwise_overlap"] == 0
    assert m["collapse/div/distinct_2"] == 1.0
    mon.close()


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_groups_split_over_a_steps_micro_batches_are_grouped_at_its_end(micro_batches):
    """TRL's GRPO under gradient accumulation shuffles a generation batch and splits it into
    micro-batches: a prompt's completions reach the model over several calls (of different
    widths: each micro-batch padded to its own longest completion). Grouped per call, nearly
    every group was left out as mixing prompts (and the probe's silent rule fired); grouped
    over the step they equal the reference on the whole step, advantages included."""
    g = torch.Generator().manual_seed(micro_batches)
    G, V, P, C = 4, 9, 4, 6
    rows, labels, prompt_of, adv = [], [], [], []
    for p in range(3):
        prompt = torch.randint(2, V, (P,), generator=g)
        for k in range(G):
            n = int(torch.randint(1, C + 1, (), generator=g))
            ids = torch.cat([prompt, torch.randint(2, V, (n,), generator=g)])
            rows.append(ids)
            labels.append(torch.cat([torch.full((P,), -100), ids[P:]]))
            prompt_of.append(p)
            adv.append(0.0 if p == 1 else float(k) - 1.5)  # prompt 1: equal rewards
    perm = torch.randperm(len(rows), generator=g)
    rows, labels = [rows[i] for i in perm], [labels[i] for i in perm]
    groups, adv = torch.tensor(prompt_of)[perm], torch.tensor(adv)[perm]
    pad = nn.utils.rnn.pad_sequence
    model = lm()
    probe = probes.GenerationDiversity("lm", group_size=G, vocab_size=V, name="div")
    mon = CollapseMonitor(model, [probe], 1, strict=True)
    for part in torch.tensor_split(torch.arange(len(rows)), micro_batches):
        ids = pad([rows[i] for i in part], batch_first=True)
        lab = pad([labels[i] for i in part], batch_first=True, padding_value=-100)
        with mon.observe(targets=lab, advantages=adv[part]):
            model.lm(ids)
    got = mon.step()
    mon.close()
    ids = pad(rows, batch_first=True)
    lab = pad(labels, batch_first=True, padding_value=-100)
    want = MF.generation_diversity(ids, lab != -100, groups)
    for key in KEYS:
        assert got[f"collapse/div/{key}"] == pytest.approx(want[key], rel=1e-12), key
    assert got["collapse/div/mixed_groups"] == 0 and got["collapse/div/completions"] == 12
    assert got["collapse/div/zero_advantage_fraction"] == pytest.approx(1 / 3)


def test_a_completion_masked_whole_stays_in_its_group():
    """TRL's mask_truncated_completions masks a truncated completion's every token: its row
    had no completion token, was keyed on all its tokens and its group left out as mixed."""
    prompt = [0, 0, 5, 6]  # left-padded
    completions = [[2, 3, 1], [2, 4, 1], [7, 7, 7], [2, 3, 1]]
    ids = torch.tensor([prompt + c for c in completions])
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 4:] = -100  # truncated: masked whole
    model = lm()
    probe = probes.GenerationDiversity("lm", group_size=4, vocab_size=10, name="div")
    mon = CollapseMonitor(model, [probe], 1, strict=True)
    with mon.observe(targets=labels, advantages=torch.tensor([0.5, -0.5, 0.0, 0.5])):
        model.lm(ids)
    m = mon.step()
    mon.close()
    assert m["collapse/div/groups"] == 1 and m["collapse/div/mixed_groups"] == 0
    assert m["collapse/div/distinct_1"] == pytest.approx(4 / 9)  # {1, 2, 3, 4} of 9 tokens
    assert m["collapse/div/zero_advantage_fraction"] == 0.0


def test_zero_advantage_fraction_counts_groups_without_a_gradient():
    model = lm()
    probe = probes.GenerationDiversity(
        "lm", group_size=2, group_by="order", vocab_size=10, name="div"
    )
    mon = CollapseMonitor(model, [probe], 2, strict=True)
    ids = torch.arange(16).remainder(10).view(4, 4)
    with mon.observe(advantages=torch.tensor([0.0, 0.0, 1.0, -1.0])):  # one of 2 groups
        model.lm(ids)
    mon.step()
    per_token = torch.zeros(4, 4)
    per_token[3, 2] = 0.5  # group 2 has a gradient; group 1 none
    labels = ids.clone()
    labels[:, :2] = -100
    per_token[0, 0] = 9.0  # on a prompt token: does not count
    with mon.observe(targets=labels, advantages=per_token):
        model.lm(ids)
    m = mon.step()
    mon.close()
    assert m["collapse/div/zero_advantage_fraction"] == 0.5 and m["collapse/div/groups"] == 4


def test_completions_of_one_prompt_are_grouped_wherever_their_rows_are():
    # TRL shuffles a step's rows: 3 prompts (left-padded, of different lengths) x 4 completions,
    # shuffled; grouped by their prompt tokens, equal to the reference grouped by prompt; and
    # observe(groups=) gives the same
    g = torch.Generator().manual_seed(3)
    G, V, T = 4, 9, 12
    rows, labels, prompt_of = [], [], []
    for p, length in enumerate((2, 5, 3)):
        prompt = torch.randint(2, V, (length,), generator=g)
        for _ in range(G):
            ids = torch.zeros(T, dtype=torch.long)
            ids[T - 6 - length : T - 6] = prompt  # left padding with 0
            ids[T - 6 :] = torch.randint(2, V, (6,), generator=g)
            lab = ids.clone()
            lab[: T - 6] = -100
            rows.append(ids)
            labels.append(lab)
            prompt_of.append(p)
    perm = torch.randperm(len(rows), generator=g)
    ids, lab = torch.stack(rows)[perm], torch.stack(labels)[perm]
    groups = torch.tensor(prompt_of)[perm]
    want = MF.generation_diversity(ids, lab != -100, groups)
    for observe in ({"targets": lab}, {"targets": lab, "groups": groups * 7 + 1}):
        model = lm()
        probe = probes.GenerationDiversity("lm", group_size=G, vocab_size=V, name="div")
        mon = CollapseMonitor(model, [probe], 1, strict=True)
        with mon.observe(**observe):
            model.lm(ids)
        got = mon.step()
        mon.close()
        for key in KEYS:
            assert got[f"collapse/div/{key}"] == pytest.approx(want[key], rel=1e-12), key
        assert got["collapse/div/mixed_groups"] == 0


def test_a_group_that_mixes_prompts_is_left_out_and_counted():
    # 5 completions of one prompt and 3 of another, G = 4: sorted by prompt, the second group
    # holds both prompts
    ids = torch.tensor([[1, 5, 6]] * 5 + [[2, 7, 8]] * 3)
    labels = ids.clone()
    labels[:, 0] = -100
    model = lm()
    probe = probes.GenerationDiversity("lm", group_size=4, vocab_size=10, name="div")
    mon = CollapseMonitor(model, [probe], 1, strict=True)
    with mon.observe(targets=labels):
        model.lm(ids)
    m = mon.step()
    mon.close()
    assert m["collapse/div/groups"] == 1 and m["collapse/div/mixed_groups"] == 1
    assert m["collapse/div/identical_fraction"] == 1.0


def test_generate_inside_a_training_observe_is_left_out(caplog):
    # generate()'s steps (a key-value cache, no gradients) are not completions to group: the
    # probe leaves them out and says so; the training forward after them is counted
    pytest.importorskip("transformers")
    from tests.probes.test_conventions import tiny

    model = tiny("Llama", vocab_size=30, num_hidden_layers=1)
    mon = CollapseMonitor(model, [probes.GenerationDiversity("", group_size=2, name="d")], 1)
    ids = torch.randint(2, 30, (4, 5), generator=torch.Generator().manual_seed(0))
    with mon.observe(), torch.no_grad():
        model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=0)
    assert mon.step()["collapse/d/groups"] == 0
    assert "leaves out generation forwards" in caplog.text
    with mon.observe():
        model(ids)
    assert mon.step()["collapse/d/groups"] == 2
    mon.close()
