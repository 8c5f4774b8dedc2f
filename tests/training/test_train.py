"""The head trainer (sprm_kernels.model.training: rollouts, collect, verifiers, metrics, fit; `sprm train`) and the
generate hooks it needs (return_features, answer_all).

Rollouts of a tiny random policy check the plumbing: the features are the decoding's own layer L-2 rows at the
final scored positions (no second forward), every candidate's answer comes from its own KV cache, the rollout file
is exact. Synthetic features, in which correct trajectories are separable within a problem, check the training:
it must raise the within-problem gap and AUC, be deterministic for a seed, and write loadable checkpoints.
Everything runs on one thread (tiny matrices: a busy 2-core machine makes more threads far slower).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace

import pytest
import torch

from sprm_kernels import sprm_score
from sprm_kernels.model import ReflectiveModel, SPRMHead
from sprm_kernels.model.cli import train as train_cli
from sprm_kernels.model.shipped import SHIPPED_DIR, tiny
from sprm_kernels.model.training.collect import collect
from sprm_kernels.model.training.fit import train_head
from sprm_kernels.model.training.metrics import evaluate, roc_auc
from sprm_kernels.model.training.rollouts import RolloutSet
from sprm_kernels.model.training.verifiers import last_number_verifier

HIDDEN = 32  # the tiny policy's
PROMPTS = ["1+2=3.\n\n4+5=", "2+2=", "7.\n\n1+1=", "3+4="]  # steps inside prompts: scored once a row reopens <think>
GENERATION = dict(max_think_tokens=24, max_answer_tokens=4, temperature=1.0, backend="torch", progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def add_logit_bias(model, bias: dict[int, float]) -> None:
    vector = torch.zeros(model.config.vocab_size)
    for token, value in bias.items():
        vector[token] = value
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + vector.to(logits))


def tiny_reflective(arch: str = "qwen2", init_std: float = 0.02) -> ReflectiveModel:
    """A random policy that writes `.\\n\\n` often and `</think>` a little more than chance."""
    tokenizer = tiny.make_char_tokenizer()
    model = tiny.make_tiny_policy(arch, len(tokenizer), hidden_size=HIDDEN, init_std=init_std)
    ids = tokenizer.convert_tokens_to_ids
    add_logit_bias(model, {ids(".\n\n"): 1.5, ids("</think>"): 0.5, tokenizer.eos_token_id: -1e4})
    return ReflectiveModel(model, tokenizer, tiny.make_tiny_head(HIDDEN), backend="torch")


def has_one(prompt, answer: str) -> bool:
    return "1" in answer


@pytest.fixture(scope="module")
def reflective():
    return tiny_reflective()


@pytest.fixture(scope="module")
def collected(reflective):
    return collect(reflective, PROMPTS, has_one, 6, seed=1, **GENERATION)


# -- generate's hooks ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_step_features_are_the_rows_the_scores_came_from(reflective):
    result = reflective.generate(PROMPTS[0], k=8, seed=3, return_features=True, **GENERATION)
    plain = reflective.generate(PROMPTS[0], k=8, seed=3, **GENERATION)
    assert result.candidates == plain.candidates and result.answer_token_ids == plain.answer_token_ids
    assert all(c.step_features is None for c in plain.candidates)
    prompt_len = len(result.prompt_token_ids)
    for candidate in result.candidates:
        features = candidate.step_features
        assert features.shape == (len(candidate.score_positions), HIDDEN) and features.dtype == reflective.dtype
        if not candidate.score_positions:
            continue
        offsets = torch.tensor([0, features.shape[0]])
        scores = sprm_score(features, torch.arange(features.shape[0]), offsets, *reflective.head.kernel_weights(),
                            return_step_scores=True, backend="torch")  # fmt: skip
        torch.testing.assert_close(scores.step_scores.tolist(), candidate.step_scores, rtol=1e-6, atol=1e-7)
    # A row that reopened <think> moved the span to 0: the prompt's step is scored and has its prefill row.
    assert any(c.score_positions and min(c.score_positions) < prompt_len - 1 for c in result.candidates)


@pytest.mark.parametrize("arch, max_think", [("qwen2-sliding", 8), ("llama", 12)])
@torch.inference_mode()
def test_answer_all_decodes_each_candidate_from_its_own_cache(arch, max_think):
    """Greedy answers against a cache-free greedy decode of prompt + thinking; rows left the batch at various
    steps, so both kinds of cache (a closed row's own, a copy of a live row) are exercised."""
    reflective = tiny_reflective(arch, init_std=0.3)  # a larger init: greedy continuations are not constant
    kwargs = dict(GENERATION, max_think_tokens=max_think, max_answer_tokens=6, answer_temperature=0.0)
    result = reflective.generate(PROMPTS[1], k=4, seed=0, answer_all=True, **kwargs)
    plain = reflective.generate(PROMPTS[1], k=4, seed=0, **kwargs)
    assert (result.best, result.answer_token_ids) == (plain.best, plain.answer_token_ids)  # the chosen is unchanged
    lengths = [len(c.token_ids) for c in result.candidates]
    finished = [c.finished for c in result.candidates]
    assert len(set(lengths)) > 1 and any(finished) and not all(finished), (lengths, finished)
    for candidate in result.candidates:
        ids = result.prompt_token_ids + candidate.token_ids + ([] if candidate.finished else [reflective.think_end_id])
        expected = []
        while len(expected) < 6 and not (expected and expected[-1] in reflective.eos_token_ids):
            expected.append(int(reflective.model(torch.tensor([ids + expected])).logits[0, -1].argmax()))
        assert candidate.answer_token_ids == expected
        assert candidate.answer == reflective.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.candidates[result.best].answer_token_ids == result.answer_token_ids
    fed = sum(len(c.answer_token_ids) + (0 if c.finished else 1) for c in result.candidates)  # </think> added
    assert result.stats.answer_decode_tokens == fed


# -- collect and the rollout file -----------------------------------------------------------------------------------


@torch.inference_mode()
def test_collected_features_are_the_decoding_features(reflective, monkeypatch):
    """Features equal the hooked layer L-2 states of the final sequences at the final score positions, yet come
    from the decoding: collecting never calls the scoring path and never re-prefills a sequence."""
    fed = []
    handle = reflective.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)  # fmt: skip
    monkeypatch.setattr(reflective, "penultimate_hidden_states", lambda *a, **k: pytest.fail("second forward"))
    try:
        rollouts = collect(reflective, PROMPTS, has_one, 6, seed=1, **GENERATION)
    finally:
        handle.remove()
        monkeypatch.undo()
    prompt_lengths = [len(ids) for ids in rollouts.prompt_token_ids]
    assert sorted(n for n in fed if n > 2) == sorted(prompt_lengths)  # one prefill per prompt, then 1-2 tokens

    assert rollouts.num_rollouts == 6 * len(PROMPTS)
    assert rollouts.problem_id.tolist() == [p for p in range(len(PROMPTS)) for _ in range(6)]
    in_prompt = 0
    for r in range(rollouts.num_rollouts):
        prompt_ids = rollouts.prompt_token_ids[rollouts.problem_id[r]]
        thinking = rollouts.token_ids[rollouts.token_offsets[r] : rollouts.token_offsets[r + 1]].tolist()
        lo, hi = rollouts.offsets[r].item(), rollouts.offsets[r + 1].item()
        positions = rollouts.step_positions[lo:hi].tolist()
        assert positions == reflective.score(prompt_ids + thinking, backend="torch").score_positions
        hooked = reflective.penultimate_hidden_states(torch.tensor([prompt_ids + thinking]))[0]
        torch.testing.assert_close(rollouts.features[lo:hi], hooked[positions], rtol=1e-4, atol=1e-6)
        in_prompt += bool(positions) and min(positions) < len(prompt_ids) - 1
        assert rollouts.texts[r] == reflective.tokenizer.decode(thinking, skip_special_tokens=False)
    assert in_prompt, "no rollout scores a prompt step: the recompute path is not exercised"


def test_collected_labels(collected):
    r = collected
    assert torch.equal(r.valid, r.finished)  # has_one always gives a verdict
    assert r.finished.any() and not r.finished.all()
    for i in range(r.num_rollouts):
        assert r.correct[i] == (bool(r.finished[i]) and "1" in r.answers[i])
    assert r.correct.any() and (r.valid & ~r.correct).any()
    assert r.info["k"] == 6 and r.info["label_from"] == "answer" and r.info["seed"] == 1


def test_collect_labels_from_the_thinking(reflective):
    seen = []

    def verifier(prompt, text):
        seen.append(text)
        return None if "x" in text else "2" in text  # None: a format failure

    rollouts = collect(reflective, PROMPTS[:2], verifier, 4, label_from="thinking", **GENERATION)
    finished = [i for i in range(rollouts.num_rollouts) if rollouts.finished[i]]
    assert seen == [rollouts.texts[i] for i in finished] and rollouts.answers == [None] * rollouts.num_rollouts
    for i in finished:
        assert rollouts.valid[i] == ("x" not in rollouts.texts[i])
        assert rollouts.correct[i] == ("x" not in rollouts.texts[i] and "2" in rollouts.texts[i])


def assert_same_rollouts(a: RolloutSet, b: RolloutSet) -> None:
    for name in RolloutSet.TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("prompts", "prompt_token_ids", "texts", "answers", "info"):
        assert getattr(a, name) == getattr(b, name), name


def test_rollout_set_roundtrip_is_exact(collected, tmp_path):
    collected.save(tmp_path / "fp32")
    assert sorted(os.listdir(tmp_path / "fp32")) == ["rollouts.json", "rollouts.safetensors"]
    assert_same_rollouts(RolloutSet.load(tmp_path / "fp32"), collected)
    as_bf16 = replace(collected, features=collected.features.bfloat16(), prompts=[[{"role": "user", "content": "é"}]]
                      + collected.prompts[1:])  # fmt: skip
    as_bf16.save(tmp_path / "bf16")
    assert_same_rollouts(RolloutSet.load(tmp_path / "bf16"), as_bf16)
    sidecar = json.loads((tmp_path / "fp32" / "rollouts.json").read_text())
    (tmp_path / "fp32" / "rollouts.json").write_text(json.dumps(dict(sidecar, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        RolloutSet.load(tmp_path / "fp32")


# -- training on synthetic rollouts --------------------------------------------------------------------------------

SYNTH_HIDDEN = 16


def synthetic_rollouts(problems=160, k=8, max_steps=6, seed=0) -> RolloutSet:
    """As tests/kernels/test_loss.py's synthetic batches: a step is good or bad, +-1 along axis 0, plus unit noise, a
    per-problem offset and the problem's difficulty along axis 1 (which alone separates problems, not rollouts). A
    wrong rollout is good up to its first error, a correct one good but for a few lucky bad steps. One rollout in 10
    never finished (invalid); its features are the opposite of its label, so training on it would hurt."""
    gen = torch.Generator().manual_seed(seed)
    features, counts, correct, finished, problem_id = [], [], [], [], []
    for p in range(problems):
        difficulty = torch.rand((), generator=gen).item()
        offset = torch.randn(SYNTH_HIDDEN, generator=gen) * 0.5
        for _ in range(k):
            ok = torch.rand((), generator=gen).item() > 0.2 + 0.6 * difficulty
            done = torch.rand((), generator=gen).item() > 0.1
            n = int(torch.randint(0, max_steps + 1, (), generator=gen))
            good = torch.rand(n, generator=gen) > (0.1 if ok else 0.0)
            if not ok and n:
                good[int(torch.randint(0, n, (), generator=gen)) :] = False
            x = torch.randn(n, SYNTH_HIDDEN, generator=gen) + offset
            x[:, 0] += (good.float() * 2 - 1) * (1 if done else -1)
            x[:, 1] += difficulty
            features.append(x), counts.append(n), correct.append(ok and done), finished.append(done)
            problem_id.append(p)
    num = len(counts)
    return RolloutSet(
        features=torch.cat(features),
        offsets=torch.tensor([0, *counts]).cumsum(0),
        step_positions=torch.cat([torch.arange(n) for n in counts]),
        correct=torch.tensor(correct),
        finished=torch.tensor(finished),
        valid=torch.tensor(finished),
        problem_id=torch.tensor(problem_id),
        token_ids=torch.zeros(0, dtype=torch.int64),
        token_offsets=torch.zeros(num + 1, dtype=torch.int64),
        prompts=[f"problem {p}" for p in range(problems)],
        prompt_token_ids=[[] for _ in range(problems)],
        texts=[""] * num,
        answers=[None] * num,
        info={"synthetic": True},
    )


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_rollouts()


def fresh_head(seed=0, hidden=SYNTH_HIDDEN) -> SPRMHead:
    torch.manual_seed(seed)
    return SPRMHead(hidden)


TRAIN = dict(steps=300, lr=3e-3, batch_problems=8, eval_split=0.25, backend="torch", progress=False)


def test_training_is_deterministic_for_a_seed(synthetic):
    heads = [fresh_head() for _ in range(3)]
    reports = [train_head(head, synthetic, seed=seed, **dict(TRAIN, steps=30)) for head, seed in
               zip(heads, (5, 5, 6), strict=True)]  # fmt: skip
    for name, value in heads[0].state_dict().items():
        assert torch.equal(value, heads[1].state_dict()[name]), name
    assert reports[0].losses == reports[1].losses and reports[0].eval_problems == reports[1].eval_problems
    assert not torch.equal(heads[0][0].weight, heads[2][0].weight)  # another seed: another split, order, dropout


@pytest.mark.parametrize("mode", ["spr", "bce"])
def test_training_learns_the_within_problem_signal(synthetic, tmp_path, mode):
    """300 AdamW steps of 8 problems (64 rollouts, ~190 steps) with the reference's Dropout(0.5), over 120
    problems; metrics on the 40 held-out ones. Run with -s for the curve."""
    head = fresh_head()
    report = train_head(head, synthetic, mode=mode, output_dir=tmp_path, checkpoint_every=100, backbone="tiny/qwen",
                        **dict(TRAIN, progress=True))  # fmt: skip
    print(f"\n{mode}:", *(report.line(i) for i in range(len(report.steps))), sep="\n")  # shown with -s
    assert report.steps == list(range(0, 301, 30)) and len(report.losses) == 300
    assert report.eval_on == "held-out" and len(report.eval_problems) == 40
    assert sorted(report.eval_problems + report.train_problems) == list(range(160))
    assert report.within_gap[-1] >= report.within_gap[0] + 0.05 and report.within_gap[-1] >= 0.1
    assert report.within_auc[-1] >= 0.7 and report.auc[-1] >= report.auc[0] + 0.1 and report.auc[-1] >= 0.7
    assert report.best_of_k[-1] >= report.random_pick + 0.15  # selection beats a score-blind pick by far
    assert report.random_pick > report.pass_at_1  # finished rows first: unfinished ones are never correct here
    kept = report.kept_correct[1:] + report.kept_wrong[1:]
    assert all(k == 1.0 for k in kept) if mode == "bce" else all(0.2 < k < 1 for k in kept)
    assert math.isnan(report.train_loss[0]) and report.train_loss[-1] < report.train_loss[1]

    # Checkpoints: the official layout beside the training record, loading back to the trained head.
    assert report.checkpoints == [str(tmp_path / f"checkpoint-000{n}00") for n in (1, 2)] + [str(tmp_path)]
    loaded = SPRMHead.from_pretrained(tmp_path)
    published = SPRMHead.from_state_dict(torch.load(tmp_path / "score_module.pt", weights_only=True))
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value) and torch.equal(published.state_dict()[name], value)
    info = json.loads((tmp_path / "sprm_train.json").read_text())
    assert info["backbone"] == "tiny/qwen" and info["step"] == 300 and info["settings"]["mode"] == mode
    assert info["metrics"]["within_gap"] == report.within_gap[-1]
    assert json.loads((tmp_path / "train_report.json").read_text())["within_gap"] == report.within_gap
    middle = SPRMHead.from_pretrained(tmp_path / "checkpoint-000100")
    assert not torch.equal(middle[0].weight, head[0].weight)
    assert evaluate(head, synthetic, report.eval_problems, backend="torch").within_gap == report.within_gap[-1]


def test_bce_warmup_runs_plain_bce_first_then_spr(synthetic):
    """Warm-up over every step is plain BCE bit for bit; a partial warm-up differs from both pure modes."""
    heads = {name: fresh_head() for name in ("bce", "spr warm 30", "spr warm 10", "spr")}
    train_head(heads["bce"], synthetic, mode="bce", seed=3, **dict(TRAIN, steps=30))
    train_head(heads["spr warm 30"], synthetic, mode="spr", bce_warmup_steps=30, seed=3, **dict(TRAIN, steps=30))
    report = train_head(heads["spr warm 10"], synthetic, mode="spr", bce_warmup_steps=10, seed=3,
                        **dict(TRAIN, steps=30, eval_every=10))  # fmt: skip
    train_head(heads["spr"], synthetic, mode="spr", seed=3, **dict(TRAIN, steps=30))
    weight = {name: head[0].weight for name, head in heads.items()}
    assert torch.equal(weight["bce"], weight["spr warm 30"])
    assert not torch.equal(weight["spr warm 10"], weight["bce"]) and not torch.equal(
        weight["spr warm 10"], weight["spr"]
    )
    assert report.kept_correct[1] == report.kept_wrong[1] == 1.0  # BCE keeps every step
    assert report.kept_wrong[-1] < 1.0 and report.settings["bce_warmup_steps"] == 10


def test_invalid_rollouts_do_not_teach(synthetic):
    """Flipping the labels of the invalid rollouts changes nothing: they are left out of the loss."""
    flipped = replace(synthetic, correct=torch.where(synthetic.valid, synthetic.correct, ~synthetic.correct))
    heads = [fresh_head(), fresh_head()]
    for head, rollouts in zip(heads, (synthetic, flipped), strict=True):
        train_head(head, rollouts, **dict(TRAIN, steps=10))
    assert torch.equal(heads[0][0].weight, heads[1][0].weight)


def test_metrics_by_hand():
    """One step per rollout, a head whose logit is the feature: score = sigmoid(feature)."""
    head = SPRMHead(1)
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head[0].bias.zero_()
        head[3].weight.copy_(torch.tensor([[1.0, -1.0]]))
        head[3].bias.zero_()
    logits = [2.0, 0.0, 1.0, -1.0, 3.0, 5.0]  # problem 0: three rollouts; problem 1: three
    correct = [True, False, False, True, False, False]
    finished = [True, True, True, True, True, False]  # the 5.0 of problem 1 never finished (chosen last)
    base = synthetic_rollouts(problems=2, k=3)
    rollouts = replace(
        base, features=torch.tensor(logits)[:, None], offsets=torch.arange(7), step_positions=torch.zeros(6).long(),
        correct=torch.tensor(correct), finished=torch.tensor(finished), valid=torch.tensor(finished),
        problem_id=torch.tensor([0, 0, 0, 1, 1, 1]),
    )  # fmt: skip
    m = evaluate(head, rollouts, backend="torch")
    s = torch.sigmoid(torch.tensor(logits)).tolist()
    assert m.score_correct == pytest.approx((s[0] + s[3]) / 2, rel=1e-6)
    assert m.score_incorrect == pytest.approx((s[1] + s[2] + s[4]) / 3, rel=1e-6)
    assert m.gap == pytest.approx(m.score_correct - m.score_incorrect)
    assert m.auc == pytest.approx(2 / 6)  # valid pairs (correct, wrong): 2.0 beats 0.0 and 1.0; -1.0 beats none
    within = [(s[0] - (s[1] + s[2]) / 2), (s[3] - s[4])]
    assert m.within_gap == pytest.approx(sum(within) / 2, rel=1e-6) and m.within_auc == pytest.approx(0.5)
    assert m.best_of_k == 0.5  # problem 0 picks 2.0 (correct); problem 1 picks 3.0 (finished first), wrong
    assert m.random_pick == pytest.approx((1 / 3 + 1 / 2) / 2)  # problem 1: a random one of its finished two
    assert m.pass_at_1 == pytest.approx((1 / 3 + 1 / 3) / 2) and m.oracle == 1.0
    assert (m.problems, m.mixed_problems) == (2, 2)


def test_roc_auc_matches_the_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=gen).float()  # many ties
    labels = torch.rand(40, generator=gen) < 0.4
    diff = scores[labels][:, None] - scores[~labels][None, :]
    expected = ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()
    assert roc_auc(scores, labels) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(roc_auc(scores, torch.ones(40, dtype=torch.bool)))


def test_last_number_verifier():
    verify = last_number_verifier({"2+2=": "4", "1+1=": "2"})
    assert verify("2+2=", "so 3, no: 4") is True and verify("1+1=", "2.0") is True
    assert verify("2+2=", "5") is False and verify("2+2=", "no idea") is None


# -- the command line ----------------------------------------------------------------------------------------------


def test_command_line_collect_then_fit(tmp_path, capsys):
    model_dir = tiny.save_tiny_reflective(tmp_path / "model", hidden_size=HIDDEN)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a in range(3) for b in range(2)))
    verifier = tmp_path / "verify.py"
    verifier.write_text("def verify(prompt, text):\n    return text.count('1') >= 2\n")
    rollouts_dir, out = tmp_path / "rollouts", tmp_path / "head"
    assert train_cli.main([
        "collect", "--model", model_dir, "--prompts", str(prompts), "--out", str(rollouts_dir), "--k", "4",
        "--verifier", f"{verifier}:verify", "--label-from", "thinking", "--max-think-tokens", "16",
        "--temperature", "1.0", "--device", "cpu", "--backend", "torch",
    ]) == 0  # fmt: skip
    rollouts = RolloutSet.load(rollouts_dir)
    assert rollouts.num_rollouts == 24 and rollouts.info["model"] == model_dir and rollouts.hidden_size == HIDDEN
    assert train_cli.main([
        "fit", "--rollouts", str(rollouts_dir), "--out", str(out), "--steps", "4", "--batch-problems", "2",
        "--eval-split", "0.34", "--init", model_dir, "--backend", "torch",
    ]) == 0  # fmt: skip
    assert {"sprm_head.safetensors", "score_module.pt", "sprm_train.json", "train_report.json"} <= set(os.listdir(out))
    assert json.loads((out / "sprm_train.json").read_text())["backbone"] == model_dir
    assert SPRMHead.from_pretrained(out).hidden_size == HIDDEN
    assert "head ->" in capsys.readouterr().out


def test_train_is_a_subcommand_with_add_parser_and_run(collected, tmp_path, capsys):
    """The interface the `sprm` command table uses: `add_parser(subparsers)` makes `train`, `run(args)` runs it."""
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    collected.save(tmp_path / "rollouts")
    args = parser.parse_args(["train", "fit", "--rollouts", str(tmp_path / "rollouts"), "--out", str(tmp_path / "head"),
                              "--steps", "2", "--batch-problems", "2", "--backend", "torch", "--quiet"])  # fmt: skip
    assert (args.command, args.train_command) == ("train", "fit")
    assert train_cli.run(args) == 0
    assert SPRMHead.from_pretrained(tmp_path / "head").hidden_size == HIDDEN and "head ->" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, names",
    [
        (["collect", "--model", "no/such/folder", "--prompts", "p.jsonl", "--out", "o"], ["--model no/such/folder"]),
        (["collect", "--model", SHIPPED_DIR, "--prompts", "p.jsonl", "--out", "o", "--k", "0"], ["--k", "'0'"]),
        (["collect", "--model", SHIPPED_DIR, "--prompts", "no-such.jsonl", "--out", "o"], ["--prompts no-such.jsonl"]),
        (
            ["collect", "--model", SHIPPED_DIR, "--prompts", "PROMPTS", "--out", "o", "--rows", "r.jsonl"],
            ["--rows: only with --ray"],
        ),
        (
            ["collect", "--model", SHIPPED_DIR, "--prompts", "PROMPTS", "--out", "o", "--verifier", "nowhere:f"],
            ["--verifier nowhere:f"],
        ),
        (["collect", "--model", SHIPPED_DIR, "--prompts", "PROMPTS", "--out", "o", "--top-p", "2"], ["--top-p:"]),
        (
            ["collect", "--model", SHIPPED_DIR, "--prompts", "PROMPTS", "--out", "o", "--temperature", "-1"],
            ["--temperature:"],
        ),
        (["fit", "--rollouts", "no-rollouts", "--out", "o"], ["--rollouts no-rollouts: not a rollouts folder"]),
        (["fit", "--rollouts", "ROLLOUTS", "--out", "o", "--lr", "-1"], ["--lr: expected a number in [0, inf)"]),
        (["fit", "--rollouts", "ROLLOUTS", "--out", "o", "--steps", "0"], ["--steps", "'0'"]),
        (["fit", "--rollouts", "ROLLOUTS", "--out", "o", "--mode", "listwise"], ["--mode", "listwise"]),
        (["fit", "--rollouts", "ROLLOUTS", "--out", "o", "--init", "no-head"], ["--init no-head: no such folder"]),
        (["sample"], ["sample"]),
    ],
)
def test_command_line_usage_errors_are_one_line_exit_2(argv, names, collected, tmp_path, capsys, monkeypatch):
    """Bad options, folders and values: one line on stderr, exit status 2, before any model is loaded."""
    monkeypatch.setattr(ReflectiveModel, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts, rollouts = tmp_path / "prompts.jsonl", tmp_path / "rollouts"
    prompts.write_text(json.dumps({"prompt": "1+1=", "reference": "2"}) + "\n")
    collected.save(rollouts)
    argv = [{"PROMPTS": str(prompts), "ROLLOUTS": str(rollouts)}.get(arg, arg) for arg in argv]
    monkeypatch.chdir(tmp_path)
    status = train_cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 2 and out == "", (status, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("sprm") and "Traceback" not in err, err
    for name in names:
        assert name in err, err


# -- bad inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(k=0), "k"),
        (dict(k=True), "k"),
        (dict(prompts=[]), "prompts"),
        (dict(prompts="2+2="), "prompts"),
        (dict(verifier="exact"), "verifier"),
        (dict(label_from="text"), "label_from"),
        (dict(model="not a model"), "model"),
    ],
)
def test_collect_rejects_bad_arguments(reflective, kwargs, name):
    args = dict(model=reflective, prompts=PROMPTS[:1], verifier=has_one, k=2) | kwargs
    with pytest.raises(ValueError, match=f"^{name}:"):
        collect(args.pop("model"), args.pop("prompts"), args.pop("verifier"), args.pop("k"), **args, **GENERATION)


def test_a_verifier_must_answer_true_false_or_none(reflective):
    with pytest.raises(ValueError, match="^verifier: expected it to return True, False or None"):
        collect(reflective, PROMPTS[:1], lambda prompt, answer: "yes", 4, seed=0, **GENERATION)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(head=SPRMHead(8)), "head"),
        (dict(head="head"), "head"),
        (dict(rollouts=[]), "rollouts"),
        (dict(mode="listwise"), "mode"),
        (dict(steps=0), "steps"),
        (dict(epochs=0), "epochs"),
        (dict(lr=-1e-3), "lr"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(batch_problems=0), "batch_problems"),
        (dict(eval_split=1.0), "eval_split"),
        (dict(eval_split=0.999), "eval_split"),  # would hold out every problem
        (dict(dropout=1.0), "dropout"),
        (dict(bce_warmup_steps=-1), "bce_warmup_steps"),
        (dict(bce_warmup_steps=2.0), "bce_warmup_steps"),
        (dict(seed=1.5), "seed"),
        (dict(checkpoint_every=0), "checkpoint_every"),
    ],
)
def test_train_head_rejects_bad_arguments(synthetic, kwargs, name):
    args = dict(head=fresh_head(), rollouts=synthetic) | kwargs
    with pytest.raises(ValueError, match=f"^{name}:"):
        train_head(args.pop("head"), args.pop("rollouts"), **args, progress=False)


def test_rollout_set_rejects_inconsistent_tensors(synthetic):
    with pytest.raises(ValueError, match="^offsets:"):
        replace(synthetic, offsets=synthetic.offsets[:-1])
    with pytest.raises(ValueError, match="^valid:"):
        replace(synthetic, valid=torch.ones_like(synthetic.valid))  # valid but never finished
    with pytest.raises(ValueError, match="^problem_id:"):
        replace(synthetic, problem_id=synthetic.problem_id + 1)
