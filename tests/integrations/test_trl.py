"""TRL trainers with the monitor's Trainer callback: TokenEntropy against TRL's own entropy."""

import json
import math

import pytest
import torch

from collapse_monitor import functional, probes

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from collapse_monitor.integrations.transformers import CollapseTrainerCallback  # noqa: E402
from tests.test_examples import load_example  # noqa: E402

# the example's character tokenizer (built in code: no download)
_EXAMPLE = load_example("grpo_entropy_collapse")
CHARS, char_tokenizer = _EXAMPLE.CHARS, _EXAMPLE.tokenizer


def tiny_lm(vocab):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def prompts_and_reward():
    """Prompts of different lengths (left-padded in a batch) and a reward for 'a's."""
    ds = datasets.Dataset.from_dict({"prompt": ["ab", "abcdef", "a", "cdefghij"] * 4})

    def reward(completions, **kw):  # more 'a's is better
        return [float(c.count("a")) for c in completions]

    return ds, reward


def assert_equals_trls_entropy(trainer):
    theirs = logged(trainer, "entropy")
    ours = logged(trainer, "collapse/entropy/entropy_mean")
    assert sorted(ours) == sorted(theirs) == [1, 2, 3]
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5), step
    return ours


def rescore_rollouts(trainer, model, temperature=1.0) -> dict:
    """By hand, as the run goes: each step's generated completions scored by a float64 copy of
    the weights that sampled them (positions from the mask, as generate() numbers them), the
    entropy of ``z / temperature`` over each completion up to its end token: ``{step: [sum,
    tokens]}``."""
    steps = {}
    inner = trainer._generate_and_score_completions

    def score(inputs):
        out = inner(inputs)
        copy = transformers.LlamaForCausalLM(model.config)
        copy.load_state_dict(model.state_dict())
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            z = copy.double()(ids, attention_mask=mask, position_ids=mask.cumsum(1).sub(1).clamp(0))
        P = out["prompt_ids"].shape[1]
        ent = functional.token_entropy(z.logits[:, P - 1 : -1] / temperature)
        keep = out["completion_mask"].bool()
        steps[trainer.state.global_step + 1] = [float(ent[keep].sum()), int(keep.sum())]
        return out

    trainer._generate_and_score_completions = score
    return steps


def grpo_config(tmp_path, temperature):
    """3 steps of 2 prompts' groups of 4 completions of up to 6 tokens, a log at each."""
    return trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=6, max_steps=3, logging_steps=1, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", temperature=temperature, beta=0.0, seed=0,
    )  # fmt: skip


def logged(trainer, key):
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


def test_grpo_token_entropy_equals_trls_entropy_over_the_completion_tokens(tmp_path):
    # prompts of different lengths, left-padded; TRL never materialises the logits (a fused
    # head): the probe reads the backbone's hidden states with head="lm_head". Rollouts
    # (generate(), no gradient) are not training forwards and are left out
    tok = char_tokenizer()
    ds, reward = prompts_and_reward()
    args = grpo_config(tmp_path, temperature=1.0)
    callback = CollapseTrainerCallback(
        [
            probes.TokenEntropy("model", head="lm_head", tokens=None, name="entropy"),
            probes.GenerationDiversity("", group_size=4, name="diversity"),
            # the completions' embeddings: each one's mean last hidden state
            probes.RepresentationRank("model", per_sequence=True, name="completions"),
        ]
    )
    model = tiny_lm(len(CHARS) + 2)
    seen, logits, hidden = [], [], []  # what each training forward (gradients on) scores

    def capture(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append((kwargs["input_ids"], kwargs["labels"]))

    def states(module, args, output):
        if module.training and torch.is_grad_enabled():  # float64 logits at that step's weights
            h = output.last_hidden_state.detach().double()
            logits.append(h @ model.lm_head.weight.detach().double().T)
            hidden.append(h)

    model.register_forward_pre_hook(capture, with_kwargs=True)
    model.model.register_forward_hook(states)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds,
        processing_class=tok, callbacks=[callback],
    )  # fmt: skip
    callback.observe_loss_inputs(trainer, advantages="advantages")
    advantages = []
    inner = trainer.compute_loss  # by hand, what each loss step receives

    def record(model, inputs, *a, **kw):
        # the rows of a step arrive shuffled: each row's prompt, by hand, says its group
        prompts = [
            tuple(r[m.bool()].tolist()) for r, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])
        ]
        group = torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
        advantages.append((inputs["advantages"].detach().clone(), group))
        return inner(model, inputs, *a, **kw)

    trainer.compute_loss = record
    trainer.train()
    callback.close()
    ours = assert_equals_trls_entropy(trainer)
    assert all(0 < v < math.log(len(CHARS) + 2) + 1e-6 for v in ours.values())
    # two prompts' groups of 4 completions per step; their diversity from the raw ids and labels
    assert len(seen) == len(advantages) == 3
    zero_std = logged(trainer, "frac_reward_zero_std")  # TRL's own count of gradient-less groups
    for step, ((ids, labels), (adv, group), z) in enumerate(zip(seen, advantages, logits), 1):
        want = functional.generation_diversity(ids, labels != -100, group)
        for key in ("distinct_1", "distinct_2", "pairwise_overlap", "identical_fraction"):
            got = logged(trainer, f"collapse/diversity/{key}")[step]
            assert got == pytest.approx(want[key], rel=1e-12, nan_ok=True), (step, key)
        zero = logged(trainer, "collapse/diversity/zero_advantage_fraction")[step]
        still = [float((adv[group == k].abs() <= 1e-6).all()) for k in range(2)]
        assert zero == sum(still) / 2 == zero_std[step]
        assert logged(trainer, "collapse/diversity/groups")[step] == 2
        # the completions' embeddings: means over the completion tokens, by hand
        h, keep = hidden[step - 1], labels != -100
        means = torch.stack([h[b][keep[b]].mean(0) for b in range(len(h))])
        erank = functional.representation_rank(means)["erank"]
        assert logged(trainer, "collapse/completions/erank")[step] == pytest.approx(erank, rel=1e-9)
        assert logged(trainer, "collapse/completions/samples")[step] == 8
        # Cui et al.'s covariance of the sampled tokens' log-probabilities with the advantages
        y = labels[:, 1:]
        want = functional.token_entropy_metrics(
            z[:, :-1], y != -100, targets=y, advantages=adv[:, None].expand_as(y)
        )
        cov = logged(trainer, "collapse/entropy/logprob_advantage_cov")[step]
        assert cov == pytest.approx(want["logprob_advantage_cov"], abs=1e-6)
        assert logged(trainer, "collapse/entropy/logprob_mean")[step] == pytest.approx(
            want["logprob_mean"], rel=1e-5
        )


def test_grpo_rollout_entropy_apart_from_the_trained_policys(tmp_path):
    # one run, two keys: the policy that sampled the completions (generate()'s steps, known by
    # their key-value cache; at the sampler's temperature) and the policy being trained (the
    # loss forwards; TRL's own entropy). By hand: every step's generated completions scored by
    # a float64 copy of the weights that sampled them, over each completion up to its end token
    tok = char_tokenizer()
    ds, reward = prompts_and_reward()
    args = grpo_config(tmp_path, temperature=0.7)
    callback = CollapseTrainerCallback(
        [
            probes.TokenEntropy(
                "model", head="lm_head", tokens=None, temperature=0.7, name="entropy"
            ),
            probes.TokenEntropy(
                "model", head="lm_head", tokens=None, temperature=0.7, rollout=True, name="rollout"
            ),
        ]
    )
    model = tiny_lm(len(CHARS) + 2)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds,
        processing_class=tok, callbacks=[callback],
    )  # fmt: skip
    sampled = rescore_rollouts(trainer, model, temperature=0.7)
    trainer.train()
    callback.close()
    assert_equals_trls_entropy(trainer)
    got = logged(trainer, "collapse/rollout/entropy_mean")
    tokens = logged(trainer, "collapse/rollout/tokens")
    assert sorted(sampled) == sorted(got) == [1, 2, 3]
    for step, (total, count) in sampled.items():
        assert tokens[step] == count
        assert got[step] == pytest.approx(total / count, rel=2e-5)


def sft_trainer(tmp_path, probe_list, **config):
    """TRL's SFTTrainer on prompt-completion pairs (right padding), 3 steps logged at each."""
    tok = char_tokenizer()
    tok.padding_side = "right"
    pairs = [("ab", "cde"), ("abcdef", "g"), ("a", "bcdefgh"), ("cdefghij", "aa")] * 4
    ds = datasets.Dataset.from_dict(
        {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0, **config,
    )  # fmt: skip
    callback = CollapseTrainerCallback(probe_list)
    trainer = trl.SFTTrainer(
        model=tiny_lm(len(CHARS) + 2), args=args, train_dataset=ds, processing_class=tok,
        callbacks=[callback],
    )  # fmt: skip
    return trainer, callback


def test_sft_token_entropy_equals_trls_entropy_over_the_completion_tokens(tmp_path, caplog):
    # prompt-completion pairs: the loss (and TRL's entropy) covers the completion tokens only;
    # the probe reads the labels the trainer passes (prompt and padding at -100). TRL's fused
    # head never calls lm_head: a probe there sees nothing and says so; the hidden states with
    # the head's weight give TRL's number
    trainer, callback = sft_trainer(
        tmp_path,
        [
            probes.TokenEntropy("model", head="lm_head", tokens=None, name="entropy"),
            probes.TokenEntropy("lm_head", tokens=None, name="logits"),
        ],
    )
    trainer.train()
    callback.close()
    assert_equals_trls_entropy(trainer)
    assert not logged(trainer, "collapse/logits/entropy_mean")
    assert "name='logits') recorded" in caplog.text and "never ran" in caplog.text


def test_sft_with_label_smoothing_counts_the_completion_tokens_given_the_losss_labels(tmp_path):
    """With label_smoothing_factor (or compute_loss_func) TRL runs the gradient forward
    without labels (the labelled fused pass runs without gradients): the probe counted the
    prompt tokens too. cb.observe_loss_inputs(trainer, targets="labels") hands it the loss's
    labels (it raised a TypeError: observe() got targets twice)."""
    probe = probes.TokenEntropy("model", head="lm_head", tokens=None, name="entropy")
    trainer, callback = sft_trainer(tmp_path, [probe], label_smoothing_factor=0.1)
    callback.observe_loss_inputs(trainer, targets="labels")
    batches = []
    original = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, *a, **k: (
        batches.append(inputs["labels"].clone()) or original(model, inputs, *a, **k)
    )
    trainer.train()
    callback.close()
    counted = logged(trainer, "collapse/entropy/tokens")
    # completion tokens that predict a next one: labels shifted by one, not -100
    want = {step + 1: float((labels[:, 1:] != -100).sum()) for step, labels in enumerate(batches)}
    assert counted == want
    assert_equals_trls_entropy(trainer)


@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_two_processes_with_a_resume_in_a_window(kind, tmp_path):
    """torchrun, 2 gloo processes: each logged window is the token mean over both ranks'
    completion tokens of its steps (a float64 reference recorded in every rank's training
    forward; with GRPO, the rollout probe's against every rank's completions rescored by the
    weights that sampled them); the window of steps 3-4 spans a checkpoint at step 3 and a
    resume."""
    from tests.integrations.test_two_processes import torchrun

    torchrun("-m", "tests.scripts.trl_grpo_ddp", str(tmp_path), kind, timeout=600)
    first, second = (json.loads((tmp_path / f"run{i}.json").read_text()) for i in (0, 1))

    def window(which, steps, *runs):
        total = count = 0
        for run in runs:
            for rank in run["ranks"]:
                for step in steps:
                    if str(step) in rank[which]:
                        total += rank[which][str(step)][0]
                        count += rank[which][str(step)][1]
        return total / count

    for which, key in enumerate(["entropy", "rollout"][: 2 if kind == "grpo" else 1]):
        logs = [run["logs"][f"collapse/{key}/entropy_mean"] for run in (first, second)]
        # (the resumed run's log history starts with the checkpoint's: step 2 again)
        assert list(logs[0]) == ["2"] and list(logs[1]) == ["2", "4"], key
        assert logs[0]["2"] == pytest.approx(window(which, [1, 2], first), rel=1e-5), key
        # the resumed run's window holds step 3 (saved with the checkpoint) and step 4
        both = window(which, [3, 4], first, second)
        assert logs[1]["4"] == pytest.approx(both, rel=1e-5), key
        assert logs[1]["4"] != pytest.approx(window(which, [4], second), rel=1e-5), key
    if kind == "sft":  # no generation: the rollout probe saw nothing of the training forwards
        for run in (first, second):
            assert set(run["logs"]["collapse/rollout/tokens"].values()) == {0.0}
