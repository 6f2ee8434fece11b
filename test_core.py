"""Tests for core.py, in the order of its sections. CPU only; tiny random Qwen2/Qwen3 models are built once,
saved with save_pretrained and loaded back through from_pretrained, as users load real ones."""

import contextlib
import functools
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import core
from bench import study
from tools import compare, curves, export

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two tiny random models (Qwen2 and Qwen3 architectures) with the demo tokenizer, saved to disk."""
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for arch in ("qwen2", "qwen3"):
        tokenizer = core.demo_tokenizer()
        model = core.tiny_model(arch, tokenizer, seed=0, hidden=32)
        model.save_pretrained(folder / arch)
        tokenizer.save_pretrained(folder / arch)
        paths.append(str(folder / arch))
    return paths


@pytest.fixture(scope="session")
def warm_pair(tmp_path_factory):
    """The demo's two tiny models of very different skill: the first warmed up until about half its sampled answers
    are right, the second for only 10 supervised steps (it writes the format, rarely the right sum)."""
    return core.build_demo_models(tmp_path_factory.mktemp("warm"), seed=0, targets=(0.5, 0.0))


def loaded(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def lively(model, seed=1):
    """Weights ~ N(0, 0.5): a tiny random model whose greedy tokens vary (at the default init they repeat one
    token, which would let a broken sampler pass a token-equality test)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# Config

def test_help_documents_every_flag_in_the_config_sections():
    text = core.build_parser().format_help()
    for f in core.fields(core.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"]
    titles = [f.metadata["section"] for f in core.fields(core.Config) if f.metadata["section"]]
    section = None  # each flag is listed under the section its field (or an earlier one) opens
    for f in core.fields(core.Config):
        section = f.metadata["section"] or section
        start = text.index(f"\n{section}:\n")
        following = [i for i in (text.find(f"\n{t}:\n", start + 1) for t in titles) if i > start]
        assert text.index(core.flag_name(f.name) + " ", start) < min(following, default=len(text)), f.name
    assert "(default: )" not in text and "(default: False)" not in text
    assert "--eval-n EVAL_N test questions to evaluate (0 = all) (default: 0)" in re.sub(r"\s+", " ", text)


def test_each_flags_kind_is_in_its_field():
    """Which flags --eval-only refuses and --resume may change come from the Config fields' kinds (arg)."""
    assert core.RESUME_OVERRIDES == {"stop_after", "gen_batch", "micro_batch", "logprob_chunk", "no_grad_checkpoint",
                                     "decoder", "device1", "device2", "save_every", "keep", "show"}
    assert {"steps", "k", "lr", "adv_group", "max_new_tokens", "no_eval_before", "eval_every"} <= core.TRAINING_ONLY
    assert not core.TRAINING_ONLY & (core.RESUME_OVERRIDES | {"eval_n", "eval_k", "lora_rank", "seed", "data"})
    for f in core.fields(core.Config):  # what the kinds do: --eval-only refuses exactly the training flags
        refused = core.UsageError if f.name in core.TRAINING_ONLY else None
        with pytest.raises(refused) if refused else contextlib.nullcontext():
            core.validate(core.Config(eval_only=True), given={f.name})


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "--k must be >= 1"),
    (["--hint-dropout", "1.5"], "--hint-dropout"),
    (["--data", "nonsense"], "unknown dataset"),
    (["--lr", "0"], "--lr"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--steps", "0"], "--steps"),
    (["--hint-dropout", "-0.1"], "--hint-dropout"),
    (["--top-p", "0"], "--top-p"),
    (["--batch-questions", "0"], "--batch-questions"),
    (["--single-samples", "3"], "--single-samples needs --single"),
    (["--w-div", "nan"], "--w-div must be a finite number"),  # else every reward is nan and every update skipped
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--weight-decay", "-1"], "--weight-decay >= 0"),  # AdamW's own check: a traceback
    (["--lora-alpha", "0"], "--lora-alpha > 0"),  # scale 0: the adapters would learn nothing, silently
    (["--stop-after", "-1"], "--stop-after and --show >= 0"),
])
def test_validate_rejects_bad_settings(flags, message):
    cfg = core.Config(**vars(core.build_parser().parse_args(flags)))
    with pytest.raises(core.UsageError, match=message):
        core.validate(cfg)


def test_paper_defaults():
    c = core.Config()
    assert (c.k, c.k_rescue, c.temperature, c.top_p, c.max_new_tokens, c.hint_tokens) == (2, 1, 0.7, 0.9, 3072, 1536)
    assert (c.hint_dropout, c.rescue_bonus, c.lora_rank, c.lora_alpha, c.lr, c.grad_clip) == (0.5, 0.15, 16, 32.0, 1e-5, 1.0)
    assert (c.batch_questions, c.train_n, c.seed, c.beta_kl, c.round_b_weight) == (4, 1000, 42, 0.04, 0.8)


# -----------------------------------------------------------------------------
# The CORE step: round A, teacher hint, round B, rewards and advantages

NO_UPDATE = {"loss": 0, "kl": 0, "entropy": 0, "grad_norm": 0, "skipped": 0, "mismatch": None, "mismatch_kl": None}


class FakePolicy:
    """Stands in for a model in the protocol; its answers come from the patched `generate`."""

    def __init__(self, index, tokenizer):
        self.index, self.tokenizer, self.name, self.context = index, tokenizer, f"fake{index}", 10_000
        self.eos_ids = {tokenizer.eos_token_id}
        self.hint_draws = random.Random(index)


def test_protocol_hints_only_failed_models_and_pays_rescue(monkeypatch):
    tokenizer = core.demo_tokenizer()
    problem = core.Problem("p", "What is 2 + 2 ?", "4", "number")
    scripts = {1: iter(["2 + 2 = 5 . \\boxed{5}", "2 + 2 = 3 . \\boxed{3}", "2 + 2 = 4 . \\boxed{4}"]),
               2: iter(["2 + 2 = 4 . \\boxed{4}", "2 + 2 = 4 . so \\boxed{4}", "2 + 2 = 4 . \\boxed{4}"])}
    seen = {1: [], 2: []}

    def fake_generate(policy, prompts, max_new_tokens, cfg, n=1, **_):
        m = policy.index
        seen[m] += [tokenizer.decode(p) for p in prompts]
        return [([1, 2], next(scripts[m]), [-0.5, -0.5]) for _ in prompts for _ in range(n)]

    monkeypatch.setattr(core, "generate", fake_generate)
    policies = [FakePolicy(m, tokenizer) for m in (1, 2)]
    cfg = core.Config(hint_dropout=0.0)
    groups, hints = core.core_step(policies, [problem], cfg, core.reward_schedule(cfg, 0))
    group = groups[0]
    assert [(t.model, t.round) for t in group] == [(1, "A"), (1, "A"), (2, "A"), (2, "A"), (1, "B"), (2, "B")]
    assert hints[0] and "\\boxed" not in hints[0] and "Hint:" in seen[1][-1] and "Hint:" not in seen[2][-1]
    rescued = group[4]
    assert rescued.hint_shown and rescued.correct and rescued.terms["rescue"] == 0.15
    assert group[5].terms["rescue"] == 0 and not group[5].hint_shown
    assert abs(sum(t.advantage for t in group)) < 1e-9
    assert group[0].advantage < 0 < rescued.advantage


def protocol_step(monkeypatch, problems, scripts, cfg):
    """core_step on FakePolicies whose samples are scripts[model] (one text per sample, in order)."""
    tokenizer = core.demo_tokenizer()
    scripts = {m: iter(texts) for m, texts in scripts.items()}
    monkeypatch.setattr(core, "generate", lambda policy, prompts, max_new, cfg, n=1, **_:
                        [([1, 2], next(scripts[policy.index]), [-0.5, -0.5]) for _ in prompts for _ in range(n)])
    policies = [FakePolicy(m, tokenizer) for m in (1, 2)]
    return core.core_step(policies, problems, cfg, core.reward_schedule(cfg, 0))


@pytest.mark.parametrize("hint_to", ["failed", "all"])
@pytest.mark.parametrize("adv_group", ["joint", "model"])
def test_swapping_the_models_swaps_every_reward_advantage_and_hint(monkeypatch, hint_to, adv_group):
    """One CORE step with models a and b, then the same step with b first (each model's scripts and random streams
    travel with it): every trace's text, hint, reward, terms and advantage, and each question's hint, swap exactly
    (rewards to 1e-12: a determinant's rows come in another order). The questions hold what used to break it:
    teachers of equal reward from both models (the first model's won) and, under --hint-to all, hint-dropout
    draws from one stream in model order."""
    tokenizer = core.demo_tokenizer()
    problems = [core.Problem("p0", "What is 2 + 2 ?", "4", "number"), core.Problem("p1", "What is 3 + 3 ?", "6", "number"),
                core.Problem("p2", "What is 1 + 4 ?", "5", "number")]
    # per model, in sampling order: round A (2 samples of each question), then round B (2 samples of each)
    scripts = {"a": ["\\boxed{5}", "\\boxed{3}", "3 + 3 = 6 . \\boxed{6}", "\\boxed{7}", "1 + 4 = 5 . \\boxed{5}", "\\boxed{2}",
                     "2 + 2 = 4 . \\boxed{4}", "\\boxed{1}", "\\boxed{6}", "\\boxed{0}", "\\boxed{5}", "\\boxed{9}"],
               "b": ["two and two make 4 . \\boxed{4}", "\\boxed{1}", "\\boxed{2}", "\\boxed{9}", "one and four make 5 . \\boxed{5}",
                     "\\boxed{8}", "\\boxed{4}", "\\boxed{3}", "3 + 3 = 6 . \\boxed{6}", "\\boxed{6}", "\\boxed{5}", "\\boxed{7}"]}
    cfg = core.Config(k=2, k_rescue=2, hint_dropout=0.5, hint_to=hint_to, adv_group=adv_group, steps=2)

    def step(order):
        texts = {name: iter(scripts[name]) for name in order}
        monkeypatch.setattr(core, "generate", lambda policy, prompts, max_new, cfg, n=1, **_:
                            [([1, 2], next(texts[policy.name]), [-0.5, -0.5]) for _ in prompts for _ in range(n)])
        policies = []
        for name in order:
            policy = FakePolicy(0, tokenizer)
            policy.name, policy.hint_draws = name, random.Random(name)  # its streams are its own
            policies.append(policy)
        groups, hints = core.core_step(policies, problems, cfg, core.reward_schedule(cfg, 1))  # second half: cm on
        return hints, [keyed_by_model_name(group, order) for group in groups]

    hints_ab, ab = step("ab")
    hints_ba, ba = step("ba")
    assert hints_ab == hints_ba and all(hints_ab)  # p2's teachers tie: a's trace and b's, of equal reward
    shown = [t.hint_shown for g in ab for t in g.values()]
    assert any(shown) and not all(shown)  # the dropout drew both ways
    for one, other in zip(ab, ba):
        assert one.keys() == other.keys()
        for key, t in one.items():
            u = other[key]
            assert (t.text, t.correct, t.hint_shown, t.failed_cold, t.prompt_ids) == \
                   (u.text, u.correct, u.hint_shown, u.failed_cold, u.prompt_ids), key
            assert t.reward == pytest.approx(u.reward, abs=1e-12) and t.advantage == pytest.approx(u.advantage, abs=1e-12)
            assert t.terms == pytest.approx(u.terms, abs=1e-12), key


def keyed_by_model_name(group, order):
    """A question's traces by (model name, round, index among that model's traces of the round)."""
    keyed, counts = {}, {}
    for t in group:
        key = (order[t.model - 1], t.round)
        counts[key] = counts.get(key, -1) + 1
        keyed[key + (counts[key],)] = t
    return keyed


def test_hint_whose_first_number_is_the_gold_is_kept_a_bare_answer_is_not(monkeypatch):
    problems = [core.Problem("a", "Janet's ducks lay 16 eggs. How many?", "16", "number"),
                core.Problem("b", "What is 8 + 8 ?", "16", "number")]
    wrong = "I think \\boxed{3}"
    scripts = {1: [wrong] * 4 + [wrong] * 2,
               2: ["Janet's ducks lay 16 eggs per day. \\boxed{16}", wrong, "$16$. \\boxed{16}", wrong, wrong, wrong]}
    groups, hints = protocol_step(monkeypatch, problems, scripts, core.Config(hint_dropout=0.0))
    assert hints == ["Janet's ducks lay 16 eggs per day.", None]
    assert [t.hint_shown for t in groups[0] if t.round == "B"] == [True, False]
    assert not any(t.hint_shown for t in groups[1])


def test_hint_leak_is_counted_per_shown_hint(monkeypatch):
    problems = [core.Problem("a", "What is 9 * 2 ?", "18", "number"), core.Problem("b", "What is 9 + 9 ?", "18", "number")]
    wrong = "I think \\boxed{3}"
    scripts = {1: [wrong] * 4 + [wrong] * 2,  # model 1 fails both questions: it is shown both hints
               2: ["9 * 2 = 18, so \\boxed{18}", wrong, "Add nine to nine. \\boxed{18}", wrong, wrong, wrong]}
    cfg = core.Config(hint_dropout=0.0)
    groups, hints = protocol_step(monkeypatch, problems, scripts, cfg)
    assert hints == ["9 * 2 = 18, so", "Add nine to nine."]
    assert [t.hint_leaks for g in groups for t in g if t.hint_shown] == [True, False]  # '18' is read from the first
    row = core.step_metrics(0, cfg, groups, [NO_UPDATE] * 2, (1.0, 0.5), 0)
    assert (row["hints_shown"], row["hints_leaking"], row["hint_leak"]) == (2, 1, 0.5)
    assert (row["w_div"], row["lambda_cm"]) == (0.2, 0.0)  # the weights in force at step 0


def test_format_bonus_is_paid_for_an_explicit_answer_only():
    cfg = core.Config()
    traces = [core.Trace(1, "A", [], [], "9 * 2 = 18. \\boxed{18}", True), core.Trace(1, "A", [], [], "9 * 2 = 18", True)]
    _, terms = core.score_group(traces, "number", cfg, core.reward_schedule(cfg, 0))
    assert [t["format"] for t in terms] == [0.1, 0.0] and all(t.correct for t in traces)


def test_advantage_groups_of_a_weaker_partner(monkeypatch):
    """Model 1 is right and model 2 wrong on both questions; on the first a hint rescues model 2."""
    problems = [core.Problem("a", "What is 2 + 2 ?", "4", "number"), core.Problem("b", "What is 1 + 2 ?", "3", "number")]
    scripts = {1: ["2 + 2 = 4 . \\boxed{4}", "2 + 2 = 4 . so \\boxed{4}", "1 + 2 = 3 . \\boxed{3}", "1 + 2 = 3 . so \\boxed{3}",
                   "2 + 2 = 4 . \\boxed{4}", "1 + 2 = 3 . \\boxed{3}"],
               2: ["\\boxed{5}", "\\boxed{6}", "\\boxed{5}", "\\boxed{6}", "2 + 2 = 4 . \\boxed{4}", "\\boxed{7}"]}
    runs = {g: protocol_step(monkeypatch, problems, scripts, core.Config(hint_dropout=0.0, adv_group=g))[0]
            for g in ("joint", "model")}
    assert [[t.reward for t in g] for g in runs["joint"]] == [[t.reward for t in g] for g in runs["model"]]  # same R
    for adv_group, groups in runs.items():
        rescued = next(t for t in groups[0] if t.model == 2 and t.round == "B")
        assert rescued.correct and rescued.hint_shown and rescued.terms["rescue"] == 0.15 and rescued.advantage > 0
        cold = [t.advantage for t in groups[0] if t.model == 2 and t.round == "A"]
        all_wrong = [t.advantage for t in groups[1] if t.model == 2]  # model 2 fails the second question in both rounds
        assert all(a < 0 for a in cold)  # below the rescued trace (joint: below model 1's too)
        if adv_group == "joint":  # the paper: the partner's right answers set the baseline, every wrong trace goes down
            assert all(a < 0 for a in all_wrong)
        else:  # each model against its own traces: nothing to learn from an all-wrong group
            assert all_wrong == [0.0, 0.0, 0.0]
            assert all(abs(sum(t.advantage for t in g if t.model == m)) < 1e-9 for g in groups for m in (1, 2))
        stats = [NO_UPDATE] * 2
        for t in (t for g in groups for t in g):
            t.terms["extra"] = 0.5  # a new reward term is logged as it is, with no change to the log
        row = core.step_metrics(0, core.Config(adv_group=adv_group), groups, stats, (1.0, 0.5), 0)
        assert row["extra"] == 0.5 and set(row) >= {"correct", "div", "cm", "rescue", "format"}
        assert row["constant_groups"] == (1 if adv_group == "model" else 0)  # counted where the baseline is: model 2's
        assert row["advantage_groups"] == (4 if adv_group == "model" else 2)  # of 2 questions x (2 models or 1 group)
        assert f"const {row['constant_groups']}/{row['advantage_groups']} |" in core.format_log(row, 1)
    # "constant" is the update's own rule: a spread of 1e-10 is below its 1e-8, so every advantage is 0
    twins = [core.Trace(m, "A", [1], [2], "", False, reward=r) for m, r in ((1, 0.5), (2, 0.5 + 1e-10))]
    for t, a in zip(twins, core.group_advantages([t.reward for t in twins]).tolist()):
        t.advantage = a
    assert core.step_metrics(0, core.Config(), [twins], stats, (1.0, 0.5), 0)["constant_groups"] == 1


def test_shown_samples_name_round_and_advantage_and_keep_the_text_as_written(capsys):
    problem = core.Problem("p", "What is 2 + 2 ?", "4", "number")
    trace = core.Trace(1, "A", [], [], "2 + 2 = 4 .\nSo \\boxed{4}", True, reward=1.1, advantage=-0.4)
    core.show_group(problem, [trace], None, {1: "tiny-qwen2"})
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[:4] == ["round", "A", "tiny-qwen2", "right"] and "  adv -0.40  " in line
    assert line.endswith("2 + 2 = 4 .\\nSo \\boxed{4}")  # one backslash, as the model wrote it; \n marks the break


def test_hint_cap_in_receiver_tokens():
    tokenizer = core.demo_tokenizer()
    hint = " ".join(["3 + 4 = 7 ."] * 50)
    capped = core.cap_hint(hint, tokenizer, 20)
    assert len(tokenizer(capped, add_special_tokens=False)["input_ids"]) <= 20 and hint.startswith(capped.strip())


# -----------------------------------------------------------------------------
# Rewards

def test_dpp_gain_equals_brute_force_determinant_ratio():
    torch.manual_seed(0)
    phi = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    eps = 1e-3
    kernel = phi @ phi.T + eps * torch.eye(5, dtype=torch.float64)
    gains = core.dpp_gains(phi, eps)
    for i in range(5):
        rest = [j for j in range(5) if j != i]
        assert math.isclose(gains[i].item(), (torch.det(kernel) / torch.det(kernel[rest][:, rest])).item(), rel_tol=1e-9)


def test_dpp_gain_near_zero_for_duplicates_near_one_for_orthogonal():
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(core.dpp_gains(eye[:3]), torch.ones(3, dtype=torch.float64))
    dup = torch.stack([eye[0], eye[0], eye[1]])
    gains = core.dpp_gains(dup)
    assert gains[0] < 0.01 and gains[1] < 0.01 and gains[2] > 0.99
    same = core.ngram_features("first add 3 and 4 to get 7. \\boxed{7}", 256)
    assert torch.allclose(same, core.ngram_features("first add 3 and 4 to get 7. \\boxed{8}", 256))  # answer stripped


def test_diversity_rewards_only_correct_traces():
    eye = torch.eye(3, dtype=torch.float64)
    phi = torch.stack([eye[0], eye[0], eye[1]])
    div = core.diversity_rewards(phi, [True, False, True])
    assert div[1] == 0 and div[0] > 0.99 and div[2] > 0.99  # the wrong duplicate does not count


def test_complementarity():
    eye = torch.eye(3, dtype=torch.float64)
    phi = torch.stack([eye[0], eye[0], eye[1], eye[2]])
    cm = core.complementarity_rewards(phi, [True, True, True, False], [1, 2, 2, 1], ["A"] * 4)
    assert cm[0] < 0.01           # model 1's trace duplicates a correct trace of its partner
    assert cm[1] < 0.01 and cm[2] > 0.99 and cm[3] == 0
    alone = core.complementarity_rewards(phi[:2], [True, False], [1, 2], ["A", "A"])
    assert alone[0] == 1.0        # right where the peer is wrong
    taught = core.complementarity_rewards(phi[:2], [True, True], [2, 1], ["A", "B"])
    assert taught.tolist() == [1.0, 1.0]  # a hinted copy in round B is not the partner's own attempt in round A


@pytest.mark.parametrize("flip", range(4))
def test_rescue_bonus_needs_every_condition(flip):
    flags = [True, True, True, True]  # round B, hint shown, failed cold, correct
    assert core.rescue_bonuses(*[[f] for f in flags], 0.15) == [0.15]
    flags[flip] = False
    assert core.rescue_bonuses(*[[f] for f in flags], 0.15) == [0.0]


def test_group_advantages():
    adv = core.group_advantages([1.3, 0.1, 0.1, 1.25, 0.1, 0.4])
    assert abs(adv.mean().item()) < 1e-9 and adv[0] > adv[3] > adv[5] > adv[1]
    assert torch.equal(core.group_advantages([0.1] * 6), torch.zeros(6, dtype=torch.float64))
    assert not torch.isnan(core.group_advantages([2.0])).any()
    raw = core.group_advantages([1.3, 0.1, 0.1, 1.25, 0.1, 0.4], scale="none")  # Dr. GRPO: reward units
    assert torch.allclose(raw, torch.tensor([1.3, 0.1, 0.1, 1.25, 0.1, 0.4], dtype=torch.float64) - 3.25 / 6)


def test_reward_schedule():
    cfg = core.Config(steps=10)
    assert core.reward_schedule(cfg, 0) == {"w_div": 0.2, "lambda_cm": 0.0}
    late = core.reward_schedule(cfg, 5)
    assert math.isclose(late["w_div"], 0.05) and late["lambda_cm"] == 0.1


# -----------------------------------------------------------------------------
# The update

def test_policy_loss_matches_definition():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, kl = core.policy_loss(logp, ref, torch.tensor([2.0]), torch.tensor([0.8]), mask, beta=0.1)
    r = torch.tensor([-0.5, 0.0])
    k3 = torch.exp(r) - r - 1
    assert math.isclose(kl.item(), k3.sum().item(), rel_tol=1e-6)
    assert math.isclose(loss.item(), (0.8 * (-2.0 * torch.tensor([-1.0, -2.0]) + 0.1 * k3)).sum().item(), rel_tol=1e-6)
    loss, kl = core.policy_loss(logp, None, torch.tensor([2.0]), torch.tensor([0.8]), mask, beta=0.1)  # no KL term
    assert kl.item() == 0 and math.isclose(loss.item(), (0.8 * -2.0 * torch.tensor([-1.0, -2.0])).sum().item())


def test_chunked_logprobs_entropy_and_tempered_logprobs_equal_full_logits():
    model, _ = small_model()
    ids = torch.randint(0, 300, (2, 11))
    logits = model(ids).logits[:, :-1].float()
    full = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    tempered = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    for chunk in (1, 3, 100):
        assert torch.allclose(core.token_logprobs(model, ids, chunk)[0], full, atol=1e-5)
        logp, entropy, at_temperature = core.token_logprobs(model, ids, chunk, sampling_temperature=0.7)
        assert torch.allclose(logp, full, atol=1e-5) and torch.allclose(at_temperature, tempered, atol=1e-5)
        assert torch.allclose(entropy, torch.distributions.Categorical(logits=logits).entropy(), atol=1e-4)


def test_logprobs_of_right_padded_rows_need_no_attention_mask(tiny_models, monkeypatch):
    """Right padding: a real token attends only to real tokens before it, so the causal mask alone gives the
    same log-probs as the 2-D padding mask, and the update passes none (sdpa keeps its flash kernel; with a mask,
    transformers builds a [b, 1, T, T] one for every layer)."""
    cfg = core.Config(lora_rank=4, micro_batch=4)
    policy = make_policy(tiny_models[1], cfg)
    lively(policy.model)
    prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    traces = [core.Trace(1, "A", prompt, list(range(5, 5 + n)), "", False, advantage=a) for n, a in ((2, 1.0), (9, -1.0))]
    ids, mask, _, _ = core.padded_batch(traces, [t.prompt_ids for t in traces], policy, cfg)
    assert (ids[0, len(prompt) + 2:] == policy.pad_id).all()  # the short row is padded on the right
    padding = (ids != policy.pad_id).long()
    padding[:, :len(prompt)] = 1
    with torch.no_grad():
        masked = torch.log_softmax(policy.model(ids, attention_mask=padding).logits[:, :-1].float(), -1)
        masked = masked.gather(-1, ids[:, 1:, None]).squeeze(-1)
        unmasked = core.token_logprobs(policy.model, ids, cfg.logprob_chunk)[0]
    assert torch.allclose(unmasked * mask, masked * mask, atol=1e-6)
    masks, decoder = [], policy.model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: (masks.append(kw.get("attention_mask")), forward(*a, **kw))[1])
    core.update_policy(policy, traces, cfg, 0.0)
    assert len(masks) == 2 and masks == [None, None]  # the reference and the policy pass


def test_diagnostics_are_computed_once_where_they_are_logged(tiny_models, monkeypatch):
    """The entropy and the tempered log-probs (the mismatch) come from the policy pass only, once per chunk: not
    in the reference pass, and not again when the checkpointed chunk is recomputed for the backward pass."""
    cfg = core.Config(lora_rank=4, micro_batch=4, logprob_chunk=8)
    policy = make_policy(tiny_models[1], cfg)
    prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    traces = [core.Trace(1, "A", prompt, list(range(5, 25)), "", False, advantage=1.0)]
    calls, logsumexp = [], torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **kw: (calls.append(1), logsumexp(*a, **kw))[1])
    heads, head = [], policy.model.get_output_embeddings()
    head.register_forward_hook(lambda *_: heads.append(1))
    core.update_policy(policy, traces, cfg, 0.0)
    chunks = math.ceil((len(prompt) + 20 - 1) / 8)
    assert len(heads) == 3 * chunks  # reference pass, policy pass, and its recomputation in the backward pass
    assert len(calls) == chunks  # the diagnostics: once per chunk of the policy pass


def test_the_rollout_update_mismatch_is_the_mean_difference_and_k3(tiny_models):
    """Rollout log-probs made 0.1 higher than the update's own: |difference| 0.1 and KL k3 = e^-0.1 + 0.1 - 1
    per token; tokens without rollout log-probs (or of a hinted trace trained on its cold prompt) do not count."""
    cfg = core.Config(lora_rank=4, micro_batch=4, temperature=0.7)
    policy = make_policy(tiny_models[0], cfg)
    prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    completion = [5, 6, 7, 8]
    with torch.no_grad():
        ids = torch.tensor([prompt + completion])
        own = torch.log_softmax(policy.model(ids).logits[0, len(prompt) - 1:-1] / 0.7, -1)
        own = own.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    traces = [core.Trace(1, "A", prompt, completion, "", False, rollout_logprobs=(own + 0.1).tolist(), advantage=1.0),
              core.Trace(1, "A", prompt, completion, "", False, advantage=-1.0),  # no rollout log-probs
              core.Trace(1, "B", prompt, completion, "", False, rollout_logprobs=[0.0] * 4, cold_prompt_ids=prompt)]
    stats = core.update_policy(policy, traces, cfg, 0.0)
    assert math.isclose(stats["mismatch"], 0.1, rel_tol=1e-4)
    assert math.isclose(stats["mismatch_kl"], math.exp(-0.1) + 0.1 - 1, rel_tol=1e-3)
    assert core.update_policy(policy, traces[1:2], cfg, 0.0)["mismatch"] is None  # nothing measured


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_rollout_update_mismatch_of_a_core_step(warm_pair, dtype):
    """The sampler's log-probs (KV cache, one token at a time) against the update's (the full sequence) on the demo's
    models, with adapters that change the model: the same up to rounding, in bfloat16 too (both apply the adapters
    the same way; a merged bf16 copy gave 1e-3 and more, bench/mismatch.py)."""
    cfg = core.Config(lora_rank=4, dtype=dtype, max_new_tokens=12, micro_batch=16, single=True, k=4, temperature=0.7)
    policy = make_policy(warm_pair[0], cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in core.lora_parameters(policy.model):
            p.add_(0.02 * torch.randn_like(p))
    problems = core.arithmetic_problems(4, 0)
    groups, _ = core.core_step([policy], problems, cfg, core.reward_schedule(cfg, 0))
    stats = core.update_policy(policy, [t for g in groups for t in g], cfg, 0.0)
    assert 0 <= stats["mismatch"] < (1e-4 if dtype == "float32" else 1e-3) and 0 <= stats["mismatch_kl"] < 1e-6


def make_policy(path, cfg):
    return core.load_policy(1, path, torch.device("cpu"), cfg)


def test_policy_gradient_raises_reward(tmp_path):
    """A few dozen steps with reward = fraction of sampled tokens from the lower half of the vocabulary.
    The embeddings are scaled up (std 0.2) so the tiny model's logits can move far from uniform at all."""
    tokenizer = core.demo_tokenizer()
    model = core.tiny_model("qwen2", tokenizer, seed=0, hidden=32)
    model.get_input_embeddings().weight.data *= 10
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = core.Config(lr=2e-2, lora_rank=8, beta_kl=0.0, temperature=1.0, top_p=1.0, micro_batch=16)
    policy = make_policy(str(tmp_path), cfg)
    half = len(policy.tokenizer) // 2
    prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    means = []
    for step in range(30):
        outs = core.sample(policy.model, [prompt], 6, set(), policy.pad_id, 1.0, 1.0, policy.generator, n=16)[0]
        rewards = [sum(t < half for t in o) / len(o) for o in outs]
        traces = [core.Trace(1, "A", prompt, o, "", False) for o in outs]
        for t, a in zip(traces, core.group_advantages(rewards).tolist()):
            t.advantage = a
        core.update_policy(policy, traces, cfg, cfg.lr)
        means.append(sum(rewards) / len(rewards))
    assert sum(means[-5:]) / 5 > sum(means[:5]) / 5 + 0.2, means


class RecordingOptimizer:
    """Stands in for AdamW: keeps the gradients update_policy hands it, changes nothing."""

    def __init__(self, params):
        self.params, self.param_groups, self.grads = params, [{}], None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def update_gradients(policy, traces, cfg):
    policy.optimizer = RecordingOptimizer(core.lora_parameters(policy.model))
    policy.optimizer.zero_grad()
    core.update_policy(policy, traces, cfg, 0.0)
    return policy.optimizer.grads


def test_round_b_on_the_cold_prompt_has_the_importance_weighted_gradient(tiny_models):
    """--round-b-context cold: a hinted trace's tokens are scored under the cold prompt, each weighted by
    min(1, pi(y | cold) / pi(y | hinted)) without gradient. Its gradient against one written out with full
    logits, and the paper's loss again when the hint is empty (the two prompts equal)."""
    cfg = core.Config(lora_rank=4, beta_kl=0.04, micro_batch=4, grad_clip=1e9, round_b_context="cold")
    policy = make_policy(tiny_models[1], cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in core.lora_parameters(policy.model):
            p.add_(0.05 * torch.randn_like(p))
    cold = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    hinted = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number", hint="1 + 1 = 2 .")
    traces = [core.Trace(1, "A", cold, [5, 6, 7], "", False, advantage=1.0),
              core.Trace(1, "B", hinted, [8, 9, 10, 11], "", False, hint_shown=True, cold_prompt_ids=cold,
                         advantage=-0.7)]
    grads = update_gradients(policy, traces, cfg)

    def logps(prompt, completion):  # log pi of each completion token, from the full logits
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(policy.model(ids).logits[0, :-1].float(), -1)
        return logp[len(prompt) - 1:].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)

    loss = 0.0
    for t in traces:
        trained = logps(cold, t.completion_ids)
        with torch.no_grad(), core.lora_disabled(policy.model):
            ref = logps(cold, t.completion_ids)
        with torch.no_grad():
            rho = (trained - logps(t.prompt_ids, t.completion_ids)).exp().clamp(max=1.0)
        kl = (ref - trained).exp() - (ref - trained) - 1
        loss = loss + (1.0 if t.round == "A" else 0.8) * (-t.advantage * rho * trained + 0.04 * kl).sum()
    (loss / 7).backward()
    expected = [p.grad for p in core.lora_parameters(policy.model)]
    assert rho.min() < 0.99  # the hint changes the token probabilities: weights below 1
    assert all(torch.allclose(g, e, rtol=0, atol=1e-6) for g, e in zip(grads, expected))
    empty = [core.replace(t, prompt_ids=cold) for t in traces]  # no hint: both prompts are the cold one
    paper = update_gradients(policy, empty, core.replace(cfg, round_b_context="hinted"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(update_gradients(policy, empty, cfg), paper))


def test_gradient_checkpointing_gives_the_same_update(tiny_models):
    traces_grads = []
    for flag in (False, True):
        cfg = core.Config(lora_rank=4, beta_kl=0.04, no_grad_checkpoint=not flag, micro_batch=2)
        policy = make_policy(tiny_models[1], cfg)
        prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
        traces = [core.Trace(1, r, prompt, [5 + i, 6, 7, 8][:2 + i], "", False, advantage=a)
                  for i, (r, a) in enumerate([("A", 1.0), ("A", -0.5), ("B", 0.7)])]
        with torch.no_grad():  # move B off zero so that every LoRA parameter gets a gradient
            for p in core.lora_parameters(policy.model):
                p.add_(0.01)
        calls, mlp = [], policy.model.get_decoder().layers[0].mlp  # inside the checkpointed layer: recomputed
        forward = mlp.forward
        mlp.forward = lambda *args, **kw: (calls.append(1), forward(*args, **kw))[1]  # hooks skip the recompute
        core.update_policy(policy, traces, cfg, cfg.lr)
        traces_grads.append(core.lora_state(policy.model))
        assert len(calls) == (3 if flag else 2) * 2  # per micro-batch: ref + policy forward, + a recompute
    plain, ckpt = traces_grads
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-7) for k in plain)


def test_bfloat16_weights_train_float32_adapters(tiny_models):
    """--dtype bfloat16 (the CUDA default) on the CPU: bf16 base weights, fp32 LoRA master weights, a finite
    update with gradient checkpointing and the KL term."""
    cfg = core.Config(lora_rank=4, dtype="bfloat16", micro_batch=2, lr=1e-3)
    policy = make_policy(tiny_models[0], cfg)
    layer = next(iter(core.lora_layers(policy.model).values()))
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    traces = [core.Trace(1, r, prompt, [5 + i, 6, 7, 8][:2 + i], "", False, advantage=a)
              for i, (r, a) in enumerate([("A", 1.0), ("A", -0.5), ("B", -0.5)])]
    stats = core.update_policy(policy, traces, cfg, cfg.lr)
    assert stats["skipped"] == 0 and math.isfinite(stats["loss"]) and stats["tokens"] == 9 and stats["kl"] >= 0
    # --beta-kl 0: the reference policy never runs, so no KL is measured: logged as None ("-"), never as 0
    assert core.update_policy(policy, traces, core.replace(cfg, beta_kl=0.0), cfg.lr)["kl"] is None
    assert layer.lora_B.abs().sum() > 0 and layer.lora_B.dtype == torch.float32


def test_non_finite_update_is_skipped(tiny_models):
    cfg = core.Config(lora_rank=4, beta_kl=0.0)
    policy = make_policy(tiny_models[0], cfg)
    before = {k: v.clone() for k, v in core.lora_state(policy.model).items()}
    prompt = core.build_prompt(policy.tokenizer, "What is 1 + 1 ?", "number")
    trace = core.Trace(1, "A", prompt, [5, 6, 7], "", False, advantage=float("nan"))
    stats = core.update_policy(policy, [trace], cfg, cfg.lr)
    assert stats["skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in core.lora_state(policy.model).items())


def test_learning_rate_schedule():
    cfg = core.Config(steps=100, lr=1.0)
    assert core.learning_rate(cfg, 0) == 0.1 and core.learning_rate(cfg, 9) == 1.0
    assert core.learning_rate(cfg, 99) < 0.01


# -----------------------------------------------------------------------------
# LoRA

def small_model():
    tokenizer = core.demo_tokenizer()
    return core.tiny_model("qwen3", tokenizer, seed=1, hidden=32).eval(), tokenizer


def test_lora_starts_at_base_and_disables():
    model, _ = small_model()
    x = torch.randint(0, 300, (2, 7))
    before = model(x).logits
    names = core.add_lora(model, rank=4, alpha=8)
    assert len(names) == 2 * 7 and all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    assert torch.equal(model(x).logits, before)  # B = 0
    with torch.no_grad():
        for p in core.lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(model(x).logits, before, atol=1e-4)
    with core.lora_disabled(model):
        assert torch.allclose(model(x).logits, before, atol=1e-6)


def test_a_lora_rank_over_a_layers_width_and_non_finite_adapters_are_refused():
    model, _ = small_model()  # k_proj: 2 kv heads x head_dim 8 = 16 outputs, the narrowest adapted layer
    with pytest.raises(core.UsageError, match="--lora-rank 17 is over the narrowest adapted layer's width, 16"):
        core.add_lora(model, rank=17, alpha=8)
    with pytest.raises(core.UsageError, match=r"--lora-targets: foo_proj matches no linear layer of the model \(its "
                                              r"layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        core.add_lora(small_model()[0], rank=4, alpha=8, targets="q_proj,foo_proj")  # not q_proj alone, silently
    core.add_lora(model, rank=16, alpha=8)
    policy = types.SimpleNamespace(model=model)
    core.check_in_sync([policy])  # one process: always in sync
    with torch.no_grad():
        core.lora_parameters(model)[0][0, 0] = float("nan")
    with pytest.raises(core.TrainingError, match="non-finite weights"):  # not "adapters differ across ranks"
        core.check_in_sync([policy])


def test_lora_save_load_round_trip_and_merge(tmp_path):
    from transformers import AutoModelForCausalLM
    model, tokenizer = small_model()
    core.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for p in core.lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    core.save_lora(model, tmp_path / "adapter", "org/tiny-base")
    other, _ = small_model()
    core.add_lora(other, rank=4, alpha=8)
    core.load_lora(other, tmp_path / "adapter")
    x = torch.randint(0, 300, (1, 9))
    assert torch.equal(model(x).logits, other(x).logits)
    export.merged(model).save_pretrained(tmp_path / "merged")  # tools/export.py's merge: plain nn.Linear layers
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(plain(x).logits, model(x).logits, atol=1e-5)
    for rank, alpha in ((2, 8), (4, 16)):  # another rank, or the same rank with another alpha (scale)
        wrong, _ = small_model()
        core.add_lora(wrong, rank=rank, alpha=alpha)
        with pytest.raises(core.UsageError, match="does not fit"):
            core.load_lora(wrong, tmp_path / "adapter")


def test_export_merges_in_float32_and_keeps_the_models_dtype(tiny_models, tmp_path):
    """tools/export.py on a model folder that declares bfloat16 (as the Qwen models do): trained in float32 on the
    CPU, its merged copy is saved in bfloat16, config and tensors, each weight W + scale B A rounded once."""
    from transformers import AutoModelForCausalLM
    model, tokenizer = loaded(tiny_models[0])
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    cfg = core.Config(model1=str(tmp_path / "bf16"), model2="none", single=True, lora_rank=4)
    policy = make_policy(cfg.model1, cfg)
    with torch.no_grad():
        for p in core.lora_parameters(policy.model):
            p.add_(0.05 * torch.randn_like(p))
    core.save_checkpoint(core.Run(cfg, [policy], [], tmp_path / "run"), 1)
    assert export.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "merged_1"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = core.load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    layer = policy.model.get_submodule("model.layers.0.self_attn.q_proj")
    expected = (layer.base.weight.float() + layer.scale * layer.lora_B @ layer.lora_A).to(torch.bfloat16)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], expected)
    assert next(AutoModelForCausalLM.from_pretrained(folder).parameters()).dtype == torch.bfloat16


def test_adapters_are_saved_in_peft_layout(tmp_path):
    """PEFT's format, by construction (peft is not a dependency): adapter_config.json with the LoRA settings and
    adapter_model.safetensors with 'base_model.model.<module>.lora_A.weight' [r, in] / lora_B [out, r]."""
    model, _ = small_model()
    core.add_lora(model, rank=4, alpha=8, targets="q_proj,down_proj")
    core.save_lora(model, tmp_path / "adapter", "org/tiny-base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")} \
        == {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0,
            "target_modules": ["down_proj", "q_proj"], "base_model_name_or_path": "org/tiny-base"}
    tensors = core.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    layers = dict(model.named_modules())
    assert len(tensors) == 2 * 2 * model.config.num_hidden_layers  # A and B of 2 targets per layer
    for key, value in tensors.items():
        prefix, module, suffix = key[:17], key[17:].rsplit(".lora_", 1)[0], key.rsplit(".lora_", 1)[1]
        assert prefix == "base_model.model." and suffix in ("A.weight", "B.weight")
        base = layers[module].base
        assert value.shape == ((4, base.in_features) if suffix == "A.weight" else (base.out_features, 4))


def test_peft_reads_our_adapters(tmp_path):
    """Only where peft happens to be installed (it is not a dependency): PeftModel and transformers' load_adapter
    give exactly our adapted model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    model, tokenizer = small_model()
    model.save_pretrained(tmp_path / "base")
    core.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for p in core.lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    core.save_lora(model, tmp_path / "adapter", str(tmp_path / "base"))
    x = torch.randint(0, 300, (1, 9))
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(loaded.eval()(x).logits, model(x).logits)


# -----------------------------------------------------------------------------
# Rollouts: prompts, the reference sampler and the GPU sampler

def prompts_of(tokenizer, questions):
    return [core.build_prompt(tokenizer, q, "number") for q in questions]


def test_greedy_equals_transformers_generate(tiny_models):
    for path in tiny_models:
        model, tokenizer = loaded(path)
        lively(model)
        prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "What is 3 + 4 ? Hint: add", "Hi"])
        ours = core.sample(model, prompts, 12, {tokenizer.eos_token_id}, tokenizer.pad_token_id, temperature=0)[0]
        for p, o in zip(prompts, ours):
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                 max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            assert o == ref[0, len(p):].tolist()


def test_samplers_call_the_models_without_deprecated_arguments(tiny_models):
    """transformers 5.24 renamed forward()'s past_key_values to cache and removes the old name in 5.40, where a
    sampler still passing it would fail: both samplers, round and update must pass no deprecated argument."""
    model, tokenizer = loaded(tiny_models[1])
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        core.sample(model, prompts, 4, set(), tokenizer.pad_token_id, temperature=0, n=2)
        core.sample_fast(model, prompts, 4, set(), tokenizer.pad_token_id, temperature=0, segment=2)
        cfg = core.Config(lora_rank=4, max_new_tokens=4, micro_batch=2)
        policy = make_policy(tiny_models[1], cfg)
        problem = core.Problem("p", "What is 1 + 2 ?", "3", "number")
        groups, _ = core.core_step([policy], [problem], core.replace(cfg, single=True),
                                   core.reward_schedule(cfg, 0))
        core.update_policy(policy, groups[0], cfg, 1e-3)


def test_eos_stops_a_row_and_left_padding_changes_nothing(tiny_models):
    model, tokenizer = loaded(tiny_models[0])
    short, long = prompts_of(tokenizer, ["Hi", "What is 4 + 4 ? Think about it very carefully please"])
    alone = core.sample(model, [short], 10, set(), tokenizer.pad_token_id, temperature=0)[0][0]
    batched = core.sample(model, [long, short], 10, set(), tokenizer.pad_token_id, temperature=0)[0]
    assert batched[1] == alone and len(alone) == 10
    stop = alone[3]  # make the 4th greedy token an EOS: that row ends there, the other runs on
    first = alone.index(stop)
    out = core.sample(model, [short, long], 10, {stop}, tokenizer.pad_token_id, temperature=0)[0]
    assert out[0] == alone[:first + 1]
    assert out[1] == batched[0][:len(out[1])] and (len(out[1]) == 10 or out[1][-1] == stop)


def test_seeded_sampling_is_deterministic(tiny_models):
    model, tokenizer = loaded(tiny_models[1])
    prompts = prompts_of(tokenizer, ["What is 1 + 1 ?"] * 4)
    runs = [core.sample(model, prompts, 12, set(), 0, 1.0, 0.9, torch.Generator().manual_seed(s))[0] for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("sampler", ["sample", "sample_fast"])
def test_progress_shows_rows_tokens_and_time_left_while_sampling(tiny_models, capsys, sampler):
    model, tokenizer = loaded(tiny_models[1])
    prompts = prompts_of(tokenizer, ["What is 1 + 1 ?", "What is 2 + 3 ?"])
    progress = core.Progress("round A", total=12)
    progress.every = 0  # due at every decode step (a terminal: 1 s, a log file: 10 s)
    outs = getattr(core, sampler)(model, prompts, 5, set(), 0, 1.0, 1.0, torch.Generator().manual_seed(0), n=3,
                                  progress=progress)[0]
    progress.add(len(outs), sum(map(len, outs)))
    progress.close()
    lines = capsys.readouterr().out.splitlines()  # plain lines: pytest's stdout is not a terminal
    shown = {"sample": 5, "sample_fast": 1}[sampler]  # every step; every window of up to 8 steps (5 tokens: 1)
    assert len(lines) == shown + 1 and lines[0].startswith("  round A: 0/12 rows | ")
    assert lines[0].endswith("time left: ?")
    assert lines[-1].startswith("  round A: 6/12 rows") and lines[-1].endswith(", done") and " tok/s | " in lines[-1]


def test_the_time_left_says_whether_it_is_a_bound_or_a_forecast_and_a_bound_holds(monkeypatch, capsys):
    """A scripted slow sampler: 1 s per decode step, 3 batches of 4 rows with a budget of 10 tokens; the first
    batch's rows end at steps 2, 3, 4 and 10 (it runs to its budget), the second's by step 4 and the third's by
    step 3 (they end early). While only the current batch is left, its steps to the budget at its pace are a bound,
    marked '≤', and the time really left never exceeds it; anything that leans on other batches is marked '~'.
    Before this, the line said '238s left' unmarked on a real run that was done 3 s later."""
    now = [0.0]
    monkeypatch.setattr(core.time, "time", lambda: now[0])
    progress = core.Progress("round A", total=12)
    progress.every = 0
    shown = []  # (the time it was shown, its line)
    for ends in ([2, 3, 4, 10], [1, 2, 4, 4], [3, 3, 3, 3]):
        progress.batch(4, 10)
        for step in range(max(ends)):
            progress.show(sum(end <= step for end in ends), 0, step)
            shown.append((now[0], capsys.readouterr().out.strip()))
            now[0] += 1
        progress.add(4, sum(ends))
    finished = now[0]
    assert shown[0][1].endswith("time left: ?")  # no pace before the first decode step
    marks = [re.search(r"(≤ |~)?(\d+)s left$", line) for _, line in shown[1:]]
    assert all(m and m.group(1) for m in marks), shown  # every estimate says what it is
    bounds = [(int(m.group(2)), finished - t) for m, (t, _) in zip(marks, shown[1:]) if m.group(1) == "≤ "]
    assert len(bounds) == 2 and all(really <= bound for bound, really in bounds)  # the third batch's: it held
    assert [m.group(1) for m in marks[:13]] == ["~"] * 13  # other batches to come: a forecast
    assert shown[5][1].startswith("round A: 3/12 rows") and shown[5][1].endswith("5s, ~25s left")


def test_samples_of_a_prompt_share_one_prefill(tiny_models):
    model, tokenizer = loaded(tiny_models[0])
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    repeated = [p for p in prompts for _ in range(3)]
    for temperature in (0, 1.0):
        shared = core.sample(model, prompts, 8, set(), 0, temperature, 0.9, torch.Generator().manual_seed(3), n=3)
        separate = core.sample(model, repeated, 8, set(), 0, temperature, 0.9, torch.Generator().manual_seed(3))
        assert shared[0] == separate[0] and len(shared[0]) == 6


def greedy_reference(model, tokenizer):
    """Three left-padded prompts sampled twice each for 12 greedy tokens by sample(), with EOS ids chosen so
    that rows end at different steps: (prompts, eos ids, reference rows)."""
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi", "What is 3 + 4 ? Think about it carefully please"])
    free = core.sample(model, prompts, 12, set(), tokenizer.pad_token_id, temperature=0, n=2)[0]
    stops = {free[0][2], free[3][5]}
    return prompts, stops, core.sample(model, prompts, 12, stops, tokenizer.pad_token_id, temperature=0, n=2)[0]


def test_fast_sampler_greedy_equals_the_reference(tiny_models):
    """sample_fast (static cache, segments; its steps run eagerly on CPU, the same code CUDA records as a
    graph) gives sample()'s greedy tokens: left padding, EOS stops, shared prefill, rows dropped between
    segments, segment boundaries inside and at the end of the budget."""
    for path in tiny_models:
        model, tokenizer = loaded(path)
        prompts, stops, ref = greedy_reference(lively(model), tokenizer)
        assert len({len(r) for r in ref}) > 1
        for segment in (1, 3, 5, 12, 256):
            fast = core.sample_fast(model, prompts, 12, stops, tokenizer.pad_token_id, temperature=0, n=2, segment=segment)
            assert fast[0] == ref, segment


def test_bfloat16_fast_sampler_greedy_equals_the_reference_and_generate(tiny_models):
    """The GPU's dtype, run on the CPU: in bfloat16 the static-cache sampler, the reference loop and transformers'
    greedy `generate` still agree token for token."""
    for path in tiny_models:
        model, tokenizer = loaded(path)
        lively(model).to(torch.bfloat16)
        prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "What is 3 + 4 ? Think about it carefully please"])
        ref = core.sample(model, prompts, 16, set(), tokenizer.pad_token_id, temperature=0)[0]
        assert core.sample_fast(model, prompts, 16, set(), tokenizer.pad_token_id, temperature=0, segment=5)[0] == ref
        for prompt, row in zip(prompts, ref):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
            assert out[0, len(prompt):].tolist() == row


def test_fast_sampler_draws_the_same_samples_while_no_row_ends(tiny_models):
    model, tokenizer = loaded(tiny_models[1])
    lively(model)
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    ref, ref_logp = core.sample(model, prompts, 10, set(), 0, 1.0, 0.9, torch.Generator().manual_seed(5), n=3)
    fast, fast_logp = core.sample_fast(model, prompts, 10, set(), 0, 1.0, 0.9, torch.Generator().manual_seed(5), n=3,
                                       segment=4)
    assert fast == ref and len(set(map(tuple, fast))) > 1
    # each token's log-probability as drawn (softmax(logits / T) before the top-p cut), the same in both samplers
    assert all(len(lp) == len(row) for lp, row in zip(fast_logp, fast))
    assert torch.allclose(torch.tensor(fast_logp), torch.tensor(ref_logp), atol=1e-5)


def test_fast_sampler_cache_holds_only_live_rows_and_the_next_segment(tiny_models, monkeypatch):
    model, tokenizer = loaded(tiny_models[0])
    lively(model)
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    free = core.sample(model, prompts, 9, set(), 0, temperature=0)[0]
    shapes = []  # (rows, positions) of every cache sample_fast builds
    real = core.static_cache

    def recording(*args):
        cache = real(*args)
        shapes.append((cache.layers[0].keys.shape[0], cache.layers[0].keys.shape[2]))
        return cache

    monkeypatch.setattr(core, "static_cache", recording)
    stop = next(t for t in free[0][:3] if t not in free[1])  # row 0 ends in the first segment, row 1 runs on
    core.sample_fast(model, prompts, 9, {stop}, 0, temperature=0, segment=4)
    width = max(len(p) for p in prompts)
    # segment 1: both rows, room for 4 more tokens; segments 2 and 3: row 1 alone
    assert shapes == [(2, width + 4), (1, width + 8), (1, width + 9)]


class OpLog(TorchDispatchMode):
    """Records the name of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ops that make the host wait for the device (or copy host data in): forbidden inside a CUDA graph capture
SYNCING_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "lift_fresh",
               "_unique2", "unique_consecutive", "repeat_interleave", "_assert_async"}


def test_decode_step_runs_no_op_that_would_break_a_cuda_graph(tiny_models):
    """What CPU can check of the capture: the step the GPU records (a full decoder forward on the StaticCache)
    calls no op that syncs, and it changes only its own buffers in place."""
    for path in tiny_models:
        model, tokenizer = loaded(path)
        prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
        cache, _, mask, next_pos = core.prefill(model, prompts, tokenizer.pad_token_id, 1)
        width = mask.shape[1]
        cache = core.static_cache(model, cache, torch.arange(2), width, width + 4)
        attn = torch.zeros(2, 1, 1, width + 4, dtype=torch.bool)
        attn[..., :width] = mask.bool()[:, None, None]
        step = core.DecodeStep(model, cache, attn, next_pos[:, None], torch.tensor([width]), cuda_graph=False)
        keys = cache.layers[0].keys
        tokens = torch.tensor([5, 6])
        with torch.no_grad(), OpLog() as log:
            step(tokens)
        assert log.ops and not log.ops & SYNCING_OPS
        assert cache.layers[0].keys is keys and step.cursor.item() == width + 1 and attn[:, 0, 0, width].all()


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's devices, streams and memory pools faked (no GPU here), so that sample_fast(cuda_graph=True)
    takes the capture path on the CPU; the tests fake the capture itself. Returns the streams and pools made."""
    made = types.SimpleNamespace(streams=[], pools=[])

    class FakeStream:
        def __init__(self, main=False):
            made.streams += [] if main else [self]

        def wait_stream(self, other):
            pass

    made.current = [FakeStream(main=True)]  # the stack of current streams: the main one first

    @contextlib.contextmanager
    def stream(s):
        made.current.append(s)
        try:
            yield
        finally:
            made.current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: made.current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "MemPool", lambda: made.pools.append(types.SimpleNamespace(id=(0, 9))) or made.pools[-1])
    core.capture_stream_and_pool.cache_clear()
    core.GRAPHLESS.clear()
    yield made
    core.capture_stream_and_pool.cache_clear()
    core.GRAPHLESS.clear()


class EagerGraph:
    """A recorded step stand-in: replay() runs the step for real and points the output buffer at its logits."""

    def __init__(self, step):
        self.step, self.output, self.replays = step, torch.empty(0), 0

    def replay(self):
        self.replays += 1
        self.output.set_(self.step())


@pytest.mark.parametrize("refusal", [
    torch.AcceleratorError("CUDA error: operation not permitted when stream is capturing"),  # cudaErrorStreamCapture*
    RuntimeError("Cannot call CUDAGeneratorImpl::current_seed during CUDA graph capture")])  # a TORCH_CHECK
def test_a_failed_capture_turns_graphs_off_for_that_model_only(tiny_models, fake_cuda, monkeypatch, capsys, refusal):
    """Model 1's capture is refused (torch 2.13 raises CUDA's refusal as an AcceleratorError, its own checks as
    RuntimeError): one warning, its steps run eagerly from then on (the same tokens), and it is never captured
    again. Model 2 keeps its graphs: captured once per segment and replayed, on one capture stream and one memory
    pool for the device, reused across segments and models."""
    models = [lively(loaded(path)[0]) for path in tiny_models]
    tokenizer = loaded(tiny_models[0])[1]
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    refs = [core.sample(model, prompts, 9, set(), 0, temperature=0)[0] for model in models]
    graphs, recorded_on = [], []

    def record(step, pool):
        recorded_on.append(torch.cuda.current_stream())
        if step.__self__.model is models[0]:
            raise refusal
        graphs.append(EagerGraph(step))
        return graphs[-1], graphs[-1].output

    monkeypatch.setattr(core, "record_graph", record)
    for _ in range(2):
        for model, ref in zip(models, refs):
            assert core.sample_fast(model, prompts, 9, set(), 0, temperature=0, segment=4, cuda_graph=True)[0] == ref
    assert capsys.readouterr().err.count(f"CUDA graph capture failed ({refusal})") == 1
    assert models[0] in core.GRAPHLESS and models[1] not in core.GRAPHLESS
    # model 2: segments of 4, 4 and 1 steps per call; a step that feeds the model (not the budget's last) is
    # captured at the first feed of its segment (run eagerly as the capture's warm-up) and replayed after it
    assert [g.replays for g in graphs] == [3, 3] * 2
    assert len(fake_cuda.streams) == 1 and len(fake_cuda.pools) == 1
    # recorded on the device's own capture stream (torch's default capture stream lives on the GPU that captured
    # first: with --device2 on another GPU, model 2's graph would be empty), the main stream current again after
    assert set(recorded_on) == set(fake_cuda.streams) and len(fake_cuda.current) == 1


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   torch.AcceleratorError("CUDA error: an illegal memory access was encountered")])
def test_out_of_memory_or_a_cuda_error_at_capture_propagates(tiny_models, fake_cuda, monkeypatch, error):
    """Not a reason to decode without graphs for hours: the error reaches the run (out of memory: its handler
    saves and says how to resume), the capture is ended first, and the model keeps its graphs."""
    calls = []

    class FailingGraph:
        def capture_begin(self, pool=None):
            calls.append(("begin", pool))

        def capture_end(self):
            calls.append("end")

    model, tokenizer = loaded(tiny_models[0])
    real_forward = core.DecodeStep.forward
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    monkeypatch.setattr(core.DecodeStep, "forward",  # the warm-up step runs, the recorded one fails
                        lambda self: real_forward(self) if not calls else (_ for _ in ()).throw(error))
    with pytest.raises(type(error)):
        core.sample_fast(model, prompts_of(tokenizer, ["Hi"]), 4, set(), 0, temperature=0, cuda_graph=True)
    assert calls == [("begin", (0, 9)), "end"] and model not in core.GRAPHLESS


def test_a_broken_capture_is_ended_and_its_first_error_reported(fake_cuda, monkeypatch):
    ended = []

    class Graph:
        def capture_begin(self, pool=None):
            pass

        def capture_end(self):
            ended.append(1)
            raise RuntimeError("the capture was invalidated")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    with pytest.raises(RuntimeError, match="operation not permitted"):
        core.record_graph(lambda: (_ for _ in ()).throw(RuntimeError("operation not permitted")), torch.cuda.MemPool())
    assert ended == [1]


def test_a_fast_path_that_fails_on_first_use_warns_and_samples_with_the_reference_loop(tiny_models, monkeypatch,
                                                                                        capsys):
    """A transformers internal the GPU sampler uses changed (here StaticCache's layers lose lazy_initialization):
    one warning naming the error, and this model's rollouts come from the reference loop."""
    cfg = core.Config(lora_rank=4, temperature=0, max_new_tokens=8)
    policy = make_policy(tiny_models[1], cfg)
    lively(policy.model)
    prompts = prompts_of(policy.tokenizer, ["What is 1 + 2 ?", "Hi"])
    reference = core.sample(policy.model, prompts, 8, policy.eos_ids, policy.pad_id, temperature=0)[0]

    def changed(*args):
        raise AttributeError("'StaticLayer' object has no attribute 'lazy_initialization'")

    monkeypatch.setattr(core, "static_cache", changed)
    monkeypatch.setattr(core, "fast_decoding", lambda model, cfg: True)
    for _ in range(2):
        assert [ids for ids, _, _ in core.generate(policy, prompts, 8, cfg)] == reference
    err = capsys.readouterr().err
    assert err.count(f"warning: {policy.name}: the GPU sampler failed (AttributeError: 'StaticLayer' object has no "
                     f"attribute 'lazy_initialization'); sampling with the reference loop from now on") == 1
    assert policy.fast_agrees is False


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   torch.AcceleratorError("CUDA error: an illegal memory access was encountered")])
def test_out_of_memory_or_a_cuda_error_in_the_fast_paths_first_use_propagates(tiny_models, monkeypatch, error):
    """The first-use check falls back for a fast path that is broken (above), not for a device that is: out of
    memory and CUDA errors reach the run, which says how to go on, and the check is not spent."""
    cfg = core.Config(lora_rank=4, temperature=0, max_new_tokens=8)
    policy = make_policy(tiny_models[1], cfg)
    monkeypatch.setattr(core, "static_cache", lambda *args: (_ for _ in ()).throw(error))
    monkeypatch.setattr(core, "fast_decoding", lambda model, cfg: True)
    with pytest.raises(type(error)):
        core.generate(policy, prompts_of(policy.tokenizer, ["Hi"]), 8, cfg)
    assert policy.fast_agrees is None


def test_the_fast_sampler_reads_from_the_device_once_per_window_and_segment(tiny_models, monkeypatch):
    """Each read of a value back to Python (aten::_local_scalar_dense) makes the host wait for the GPU. Outside the
    prefill, the decode step's forward (replayed as a CUDA graph on the GPU, without Python) and multinomial's
    check (asynchronous on CUDA), sample_fast reads at most once per window of 8 steps and once per segment."""
    from torch.profiler import profile
    model, tokenizer = loaded(tiny_models[0])
    lively(model)
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    mark_forward_and_prefill(monkeypatch)
    for segment, windows in ((256, 3), (8, 3), (5, 5)):  # 24 tokens: windows of 8, cut at segment ends
        with profile() as prof:
            out = core.sample_fast(model, prompts, 24, set(), 0, 1.0, 0.9, torch.Generator().manual_seed(0),
                                   segment=segment)
        assert all(len(row) == 24 for row in out[0])
        assert 0 < len(host_reads(prof)) <= windows + math.ceil(24 / segment), segment


def mark_forward_and_prefill(monkeypatch):
    """The decode step's forward and the prefill run inside a 'marked' profiler range (host_reads leaves them out)."""
    real_forward, real_prefill = core.DecodeStep.forward, core.prefill
    monkeypatch.setattr(core.DecodeStep, "forward", lambda self: record_marked(real_forward, self))
    monkeypatch.setattr(core, "prefill", lambda *a: record_marked(real_prefill, *a))


def host_reads(prof):
    """The profiled reads of a value back to Python outside the marked ranges and multinomial's own check."""
    excluded = {"marked", "aten::multinomial", "aten::_assert_async"}
    return [e for e in prof.events() if e.name == "aten::_local_scalar_dense" and not ancestors(e) & excluded]


def record_marked(fn, *args):
    from torch.profiler import record_function
    with record_function("marked"):
        return fn(*args)


def ancestors(event):
    names = set()
    while event.cpu_parent is not None:
        event = event.cpu_parent
        names.add(event.name)
    return names


def test_a_nucleus_wider_than_the_candidates_redecodes_its_window_exactly(tiny_models, monkeypatch):
    """sample_fast does not wait for the device to learn whether each step's nucleus fitted in draw_tokens'
    candidates: a window where one did not is decoded again from the same random state, checking every step. The
    result is the always-checked sampler's, token for token (sample(), which checks at every step; no row ends
    here, so both draw the same random numbers)."""
    model, tokenizer = loaded(tiny_models[1])
    lively(model, seed=3)
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    real_draw, restores = core.draw_tokens, []
    monkeypatch.setattr(core, "draw_tokens", lambda *a, **kw: real_draw(*a, **kw, candidates=8))  # often too few at T = 1.5
    real_restore = core.DecodeStep.restore
    monkeypatch.setattr(core.DecodeStep, "restore", lambda self, saved: (restores.append(1), real_restore(self, saved)))
    ref, ref_logp = core.sample(model, prompts, 20, set(), 0, 1.5, 0.95, torch.Generator().manual_seed(1), n=2)
    fast, fast_logp = core.sample_fast(model, prompts, 20, set(), 0, 1.5, 0.95, torch.Generator().manual_seed(1),
                                       n=2, segment=12)
    assert restores and fast == ref
    assert torch.allclose(torch.tensor(fast_logp), torch.tensor(ref_logp), atol=1e-5)


def test_after_a_redecoded_window_the_next_windows_are_unchecked_again(tiny_models, monkeypatch):
    """The first window's nucleus outgrows draw_tokens' candidates (2 here, first pass only): that window is decoded
    again, checked at every step. The two windows after it are unchecked again: one device read each."""
    from torch.profiler import profile
    model, tokenizer = loaded(tiny_models[1])
    lively(model, seed=3)
    real_draw, calls = core.draw_tokens, []

    def draw(*args, **kwargs):
        calls.append(1)
        return real_draw(*args, **kwargs, candidates=2 if len(calls) <= 8 else 1024)

    monkeypatch.setattr(core, "draw_tokens", draw)
    real_restore, restores = core.DecodeStep.restore, []
    monkeypatch.setattr(core.DecodeStep, "restore", lambda self, saved: (restores.append(1), real_restore(self, saved)))
    mark_forward_and_prefill(monkeypatch)
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    with profile() as prof:
        rows = core.sample_fast(model, prompts, 24, set(), 0, 1.5, 0.95, torch.Generator().manual_seed(1))[0]
    assert restores == [1] and all(len(row) == 24 for row in rows)
    assert len(host_reads(prof)) <= 1 + 8 + 1 + 2 + 1  # window 1: its verdict, 8 checked steps, its verdict again; 2 more; segment


class SortCount(TorchDispatchMode):
    """Counts the full sorts (aten.sort) run inside it."""
    sorts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sorts += func.overloadpacket == torch.ops.aten.sort
        return func(*args, **(kwargs or {}))


def test_a_redone_window_judges_the_nucleus_of_live_rows_only(tiny_models, monkeypatch):
    """As the unchecked pass does (and pick_tokens, whose rows are all live): in a redone window, the nucleus of a
    row that has finished, wider than the candidates or not, makes no full sort."""
    logits = torch.stack([torch.tensor([9.0, 8.0] + [0.0] * 30), torch.zeros(32)])  # row 1's nucleus: 29 tokens
    for judged, sorts in [(torch.tensor([True, False]), 0), (torch.tensor([True, True]), 1), (None, 0)]:
        with SortCount() as counted:
            core.draw_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(0), sort_for=judged, candidates=4)
        assert counted.sorts == sorts
    model, tokenizer = loaded(tiny_models[1])
    lively(model, seed=3)
    real_draw, judged = core.draw_tokens, []

    def draw(*args, **kwargs):
        judged.append(kwargs.get("sort_for"))
        return real_draw(*args, **kwargs, candidates=2)  # too few at T = 1.5: every window is redone

    monkeypatch.setattr(core, "draw_tokens", draw)
    eos = set(range(0, model.config.vocab_size, 3))  # about a third of the tokens end a row: rows end early
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi"])
    core.sample_fast(model, prompts, 16, eos, 0, 1.5, 0.95, torch.Generator().manual_seed(1), n=3)
    checked = [j for j in judged if j is not None]
    assert checked and all(isinstance(j, torch.Tensor) for j in checked)
    assert any(j.any() and not j.all() for j in checked)  # a finished row beside live ones: not judged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_a_capture_refused_by_a_host_read_leaves_the_other_models_capture_and_the_run_going(tiny_models,
                                                                                               monkeypatch, capsys):
    """For bench/gpu_checks.sh: model 1's decode step reads the host inside its capture, which CUDA refuses; it
    warns and decodes without graphs. Model 2 then captures on the same device pool and replays; both give the
    reference loop's greedy tokens, and a CORE step with an update of each model goes on."""
    cfg = core.Config(lora_rank=4, temperature=0, max_new_tokens=8, micro_batch=8)
    policies = [core.load_policy(m, path, torch.device("cuda"), cfg) for m, path in enumerate(tiny_models, 1)]
    core.GRAPHLESS.clear()
    core.capture_stream_and_pool.cache_clear()
    real_forward = core.DecodeStep.forward

    def reads_the_host(self):
        logits = real_forward(self)
        if self.model is policies[0].model:
            logits.sum().item()  # a device-to-host copy: not permitted while the stream captures
        return logits

    monkeypatch.setattr(core.DecodeStep, "forward", reads_the_host)
    prompts = prompts_of(policies[0].tokenizer, ["What is 1 + 2 ?", "Hi"])
    for policy in policies:
        ref = core.sample(policy.model, prompts, 8, policy.eos_ids, policy.pad_id, temperature=0)[0]
        fast = core.sample_fast(policy.model, prompts, 8, policy.eos_ids, policy.pad_id, temperature=0, cuda_graph=True)
        assert fast[0] == ref
    assert policies[0].model in core.GRAPHLESS and policies[1].model not in core.GRAPHLESS
    assert capsys.readouterr().err.count("CUDA graph capture failed") == 1
    assert core.capture_stream_and_pool.cache_info().currsize == 1  # one stream and pool for the device
    groups, _ = core.core_step(policies, core.arithmetic_problems(4, 0), cfg, core.reward_schedule(cfg, 0))
    for m, policy in enumerate(policies, 1):
        stats = core.update_policy(policy, [t for g in groups for t in g if t.model == m], cfg, 1e-3)
        assert not stats["skipped"] and math.isfinite(stats["loss"])


def test_a_fallback_sampler_shows_in_the_step_line_and_the_metrics_row(tiny_models, monkeypatch):
    """Each model's sampler is in the metrics row; a fallback, which costs hours, also in the step line (and at the
    run's end: test_end_to_end_core_steps)."""
    cfg = core.Config(lora_rank=4)
    policy = make_policy(tiny_models[1], cfg)
    assert core.sampler_in_use(policy, cfg) == "reference"  # the CPU's sampler: no fallback
    monkeypatch.setattr(core, "fast_decoding", lambda model, cfg: True)
    assert core.sampler_in_use(policy, cfg) == "graphs"
    monkeypatch.setattr(core, "GRAPHLESS", {policy.model})
    assert core.sampler_in_use(policy, cfg) == "no graphs"
    policy.fast_agrees = False
    assert core.sampler_in_use(policy, cfg) == "reference (fallback)"
    group = [core.Trace(m, "A", [1], [2, 3], "", m == 1) for m in (1, 2)]
    core.score_traces(group, "number", cfg, core.reward_schedule(cfg, 0))
    core.set_advantages(group, cfg)
    monkeypatch.setattr(core, "GRAPHLESS", set())
    run, lines = core.Run(cfg, [make_policy(tiny_models[0], cfg), policy], [], None), {}
    for sampler, agrees in (("graphs", None), ("reference (fallback)", False)):
        policy.fast_agrees = agrees
        row = core.metrics_row(run, 0, [group], [NO_UPDATE] * 2, time.time(), 1.0, 0)
        assert (row["sampler_m1"], row["sampler_m2"]) == ("graphs", sampler)
        lines[sampler] = core.format_log(row, 1)
    assert "graphs" not in lines["graphs"]
    assert "tok/s (graphs/reference (fallback)) |" in lines["reference (fallback)"]


def test_fast_decoding_is_the_gpu_default_only():
    cfg = core.Config()
    model = types.SimpleNamespace(device=torch.device("cpu"), config=types.SimpleNamespace(_attn_implementation="sdpa"))
    assert not core.fast_decoding(model, cfg)
    model.device = torch.device("cuda")
    assert core.fast_decoding(model, cfg) and not core.fast_decoding(model, core.Config(decoder="reference"))
    model.config.use_sliding_window = True
    assert not core.fast_decoding(model, cfg)


@pytest.mark.parametrize("diverges", [False, True])
def test_the_fast_path_checks_itself_against_the_reference_loop(tiny_models, monkeypatch, capsys, diverges):
    """On its first use for a model (CUDA faked: the fast path runs its steps eagerly here), greedy rows of both
    samplers are compared. Agreeing: no warning, the fast path samples. Diverging (one token changed): one warning,
    and this and every later rollout come from the reference loop."""
    cfg = core.Config(lora_rank=4, temperature=0, max_new_tokens=8)
    policy = make_policy(tiny_models[1], cfg)
    lively(policy.model)
    prompts = prompts_of(policy.tokenizer, ["What is 1 + 2 ?", "What is 3 + 4 ?", "Hi"])
    reference = core.sample(policy.model, prompts, 8, policy.eos_ids, policy.pad_id, temperature=0)[0]
    calls, real_fast = [], core.sample_fast

    def fast(*args, **kwargs):
        calls.append(1)
        rows, logprobs = real_fast(*args, **kwargs)
        return ([[row[0] + 1] + row[1:] for row in rows] if diverges else rows), logprobs

    monkeypatch.setattr(core, "sample_fast", fast)
    monkeypatch.setattr(core, "fast_decoding", lambda model, cfg: True)
    assert core.generate(policy, [], 8, cfg) == [] and policy.fast_agrees is None  # a torchrun rank without questions
    for _ in range(2):
        assert [ids for ids, _, _ in core.generate(policy, prompts, 8, cfg)] == reference
    warnings = capsys.readouterr().err.count("differ from the reference loop's")
    assert (warnings, policy.fast_agrees) == ((1, False) if diverges else (0, True))
    assert len(calls) == (1 if diverges else 3)  # the check, then (agreeing) both rollouts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampler_greedy_equals_the_reference(tiny_models):
    model, tokenizer = loaded(tiny_models[0])
    model = lively(model).cuda()
    prompts = prompts_of(tokenizer, ["What is 1 + 2 ?", "Hi", "What is 3 + 4 ?"])
    ref = core.sample(model, prompts, 20, {tokenizer.eos_token_id}, tokenizer.pad_token_id, temperature=0, n=2)[0]
    fast = core.sample_fast(model, prompts, 20, {tokenizer.eos_token_id}, tokenizer.pad_token_id, temperature=0, n=2,
                            segment=8, cuda_graph=True)
    assert fast == ref


def test_rollouts_sample_the_policy_being_trained(tiny_models):
    """After AdamW steps that move the adapters, each token's log-probability as the sampler drew it equals the
    update's for the same token (fp32), and sampling writes no base weight (nothing is merged into W)."""
    cfg = core.Config(lora_rank=4, temperature=0.7, max_new_tokens=8, lr=2e-2, micro_batch=8)
    policy = make_policy(tiny_models[1], cfg)
    prompts = prompts_of(policy.tokenizer, ["What is 1 + 2 ?", "What is 3 + 4 ?"])

    def rollout():
        return [core.Trace(1, "A", prompts[i // 2], ids, text, False, rollout_logprobs=logp, advantage=(-1) ** i)
                for i, (ids, text, logp) in enumerate(core.generate(policy, prompts, 8, cfg, n=2))]

    for _ in range(3):
        core.update_policy(policy, rollout(), cfg, cfg.lr)
    base = {n: (p._version, p.clone()) for n, p in policy.model.named_parameters() if "lora" not in n}
    traces = rollout()
    assert all(p._version == base[n][0] and torch.equal(p, base[n][1])
               for n, p in policy.model.named_parameters() if "lora" not in n)
    ids, mask, _, _ = core.padded_batch(traces, [t.prompt_ids for t in traces], policy, cfg)
    rollout_logp, measured = core.sampler_logprobs(traces, mask)
    with torch.no_grad():
        update_logp = core.token_logprobs(policy.model, ids, cfg.logprob_chunk, cfg.temperature)[2]
        with core.lora_disabled(policy.model):
            base_logp = core.token_logprobs(policy.model, ids, cfg.logprob_chunk, cfg.temperature)[2]
    assert measured.sum() == sum(len(t.completion_ids) for t in traces)
    assert ((update_logp - rollout_logp) * measured).abs().max() < 1e-5
    assert ((base_logp - rollout_logp) * measured).abs().max() > 1e-3  # the adapters moved: a real comparison


def test_in_bfloat16_the_sampler_sees_an_update_that_a_merge_would_round_away(tiny_models):
    """bf16 weights and an adapter whose B A is under a quarter of W's bf16 spacing everywhere: W + B A rounds back
    to W (a merged copy would be the base model), yet the sampler's log-probs move with it, as the update's do."""
    cfg = core.Config(lora_rank=4, dtype="bfloat16", temperature=0, max_new_tokens=8)
    policy = make_policy(tiny_models[0], cfg)
    lively(policy.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in core.lora_layers(policy.model).values():
            weight = layer.base.weight  # |W| in [0.5, 1): a bf16 spacing of 2^-8 everywhere
            weight.copy_(torch.sign(weight) * (0.5 + 0.5 * torch.rand_like(weight, dtype=torch.float32)))
            layer.lora_A.normal_()
            layer.lora_B.normal_()
            layer.lora_B.mul_(2.0 ** -10 / (layer.scale * layer.lora_B @ layer.lora_A).abs().max())
            merged = (weight.float() + layer.scale * layer.lora_B @ layer.lora_A).to(torch.bfloat16)
            assert torch.equal(merged, weight)
    prompts = prompts_of(policy.tokenizer, ["What is 1 + 2 ?", "What is 3 + 4 ?"])
    tuned = core.generate(policy, prompts, 8, cfg)
    with core.lora_disabled(policy.model):
        base = core.generate(policy, prompts, 8, cfg)
    assert any(a[2] != b[2] for a, b in zip(tuned, base))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {core.pick_tokens(logits, 1.0, 0.7, g)[0].item() for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert core.pick_tokens(logits, 0, 0.7, g)[0].item() == 0
    flat = torch.zeros(1, 5000)  # uniform: the nucleus is wider than the topk candidates, so the full sort is used
    every_row = torch.ones(len(flat), dtype=torch.bool)
    picks = {core.draw_tokens(flat, 1.0, 0.5, g, every_row, candidates=16)[0].item() for _ in range(200)}
    assert len(picks) > 100 and max(picks) < 5000


def test_top_p_from_candidates_is_the_exact_nucleus_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    probs = torch.softmax(logits, -1)[0]
    sorted_probs, order = probs.sort(descending=True)
    keep = order[(sorted_probs.cumsum(0) - sorted_probs) <= 0.8]
    expected = torch.zeros(50)
    expected[keep] = probs[keep] / probs[keep].sum()
    g = torch.Generator().manual_seed(1)
    every_row = torch.ones(20000, dtype=torch.bool)
    counts = torch.bincount(core.draw_tokens(logits.expand(20000, 50), 1.0, 0.8, g, every_row, candidates=20)[0],
                            minlength=50)
    assert torch.allclose(counts / 20000, expected, atol=0.015)


# -----------------------------------------------------------------------------
# Answers

@pytest.mark.parametrize("text, gold", [
    ("so the total is 18 dollars. \\boxed{18}", "18"),
    ("#### 1,234", "1234"),
    ("The answer is $1,234.00.", "1234"),
    ("she pays \\boxed{\\$18.0}", "18"),
    ("first 3 then 5 then \\boxed{-7}", "-7"),
    ("we get 12 apples, then 15 apples", "15"),
    ("\\boxed{5} wait, recheck: \\boxed{6}", "6"),
    ("The answer is: 0.5", "1/2"),
    ("answer is \u22124", "-4"),
    ("\\boxed{5 \\times 4 = 20}", "20"),   # a box's value is after its last '='
    ("\\boxed{3\\frac{1}{2}}", "7/2"),      # a mixed number
    ("\\boxed{1{,}000}", "1000"), ("\\boxed{70\\,000}", "70000"), ("\\boxed{-\\$5}", "-5"), ("\\boxed{- 5}", "-5"),
    ("The answer is **18**.", "18"), ("\\boxed{18} and \\boxed{}", "18"),  # bold is not a product; an empty box no answer
    ("I first thought the answer is 20, but rechecking, the answer is 18.", "18"),  # the later marker on a line
    ("The answer is 9 \u00d7 2 = 18 dollars.", "18"),
    ("The answer is:\n- 18", "18"), ("The answer is *18*, which is 2 more than 16.", "18"),  # a bullet, italics
    ("The answer is 18 (the answer = 6*3).", "18"), ("\\boxed{30^{ \\circ}}", "30"),  # an inner statement, degrees
])
def test_number_answers(text, gold):
    assert core.is_correct(text, gold, "number")


@pytest.mark.parametrize("text, gold", [
    ("no number here", "3"),
    ("\\boxed{17}", "18"),
    ("\\boxed{18.5}", "18"),
    ("", "0"),
    ("\\boxed{5 \\times 4 = 20}", "5"), ("\\boxed{3\\frac{1}{2}}", "3"), ("\\boxed{1{,}000}", "1"),  # a first number
    ("\\boxed{3-4}", "3"), ("\\boxed{2^{10}}", "2"), ("\\boxed{2^{10}}", "10"),  # an expression: no answer, no fallback
    ("\\boxed{- 5}", "5"), ("I first thought the answer is 20, but rechecking, the answer is 18.", "20"),
    ("The answer is 9 \u00d7 2 = 18 dollars.", "9"),
    ("The answer is:\n- 18", "-18"), ("\\boxed{2\\sqrt{3}}", "2"), ("\\boxed{2 - \\sqrt{3}}", "2"),
])
def test_number_answers_wrong(text, gold):
    assert not core.is_correct(text, gold, "number")


@pytest.mark.parametrize("text, gold", [
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac12"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
    ("\\boxed{x = 3}", "3"), ("\\boxed{x=3}", "x = 3"), ("\\boxed{3}", "y = 3"), ("\\boxed{K = 15}", "k = 15"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("first \\boxed{1} then \\boxed{{a}^{2}+\\{b\\}}", "{a}^{2}+\\{b\\}"),
    ("\\boxed{10,000}", "10000"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("\\boxed{\\!2\\,}", "2"),
    ("\\boxed{2{,}220}", "2220"), ("\\boxed{4210_5}", "4210_{5}"), ("\\boxed{\\frac{9}{19}}", "\\frac9{19}"),
    ("\\boxed{C}", "\\text{(C)}"), ("\\boxed{7} \\boxed{ }", "7"),
    ("\\boxed{864}", "864 \\mbox{ inches}^2"), ("\\boxed{[-2, 7]}", "x \\in [-2,7]"),  # MATH-500 golds
    ("\\boxed{1 \\pm \\sqrt{5}, -2}", "\\{1\\pm\\sqrt{5},-2\\}"),
    ("\\boxed{\\text{East}}", "\\text{east}"), ("\\boxed{\\frac{5}{3}}", "1\\frac{2}{3}"), ("\\boxed{1.8}", "1\\frac45"),  # mixed numbers
    ("\\boxed{\\begin{pmatrix} \\frac{1}{5} \\\\ -\\frac{18}{5} \\end{pmatrix}}", "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}"),
])
def test_math_answers(text, gold):
    assert core.is_correct(text, gold, "math")


@pytest.mark.parametrize("text, gold", [
    ("the answer is 1/2", "\\frac{1}{2}"),      # math needs a \boxed answer
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("\\boxed{x^2+1", "x^2+1"),                 # unbalanced
    ("\\boxed{}", ""),
    ("\\boxed{4}", "1\\frac{2}{3}"), ("\\boxed{12/3}", "1\\frac{2}{3}"),  # not 1 and 2/3 run together
    ("\\boxed{y = \\frac{3}{2}}", "x = \\frac32"),  # another line than the gold's
    ("\\boxed{\\log_{10} 5}", "\\log_{105}"),
])
def test_math_answers_wrong(text, gold):
    assert not core.is_correct(text, gold, "math")


@pytest.mark.parametrize("text, gold, ok", [
    ("\\boxed{033}", "033", True), ("so \\boxed{33}", "033", True), ("The answer is 204.", "204", True),
    ("\\boxed{33.5}", "033", False), ("\\boxed{34}", "033", False),
])
def test_integer_answers(text, gold, ok):
    assert core.is_correct(text, gold, "integer") == ok


@pytest.mark.parametrize("text, gold, ok", [
    ("\\boxed{B}", "B", True), ("\\boxed{\\text{(C)}}", "C", True), ("The answer is (D).", "D", True),
    ("Answer: A", "A", True), ("C", "C", True), ("A cat says \\boxed{B}", "A", False), ("no letter", "A", False),
    ("... option (C).", "C", False), ("The correct answer is **(D)**.", "D", True),
    ("At first the answer is B, but rechecking, the answer is D.", "D", True),
    ("The answer is C, since options (A) and (B) break energy conservation.", "C", True),  # the stated letter
    ("Answer: A because D needs a higher temperature.", "A", True),
])
def test_choice_answers(text, gold, ok):
    assert core.is_correct(text, gold, "choice") == ok


@needs_shared
def test_every_gsm8k_and_math500_gold_solution_is_judged_correct():
    for split in ("train", "test"):
        for line in open(SHARED / "gsm8k" / f"{split}.jsonl"):
            row = json.loads(line)
            assert core.is_correct(row["answer"], core.gsm8k_gold(row["answer"]), "number"), row["answer"][-60:]
    for line in open(SHARED / "math500" / "test.jsonl"):
        row = json.loads(line)
        assert core.is_correct(row["solution"], row["answer"], "math"), (row["answer"], core.last_boxed(row["solution"]))


def test_strip_answer_removes_every_explicit_answer():
    trace = ("Natalia sold 48 clips in April and half as many in May.\nSo in May she sold 24.\n"
             "Total: 48 + 24 = 72... let me write it as \\boxed{72}.\nThe answer is 72.\n#### 72\nFinal answer: 72")
    hint = core.strip_answer(trace)
    assert "\\boxed" not in hint and "####" not in hint and "72" not in hint.split("Total")[0]
    assert "answer" not in hint.lower() and "sold 24" in hint
    assert core.extract_answer(core.strip_answer("x \\boxed{\\frac{1}{2}} y"), "math") is None
    assert core.strip_answer("\\boxed{5}") == ""


@pytest.mark.parametrize("text, kept", [
    ("9 * 2 = 18. Answer = 18", "9 * 2 = 18."),
    ("She has 9 * 2 = 18 eggs. So our answer is 18.", "She has 9 * 2 = 18 eggs."),
    ("Twice 9 is 18. **Answer**: 18", "Twice 9 is 18."),
    ("Twice 9 is 18. **Answer:** 18", "Twice 9 is 18."),
    ("Twice 9 is 18, so the answer is 18", "Twice 9 is 18,"),
    ("Twice 9 is 18. The final answer is $\\boxed{18}$.", "Twice 9 is 18."),
    ("Twice 9 is 18.\n**Final Answer**\n\\[\\boxed{18}\\]", "Twice 9 is 18."),
    ("Twice 9 is 18. #### 18", "Twice 9 is 18."),
    ("Twice 9 is 18. Therefore, the answer is 18. Check: 18 / 2 = 9", "Twice 9 is 18.  Check: 18 / 2 = 9"),
    ("the answer is 18", ""),
])
def test_strip_answer_removes_the_statement_and_keeps_its_line(text, kept):
    stripped = core.strip_answer(text)
    assert stripped == kept
    assert core.extract_answer(stripped, "number", fallback=False) is None  # no explicit answer is left


def test_bare_answer_hint_is_the_whole_text_not_its_first_number():
    assert not core.is_bare_answer("Janet's ducks lay 16 eggs per day. She eats 3.", "16", "number")
    assert not core.is_bare_answer("Step 1: add the two numbers.", "1", "number")
    for bare in ("16", "16.", "$16$", "**16**", " 16 "):
        assert core.is_bare_answer(bare, "16", "number"), bare
    assert core.is_bare_answer("\\frac{1}{2}", "0.5", "math") and core.is_bare_answer("(B)", "B", "choice")
    assert not core.is_bare_answer("", "16", "number")


def test_explicit_answers_and_the_last_number_fallback():
    assert core.extract_answer("16 - 3 = 13, then 13 - 4", "number") == "4"  # correctness keeps the fallback
    assert core.extract_answer("16 - 3 = 13, then 13 - 4", "number", fallback=False) is None
    assert core.extract_answer("so the answer is 9", "number", fallback=False) == "9"
    assert core.extract_answer("**Answer**: 9", "number", fallback=False) == "9"
    assert core.extract_answer("C", "choice") == "C" and core.extract_answer("C", "choice", fallback=False) is None


@pytest.mark.parametrize("text, kept", [
    ("9 * 2 = 18 eggs.\nThe answer is:\n18", "9 * 2 = 18 eggs."),  # the value on the next line
    ("Twice 9 is 18 eggs.\nFinal answer:\n\n$18$", "Twice 9 is 18 eggs."),
    ("Nine twice. The answer is approx. 18 eggs", "Nine twice."),  # an abbreviation inside the statement
])
def test_strip_answer_removes_what_the_checker_reads_across_lines_and_abbreviations(text, kept):
    assert core.extract_answer(text, "number", fallback=False) == "18"
    assert core.strip_answer(text) == kept


@pytest.mark.parametrize("text, kept", [
    ("The answer $\\boxed{18}$ is 18.", ""),  # the box's delimiters go with it: no new marker appears
    ("**The answer is 5.** Next, we verify that 2+3 = 5 holds.", "Next, we verify that 2+3 = 5 holds."),
    ("The answer is $\\boxed{5}$. Let me check: 3 + 2 = 5.", "Let me check: 3 + 2 = 5."),  # its own sentence
    ("The sides are $3$ $4$ and $5$.", "The sides are $3$ $4$ and $5$."),  # math spans stay apart
    ("Before the final answer, check it.", "Before the final answer, check it."),  # not a heading
])
def test_strip_answer_keeps_the_reasoning_around_a_statement(text, kept):
    assert core.strip_answer(text) == kept


STATEMENTS = ["The answer is {v}", "the answer is: {v}", "Answer: {v}", "Answer = {v}", "**Answer**: {v}",
              "**Answer:** {v}", "#### {v}", "So the final answer is {v}", "Therefore, our answer is {v}",
              "The answer is approx. {v}", "The answer is:\n{v}", "Final answer:\n\n{v}", "answer is\n\n {v}",
              "The answer is \\boxed{{{v}}}", "Answer: $\\boxed{{{v}}}$", "The answer is $ {v} $"]


@pytest.mark.parametrize("kind, values", [("number", ["37", "1,234", "-7", "0.5", "$37$", "\\$37"]),
                                          ("choice", ["C", "(C)", "\\text{C}"])])
def test_every_answer_statement_the_checker_reads_is_stripped_whole(kind, values):
    """Property: for every marker form extract_answer reads, its value on the same line or the next, and what
    may follow it, the checker reads the value from the trace and nothing of it is left after stripping."""
    gold = {"number": None, "choice": "C"}[kind]
    problem = core.Problem("p", "Which?\n\n(A) one\n(B) two\n(C) cats\n(D) four", "C", "choice")
    for statement, value, before, after in itertools.product(
            STATEMENTS, values, ["", "Twice nine is more than ten. ", "We add them up.\n"],
            ["", ".", " eggs.", ". Check: 2 + 2 = 4", "\nDone."]):
        text = before + statement.format(v=value) + after
        expected = gold or core.extract_answer(f"\\boxed{{{value}}}", kind)
        assert core.extract_answer(text, kind, fallback=False) == expected, text
        stripped = core.strip_answer(text)
        assert core.extract_answer(stripped, kind, fallback=False) is None, (text, stripped)
        if kind == "number":
            assert not core.gold_visible(stripped, core.Problem("p", "q", expected, "number")), (text, stripped)
        else:
            assert not core.gold_visible(stripped, problem) and not re.search(rf"\b{gold}\b", stripped), text


def test_hint_leak_reads_the_gold_the_way_a_reader_would_for_every_kind():
    math = core.Problem("m", "Solve 2x = 1.", "\\frac12", "math")
    hint = core.strip_answer("We divide by 2. So $x=\\frac{1}{2}$, i.e. $\\boxed{\\frac12}$.")
    assert hint == "We divide by 2. So $x=\\frac{1}{2}$, i.e. ." and core.gold_visible(hint, math)
    assert not core.is_correct(hint, math.gold, "math")  # the checker alone sees nothing (boxes only)
    assert not core.gold_visible("We divide by 2.", math)
    sqrt = core.Problem("s", "q", "\\frac{\\sqrt{3}}{2}", "math")
    assert core.gold_visible("so the height is \\frac{\\sqrt3}{2} units", sqrt)
    assert not core.gold_visible("so the height is \\frac{\\sqrt2}{2} units", sqrt)
    gpqa = core.Problem("g", "Which gas?\n\n(A) Neon\n(B) Argon\n(C) Xenon\n(D) Radon", "B", "choice")
    hint = core.strip_answer("Noble gases... the correct option is B. The answer is \\boxed{B}.")
    assert hint == "Noble gases... the correct option is B." and core.gold_visible(hint, gpqa)
    assert core.gold_visible("It must be argon, the third noble gas.", gpqa)  # the option's text
    assert not core.gold_visible("It must be a noble gas. A quick check: B-type stars.", gpqa)
    gsm = core.Problem("n", "q", "18", "number")
    assert core.gold_visible("9 * 2 = 18 eggs", gsm) and not core.gold_visible("9 * 2 eggs", gsm)
    negative = core.Problem("f", "q", "-\\frac{3}{4}", "math")
    assert core.gold_visible("so x = -\\frac{3}{4}", negative) and not core.gold_visible("so x = \\frac{3}{4}", negative)
    assert core.gold_visible("20-5 = 15", core.Problem("s", "q", "5", "number"))  # a subtraction, not -5
    assert core.gold_visible("10 / 2 = 5", core.Problem("s", "q", "10", "number"))  # a division, not 10/2


@needs_shared
def test_strip_answer_on_real_solutions_leaves_no_marked_answer():
    for line in list(open(SHARED / "gsm8k" / "test.jsonl"))[:300]:
        hint = core.strip_answer(json.loads(line)["answer"])
        assert "####" not in hint
    for line in open(SHARED / "math500" / "test.jsonl"):
        row = json.loads(line)
        hint = core.strip_answer(row["solution"])
        assert "\\boxed" not in hint and core.extract_answer(hint, "math") is None


# -----------------------------------------------------------------------------
# Data

def test_load_gsm8k_folder_and_generic_file(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}"} for i in range(999, 1004)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:2])
    train = core.load_problems("gsm8k", "train", str(tmp_path))
    assert [p.gold for p in train] == ["1000", "1001", "1002", "1003", "1004"] and train[0].kind == "number"
    assert len(core.load_problems(str(folder), "test")) == 2  # a folder named like a dataset
    generic = write_jsonl(tmp_path / "mine.jsonl", [{"problem": f"p{i}", "answer": "B"} for i in range(10)])
    probs = core.load_problems(str(generic), "train")
    assert len(probs) == 8 and {p.kind for p in probs} == {"choice"}  # first 80%, every row the file's kind
    assert len(core.load_problems(str(generic), "test")) == 2
    kinds = {"numbers": ["7", " 12 ", "1,000", "-0.5", "$5", "5%", "+5", "\u22127", "12.", "1/2"], "letters": ["A", "C", "D"], "math": ["2x+1", "(1,2)", "7"],
             "expressions": ["2x+1", "\\frac{\\sqrt{3}}{2}", "x^2"]}  # a number only where the whole gold is one
    for name, golds in kinds.items():
        mine = write_jsonl(tmp_path / f"{name}.jsonl", [{"question": f"q{i}", "answer": g} for i, g in enumerate(golds)])
        assert {p.kind for p in core.load_problems(str(mine), "all")} == {
            {"numbers": "number", "letters": "choice"}.get(name, "math")}, name


def test_the_data_line_gives_the_split_sizes_and_the_answer_kind(tmp_path, capsys):
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)])
    train, test = core.load_data(core.Config(data=str(mine), eval_n=0))
    assert (len(train), len(test)) == (8, 2)
    assert capsys.readouterr().out == f"data: {mine}: 8 train / 2 test questions, answer kind number (inferred from the golds)\n"


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{not json\n')
    with pytest.raises(core.UsageError, match="bad.jsonl:2: malformed JSON"):
        core.load_problems(str(bad), "train")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "answer": "1"}, {"question": "q2"}])
    with pytest.raises(core.UsageError, match="missing.jsonl:2: row has no 'answer'"):
        core.load_problems(str(missing), "train")


def test_offline_download_error_names_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(core.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(core.UsageError) as e:
        core.load_problems("aime24", "test")
    assert "https://raw.githubusercontent.com" in str(e.value) and str(tmp_path / "cache" / "aime24") in str(e.value)
    with pytest.raises(core.UsageError) as e:  # every file of the dataset, in one message; nothing created
        core.load_problems("gsm8k", "train")
    assert all(str(tmp_path / "cache" / "gsm8k" / f) in str(e.value) for f in ("train.jsonl", "test.jsonl"))
    assert not (tmp_path / "cache").exists()
    (tmp_path / "data").mkdir()
    with pytest.raises(core.UsageError) as e:  # --data-dir given: the advice names the path it looked in
        core.load_problems("gsm8k", "train", data_dir=str(tmp_path / "data"))
    assert f"{tmp_path / 'data' / 'gsm8k' / 'train.jsonl'} does not exist and cannot download" in str(e.value)
    assert str(e.value).endswith(f"or in {tmp_path / 'data' / 'gsm8k'}/") and "pass --data-dir" not in str(e.value)


def test_training_order_is_a_seeded_permutation_per_epoch():
    order = [i for step in range(5) for i in core.training_order(10, step, 4, seed=1)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order != sorted(order)
    assert core.training_order(10, 3, 4, seed=1) == order[12:16]


@needs_shared
def test_real_datasets_load():
    gpqa = core.load_problems("gpqa", "all", str(SHARED))
    assert len(gpqa) == 198 and {p.gold for p in gpqa} == set("ABCD")  # shuffled, never always "A"
    assert "(A) " in gpqa[0].question and "(D) " in gpqa[0].question
    assert len(core.load_problems("aime24", "all", str(SHARED))) == 30
    aime25 = core.load_problems("aime25", "all", str(SHARED))
    assert not any("\x0c" in p.question for p in aime25)
    assert len(core.load_problems("math500", "test", str(SHARED))) == 500


# -----------------------------------------------------------------------------
# Evaluation

def records_of(correct1, correct2, answers1=None, answers2=None):
    """Evaluation records from per-sample correctness [questions][k] (and optional extracted answers)."""
    def samples(flags, answers):
        return [{"answer": a, "correct": c, "tokens": 3, "truncated": False, "text": ""} for c, a in zip(flags, answers)]
    answers1 = answers1 or [["1" if c else "0" for c in q] for q in correct1]
    answers2 = answers2 or [["1" if c else "0" for c in q] for q in correct2]
    return [{"id": str(i), "m1": samples(c1, a1), "m2": samples(c2, a2)}
            for i, (c1, c2, a1, a2) in enumerate(zip(correct1, correct2, answers1, answers2))]


def test_team_metrics():
    c1 = [[True, False], [False, False], [False, False], [True, True]]
    c2 = [[False, False], [True, False], [False, False], [False, True]]
    m = core.eval_metrics(records_of(c1, c2), 2)
    assert m["pass@1_m1"] == 3 / 8 and m["pass@2_m1"] == 0.5 and m["pass@2_m2"] == 0.5
    assert m["team_pass@2"] == 0.75 and m["p_12@2"] == 0.25 and m["joint_failure@2"] == 0.25
    assert math.isclose(m["correlated_failure@2"], 0.25 - 0.5 * 0.5)
    assert m["team_pass@1"] == 0.75 and m["p_12@1"] == 0.0  # first sample of each model only


def test_unbiased_pass_at_j_equals_enumerating_every_subset():
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for j in range(1, n + 1):
                subsets = list(itertools.combinations(flags, j))
                assert math.isclose(core.pass_at(n, c, j), sum(map(any, subsets)) / len(subsets))


def test_majority_votes_credit_a_tie_with_its_expected_accuracy():
    def vote(*answers, gold="4"):
        return core.majority_correct([{"answer": a, "correct": a == gold} for a in answers])
    assert vote("4", "5", "4") == 1.0 and vote("5", "5", "4") == 0.0
    assert vote("4", "5") == vote("5", "4") == 0.5  # a tie: the fraction of the tied answers that are right
    assert vote("4", "5", "6") == vote("6", "5", "4") == pytest.approx(1 / 3)
    assert vote(None, None, "4", "5", "4") == 1.0 and vote(None, None) == 0.0  # no answer, no vote
    # the team vote at 1 + 1 samples: m1 says 5, m2 says 4 (right): a tie, in whichever order the models come
    for first, second in ((["5"], ["4"]), (["4"], ["5"])):
        records = records_of([[a == "4" for a in first]], [[a == "4" for a in second]], [first], [second])
        assert core.team_metrics(records, 1)["team_vote@1"] == 0.5


def swapped(records):
    return [r | {"m1": r["m2"], "m2": r["m1"]} for r in records]


def random_records(rng, n=60, k=4):
    """Evaluation records of two models that often disagree: answers drawn from a few candidates, gold '1'."""
    def samples(skill):
        answers = [rng.choice(["1"] * skill + ["2", "3", None]) for _ in range(k)]
        return [{"answer": a, "correct": a == "1", "tokens": 5, "truncated": False, "text": ""} for a in answers]
    return [{"id": str(i), "m1": samples(1), "m2": samples(4)} for i in range(n)]


def test_swapping_the_models_changes_no_team_number():
    rng = random.Random(0)
    for _ in range(20):
        records = random_records(rng)
        a, b = core.eval_metrics(records, 4), core.eval_metrics(swapped(records), 4)
        for key, value in a.items():
            mirror = key.replace("_m1", "_mX").replace("_m2", "_m1").replace("_mX", "_m2")
            assert b[mirror] == pytest.approx(value, abs=1e-12), key


def brute_force_metrics(records, k):
    """Every evaluation number written out independently: Pass@j by enumerating the j-subsets of each model's
    samples, votes by counting answers (a tie credits the fraction of the tied answers that are right), and
    the team numbers by counting questions."""
    def vote(samples):
        counts = {}
        for s in samples:
            if s["answer"] is not None:
                counts[s["answer"]] = counts.get(s["answer"], 0) + 1
        top = [a for a, c in counts.items() if c == max(counts.values(), default=0)]
        right = {s["answer"] for s in samples if s["correct"]}
        return sum(a in right for a in top) / len(top) if top else 0.0

    n, out = len(records), {"questions": len(records), "k": k}
    for m in ("m1", "m2"):
        for j in range(1, k + 1):
            out[f"pass@{j}_{m}"] = sum(sum(map(any, itertools.combinations([s["correct"] for s in r[m]], j)))
                                       / math.comb(k, j) for r in records) / n
        out[f"maj@{k}_{m}"] = sum(vote(r[m]) for r in records) / n
        out[f"tokens_{m}"] = sum(s["tokens"] for r in records for s in r[m]) / (n * k)
        out[f"truncated_{m}"] = sum(s["truncated"] for r in records for s in r[m]) / (n * k)
    for j in sorted({k, k // 2} - {0}) if k % 2 == 0 else [k]:
        one = [any(s["correct"] for s in r["m1"][:j]) for r in records]
        two = [any(s["correct"] for s in r["m2"][:j]) for r in records]
        both_fail = sum(not a and not b for a, b in zip(one, two)) / n
        out |= {f"team_pass@{j}": sum(a or b for a, b in zip(one, two)) / n,
                f"team_vote@{j}": sum(vote(r["m1"][:j] + r["m2"][:j]) for r in records) / n,
                f"p_12@{j}": sum(a and b for a, b in zip(one, two)) / n, f"joint_failure@{j}": both_fail,
                f"correlated_failure@{j}": both_fail - (1 - sum(one) / n) * (1 - sum(two) / n)}
    return out


def test_evaluation_numbers_equal_a_brute_force_computation():
    rng = random.Random(1)
    for k in (1, 2, 3, 4):
        records = random_records(rng, k=k)
        expected = brute_force_metrics(records, k)
        got = core.eval_metrics(records, k)
        assert got.keys() == expected.keys()
        assert all(got[key] == pytest.approx(expected[key], abs=1e-12) for key in got), k


def test_identical_models_sample_independently_and_evaluations_repeat_exactly(warm_pair):
    cfg = core.Config(lora_rank=4, eval_k=2, eval_max_new_tokens=12, temperature=1.0, top_p=1.0)
    twins = [core.load_policy(m, warm_pair[0], torch.device("cpu"), cfg) for m in (1, 2)]  # the same weights twice
    problems = core.arithmetic_problems(12, 9)
    metrics, records = core.evaluate(twins, problems, cfg, "twins")
    texts = [[s["text"] for r in records for s in r[m]] for m in ("m1", "m2")]
    assert texts[0] != texts[1]  # each model draws from its own stream
    assert sum(a == b for a, b in zip(*texts)) < len(texts[0]) // 2
    again_metrics, again = core.evaluate(twins, problems, cfg, "twins again")
    assert again == records and {k: v for k, v in again_metrics.items() if k != "seconds"} == \
        {k: v for k, v in metrics.items() if k != "seconds"}


def test_eval_only_prints_the_budget_block_and_its_records_reproduce_every_number(warm_pair, tmp_path, capsys):
    data = write_jsonl(tmp_path / "arith.jsonl", [{"question": p.question, "answer": p.gold}
                                                  for p in core.arithmetic_problems(40, 4)])
    out = tmp_path / "ev"
    assert core.main(["--eval-only", "--model1", warm_pair[0], "--model2", warm_pair[1], "--data", str(data),
                      "--out", str(out), "--eval-k", "4", "--eval-max-new-tokens", "14", "--lora-rank", "4"]) == 0
    text = capsys.readouterr().out
    assert "at an equal budget of 4 candidates" in text and "Team Pass@2" in text and "team vote" in text
    assert "best-of-4 (Pass@4)" in text and "self-consistency (maj@4)" in text
    saved = json.loads((out / "eval.json").read_text())
    records = [json.loads(line) for line in open(out / "eval_samples.jsonl")]
    assert len(records) == saved["questions"] == 8 and all(len(r["m1"]) == len(r["m2"]) == 4 for r in records)
    expected = brute_force_metrics(records, 4)
    assert all(saved[key] == pytest.approx(value, abs=1e-12) for key, value in expected.items())
    # a few numbers by hand, straight from the records
    first_two = [any(s["correct"] for s in r["m1"][:2] + r["m2"][:2]) for r in records]
    assert saved["team_pass@2"] == sum(first_two) / 8
    assert saved["pass@1_m2"] == sum(s["correct"] for r in records for s in r["m2"]) / 32
    for r in records:
        gold = core.normalize_gold(r["gold"], "number")
        assert all(s["correct"] == (s["answer"] == gold) and s["tokens"] <= 14 for s in r["m1"] + r["m2"])


# -----------------------------------------------------------------------------
# The training loop and the command line: end-to-end runs on two tiny saved models

def arithmetic_file(tmp_path, n=12):
    rows = [{"question": p.question, "answer": p.gold} for p in core.arithmetic_problems(n, 3)]
    return write_jsonl(tmp_path / "arith.jsonl", rows)


def tiny_run_flags(models, data, out, steps=2):
    return ["--model1", models[0], "--model2", models[1], "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-questions", "2", "--max-new-tokens", "12", "--eval-max-new-tokens", "4",
            "--eval-n", "2", "--lora-rank", "4", "--save-every", "2", "--device1", "cpu", "--lr", "1e-3",
            "--hint-dropout", "0", "--no-grad-checkpoint"]


def test_end_to_end_core_steps(warm_pair, tmp_path, monkeypatch, capsys):
    """Two CORE steps, with model 2's GPU sampler (faked here) broken from its first use: the run samples it with
    the reference loop and says so in its warning, every step line and metrics row, and at its end."""
    out = tmp_path / "run"
    fast_decoding = core.fast_decoding
    monkeypatch.setattr(core, "fast_decoding", lambda model, cfg: fast_decoding(model, cfg) or "qwen3" in model.name_or_path)
    monkeypatch.setattr(core, "static_cache", lambda *args: (_ for _ in ()).throw(AttributeError("changed")))
    assert core.main(tiny_run_flags(warm_pair, arithmetic_file(tmp_path), out)) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert [(r["sampler_m1"], r["sampler_m2"]) for r in rows] == [("reference", "reference (fallback)")] * 2
    printed = capsys.readouterr()
    assert printed.out.count("tok/s (reference/reference (fallback)) |") == 2
    assert printed.err.count("the GPU sampler failed (AttributeError: changed)") == 1
    assert "note: tiny-qwen3 was sampled with the reference (fallback) sampler" in printed.out
    for key in ("acc_A_m1", "acc_B_m2", "rescued", "eligible", "div", "cm", "loss_m1", "kl_m2", "tok_per_s"):
        assert key in rows[0]
    sample = json.loads(open(out / "samples.jsonl").readline())
    assert [t["round"] for t in sample["traces"]] == ["A", "A", "A", "A", "B", "B"]
    assert (out / "eval_before.json").exists() and (out / "eval_after.json").exists()
    ckpt = out / "checkpoints" / "step_000002"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter_1", "adapter_2", "state.json"}
    adapters = core.load_file(str(ckpt / "adapter_1" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())  # the update happened
    for key in ("time", "lr", "w_div", "lambda_cm", "len_A_m1", "len_B_m2", "truncated", "grad_norm_m1", "rollout_s", "update_s"):
        assert key in rows[0]
    curves.write_curves(out)  # tools/curves.py RUN
    assert (out / "curves.svg").exists()


def test_eval_only_adapters_reproduce_the_run_take_its_lora_settings_and_export(warm_pair, tmp_path, capsys):
    """--eval-only --adapters RUN evaluates exactly what the run evaluated after training (the same adapters, read
    back from the PEFT layout, and the same evaluation streams); the LoRA rank comes from the checkpoint, swapped
    models are warned about, and tools/export.py writes the merged models."""
    out, data = tmp_path / "run", arithmetic_file(tmp_path)
    assert core.main(tiny_run_flags(warm_pair, data, out, steps=2) + ["--no-eval-before", "--eval-n", "4"]) == 0
    common = ["--eval-only", "--adapters", str(out), "--data", str(data), "--eval-n", "4", "--eval-max-new-tokens", "4",
              "--lora-rank", "8", "--lora-alpha", "1"]  # wrong LoRA settings: the checkpoint's are used
    capsys.readouterr()
    assert core.main(common + ["--model1", warm_pair[0], "--model2", warm_pair[1], "--out", str(tmp_path / "ev")]) == 0
    assert "warning" not in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "ev" / "eval.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    assert {k: v for k, v in evaluated.items() if k != "seconds"} == {k: v for k, v in after.items() if k != "seconds"}
    assert (tmp_path / "ev" / "eval_samples.jsonl").read_text() == (out / "eval_after_samples.jsonl").read_text()
    # tools/export.py: each model with its adapter merged, a plain model folder with the adapted model's logits
    assert export.main([str(out), str(tmp_path / "merged")]) == 0
    merged, _ = loaded(tmp_path / "merged" / "merged_2")
    policy = make_policy(warm_pair[1], core.replace(core.saved_config(out / "config.json"), dtype="float32"))
    core.load_lora(policy.model, core.find_checkpoint(out) / "adapter_2")
    x = torch.randint(0, 300, (1, 9))
    assert torch.allclose(merged(x).logits, policy.model(x).logits, atol=1e-4)
    assert not torch.allclose(merged(x).logits, loaded(warm_pair[1])[0](x).logits, atol=1e-4)  # not the base
    assert export.main([str(out), str(tmp_path / "merged")]) == 2  # an existing folder is not overwritten
    with pytest.raises(core.UsageError, match=r"--export moved: python tools/export.py RUN OUT"):
        core.Config(**vars(core.build_parser().parse_args(["--export"])))
    # without --model1/--model2 (the README's own example) the models are those the checkpoint was trained on
    assert core.main(common + ["--out", str(tmp_path / "ev2")]) == 0
    assert "warning" not in capsys.readouterr().out
    again = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in after.items() if k != "seconds"}
    # the two tiny models have the same LoRA shapes: swapped adapters would load silently, so a warning says so
    assert core.main(common + ["--model1", warm_pair[1], "--model2", warm_pair[0], "--out", str(tmp_path / "swapped")]) == 0
    out_text = capsys.readouterr().out
    assert "warning: adapter 1 of" in out_text and "warning: adapter 2 of" in out_text


def test_single_model_ablation_has_no_round_b_and_compare_shows_both_runs(warm_pair, tmp_path, capsys):
    data = arithmetic_file(tmp_path)
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "core", steps=1)) == 0
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "single", steps=1) + ["--single"]) == 0
    sample = json.loads(open(tmp_path / "single" / "samples.jsonl").readline())
    assert {t["round"] for t in sample["traces"]} == {"A"}
    assert len(sample["traces"]) == 2 * (2 + 1)  # an equal budget: K + K' cold samples per model
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "single_k", steps=1) + ["--single", "--no-eval-before",
                                                                                       "--single-samples", "2"]) == 0
    assert len(json.loads(open(tmp_path / "single_k" / "samples.jsonl").readline())["traces"]) == 2 * 2
    after = json.loads((tmp_path / "single_k" / "eval_after.json").read_text())["team_pass@2"]  # --no-eval-before
    assert compare.compared_cell(compare.run_evaluations(tmp_path / "single_k"), "team_pass@{k}") == f"after {after:.3f}"
    capsys.readouterr()
    assert compare.main([str(tmp_path / "core"), str(tmp_path / "single")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["core", "single"]
    before, after = (json.loads((tmp_path / "single" / f"eval_{t}.json").read_text())["team_pass@2"] for t in ("before", "after"))
    assert f"{before:.3f} -> {after:.3f}" in next(line for line in lines if line.startswith("Team Pass@k "))
    last = json.loads(open(tmp_path / "single" / "metrics.jsonl").readlines()[-1])
    tokens = f"{last['sampled_tokens_total_m1']:,} + {last['sampled_tokens_total_m2']:,}"
    assert tokens in next(line for line in lines if line.startswith("sampled tokens m1 + m2"))
    differing = [line.split() for line in lines[lines.index("flags that differ:") + 1:]]
    assert differing == [["--single", "False", "True"]]
    assert compare.main([str(tmp_path / "core"), str(tmp_path)]) == 2  # not a run folder
    # an --eval-only run beside a training run: training flags do not count as differences
    assert core.main(["--eval-only", "--model1", warm_pair[0], "--model2", warm_pair[1], "--data", str(data),
                      "--out", str(tmp_path / "ev"), "--eval-n", "2", "--eval-max-new-tokens", "4", "--lora-rank", "4"]) == 0
    capsys.readouterr()
    value = json.loads((tmp_path / "ev" / "eval.json").read_text())["pass@1_m1"]
    assert compare.compared_cell(compare.run_evaluations(tmp_path / "ev"), "pass@1_m1") == f"{value:.3f}"
    assert compare.main([str(tmp_path / "core"), str(tmp_path / "ev")]) == 0
    lines = capsys.readouterr().out.splitlines()
    differing = [line.split()[0] for line in lines[lines.index("flags that differ:") + 1:]]
    assert differing == ["--eval-only"] and "--lr" not in differing


def test_one_model_alone_trains_and_evaluates_without_team_numbers(warm_pair, tmp_path, capsys):
    """--model2 none: model 1 alone, GRPO at CORE's budget (K + K' cold samples), the same evaluation without the
    team rows; tools/compare.py sets it beside a pair."""
    data = arithmetic_file(tmp_path)
    flags = tiny_run_flags(warm_pair, data, tmp_path / "alone", steps=2)
    flags[flags.index("--model2") + 1] = "none"
    assert core.main(flags) == 0
    sample = json.loads(open(tmp_path / "alone" / "samples.jsonl").readline())
    assert [(t["model"], t["round"]) for t in sample["traces"]] == [(1, "A")] * 3
    after = json.loads((tmp_path / "alone" / "eval_after.json").read_text())
    assert "pass@1_m1" in after and not any(k.endswith("_m2") or k.startswith("team") for k in after)
    assert "step 2/2 | acc A " in capsys.readouterr().out
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "pair", steps=1) + ["--no-eval-before"]) == 0
    capsys.readouterr()
    assert compare.main([str(tmp_path / "alone"), str(tmp_path / "pair")]) == 0
    lines = capsys.readouterr().out.splitlines()
    team = next(line for line in lines if line.startswith("Team Pass@k "))
    assert team.split()[2] == "-"
    tokens = next(line for line in lines if line.startswith("sampled tokens m1 + m2"))
    assert re.fullmatch(r"sampled tokens m1 \+ m2 +[\d,]+ \+ - +[\d,]+ \+ [1-9][\d,]*", tokens)  # no model 2: "-"
    common = ["--eval-only", "--adapters", str(tmp_path / "alone"), "--model1", warm_pair[0], "--data", str(data),
              "--eval-n", "2", "--eval-max-new-tokens", "4"]
    assert core.main(common + ["--model2", "none", "--out", str(tmp_path / "ev")]) == 0  # its adapter, evaluated
    assert core.main(common + ["--model2", warm_pair[1], "--out", str(tmp_path / "ev2")]) == 2
    assert "trained one model alone" in capsys.readouterr().err


def torchrun(script, *launcher_flags):
    """The command that starts `script` under torchrun with 2 CPU processes (gloo), and its environment."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              *launcher_flags, str(script)]
    return launch, dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def ddp_run_flags(models, data, out, steps):
    """tiny_run_flags for torchrun: each rank on its own device (the CPU here)."""
    return [f for f in tiny_run_flags(models, data, out, steps) if f not in ("--device1", "cpu")]


def test_torchrun_two_processes_data_parallel(warm_pair, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): each rank takes half of every step's questions, gradients are
    summed, rank 0 logs and saves every rank's RNG states, and the adapters stay in sync (checked at every checkpoint)."""
    data = arithmetic_file(tmp_path)
    flags = ddp_run_flags(warm_pair, data, tmp_path / "ddp", steps=2)
    launch, env = torchrun(HERE / "core.py")
    done = subprocess.run(launch + flags + ["--save-every", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["questions"] == 2 for r in rows)  # both ranks' questions
    assert done.stdout.count("step 2/2") == 1  # only rank 0 prints
    ckpt = core.find_checkpoint(tmp_path / "ddp")
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert {k.split(".")[0] for k in core.load_file(str(ckpt / "rng.safetensors"))} == {"rank0", "rank1"}
    after = json.loads((tmp_path / "ddp" / "eval_after.json").read_text())
    assert after["questions"] == 2
    cfg = core.saved_config(tmp_path / "ddp" / "config.json")  # each rank's fingerprint is the one-process one
    assert after["question_set"] == core.question_set(core.load_data(cfg)[1], core.eval_settings(cfg))
    (tmp_path / "ddp" / "eval_after.json").unlink()  # unfinished again: the resume must load the checkpoint
    assert core.main(["--resume", str(tmp_path / "ddp")]) == 2  # 2 processes wrote it: needs 2


def test_demo_runs_and_shows_the_protocol(tmp_path, capsys):
    """The demo's pipeline, shortened to 8 steps and 48 test questions to keep the suite fast (the full demo's
    numbers: bench/study.py)."""
    flags = ["--demo", "--out", str(tmp_path / "demo"), "--eval-every", "4", "--steps", "8", "--eval-n", "48", "--micro-batch", "8",
             "--batch-questions", "8"]
    assert core.main(flags) == 0
    saved = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert saved["micro_batch"] == 8 and saved["adv_group"] == "model"  # a flag given wins, even at its default
    assert saved["data"] == "arithmetic (demo)"
    text = capsys.readouterr().out
    assert "evaluates on 48 draws of the same 25 questions" in text
    assert "warmed up for" in text and "what 8 training steps changed, before -> after" in text
    assert text.strip().splitlines()[-1].startswith("team vote@k/2")
    assert "before training" in text and "after training" in text and "Team Pass@2" in text
    assert "hint (teacher's trace, answer stripped)" in text and "+hint" in text
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    assert len(rows) == 8 and any(r["rescued"] for r in rows)
    assert "before training: evaluating: 192/192 rows" in text and "tok/s" in text  # progress
    assert (tmp_path / "demo" / "checkpoints" / "step_000008" / "adapter_2" / "adapter_config.json").exists()
    curves.write_curves(tmp_path / "demo")  # tools/curves.py RUN
    svg = ElementTree.parse(tmp_path / "demo" / "curves.svg").getroot()  # well-formed, every curve named
    labels = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    names = {"m1": "tiny-qwen2", "m2": "tiny-qwen3"}
    for _, keys in curves.PANELS:  # every curve named, with the model's name for a model's curve
        assert {curves.label_and_style(key.format(k=2), names, j)[0] for j, key in enumerate(keys)} <= labels
    assert "acc round B tiny-qwen3" in labels and "kl tiny-qwen2" in labels
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}polyline"))) >= 20
    evals = [json.loads(line) for line in open(tmp_path / "demo" / "evals.jsonl")]
    assert [e["step"] for e in evals] == [0, 4, 8] and "step 4: 48 questions" in text
    assert (tmp_path / "demo" / "evals" / "step_000004_samples.jsonl").exists()
    after = json.loads((tmp_path / "demo" / "eval_after.json").read_text())
    assert evals[-1] == {"step": 8} | after


def test_curves_keep_model_colours_and_break_where_nothing_was_counted(tmp_path):
    rows = [{"step": s, "rescue_rate": r, "kl_m1": 0.1, "kl_m2": 0.2} for s, r in enumerate([0.5, None, None, 0.2, 0.7], 1)]
    names = {"m1": "one", "m2": "two"}
    assert curves.svg_panel("rescue", ["rescue_rate"], rows, names, 0, 0, 100, 100).count("<polyline") == 2
    kl = curves.svg_panel("KL", ["kl_m1", "kl_m2"], rows, names, 0, 0, 100, 100)
    assert curves.MODEL_COLORS["m1"] in kl and curves.MODEL_COLORS["m2"] in kl and ">kl two<" in kl
    (tmp_path / "config.json").write_text("{}")  # an evaluation with no question that fitted has no k
    write_jsonl(tmp_path / "evals.jsonl", [{"step": 0}])
    curves.write_curves(tmp_path)
    assert (tmp_path / "curves.svg").exists()


def text_boxes(svg):
    """(left, top, right, bottom, text) of every <text> of an SVG, at curves.CHAR_WIDTH a character."""
    boxes = []
    for e in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}text"):
        x, y, size = float(e.get("x")), float(e.get("y")), float(e.get("font-size", 11))
        width = len(e.text) * curves.CHAR_WIDTH * size / 11
        left = x - {"end": width, "middle": width / 2}.get(e.get("text-anchor"), 0)
        boxes.append((left, y - size * 0.8, left + width, y + size * 0.2, e.text))
    return boxes


def test_curves_stay_legible_with_real_model_names(tmp_path):
    """Long model paths and names: every text inside the picture and none over another (legends one line per
    curve, cut to their panel; the title on three lines)."""
    names = ["/home/researcher/models/huggingface/qwen2.5-coder-0.5b-instruct",
             "/home/researcher/models/huggingface/smollm2-135m-instruct"]
    (tmp_path / "config.json").write_text(json.dumps({"model1": names[0], "model2": names[1]}))
    keys = {key for _, panel in curves.PANELS for key in panel if "{k}" not in key}
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, **{key: 1e-5 * s for key in keys}} for s in (1, 2, 3)])
    write_jsonl(tmp_path / "evals.jsonl", [{"step": s, "k": 2, "team_pass@2": 0.5, "pass@1_m1": 0.3, "pass@1_m2": 0.2,
                                            "p_12@2": 0.1, "team_vote@2": 0.4} for s in (0, 3)])
    curves.write_curves(tmp_path)
    svg = (tmp_path / "curves.svg").read_text()
    width = float(ElementTree.fromstring(svg).get("width"))
    boxes = text_boxes(svg)
    assert any("smollm2-135m-instruct" in b[4] for b in boxes) and all(0 <= b[0] and b[2] <= width for b in boxes)
    overlapping = [(a[4], b[4]) for a, b in itertools.combinations(boxes, 2)
                   if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]
    assert overlapping == []


def test_a_weaker_partner_is_diagnosed_and_the_model_option_stops_pushing_it_away(warm_pair, tmp_path, capsys):
    """Model 2 barely writes a right answer. Without hints (--no-rescue) and with the paper's joint advantages,
    most of its traces are pushed down while its KL rises: the log says so and warns; with --adv-group model
    they are not."""
    data = arithmetic_file(tmp_path, n=24)
    base = ["--no-eval-before", "--eval-n", "1", "--batch-questions", "8", "--lr", "2e-3", "--max-new-tokens", "20"]
    runs = {}
    for adv_group in ("joint", "model"):
        out = tmp_path / adv_group
        flags = tiny_run_flags(warm_pair, data, out, steps=4) + base + ["--adv-group", adv_group, "--no-rescue"]
        assert core.main(flags) == 0
        runs[adv_group] = ([json.loads(line) for line in open(out / "metrics.jsonl")], capsys.readouterr().out)
    rows, text = runs["joint"]
    assert all(r["neg_adv_m2"] >= 0.75 for r in rows[:3]) and all(r["neg_adv_m1"] < 0.5 for r in rows)
    assert f"A<0 {rows[0]['neg_adv_m1']:.2f}/{rows[0]['neg_adv_m2']:.2f} H " in text
    warning = [line for line in text.splitlines() if line.startswith("warning: tiny-qwen3: for 3 steps")]
    kl = [float(x) for x in re.search(r"KL to the base went ([\d.]+) -> ([\d.]+)", warning[0]).groups()]
    assert len(warning) == 1 and kl[1] > kl[0] == rows[0]["kl_m2"] and kl[1] == pytest.approx(rows[2]["kl_m2"], abs=1e-4)
    assert "try --adv-group model --adv-scale none" in warning[0]
    rows, text = runs["model"]
    assert all(r["neg_adv_m2"] <= 0.3 for r in rows) and "warning: tiny-qwen3" not in text
    assert all(r["adv_A_m2"] is not None and r["adv_B_m2"] is not None for r in rows)


def test_a_step_with_nothing_to_learn_says_so_and_again_while_it_goes_on(warm_pair, tmp_path, capsys):
    state = core.new_loop_state()
    cases = [(1.0, 8, 0.0)] * 7 + [(0.2, 3, 0.5), (0.0, 8, 1.0)]  # (truncated, constant groups of 8, correct)
    for step, (truncated, constant, correct) in enumerate(cases, 1):
        row = {"step": step, "truncated": truncated, "constant_groups": constant, "advantage_groups": 8,
               "correct": correct}
        core.watch_for_nothing_to_learn(row, state, core.Config(max_new_tokens=128))
    warnings = capsys.readouterr().out.splitlines()
    assert [w.split(":")[0] for w in warnings] == ["warning"] * 3
    assert warnings[0] == ("warning: step 1: nothing to learn (1 step in a row): every sample hit --max-new-tokens 128 "
                           "before its end: raise it, or use easier data or stronger models")
    assert warnings[1].startswith("warning: step 6: nothing to learn (6 steps in a row)")  # said again
    assert warnings[2].startswith("warning: step 9: nothing to learn (1 step in a row): every question's samples were "
                                  "all right: use harder data")
    # a real run whose every sample hits a 1-token budget
    data = arithmetic_file(tmp_path)
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "run", steps=1) + ["--max-new-tokens", "1"]) == 0
    assert "warning: step 1: nothing to learn (1 step in a row): every sample hit --max-new-tokens 1" in capsys.readouterr().out


def collapse_warnings(capsys, steps, cfg=None):
    """watch_for_collapse over synthetic steps of model 2: (mean round-A advantage, KL, entropy[, fraction of all
    its traces negative])."""
    state = {"pushed_away": [0, 0], "kl_before": [0.0, 0.0], "entropy_before": [0.0, 0.0]}
    for cold, kl, entropy, *negative in steps:
        row = {"adv_A_m1": 0.05, "neg_adv_m1": 0.3, "kl_m1": 0.01, "entropy_m1": 1.0,
               "adv_A_m2": cold, "neg_adv_m2": (negative or [0.9])[0], "kl_m2": kl, "entropy_m2": entropy}
        core.watch_for_collapse(row, state, {1: "strong", 2: "weak"}, cfg or core.Config())
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]


# A real collapse (SmolLM2-135M beside Qwen2.5-Coder-0.5B, joint std advantages, lr 2e-4): the weak model's cold
# accuracy fell 0.28 -> 0.00 while its round-A traces averaged below -0.45 at every step; its rescued round-B
# traces kept the share of all its traces with a negative advantage under 0.75 three steps in a row
REAL_COLD = [-0.80, -1.04, -0.45, -0.83, -0.94, -1.39, -0.84, -1.09]
REAL_NEGATIVE = [0.83, 0.83, 0.58, 0.92, 0.83, 0.67, 0.67, 0.92]
REAL_KL = [0.0, 0.004, 0.012, 0.02, 0.03, 0.038, 0.05, 0.06]
REAL_ENTROPY = [1.24, 1.30, 1.42, 1.51, 1.62, 1.74, 1.85, 1.96]
# the demo's weaker model at its default options (per-model advantages in reward units), seeds 42 and 1: its cold
# accuracy rises while its round-A advantages stay within +-0.1 and its KL rises as it learns
DEMO_COLD = {42: [0.02, -0.03, 0.03, 0.04, 0.02, -0.01, -0.00, -0.02, 0.01, -0.04, -0.06, -0.04, -0.00, 0.03, -0.04],
             1: [0.03, -0.01, -0.04, -0.04, -0.07, 0.04, 0.02, -0.03, 0.06, -0.03, -0.01, 0.03, -0.02, -0.01, -0.08]}


def test_the_collapse_warning_reads_the_cold_rounds_advantages(capsys):
    steps = list(zip(REAL_COLD, REAL_KL, REAL_ENTROPY, REAL_NEGATIVE))
    warnings = collapse_warnings(capsys, steps)
    assert len(warnings) == 2 and warnings[0].startswith("warning: weak: for 3 steps in a row its cold (round-A) traces")
    assert "(-0.45 now)" in warnings[0] and "its KL to the base went 0.0000 -> 0.0120" in warnings[0]
    assert "its entropy went 1.24 -> 1.42" in warnings[0] and "try --adv-group model --adv-scale none" in warnings[0]
    # the second window's KL and entropy are those of its own 3 steps
    assert "for 6 steps in a row" in warnings[1] and "over the last 3 steps its KL to the base went 0.0200 -> 0.0380" in warnings[1]
    for seed, cold in DEMO_COLD.items():  # a weak model that learns: silent, its KL rising or not
        assert collapse_warnings(capsys, [(a, 0.002 * k, 0.7 + 0.01 * k) for k, a in enumerate(cold)]) == [], seed


def test_the_collapse_warnings_advice_and_what_keeps_it_silent(capsys):
    rising = list(zip(REAL_COLD, REAL_KL, REAL_ENTROPY))[:3]
    in_force = core.Config(adv_group="model", adv_scale="none")
    warnings = collapse_warnings(capsys, rising, in_force)
    assert len(warnings) == 1 and "--adv-group" not in warnings[0] and "in force" in warnings[0]
    assert "try --adv-scale none" in collapse_warnings(capsys, rising, core.Config(adv_group="model"))[0]
    assert "try --adv-scale none" in collapse_warnings(capsys, rising, core.Config(single=True))[0]  # per model
    # --beta-kl 0: no KL measured (None); a rising entropy alone warns, without a KL reading
    no_kl = collapse_warnings(capsys, [(a, None, h) for a, _, h in rising])
    assert len(no_kl) == 1 and "KL" not in no_kl[0] and "its entropy went 1.24 -> 1.42" in no_kl[0]
    # the same push while KL and entropy fall: nothing is drifting
    assert collapse_warnings(capsys, [(-0.9, kl, 1 + kl) for kl in (0.05, 0.04, 0.03, 0.02, 0.01, 0.0)]) == []
    # all-wrong groups under per-model advantages: every advantage 0, nothing pushes, KL rising or not
    assert collapse_warnings(capsys, [(0.0, kl, 1.0 + kl, 0.0) for kl in (0.0, 0.01, 0.02, 0.05, 0.08, 0.1)]) == []
    # no round-A trace of this model in a step (None), or a streak broken before `patience` steps: silent
    assert collapse_warnings(capsys, [(-0.9, 0.0, 1), (None, 0.1, 2), (-0.9, 0.2, 3), (-0.9, 0.3, 4)]) == []
    assert collapse_warnings(capsys, [(-0.9, 0.0, 1), (-0.9, 0.1, 2), (-0.2, 0.2, 3), (-0.9, 0.3, 4), (-0.9, 0.4, 5)]) == []


# -----------------------------------------------------------------------------
# Checkpoints, resume and bad input: crash-safe checkpoints with exact resume, numerical guards, one-line errors

# Each case is its own process running core.py's command line. Every hyperparameter check is also unit-tested
# in-process in test_validate_rejects_bad_settings.
BAD_INPUTS = {
    "unknown dataset": (["--data", "nosuch"], "unknown dataset 'nosuch'"),
    "missing path": (["--data", "missing/file.jsonl"], "dataset path 'missing/file.jsonl' does not exist"),
    "malformed line": (["--data", "{bad}"], "bad.jsonl:2: malformed JSON"),
    "no problems": (["--data", "{empty}"], "no usable problems"),
    "missing answer": (["--data", "{noanswer}"], "noanswer.jsonl:2: row has no 'answer'"),
    "unreachable model": (["--data", "{good}", "--model1", "nobody/no-such-model"], "--model1 /path/to/folder"),
    "folder without weights": (["--data", "{good}", "--model2", "{emptydir}"], "cannot load folder"),
    "k < 1": (["--k", "0"], "--k must be >= 1"),
    "probability": (["--hint-dropout", "-0.1"], "--hint-dropout must be in [0, 1]"),
    "out not empty": (["--data", "{good}", "--out", "{full}"], "exists and is not empty"),
    "all prompts too long": (["--data", "{long}", "--eval-only", "--eval-n", "2"], "every test problem is longer"),
    "all training prompts too long": (["--data", "{long}", "--max-new-tokens", "400"], "every training problem is too long"),
    "out cannot be created": (["--data", "{good}", "--out", "{good}/run"], "cannot be created"),
    "not UTF-8": (["--data", "{latin1}"], "latin1.jsonl: not UTF-8 text"),
    "model folder missing": (["--data", "{good}", "--model2", "./no/such/folder"], "--model2 './no/such/folder' does not exist"),
    "model is a file": (["--data", "{good}", "--model1", "{good}"], "is a file; pass the folder"),
    "negative value": (["--lr", "-1e-5"], "(a negative value: --lr=-VALUE)"),
    "not a number": (["--steps", "5OO"], "argument --steps: invalid int value: '5OO'"),
    "not a choice": (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    "ambiguous flag": (["--eval", "50"], "ambiguous option: --eval could match"),
    "out is a file": (["--data", "{good}", "--out", "{good}"], "is a file; the output is a folder"),
    "folder with a config only": (["--data", "{good}", "--model2", "{configonly}"], "it lacks weights (*.safetensors)"),
    "flags that do nothing": (["--data", "{good}", "--single", "--no-rescue"], "--no-rescue does nothing with"),
    "nothing to train with --eval-only": (["--data", "{good}", "--eval-only", "--single"], "--eval-only does not"),
    "a training budget with --eval-only": (["--data", "{good}", "--eval-only", "--max-new-tokens", "64"],
                                           "--eval-only does not train, so --max-new-tokens would do nothing"),
    "no test problem fits in training": (["--data", "{good}", "--max-new-tokens", "16", "--eval-max-new-tokens", "600"],
                                         "longer than the model context (prompt + --eval-max-new-tokens 600)"),
    "unknown device": (["--data", "{good}", "--device1", "gpu"], "unknown device 'gpu'"),
    "a run folder as a model": (["--data", "{good}", "--model2", "{arun}"], "is a run folder, not a model"),
}


EXEC_CASES = {"unknown dataset", "unreachable model"}  # full `python core.py` runs; the rest run core.main in a fork


def forked_main(args, cwd):
    """core.py's command line (core.main) in a forked child process: its own cwd, exit code and stderr, without
    paying a fresh interpreter's imports. Returns (pid, stderr path)."""
    err_path = cwd.parent / f"{cwd.name}.stderr"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            torch.set_num_threads(1)
            os.chdir(cwd)
            sys.stderr = open(err_path, "w")  # pytest's capture objects stand in for sys.stdout/stderr here
            sys.stdout = open(os.devnull, "w")
            code = core.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid, err_path


def wait_forked(pid, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "timeout"


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, tiny_models):
    """Every bad-input case as its own process, all started at once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.jsonl").write_text('{"question": "q", "answer": "1"}\n{oops\n')
    (d / "empty.jsonl").write_text("\n")
    write_jsonl(d / "noanswer.jsonl", [{"question": "q", "answer": "1"}, {"question": "q2"}])
    write_jsonl(d / "good.jsonl", [{"question": f"What is {i} + 1 ?", "answer": str(i + 1)} for i in range(10)])
    write_jsonl(d / "long.jsonl", [{"question": "What is " + "1 + " * 400 + "1 ?", "answer": "401"}] * 5)
    (d / "latin1.jsonl").write_bytes('{"question": "Combien font 2 + 2 ? \u00e9", "answer": "4"}\n'.encode("latin-1"))
    (d / "emptydir").mkdir()
    (d / "configonly").mkdir()
    (d / "configonly" / "config.json").write_text((Path(tiny_models[0]) / "config.json").read_text())
    (d / "full").mkdir()
    (d / "full" / "metrics.jsonl").write_text("{}\n")
    (d / "arun").mkdir()
    (d / "arun" / "config.json").write_text(json.dumps(core.asdict(core.Config())))
    names = {"bad": d / "bad.jsonl", "empty": d / "empty.jsonl", "noanswer": d / "noanswer.jsonl", "good": d / "good.jsonl",
             "latin1": d / "latin1.jsonl",
             "long": d / "long.jsonl", "emptydir": d / "emptydir", "full": d / "full", "configonly": d / "configonly",
             "arun": d / "arun"}
    models = ["--model1", tiny_models[0], "--model2", tiny_models[1], "--device1", "cpu", "--lora-rank", "4"]
    os.environ["HF_HUB_OFFLINE"] = "1"  # no network here: fail at once instead of retrying
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    started = {}
    for case, (flags, _) in BAD_INPUTS.items():
        cwd = d / case.replace(" ", "_")
        cwd.mkdir()
        args = models + [f.format(**names) for f in flags]  # argparse keeps a flag's last value
        if case in EXEC_CASES:
            started[case] = (cwd, subprocess.Popen([sys.executable, str(HERE / "core.py")] + args, cwd=cwd, env=env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        else:
            started[case] = (cwd, forked_main(args, cwd))
    results = {}
    for case, (cwd, proc) in started.items():
        if case in EXEC_CASES:
            results[case] = (cwd, proc.wait(timeout=120), proc.stderr.read())
        else:
            pid, err_path = proc
            results[case] = (cwd, wait_forked(pid), err_path.read_text())
    return results


def test_an_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:1")  # nothing listens there: refused at once
    core.hub_reachable.cache_clear()
    start = time.time()
    try:
        assert not core.hub_reachable()
        with pytest.raises(core.UsageError, match="neither a folder nor a model id in the local cache"):
            core.check_models(core.Config(model1="nobody/no-such-model"))
    finally:
        core.hub_reachable.cache_clear()
    assert time.time() - start < 30  # seconds, not a download's retries (a wide margin for a busy machine)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(bad_input_runs, case):
    cwd, returncode, err = bad_input_runs[case]
    lines = [line for line in err.splitlines() if line.strip()]
    assert returncode == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and BAD_INPUTS[case][1] in lines[-1], err
    assert not (cwd / "runs").exists() and list(cwd.iterdir()) == []


def assert_same_runs(a, b):
    """Adapters of the final checkpoints are bit-identical and the metrics, samples and evaluation logs agree row
    for row (timings aside): no step is missing or logged twice."""
    last_a, last_b = core.find_checkpoint(a), core.find_checkpoint(b)
    assert last_a.name == last_b.name
    for m in (1, 2):
        ta, tb = (core.load_file(str(p / f"adapter_{m}" / "adapter_model.safetensors")) for p in (last_a, last_b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    def rows(run, name):
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "seconds", "rollout_s", "update_s", "tok_per_s")} for line in open(run / name)]
    for name in ("metrics.jsonl", "samples.jsonl", "evals.jsonl"):
        assert rows(a, name) == rows(b, name), name


def test_resume_is_bit_identical(warm_pair, tmp_path, capsys):
    data = arithmetic_file(tmp_path)
    flags = tiny_run_flags(warm_pair, data, tmp_path / "straight", steps=4) + ["--save-every", "1", "--eval-every", "1"]
    assert core.main(flags) == 0
    split = tiny_run_flags(warm_pair, data, tmp_path / "split", steps=4) + ["--save-every", "1", "--eval-every", "1"]
    assert core.main(split + ["--stop-after", "2"]) == 0
    assert core.find_checkpoint(tmp_path / "split").name == "step_000002"
    assert core.main(["--resume", str(tmp_path / "split"), "--steps", "8"]) == 2  # would stretch the schedules
    assert "--steps cannot change on --resume" in capsys.readouterr().err
    assert core.main(["--resume", str(tmp_path / "split")]) == 0
    assert_same_runs(tmp_path / "straight", tmp_path / "split")
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]  # compute adds up
    assert all(rows[-1][f"sampled_tokens_total_m{m}"] == sum(r[f"sampled_tokens_m{m}"] for r in rows) for m in (1, 2))
    assert len(core.checkpoints(tmp_path / "split")) == 3  # --keep
    # a checkpoint written before the loop's state was named loop_state (state.json: "counters") resumes as exactly
    older = tiny_run_flags(warm_pair, data, tmp_path / "older", steps=4) + ["--save-every", "1", "--eval-every", "1"]
    assert core.main(older + ["--stop-after", "2"]) == 0
    state_file = core.find_checkpoint(tmp_path / "older") / "state.json"
    state = json.loads(state_file.read_text())
    state["counters"] = state.pop("loop_state")
    state_file.write_text(json.dumps(state))
    assert core.main(["--resume", str(tmp_path / "older")]) == 0
    assert_same_runs(tmp_path / "straight", tmp_path / "older")


def test_cuda_rng_states_are_restored_in_device_order(tiny_models, tmp_path, monkeypatch):
    cfg = core.Config(lora_rank=4)
    policies = [make_policy(path, cfg) for path in tiny_models]
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(12)]  # 12 GPUs: cuda_10 sorts before cuda_2
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    folder = core.save_checkpoint(core.Run(cfg, policies, [], tmp_path), 1)
    core.load_checkpoint(folder, policies)
    assert [int(s[0]) for s in restored] == list(range(12))


KILL_DURING_SAVE = """
import os, sys, time
sys.path.insert(0, {here!r})
import core
real_save = core.save_file
def slow_save(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    if "step_000002" in str(path):
        open({marker!r}, "w").close()
        time.sleep(600)  # killed here
core.save_file = slow_save
sys.exit(core.main({flags!r}))
"""


def test_kill_during_checkpoint_write_then_resume(warm_pair, tmp_path):
    data = arithmetic_file(tmp_path)
    base = ["--save-every", "1", "--no-eval-before"]
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "straight", steps=3) + base) == 0
    marker = tmp_path / "writing"
    script = KILL_DURING_SAVE.format(here=str(HERE), marker=str(marker),
                                     flags=tiny_run_flags(warm_pair, data, tmp_path / "killed", steps=3) + base)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # generous: a busy machine may take a minute to get there
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert marker.exists()
    assert core.find_checkpoint(tmp_path / "killed").name == "step_000001"  # the half-written one does not count
    assert len(open(tmp_path / "killed" / "metrics.jsonl").readlines()) == 2  # step 2 ran, its checkpoint did not land
    assert core.main(["--resume", str(tmp_path / "killed")]) == 0  # step 2's rows are dropped and logged again
    assert_same_runs(tmp_path / "straight", tmp_path / "killed")


def test_a_checkpoint_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """What a power loss needs: every file and folder of the checkpoint fsync'd before it is renamed into place,
    then its parent (the rename itself) and the run folder (a new checkpoints/ folder in it)."""
    events, real_replace = [], os.replace
    monkeypatch.setattr(core, "fsync", lambda path: events.append(("fsync", Path(path))))
    monkeypatch.setattr(core.os, "replace", lambda a, b: (events.append(("rename", Path(a), Path(b))), real_replace(a, b)))
    root = tmp_path / "checkpoints"
    tmp, final = root / ".tmp-step_000002", root / "step_000002"
    (tmp / "adapter_1").mkdir(parents=True)
    (tmp / "state.json").write_text("{}")
    (tmp / "adapter_1" / "adapter_model.safetensors").write_bytes(b"new")
    core.durable_rename(tmp, final)
    rename = events.index(("rename", tmp, final))
    assert {e[1] for e in events[:rename] if e[0] == "fsync"} == {tmp, tmp / "adapter_1", tmp / "state.json",
                                                                    tmp / "adapter_1" / "adapter_model.safetensors"}
    assert events[rename + 1:] == [("fsync", root), ("fsync", tmp_path)]
    assert (final / "adapter_1" / "adapter_model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]


@pytest.fixture(scope="module")
def four_steps(warm_pair, tmp_path_factory):
    """A 4-step run saved at every step, and the data it trained on."""
    folder = tmp_path_factory.mktemp("four")
    data = arithmetic_file(folder)
    assert core.main(tiny_run_flags(warm_pair, data, folder / "straight", steps=4) + ["--save-every", "1"]) == 0
    return folder / "straight", data


@pytest.mark.parametrize("damage", ["zero-length optimizer", "truncated adapter", "corrupt state.json"])
def test_a_checkpoint_a_crash_damaged_is_named_passed_over_and_written_anew(warm_pair, four_steps, tmp_path, capsys,
                                                                            damage):
    """The newest of three checkpoints is damaged as a machine crash leaves a file whose data never reached the
    disk: the resume names it in one line, goes on from the one before, and ends as an uninterrupted run; when it
    redoes that step, it writes a good checkpoint in its place."""
    straight, data = four_steps
    out = tmp_path / "run"
    assert core.main(tiny_run_flags(warm_pair, data, out, steps=4) + ["--save-every", "1", "--stop-after", "3"]) == 0
    newest = out / "checkpoints" / "step_000003"
    path = newest / {"zero-length optimizer": "optimizer_1.safetensors", "truncated adapter":
                     "adapter_2/adapter_model.safetensors", "corrupt state.json": "state.json"}[damage]
    path.write_bytes(b"" if damage.startswith("zero") else path.read_bytes()[:len(path.read_bytes()) // 2])
    assert core.checkpoint_damage(newest) and core.checkpoint_damage(out / "checkpoints" / "step_000002") is None
    capsys.readouterr()
    if damage == "zero-length optimizer":  # --adapters passes over it too (the adapters are intact here)
        flags = ["--model1", warm_pair[0], "--model2", warm_pair[1], "--data", str(data), "--eval-only", "--eval-n", "2",
                 "--eval-max-new-tokens", "4", "--device1", "cpu", "--adapters", str(out), "--out", str(tmp_path / "ev")]
        assert core.main(flags) == 0
        assert f"warning: checkpoint {newest} does not load (optimizer_1.safetensors is not" in capsys.readouterr().out
    assert core.main(["--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"warning: checkpoint {newest} does not load") == 1
    assert f"resumed from {out / 'checkpoints' / 'step_000002'} at step 2" in printed
    assert core.checkpoint_damage(newest) is None  # step 3 ran again: its checkpoint written anew
    assert not list((out / "checkpoints").glob(".*"))  # the damaged one, set aside, is gone with it
    assert_same_runs(straight, out)


def test_a_damaged_checkpoint_passed_over_is_never_kept_in_place_of_good_ones(warm_pair, four_steps, tmp_path):
    """A resume sets the damaged checkpoints it passed over aside (.damaged-step_N): a short --keep never deletes
    good checkpoints and keeps a damaged one instead, even when a changed --save-every never saves its step
    again; once the run has saved a later step, the damaged one goes."""
    _, data = four_steps
    out = tmp_path / "run"
    assert core.main(tiny_run_flags(warm_pair, data, out, steps=4) + ["--save-every", "1", "--stop-after", "3"]) == 0
    for step in (2, 3):
        (out / "checkpoints" / f"step_00000{step}" / "rng.safetensors").write_bytes(b"")
    assert core.main(["--resume", str(out), "--keep", "1", "--save-every", "100", "--stop-after", "1"]) == 0
    assert [p.name for p in core.checkpoints(out)] == ["step_000002"]  # step 2 saved anew, 1 pruned
    assert core.checkpoint_damage(out / "checkpoints" / "step_000002") is None
    assert [p.name for p in (out / "checkpoints").glob(".*")] == [".damaged-step_000003"]  # kept aside
    assert core.main(["--resume", str(out)]) == 0  # from step 2 to the end, saving step 4 only
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]


def test_a_run_none_of_whose_checkpoints_loads_stops_with_one_line_and_deletes_nothing(warm_pair, tmp_path):
    data = arithmetic_file(tmp_path)
    out = tmp_path / "run"
    assert core.main(tiny_run_flags(warm_pair, data, out, steps=4) + ["--save-every", "1", "--stop-after", "2"]) == 0
    for folder in core.checkpoints(out):
        (folder / "rng.safetensors").write_bytes(b"")
    done = subprocess.run([sys.executable, str(HERE / "core.py"), "--resume", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: none of the 2 checkpoints in {out / 'checkpoints'} loads (the newest: rng.safetensors is not")
    assert [p.name for p in core.checkpoints(out)] == ["step_000001", "step_000002"]


def test_resume_is_exact_with_hint_dropout(warm_pair, four_steps, tmp_path):
    """At --hint-dropout 0.5 each model's hint-dropout stream decides which offered samples see the hint (with
    --hint-to all, both models are offered it): a resume that did not restore a model's stream would show other
    hints (the other resume tests use 0)."""
    _, data = four_steps
    runs = {}
    for name, stop in (("straight", []), ("split", ["--stop-after", "2"])):
        runs[name] = tmp_path / name
        flags = tiny_run_flags(warm_pair, data, runs[name], steps=4) + ["--save-every", "1", "--hint-dropout", "0.5",
                                                                        "--hint-to", "all"]
        assert core.main(flags + stop) == 0
    assert core.main(["--resume", str(runs["split"])]) == 0
    rows = [json.loads(line) for line in open(runs["straight"] / "metrics.jsonl")]
    assert sum(r["hints_shown"] for r in rows) > 0  # hints were shown, after draws from both models' streams:
    state = json.loads((core.find_checkpoint(runs["straight"]) / "state.json").read_text())
    for m, (version, internal, gauss) in enumerate(state["python_rng"][0], 1):
        fresh = random.Random(core.stream_seed(42, "hint dropout", m, 0)).getstate()
        assert (version, tuple(internal), gauss) != fresh
    assert_same_runs(runs["straight"], runs["split"])


def test_one_signal_handler_for_the_job_keeps_an_ignored_ctrl_c_ignored_outside_the_loop(monkeypatch):
    """main's StopRequest: outside the loop the handler found at its start acts (a job started in the background
    ignores Ctrl-C, and must keep doing so while it loads and evaluates), SIGTERM's default acts as Ctrl-C; in the
    loop the first signal asks for a stop, the same delivered again within a second is one request (a terminal's
    Ctrl-C and torchrun's forwarding of it), and a second one later aborts."""
    now = [100.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: now[0])
    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop = core.StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # ignored before main: still ignored
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.requested
        stop.in_loop = True
        os.kill(os.getpid(), signal.SIGINT)
        now[0] += 0.2
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded
        assert stop.requested and stop.signals == 1
        now[0] += 1.5
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.release()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_the_resume_command_names_the_launcher_the_run_needs(monkeypatch):
    assert core.resume_command(Path("runs/a b")) == "python core.py --resume 'runs/a b'"
    monkeypatch.setattr(core, "dist_info", lambda: (0, 2))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert core.resume_command(Path("runs/x")) == "torchrun --nproc_per_node 2 core.py --resume runs/x"
    monkeypatch.setattr(core, "dist_info", lambda: (0, 8))  # 2 nodes of 4 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert core.resume_command(Path("runs/x")) == ("torchrun --nnodes 2 (and your rendezvous flags) --nproc_per_node 4 "
                                                   "core.py --resume runs/x")


def test_a_signal_while_the_handler_installs_itself_exits_130(monkeypatch, capsys):
    """StopRequest holds its state before it installs itself: a signal right after the install finds it whole."""
    real_signal = signal.signal

    def install_then_signal(signum, handler):
        previous = real_signal(signum, handler)
        if isinstance(handler, core.StopRequest):
            handler(signum, None)  # the signal arrives before signal.signal has returned
        return previous

    monkeypatch.setattr(core.signal, "signal", install_then_signal)
    try:
        assert core.main(["--help"]) == 130
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "interrupted" in capsys.readouterr().err


STOP_ON_ONE_RANK = """
import os, signal, sys
sys.path.insert(0, {here!r})
import core
save_checkpoint, end_of_step = core.save_checkpoint, core.end_of_step
if os.environ["RANK"] == "0":  # Ctrl-C on rank 0 during step 1
    core.end_of_step = lambda run, done: (done == 1 and os.kill(os.getpid(), signal.SIGINT), end_of_step(run, done))[1]
else:  # rank 1's arrives just after the ranks agreed to stop, as it saves
    core.save_checkpoint = lambda run, done: (os.kill(os.getpid(), signal.SIGINT), save_checkpoint(run, done))[1]
sys.exit(core.main(sys.argv[1:]))
"""


def test_torchrun_a_terminal_ctrl_c_stops_every_rank_after_the_step_with_a_checkpoint(warm_pair, tmp_path):
    """A Ctrl-C at the terminal under torchrun: SIGINT to the launcher's process group (torchrun starts each
    worker in a session of its own, and forwards the signal to each). Every rank finishes the step,
    checkpoints and exits 130, given a --shutdown-timeout longer than a step (after it, the launcher kills
    the workers), and the line printed says how to resume with torchrun."""
    flags = ddp_run_flags(warm_pair, arithmetic_file(tmp_path), tmp_path / "ddp", steps=8)
    launch, env = torchrun(HERE / "core.py", "--shutdown-timeout", "120")
    proc = subprocess.Popen(launch + flags + ["--save-every", "100", "--no-eval-before"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 1/"):
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the launcher's group, workers included
            break
    output = "".join(seen) + proc.stdout.read()
    proc.wait(timeout=180)
    assert "KeyboardInterrupt" not in output and "interrupted" not in output, output[-3000:]
    assert f"continue with: torchrun --nproc_per_node 2 core.py --resume {tmp_path / 'ddp'}" in output, output[-3000:]
    [checkpoint] = core.checkpoints(tmp_path / "ddp")
    assert checkpoint.name in ("step_000001", "step_000002") and core.checkpoint_damage(checkpoint) is None


def test_torchrun_a_stop_on_one_rank_and_a_late_signal_on_the_other_stop_both_together(warm_pair, tmp_path):
    """2 gloo processes: rank 0 asks to stop in step 1; rank 1's signal arrives just after the ranks agreed, while
    it saves. That is a first request for the next step, not a second Ctrl-C: both checkpoint and exit 130 together
    (before, rank 1 raised KeyboardInterrupt alone and rank 0 waited for it in a collective), and the resume command
    printed names torchrun with 2 processes."""
    script = tmp_path / "stop_on_one_rank.py"
    script.write_text(STOP_ON_ONE_RANK.format(here=str(HERE)))
    flags = ddp_run_flags(warm_pair, arithmetic_file(tmp_path), tmp_path / "ddp", steps=3)
    launch, env = torchrun(script)
    done = subprocess.run(launch + flags + ["--save-every", "100", "--no-eval-before"], env=env, capture_output=True,
                          text=True, timeout=180)
    output = done.stdout + done.stderr
    assert "KeyboardInterrupt" not in output and "interrupted" not in output, output[-3000:]
    assert "exitcode  : 130" in output or done.returncode == 130, output[-3000:]  # torchrun reports each rank's
    assert [p.name for p in core.checkpoints(tmp_path / "ddp")] == ["step_000001"]
    assert f"continue with: torchrun --nproc_per_node 2 core.py --resume {tmp_path / 'ddp'}" in done.stdout


def test_sigterm_finishes_the_step_saves_exits_130_and_resumes_bit_identical(warm_pair, tmp_path):
    """What timeout, SLURM and Kubernetes send: like Ctrl-C (the same handler), the step finishes, a checkpoint is
    saved, the resume command printed; the resumed run ends bit-identical to an uninterrupted one, no row twice."""
    data = arithmetic_file(tmp_path)
    assert core.main(tiny_run_flags(warm_pair, data, tmp_path / "straight", steps=3) + ["--save-every", "100"]) == 0
    flags = tiny_run_flags(warm_pair, data, tmp_path / "run", steps=3) + ["--save-every", "100"]
    proc = subprocess.Popen([sys.executable, str(HERE / "core.py")] + flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    assert "SIGTERM: finishing this step" in rest and "continue with: python core.py --resume" in rest
    done = int(core.find_checkpoint(tmp_path / "run").name.split("_")[1])
    assert 1 <= done < 3 and done == len(open(tmp_path / "run" / "metrics.jsonl").readlines())
    assert core.main(["--resume", str(tmp_path / "run")]) == 0
    assert_same_runs(tmp_path / "straight", tmp_path / "run")


def test_a_run_resumes_from_any_folder_and_stop_after_holds_for_one_invocation(warm_pair, tmp_path, monkeypatch):
    """Model folders given relative to where the run started are saved as absolute paths; --stop-after stops
    this invocation only, so the resume command it prints runs to the end."""
    data = arithmetic_file(tmp_path)
    monkeypatch.chdir(Path(warm_pair[0]).parent)
    models = ["./" + Path(path).name for path in warm_pair]
    assert core.main(tiny_run_flags(models, data, tmp_path / "run", steps=3) + ["--stop-after", "1"]) == 0
    assert core.find_checkpoint(tmp_path / "run").name == "step_000001"
    monkeypatch.chdir(tmp_path)
    assert core.main(["--resume", str(tmp_path / "run")]) == 0
    assert core.find_checkpoint(tmp_path / "run").name == "step_000003"
    assert (tmp_path / "run" / "eval_after.json").exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(warm_pair, tmp_path, monkeypatch):
    real_evaluate = core.evaluate
    monkeypatch.setattr(core, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C in eval
    flags = tiny_run_flags(warm_pair, arithmetic_file(tmp_path), tmp_path / "run", steps=2)
    assert core.main(flags) == 130
    assert core.checkpoints(tmp_path / "run") == [] and (tmp_path / "run" / "config.json").exists()
    assert core.main(flags) == 2  # --out refuses it, --resume continues it
    monkeypatch.setattr(core, "evaluate", real_evaluate)
    assert core.main(["--resume", str(tmp_path / "run")]) == 0
    assert core.find_checkpoint(tmp_path / "run").name == "step_000002"
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "evals.jsonl")] == [0, 2]


def test_an_eval_only_run_stopped_midway_leaves_a_folder_the_same_command_reuses(warm_pair, tmp_path, monkeypatch):
    real_evaluate = core.evaluate
    monkeypatch.setattr(core, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C in eval
    flags = ["--eval-only", "--model1", warm_pair[0], "--model2", warm_pair[1], "--data", str(arithmetic_file(tmp_path)),
             "--out", str(tmp_path / "ev"), "--eval-n", "2", "--eval-max-new-tokens", "4", "--lora-rank", "4"]
    assert core.main(flags) == 130
    assert list((tmp_path / "ev").iterdir()) == []
    monkeypatch.setattr(core, "evaluate", real_evaluate)
    assert core.main(flags) == 0 and (tmp_path / "ev" / "config.json").exists()


CTRL_C_DURING_IMPORTS = """
import runpy, sys
class Interrupt:  # Ctrl-C arriving while torch is imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["core.py", "--help"]
runpy.run_path({core!r}, run_name="__main__")
"""


def test_ctrl_c_during_the_imports_exits_130_without_a_traceback():
    done = subprocess.run([sys.executable, "-c", CTRL_C_DURING_IMPORTS.format(core=str(HERE / "core.py"))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr


def test_compare_gives_each_run_a_readable_column_with_real_model_paths(tmp_path, capsys):
    """Three runs on real models (long absolute paths): each value in its own column, none run into the next."""
    paths = [f"/home/researcher/models/huggingface/{name}" for name in
             ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "smollm2-360m-instruct-long-name")]
    runs = []
    for i, (m1, m2) in enumerate([(paths[0], paths[1]), (paths[1], paths[2]), (paths[2], paths[0])]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"model1": m1, "model2": m2, "lr": 1e-5 * (i + 1)}))
        (run / "eval_after.json").write_text(json.dumps({"k": 2, "questions": 10, "pass@1_m1": 0.1 * i}))
        runs.append(str(run))
    assert compare.main(runs) == 0
    lines = capsys.readouterr().out.splitlines()
    model1 = next(line for line in lines if line.startswith("  --model1"))
    assert re.split(r"\s{2,}", model1.strip()) == ["--model1", paths[0], paths[1], paths[2]]
    header = lines[0]
    assert [header.index(f"run{i}") for i in range(3)] == [model1.index(p) for p in paths]  # columns line up


STUB_CORE = """
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
out = Path(args[args.index("--resume" if "--resume" in args else "--out") + 1])
if "--resume" not in args:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    if out.name == os.environ.get("STUB_STOP"):
        sys.exit(130)  # stopped after its config was written, as by Ctrl-C
(out / "metrics.jsonl").write_text(json.dumps({"sampled_tokens_total_m1": 10, "sampled_tokens_total_m2": 20}))
for when, value in (("before", 0.1), ("after", 0.3)):
    (out / f"eval_{when}.json").write_text(json.dumps({"pass@1_m1": value, "pass@1_m2": value}))
"""


def test_the_study_names_every_variants_advantages_keeps_its_runs_and_resumes_a_stopped_one(tmp_path, monkeypatch,
                                                                                           capsys):
    """bench/study.py with a stub core.py: under any base each variant names its advantage options (the single
    baselines CORE's scale); its runs stay under --out; a rerun reads finished runs back and resumes a stopped one."""
    stub, log, out = tmp_path / "core.py", tmp_path / "calls.txt", tmp_path / "study"
    stub.write_text(STUB_CORE)
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("STUB_STOP", "core-2")
    argv = ["--core", str(stub), "--out", str(out), "--seeds", "1", "2", "--base", "--data gsm8k --steps 500"]
    with pytest.raises(SystemExit, match="core-2 failed \\(exit 130\\); run the study again to resume it"):
        study.main(argv)
    calls = log.read_text().splitlines()
    assert len(calls) == 12 and all(c.startswith("--data gsm8k --steps 500 ") for c in calls)
    flags = {c.split("--out ")[1]: c for c in calls}
    assert "--adv-group model --adv-scale none" in flags[str(out / "core-1")]
    assert "--adv-group joint --adv-scale std" in flags[str(out / "core-paper-1")]
    assert all("--adv-scale none" in flags[str(out / f"{v}-1")] for v in ("single", "single-k", "alone", "core-cold"))
    monkeypatch.delenv("STUB_STOP")
    log.write_text("")
    study.main(argv)
    assert log.read_text().splitlines() == [f"--resume {out / 'core-2'}"]  # the finished 11 are read back
    table = capsys.readouterr().out
    code = core.code_version()  # its header is generated: the code, device and versions it ran with
    assert f"by core.py sha256 {code['core_sha256'][:12]}, git commit {(code['git_commit'] or 'none')[:12]}" in table
    assert f"torch {torch.__version__}, transformers" in table and table.splitlines()[-1].startswith("# wall time: ")
    assert re.search(r"core\s+30\s+0.300 \(\+0.200\)", table) and f"runs in {out}" in table
    log.write_text("")
    study.main(argv)
    assert log.read_text() == ""
    with pytest.raises(SystemExit, match="holds a study with --base"):
        study.main(argv[:-2] + ["--base=--demo"])


def test_the_table_cuts_a_long_model_name_at_its_end_and_counts_in_words(capsys):
    fingerprint = {"question_set": "0aa11e3f944e" + "0" * 52}
    metrics = core.eval_metrics(records_of([[True, False]], [[False, False]]), 2) | fingerprint
    core.print_table("after", metrics, ["Qwen/Qwen2.5-Coder-0.5B-Instruct-with-a-long-suffix", "m2"])
    out = capsys.readouterr().out
    assert "  Qwen/Qwen2.5-Coder-0.5B-I... " in out  # its start kept
    assert "after: 1 question, 2 samples per model (question set 0aa11e3f944e)" in out
    core.print_table("after", core.eval_metrics(records_of([[True]] * 3, [[False]] * 3), 1) | fingerprint, ["m1", "m2"])
    assert "after: 3 questions, 1 sample per model" in capsys.readouterr().out


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(warm_pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert core.main(tiny_run_flags(warm_pair, arithmetic_file(tmp_path), out, steps=2)) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert core.main(["--resume", str(out)]) == 0
    assert f"{out} is finished (step 2 of 2)" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    ev = tmp_path / "ev"  # an --eval-only run: its evaluation is not run again
    assert core.main(["--eval-only", "--model1", warm_pair[0], "--model2", warm_pair[1], "--out", str(ev), "--data",
                      str(arithmetic_file(tmp_path)), "--eval-n", "2", "--eval-max-new-tokens", "4"]) == 0
    written = (ev / "eval.json").read_bytes()
    capsys.readouterr()
    assert core.main(["--resume", str(ev)]) == 0
    assert f"{ev} is finished (its evaluation is in eval.json)" in capsys.readouterr().out
    assert (ev / "eval.json").read_bytes() == written


def test_out_of_memory_saves_then_resumes_with_smaller_batches(warm_pair, tmp_path, monkeypatch, capsys):
    real_update, calls = core.update_policy, []

    def update_then_oom(*args):
        calls.append(1)
        if len(calls) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_update(*args)

    monkeypatch.setattr(core, "update_policy", update_then_oom)
    flags = tiny_run_flags(warm_pair, arithmetic_file(tmp_path), tmp_path / "run", steps=5) + ["--no-eval-before", "--save-every", "100"]
    assert core.main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: CUDA out of memory at step 2") and "--micro-batch" in err and "--resume" in err
    assert core.find_checkpoint(tmp_path / "run").name == "step_000001"
    # what the message says to do: resume with smaller batches (a change of what the run computes is refused)
    assert core.main(["--resume", str(tmp_path / "run"), "--lr", "0.5", "--micro-batch", "1"]) == 2
    assert "--lr would change" in capsys.readouterr().err
    monkeypatch.setattr(core, "update_policy", real_update)
    assert core.main(["--resume", str(tmp_path / "run"), "--micro-batch", "1", "--gen-batch", "3"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["micro_batch"], saved["gen_batch"], saved["steps"], saved["lr"]) == (1, 3, 5, 1e-3)
    assert core.find_checkpoint(tmp_path / "run").name == "step_000005"


def cuda_out_of_memory():
    """An out-of-memory AcceleratorError as torch 2.13 raises it from a CUDA call (C10_CUDA_CHECK): the message,
    and the error code it sets on the exception (cudaErrorMemoryAllocation)."""
    error = torch.AcceleratorError("CUDA error: out of memory")
    error.error_code = 2
    return error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_an_out_of_memory_from_a_cuda_call_is_told_as_out_of_memory():
    """For bench/gpu_checks.sh: what a CUDA call's out of memory really raises in this torch (pinned host memory
    far beyond any machine's: cudaHostAlloc fails), and that out_of_memory() tells it; if not, the assertion
    message says what was raised (its type, error code and message)."""
    with pytest.raises(Exception) as raised:
        torch.empty(1 << 50, dtype=torch.uint8, pin_memory=True)
    error = raised.value
    assert core.out_of_memory(error), (type(error).__name__, getattr(error, "error_code", None), str(error)[:300])


def test_out_of_memory_is_told_by_type_and_error_code():
    assert core.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert core.out_of_memory(cuda_out_of_memory())
    assert core.out_of_memory(torch.AcceleratorError("CUDA error: out of memory"))  # made without a code
    illegal = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    illegal.error_code = 700
    assert not core.out_of_memory(illegal) and not core.out_of_memory(RuntimeError("out of memory"))
    worded = torch.AcceleratorError("CUDA error: out of memory (reported by another call)")
    worded.error_code = 700  # the code wins over the words
    assert not core.out_of_memory(worded)


@pytest.mark.parametrize("make_error", [lambda: torch.OutOfMemoryError("CUDA out of memory"), cuda_out_of_memory],
                         ids=["OutOfMemoryError", "AcceleratorError"])
@pytest.mark.parametrize("where", ["capture", "first-use check", "update"])
def test_out_of_memory_of_either_type_anywhere_in_a_step_says_how_to_resume(warm_pair, tmp_path, fake_cuda, monkeypatch,
                                                                           capsys, make_error, where):
    """CUDA out of memory as torch.OutOfMemoryError or as an AcceleratorError (a graph's instantiation raises it so),
    in a rollout's capture, the GPU sampler's first-use check, or the update: one line that says how to resume
    with smaller batches, exit 1 (before, the AcceleratorError was a raw traceback)."""
    error, captures = make_error(), []
    monkeypatch.setattr(core, "fast_decoding", lambda model, cfg: True)  # the GPU sampler, its capture faked
    monkeypatch.setattr(core, "sample_fast", functools.partial(core.sample_fast, cuda_graph=True))

    def record(step, pool):
        captures.append(1)
        if where == "capture" and len(captures) > 1:  # after the first-use check's, a rollout's capture
            raise error
        graph = EagerGraph(step)
        return graph, graph.output

    monkeypatch.setattr(core, "record_graph", record)
    def fail(*args):
        raise error

    real_update, updates = core.update_policy, []

    def update_then_fail(*args):  # step 1's two updates, then out of memory in step 2
        updates.append(1)
        return real_update(*args) if len(updates) <= 2 else fail()

    if where == "first-use check":
        monkeypatch.setattr(core, "static_cache", fail)
    if where == "update":
        monkeypatch.setattr(core, "update_policy", update_then_fail)
    flags = tiny_run_flags(warm_pair, arithmetic_file(tmp_path), tmp_path / "run", steps=3)
    assert core.main(flags + ["--no-eval-before", "--save-every", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    step = 2 if where == "update" else 1
    assert err.startswith(f"error: CUDA out of memory at step {step}; continue from the last checkpoint with "
                          f"smaller batches: python core.py --resume {tmp_path / 'run'} --gen-batch"), err
    assert [p.name for p in core.checkpoints(tmp_path / "run")] == (["step_000001"] if step == 2 else [])


def test_three_non_finite_updates_in_a_row_stop_the_run(warm_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(core, "update_policy", lambda *a: NO_UPDATE | {"loss": float("nan"), "grad_norm": float("nan"), "tokens": 1,
                                                                       "skipped": 1})
    flags = tiny_run_flags(warm_pair, arithmetic_file(tmp_path), tmp_path / "run", steps=10) + ["--no-eval-before"]
    assert core.main(flags) == 1
    captured = capsys.readouterr()
    assert "3 non-finite updates in a row at step 3" in captured.err and captured.out.count("update skipped") == 6
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["nonfinite_m1"] for r in rows] == [1, 1, 1]


def test_too_long_prompts_are_skipped_and_counted(warm_pair, tmp_path, capsys):
    rows = [{"question": "What is " + "1 + " * 300 + "1 ?", "answer": "301"}] * 4
    rows += [{"question": p.question, "answer": p.gold} for p in core.arithmetic_problems(8, 5)]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    flags = tiny_run_flags(warm_pair, data, tmp_path / "run", steps=3) + ["--batch-questions", "4", "--no-eval-before"]
    assert core.main(flags) == 0
    assert "problem(s) skipped" in capsys.readouterr().out
    state = json.loads((core.find_checkpoint(tmp_path / "run") / "state.json").read_text())
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert state["loop_state"]["skipped_problems"] == rows[-1]["skipped_problems_total"] > 0
    assert [r["skipped_problems_total"] for r in rows] == list(itertools.accumulate(r["skipped_problems"] for r in rows))


def test_answer_parsing_on_random_strings_never_raises_and_agrees_with_itself():
    """On 3,000 random strings of answer-like pieces: no exception; a number or integer answer is the canonical form
    of the number it reads, a choice is a letter A-D, and the text is judged correct against the gold it yields."""
    rng = random.Random(0)
    atoms = ["\\boxed{", "\\boxed ", "{", "}", "\\frac", "\\dfrac{", "####", "answer is", "Answer:", "$", "\\text{", "\\left(",
             "-", ".", ",", "/", "1", "42", "9" * 30, "0.5", "x", "=", "\n", " ", "(A)", "B", "é", "∑", "−", "\\", "%", "^\\circ",
             "1e999", "\x00", "🙂", "final answer", "\\fbox{"]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        for kind in ("number", "math", "integer", "choice"):
            answer = core.extract_answer(text, kind)
            assert answer is None or isinstance(answer, str)
            core.is_correct(text, "1", kind)
            if answer is None or kind == "math":
                continue
            if kind == "choice":
                assert answer in ("A", "B", "C", "D")
            else:
                assert core.format_number(core.parse_number(answer)) == answer, (text, kind)
                assert kind == "number" or "/" not in answer
            assert core.is_correct(text, answer, kind), (text, kind)
        assert isinstance(core.strip_answer(text), str)


# -----------------------------------------------------------------------------
# Provenance: each invocation's code, libraries, device, models and data; each evaluation's question set

def test_the_question_set_fingerprint_changes_with_one_question_or_one_setting_and_nothing_else():
    problems = core.arithmetic_problems(6, 0)
    cfg = core.Config()
    fingerprint = core.question_set(problems, core.eval_settings(cfg))
    assert fingerprint == core.question_set(core.arithmetic_problems(6, 0), core.eval_settings(core.Config()))
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    renamed = [core.replace(p, id=f"other-{i}", source="/elsewhere/test.jsonl") for i, p in enumerate(problems)]
    assert core.question_set(renamed, core.eval_settings(cfg)) == fingerprint  # the same questions elsewhere
    changed = [problems[:2] + [core.replace(problems[2], question="What is 9 + 9 ?")] + problems[3:],
               problems[:2] + [core.replace(problems[2], gold="17")] + problems[3:],
               problems[:5], problems[::-1]]
    for other in changed:
        assert core.question_set(other, core.eval_settings(cfg)) != fingerprint
    for name, value in [("eval_k", 3), ("eval_max_new_tokens", 99), ("temperature", 0.6), ("top_p", 0.95),
                        ("seed", 1)]:
        assert core.question_set(problems, core.eval_settings(core.replace(cfg, **{name: value}))) != fingerprint
    for name, value in [("lr", 1e-3), ("k", 4), ("gen_batch", 8), ("max_new_tokens", 9)]:  # training only
        assert core.question_set(problems, core.eval_settings(core.replace(cfg, **{name: value}))) == fingerprint
    template = dict(core.FORMAT_INSTRUCTION, number="Answer in \\boxed{}.")  # the prompt template is in it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core, "FORMAT_INSTRUCTION", template)
        assert core.question_set(problems, core.eval_settings(cfg)) != fingerprint


def test_ranks_that_hold_different_test_questions_stop_the_evaluation(tiny_models, monkeypatch):
    cfg = core.Config(lora_rank=4, eval_k=1, eval_max_new_tokens=2)
    policy = core.load_policy(1, tiny_models[0], torch.device("cpu"), cfg)
    problems = core.arithmetic_problems(4, 0)
    other = core.question_set(problems[:3], core.eval_settings(cfg))  # rank 1 read one question fewer
    sampled = []
    monkeypatch.setattr(core, "dist_info", lambda: (0, 2))
    monkeypatch.setattr(core, "generate", lambda *args, **kwargs: sampled.append(1))
    monkeypatch.setattr(core, "all_gather", lambda mine: [mine, other])  # the fingerprints: rank 1's differs
    with pytest.raises(core.TrainingError, match="the 2 processes hold different test questions"):
        core.evaluate([policy], problems, cfg, "test")
    assert not sampled  # told before any sampling
    monkeypatch.undo()
    monkeypatch.setattr(core, "dist_info", lambda: (0, 2))  # the same set on both: it goes on
    monkeypatch.setattr(core, "all_gather", lambda mine: [mine, mine if isinstance(mine, str) else []])
    metrics, _ = core.evaluate([policy], problems, cfg, "test")
    assert metrics["question_set"] == core.question_set(problems, core.eval_settings(cfg))


def eval_only_flags(models, data, out, *extra):
    return ["--model1", models[0], "--model2", models[1], "--data", str(data), "--out", str(out), "--eval-only",
            "--eval-k", "1", "--eval-max-new-tokens", "3", "--lora-rank", "4", "--device1", "cpu", *extra]


def test_compare_marks_a_run_on_other_questions_or_code_and_leaves_identical_runs_unmarked(tiny_models, tmp_path,
                                                                                          capsys):
    data = arithmetic_file(tmp_path)
    subset = write_jsonl(tmp_path / "subset.jsonl", [json.loads(line) for line in open(data)][:-1])  # one fewer
    for name, flags in [("a", []), ("b", []), ("other", []), ("hotter", ["--temperature", "1.0"])]:
        assert core.main(eval_only_flags(tiny_models, subset if name == "other" else data, tmp_path / name, *flags)) == 0
    capsys.readouterr()
    runs = [str(tmp_path / name) for name in ("a", "b", "other", "hotter")]
    assert compare.main(runs) == 0
    out = capsys.readouterr().out
    fingerprint = json.loads((tmp_path / "a" / "eval.json").read_text())["question_set"]
    assert re.search(rf"question set\s+{fingerprint[:12]}\s+{fingerprint[:12]}\s+\w{{12}}\s+\w{{12}}", out)
    marks = [line for line in out.splitlines() if line.startswith("!")]
    assert [line.split()[1] for line in marks] == ["other", "hotter"], out  # b is identical: unmarked
    assert "question set" in marks[0] and marks[1].endswith(": eval temperature 0.7 vs 1.0")  # settings only
    assert "code" not in marks[0] and "torch" not in marks[0]
    record = tmp_path / "b" / "provenance.json"  # resumed on other code and another torch major version
    rows = json.loads(record.read_text())
    rows.append(json.loads(json.dumps(rows[-1])))
    rows[-1]["code"]["core_sha256"], rows[-1]["versions"]["torch"] = "f" * 64, "3.0.0"
    record.write_text(json.dumps(rows))
    assert compare.main(runs[:2]) == 0
    assert "! b is not like for like with a: code" in capsys.readouterr().out
    [mark] = compare.provenance_marks(runs[:2])
    assert "torch major 2 vs 3" in mark and mark.endswith("its invocations (provenance.json) ran different code")
    older = tmp_path / "older"  # a run from before provenance: nothing to compare, and not the reference
    older.mkdir()
    (older / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    record = json.loads((tmp_path / "a" / "eval.json").read_text())
    (older / "eval.json").write_text(json.dumps({k: v for k, v in record.items() if k not in ("question_set",
                                                                                             "eval_settings")}))
    marks = compare.provenance_marks([str(older), runs[0], runs[2]])
    assert [line.split()[1] for line in marks] == ["other"] and "like with a:" in marks[0]
    resumed = tmp_path / "resumed"  # evaluated before training by older code, after by today's: not "mixed"
    resumed.mkdir()
    (resumed / "eval_before.json").write_text((older / "eval.json").read_text())
    (resumed / "eval_after.json").write_text(json.dumps(record))
    assert compare.provenance_marks([runs[0], str(resumed)]) == []


def test_a_run_records_its_provenance_and_a_resume_on_changed_data_warns_and_records_both(warm_pair, tmp_path,
                                                                                         capsys):
    data, out = arithmetic_file(tmp_path), tmp_path / "run"
    assert core.main(tiny_run_flags(warm_pair, data, out) + ["--save-every", "1", "--stop-after", "1"]) == 0
    first = json.loads((out / "provenance.json").read_text())
    assert len(first) == 1 and not first[0]["resumed"]
    assert first[0]["command"].startswith("core.py --model1")
    assert first[0]["code"]["core_sha256"] == core.file_sha256(HERE / "core.py")
    assert set(first[0]["versions"]) == {"python", "torch", "transformers", "tokenizers", "safetensors"}
    assert first[0]["devices"]["model1"]["device"] == "cpu" and first[0]["world_size"] == 1
    weights = Path(warm_pair[0]) / "model.safetensors"
    assert first[0]["models"]["model1"]["sha256"]["model.safetensors"] == core.file_sha256(weights)
    assert first[0]["data"] == {"files": {str(data.resolve()): core.file_sha256(data)}, "train_questions": 9,
                                "test_questions": 2}
    capsys.readouterr()
    rows = [json.loads(line) for line in open(data)]
    write_jsonl(data, rows[:9] + [{"question": "What is 7 + 5 ?", "answer": "12"}] + rows[10:])  # a test question
    assert core.main(["--resume", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: resumed")]
    assert warnings == [f"warning: resumed with another data files {data.resolve()}: "
                        f"{first[0]['data']['files'][str(data.resolve())]} before, {core.file_sha256(data)} now "
                        f"(provenance.json keeps both)"]
    both = json.loads((out / "provenance.json").read_text())
    assert len(both) == 2 and both[0] == first[0] and both[1]["resumed"]
    assert both[1]["data"]["files"][str(data.resolve())] == core.file_sha256(data)
    before, after = (json.loads((out / f"eval_{when}.json").read_text())["question_set"] for when in ("before", "after"))
    assert before != after  # and tools/compare.py says so
    assert any("differ in question set" in line for line in compare.provenance_marks([str(out)]))


def test_provenance_asks_no_network_and_reads_a_hub_models_commit_from_the_cache(tiny_models, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is blocked in this test")
    for module, name in [(core.socket, "create_connection"), (core.socket, "getaddrinfo"),
                         (core.socket.socket, "connect"), (core.urllib.request, "urlopen")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("c0ffee" * 6 + "abcd")
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("c0ffee" * 6 + "abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert core.model_source("someone/tiny") == {"hub_id": "someone/tiny", "commit": "c0ffee" * 6 + "abcd"}
    assert core.model_source("someone/not-cached") == {"hub_id": "someone/not-cached", "commit": "unknown"}
    hub_reachable = core.hub_reachable
    monkeypatch.setattr(core, "hub_reachable", lambda: pytest.fail("a cached model needs no hub"))
    core.check_models(core.Config(model1="someone/tiny", model2=tiny_models[1]))  # found in the cache alone
    monkeypatch.setattr(core, "hub_reachable", hub_reachable)
    out = tmp_path / "run"
    assert core.main(eval_only_flags(tiny_models, arithmetic_file(tmp_path), out)) == 0
    assert json.loads((out / "provenance.json").read_text())[0]["models"]["model2"]["folder"] == tiny_models[1]
    assert attempts == []


def test_an_unreadable_provenance_record_is_kept_aside_and_a_new_one_begins(tmp_path, capsys):
    (tmp_path / "provenance.json").write_text('[{"started": "2026-12-07", "code": {"core_sh')  # cut short
    core.record_provenance(tmp_path, {"started": "now"})
    assert json.loads((tmp_path / "provenance.json").read_text()) == [{"started": "now"}]
    assert (tmp_path / "provenance.json.unreadable").read_text().startswith('[{"started": "2026-12-07"')
    assert "could not be read: kept as provenance.json.unreadable" in capsys.readouterr().out


def test_the_git_commit_is_read_without_git_and_outside_a_checkout_is_none(tmp_path):
    assert core.git_commit(tmp_path) is None
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs with: peeled\n" + "ab" * 20 + " refs/heads/main\n")
    (tmp_path / "repo" / "src").mkdir()
    assert core.git_commit(tmp_path / "repo" / "src") == "ab" * 20  # a packed ref, from a subfolder
    (git / "refs" / "heads" / "main").write_text("cd" * 20 + "\n")
    assert core.git_commit(tmp_path / "repo") == "cd" * 20  # a loose ref wins
    (git / "HEAD").write_text("ef" * 20 + "\n")
    assert core.git_commit(tmp_path / "repo") == "ef" * 20  # a detached HEAD
    (tmp_path / "worktree").mkdir()
    (tmp_path / "worktree" / ".git").write_text(f"gitdir: {git}\n")
    assert core.git_commit(tmp_path / "worktree") == "ef" * 20


# -----------------------------------------------------------------------------
# Documentation: every relative link in README.md and docs/ resolves, to a file and to a heading

def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lowercase, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    root = Path(__file__).resolve().parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert len(pages) > 1
    broken, links = [], 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no links in code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            links += 1
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in {github_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(
                    encoding="utf-8"), flags=re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert links > 50 and not broken, broken
