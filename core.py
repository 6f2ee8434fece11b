"""
CORE: Collaborative Reasoning via Cross Teaching (arXiv 2601.21600), in one file.

Two small LLMs learn together with reinforcement learning. For every training question:

  Round A (cold)    each model samples K solutions from the plain prompt; each is checked against the gold
                    answer: correctness c in {0, 1}.
  Teacher and hint  the highest-reward correct round-A trace is the teacher; its final-answer statements are
                    stripped and the rest (at most 1536 of the receiver's tokens) is the hint.
  Round B (rescue)  each model samples K' more solutions. A model that failed every cold sample sees the hint
                    with probability 1 - hint_dropout; everyone else resamples cold.
  Reward            R = w1*c + w2*DPP-diversity + lambda_cm*complementarity + rescue bonus + format bonus,
                    the diversity terms being determinant gains of n-gram features over correct traces
                    (halfway through training w2 drops to w2 * div_anneal and lambda_cm rises from 0).
  Update            A = (R - mean) / (std + 1e-4) over all traces of the question (both models, both rounds);
                    each model's LoRA adapter takes one AdamW step on the token-level mean of
                    w * (-A log pi(token) + beta * KL(pi || base)), w = 1 for round A and 0.8 for round B;
                    log pi is the model's own (temperature 1, no top-p), as in the official code.

The headline metric is Team Pass@k: a test question is solved if any of the 2 x k cold samples (k per model,
no hints) is correct.

  python core.py --demo                       # the whole pipeline on CPU with two tiny models, < 1 minute
  python core.py --data gsm8k --steps 500     # the paper's Qwen2.5-3B + Qwen3-4B pair on one GPU
  python core.py --data math500 --eval-only --adapters runs/gsm8k-.../checkpoints/step_000500

Departures from the paper (docs/method.md, "Known deviations"): a real determinant gain for DPP-lite and
complementarity, a format bonus, epsilon 1e-4, unbiased Pass@j; options for per-model advantages, hinted
traces trained for the cold prompt, and baselines at an equal budget (--single, --model2 none).

Read top-down: Config (to skim), then the method: core_step (round A, the teacher's hint, round B, rewards,
advantages), rewards, the update (update_policy, policy_loss), the loop (train). Then the building blocks:
LoRA, rollouts, the GPU sampler, answers, data, evaluation, checkpoints, distributed, logging; the command
line; the demo as an appendix. Tools a run does not need are in tools/ (curves.py, compare.py, export.py).
"""

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import weakref
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path

try:
    import torch
    import torch.nn as nn
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file
    from torch.utils.checkpoint import checkpoint
except KeyboardInterrupt:  # Ctrl-C while the libraries load: a quiet exit
    sys.exit(130)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


class TrainingError(Exception):
    """A run that cannot go on (non-finite updates, out of memory): one line, exit 1, checkpoints kept."""


# -----------------------------------------------------------------------------
# Config: one field per setting, made by arg(): its default, its --help line, its --help section, its kind

def arg(default, help, section=None, kind=None, **extra):
    """A Config field: its default, --help line and the --help section it opens; kind "training" (--eval-only
    refuses it) or "execution" (--resume may change it); extra: argparse's (choices)."""
    return field(default=default, metadata={"help": help, "section": section, "kind": kind, **extra})


DATASET_NAMES = ("gsm8k", "math", "math500", "aime24", "aime25", "gpqa")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Config:
    data: str = arg("gsm8k", f"dataset: one of {', '.join(DATASET_NAMES)}, or a JSONL file or folder",
                    section="what to run")
    data_dir: str = arg("", "folder with <dataset>/<split>.jsonl (or gpqa/dataset.zip); else the cache")
    model1: str = arg("Qwen/Qwen2.5-3B-Instruct", "first model: Hugging Face id or local folder")
    model2: str = arg("Qwen/Qwen3-4B-Instruct-2507", "second model: Hugging Face id, local folder, or none "
                                                     "(model 1 alone)")
    out: str = arg("", "output folder (default runs/<data>-<timestamp>); must be new or empty")
    steps: int = arg(500, "training steps (one AdamW step per model per step)", kind="training")
    eval_only: bool = arg(False, "only evaluate (optionally with --adapters), no training")
    adapters: str = arg("", "checkpoint folder (or run folder: newest checkpoint) whose adapters to load")
    resume: str = arg("", "run folder to continue from its newest checkpoint")
    demo: bool = arg(False, "run the whole pipeline on CPU with two tiny models and generated arithmetic")
    single: bool = arg(False, "ablation: each model trained alone with GRPO (no round B, no cross terms)",
                       kind="training")
    single_samples: int = arg(0, "--single: samples per model and question (0: K + K', CORE's budget)",
                              kind="training")
    no_rescue: bool = arg(False, "ablation: round B never shows hints (plain resamples, no rescue bonus)",
                          kind="training")

    k: int = arg(2, "cold samples per model per question in round A (paper K)",
                 section="cross-teaching protocol", kind="training")
    k_rescue: int = arg(1, "samples per model per question in round B (paper K')", kind="training")
    hint_dropout: float = arg(0.5, "probability that an eligible round-B sample is NOT shown the hint",
                              kind="training")
    hint_to: str = arg("failed", "who may see the hint in round B", choices=("failed", "all"),
                       kind="training")
    hint_tokens: int = arg(1536, "hint cap, in tokens of the receiving model's tokenizer", kind="training")

    temperature: float = arg(0.7, "sampling temperature (0 = greedy)", section="sampling")
    top_p: float = arg(0.9, "nucleus sampling mass")
    max_new_tokens: int = arg(3072, "token budget per sampled solution during training", kind="training")
    max_prompt_tokens: int = arg(4096, "longer prompts are skipped (counted) in training", kind="training")
    gen_batch: int = arg(64, "rows per sampling batch", kind="execution")
    decoder: str = arg("graphs", "GPU sampler: each decode step a CUDA graph, or the reference loop (the "
                                 "CPU's)", choices=("graphs", "reference"), kind="execution")

    w_correct: float = arg(1.0, "weight w1 of correctness c", section="reward", kind="training")
    w_div: float = arg(0.2, "weight w2 of DPP-lite diversity in the first half of training", kind="training")
    div_anneal: float = arg(0.25, "second-half diversity weight = w_div * div_anneal (0.2 -> 0.05)",
                            kind="training")
    lambda_cm: float = arg(0.1, "weight of cross-model complementarity in the second half (0 in the first)",
                           kind="training")
    rescue_bonus: float = arg(0.15, "bonus: a correct round-B trace of a model that failed cold, hint shown",
                              kind="training")
    w_format: float = arg(0.1, "bonus for an explicit final answer (boxed; numbers, letters also after "
                               "'####' or 'answer is/:/=')", kind="training")
    dpp_eps: float = arg(1e-3, "ridge eps in the DPP kernel K = phi phi^T + eps I", kind="training")
    ngram_dim: int = arg(4096, "hashed word n-gram feature size for the DPP kernel", kind="training")

    lora_rank: int = arg(16, "LoRA rank r", section="update")
    lora_alpha: float = arg(32.0, "LoRA alpha (scale = alpha / r)")
    lora_targets: str = arg(LORA_TARGETS, "comma-separated module names that get a LoRA adapter")
    lr: float = arg(1e-5, "AdamW learning rate (10% linear warm-up, then cosine to 0)", kind="training")
    weight_decay: float = arg(0.01, "AdamW weight decay", kind="training")
    grad_clip: float = arg(1.0, "gradient-norm clip per model", kind="training")
    beta_kl: float = arg(0.04, "weight beta of the k3 KL to the adapter-disabled base model", kind="training")
    round_b_weight: float = arg(0.8, "loss weight of round-B traces", kind="training")
    round_b_context: str = arg("hinted", "train a hinted trace on its hinted prompt (the paper) or on the "
                                         "cold one, importance-weighted (cold)", choices=("hinted", "cold"),
                               kind="training")
    adv_group: str = arg("joint", "advantage baseline: all traces of the question (joint, the paper) or each "
                                  "model's own (model)", choices=("joint", "model"), kind="training")
    adv_scale: str = arg("std", "advantage scale: the group's std (std, the paper) or reward units (none, "
                                "Dr. GRPO)", choices=("std", "none"), kind="training")
    batch_questions: int = arg(4, "training questions per step", kind="training")
    train_n: int = arg(1000, "training questions drawn (seeded) from the train split", kind="training")
    micro_batch: int = arg(8, "sequences per forward pass in the update", kind="execution")
    no_grad_checkpoint: bool = arg(False, "keep activations, do not recompute them (faster, more memory)",
                                   kind="execution")
    logprob_chunk: int = arg(512, "positions per log-softmax chunk (full logits are never materialised)",
                             kind="execution")

    eval_n: int = arg(0, "test questions to evaluate (0 = all)", section="evaluation")
    eval_k: int = arg(2, "samples per model per test question (the k of Pass@k)")
    eval_max_new_tokens: int = arg(4096, "token budget per evaluation sample")
    no_eval_before: bool = arg(False, "skip the evaluation before training", kind="training")
    eval_every: int = arg(0, "also evaluate every this many steps, into evals.jsonl (0: never)",
                          kind="training")

    save_every: int = arg(50, "save a checkpoint every this many steps (and always at the end)",
                          section="bookkeeping", kind="execution")
    keep: int = arg(3, "checkpoints kept on disk", kind="execution")
    stop_after: int = arg(0, "stop (with a checkpoint) after this many steps of this invocation (0: never)",
                          kind="execution")
    show: int = arg(0, "questions per step whose rounds, hints and rewards are printed in full",
                    kind="execution")
    seed: int = arg(42, "seed for data order, LoRA init, hint dropout and sampling")
    device1: str = arg("", "device of model 1 (default cuda if available, else cpu)", kind="execution")
    device2: str = arg("", "device of model 2 (default: same rule as --device1)", kind="execution")
    dtype: str = arg("auto", "model weights' dtype (auto: bfloat16 on CUDA, else float32; LoRA is float32)",
                     choices=("auto", "bfloat16", "float32"))


TRAINING_ONLY = {f.name for f in fields(Config) if f.metadata["kind"] == "training"}
RESUME_OVERRIDES = {f.name for f in fields(Config) if f.metadata["kind"] == "execution"}


# -----------------------------------------------------------------------------
# The CORE step: round A, the teacher's hint, round B, rewards, advantages (train then updates each model)

@dataclass
class Trace:
    model: int                # the model that sampled it: 1 or 2
    round: str                # "A" (cold) or "B" (rescue)
    prompt_ids: list          # exact prompt it was sampled from (hint included)
    completion_ids: list      # exact sampled token ids (the end-of-sequence token included)
    text: str                 # decoded completion
    correct: bool             # c(tau)
    rollout_logprobs: list = None  # log-probability of each sampled token as drawn (softmax(logits / T))
    hint_shown: bool = False  # round B: the hint was in the prompt
    hint_leaks: bool = False  # ... and the gold can be read from it (gold_visible)
    cold_prompt_ids: list = None  # ... and, under --round-b-context cold, the question's prompt without it
    truncated: bool = False   # hit the token budget without an end-of-sequence token
    failed_cold: bool = False  # its model got every round-A sample of this question wrong (set by core_step)
    reward: float = 0.0       # R(tau)
    terms: dict = field(default_factory=dict)  # correct, div, cm (unweighted); rescue, format (as paid)
    advantage: float = 0.0    # A(tau)


@dataclass
class Policy:
    name: str                             # for logs: the folder name or the hub id
    model: nn.Module                      # transformers causal LM with LoRA layers
    tokenizer: object                     # its own tokenizer (prompts, hints and caps use it)
    device: torch.device
    eos_ids: set                          # token ids that end a sample
    pad_id: int
    context: int                          # max positions of the model
    optimizer: object = None              # AdamW over the LoRA parameters only
    generator: torch.Generator = None     # sampling randomness
    hint_draws: random.Random = None      # round B's hint dropout: a stream of its own, like `generator`
    fast_agrees: bool = None              # the GPU sampler agreed with the reference loop (None: unchecked)


def core_step(policies, problems, cfg, schedule):
    """Rounds A and B of one step, then each trace's reward and advantage (schedule: reward_schedule) -> per
    question, its traces (both models, both rounds) and its hint (None: no hint). train then updates."""
    groups = round_a(policies, problems, cfg)
    solved = [{t.model for t in group if t.correct} for group in groups]  # per question: who solved it cold
    hints = [None] * len(problems)
    if not cfg.single:  # --single: each model alone, no round B
        if not cfg.no_rescue:  # --no-rescue: round B resamples without hints
            hints = [teacher_hint(group, problem, cfg, schedule) for group, problem in zip(groups, problems)]
        round_b(policies, problems, groups, hints, solved, cfg)
    for problem, group, solvers in zip(problems, groups, solved):
        for t in group:  # round A's verdict on the trace's model: the rescue bonus reads it
            t.failed_cold = t.model not in solvers
        score_traces(group, problem.kind, cfg, schedule)
        set_advantages(group, cfg)
    return groups, hints


def round_a(policies, problems, cfg):
    """K cold samples per model and question -> one group of traces per question."""
    n = (cfg.single_samples or cfg.k + cfg.k_rescue) if cfg.single else cfg.k  # --single: CORE's K + K'
    requests = [[(q, None) for q in range(len(problems))] for _ in policies]  # per model: (question, no hint)
    groups = [[] for _ in problems]
    sample_round(policies, problems, requests, groups, cfg, "A", n=n)
    return groups


def teacher_hint(group, problem, cfg, schedule):
    """The hint of one question: the correct round-A trace of highest reward, final answers stripped (None if
    none is correct or only the answer is left); under --hint-to failed, a model reads its peer's trace."""
    # The reward here is over round A alone (round B is not sampled yet) and comes before core_step sets
    # failed_cold: that is safe, as the one term that reads failed_cold, the rescue bonus, is round B's only.
    rewards, _ = score_group(group, problem.kind, cfg, schedule)
    best = max((r for t, r in zip(group, rewards) if t.correct), default=None)
    if best is None:
        return None
    tied = [t for t, r in zip(group, rewards) if t.correct and r >= best - 1e-9]
    teacher = min(tied, key=lambda t: zlib.crc32(t.text.encode()))  # a tie goes by the text, never the model
    hint = strip_answer(teacher.text)
    return None if not hint or is_bare_answer(hint, problem.gold, problem.kind) else hint


def round_b(policies, problems, groups, hints, solved, cfg):
    """K' more samples per model and question, added to the groups. A model that failed cold (any model with
    --hint-to all) is offered the hint, and each of its samples shows it with probability 1 - hint_dropout;
    the others resample cold, as does a sample whose prompt has no room left for the hint (hint_for)."""
    requests = [[] for _ in policies]  # per model: (question, hint or None), one request per sample
    for q, hint in enumerate(hints):
        for m, policy in enumerate(policies, 1):
            offered = hint is not None and (m not in solved[q] or cfg.hint_to == "all")
            for _ in range(cfg.k_rescue):  # a draw from the model's hint-dropout stream for offered ones only
                shown = offered and policy.hint_draws.random() >= cfg.hint_dropout
                requests[m - 1].append((q, hint_for(policy, problems[q], hint, cfg) if shown else None))
    sample_round(policies, problems, requests, groups, cfg, "B")


def sample_round(policies, problems, requests, groups, cfg, round_name, n=1):
    """Samples requests[m - 1] = [(question index, hint or None), ...] n times each with model m, checks every
    answer and adds each Trace to groups[question index]."""
    progress = Progress(f"round {round_name}", n * sum(map(len, requests)))
    for m, (policy, asks) in enumerate(zip(policies, requests), 1):
        prompts = [build_prompt(policy.tokenizer, problems[q].question, problems[q].kind, hint)
                   for q, hint in asks]
        outputs = generate(policy, prompts, cfg.max_new_tokens, cfg, n, progress=progress)
        for i, ((q, hint), prompt) in enumerate(zip(asks, prompts)):
            problem = problems[q]
            for ids, text, logprobs in outputs[i * n:(i + 1) * n]:  # this prompt's n samples
                groups[q].append(Trace(
                    model=m, round=round_name, prompt_ids=prompt, completion_ids=ids, text=text,
                    correct=is_correct(text, problem.gold, problem.kind), rollout_logprobs=logprobs,
                    hint_shown=hint is not None, hint_leaks=hint is not None and gold_visible(hint, problem),
                    cold_prompt_ids=cold_prompt(policy, problem, hint, cfg),
                    truncated=hit_budget(ids, cfg.max_new_tokens, policy.eos_ids)))
    progress.close()


def score_traces(group, kind, cfg, schedule):
    """R(tau) and its terms for every trace of one question, scored together (the diversity and
    complementarity pools are the whole group); --single scores each model's traces alone."""
    pools = baseline_groups(group, cfg) if cfg.single else [group]
    for traces in pools:
        rewards, terms = score_group(traces, kind, cfg, schedule)
        for t, reward, trace_terms in zip(traces, rewards, terms):
            t.reward, t.terms = reward, trace_terms


def set_advantages(group, cfg):
    """A(tau): group_advantages over each set of a question's traces that share a baseline."""
    for traces in baseline_groups(group, cfg):
        advantages = group_advantages([t.reward for t in traces], cfg.adv_scale)
        for t, advantage in zip(traces, advantages.tolist()):
            t.advantage = advantage


def baseline_groups(group, cfg):
    """The traces of one question that share a baseline: all of them (--adv-group joint, the paper), or each
    model's own (--adv-group model, and --single)."""
    if cfg.single or cfg.adv_group == "model":
        return [[t for t in group if t.model == m] for m in sorted({t.model for t in group})]
    return [group]


# -----------------------------------------------------------------------------
# Rewards: pure functions of one question's traces

def score_group(traces, kind, cfg, schedule):
    """R(tau) = w1*c + w_div*div + lambda_cm*cm + rescue + format of each of one question's traces (schedule:
    reward_schedule's w_div and lambda_cm) -> (rewards [n], terms [n]: a dict each, as in Trace.terms)."""
    phi = torch.stack([ngram_features(t.text, cfg.ngram_dim) for t in traces])  # [n, ngram_dim]
    correct, models = [t.correct for t in traces], [t.model for t in traces]
    diversity = diversity_rewards(phi, correct, cfg.dpp_eps)
    complement = torch.zeros(len(traces))  # one model alone: no partner to complement
    if len(set(models)) > 1:
        complement = complementarity_rewards(phi, correct, models, [t.round for t in traces], cfg.dpp_eps)
    rescue = rescue_bonuses([t.round == "B" for t in traces], [t.hint_shown for t in traces],
                            [t.failed_cold for t in traces], correct, cfg.rescue_bonus)
    rewards, terms = [], []
    for i, t in enumerate(traces):
        states_answer = extract_answer(t.text, kind, fallback=False) is not None  # boxed or marked only
        terms.append({"correct": float(t.correct), "div": float(diversity[i]), "cm": float(complement[i]),
                      "rescue": rescue[i], "format": cfg.w_format * states_answer})
        x = terms[i]  # c, div and cm unweighted; the rescue and format bonuses as paid
        rewards.append(cfg.w_correct * x["correct"] + schedule["w_div"] * x["div"]
                       + schedule["lambda_cm"] * x["cm"] + x["rescue"] + x["format"])
    return rewards, terms


def ngram_features(text, dim):
    """phi(tau): L2-normalised hashed counts of word 1-, 2- and 3-grams of the answer-stripped trace. [dim]"""
    words = re.findall(r"\w+|[^\w\s]", strip_answer(text).lower())
    phi = torch.zeros(dim, dtype=torch.float64)
    for n in (1, 2, 3):
        for i in range(len(words) - n + 1):
            phi[zlib.crc32(" ".join(words[i:i + n]).encode()) % dim] += 1
    return phi / phi.norm().clamp(min=1e-12)


def dpp_gains(phi, eps=1e-3):
    """DPP marginal gain of each row: det(K) / det(K without row i) = 1 / (K^-1)_ii, K = phi phi^T + eps I.
    phi: [n, d] L2-normalised rows -> [n] in [0, 1]: ~1 for a trace orthogonal to the rest, ~0 for a copy."""
    phi = torch.as_tensor(phi, dtype=torch.float64)
    kernel = phi @ phi.T + eps * torch.eye(phi.shape[0], dtype=torch.float64)
    return (1.0 / torch.linalg.inv(kernel).diagonal()).clamp(0.0, 1.0)


def diversity_rewards(phi, correct, eps=1e-3):
    """DPP-lite diversity: each correct trace's determinant gain among the question's correct traces (both
    models, both rounds); wrong traces get 0. phi: [n, d], correct: [n] bool -> [n]."""
    out = torch.zeros(len(correct), dtype=torch.float64)
    idx = torch.as_tensor(correct, dtype=torch.bool).nonzero().squeeze(1)
    out[idx] = dpp_gains(phi[idx], eps)
    return out


def complementarity_rewards(phi, correct, model_ids, rounds, eps=1e-3):
    """Cross-model complementarity: a correct trace's determinant gain against the partner's correct traces of
    the same round (1 when it has none: right where the peer is wrong). phi: [n, d]; the rest: [n] -> [n]."""
    out = torch.zeros(len(correct), dtype=torch.float64)
    for i in (j for j, c in enumerate(correct) if c):  # wrong traces get 0
        partner = [j for j in range(len(correct))
                   if correct[j] and model_ids[j] != model_ids[i] and rounds[j] == rounds[i]]
        out[i] = dpp_gains(torch.cat([phi[partner], phi[i:i + 1]]), eps)[-1] if partner else 1.0
    return out


def rescue_bonuses(in_round_b, hint_shown, failed_cold, correct, bonus):
    """The rescue bonus of each trace: `bonus` where all hold (round B, hint shown, its model failed cold,
    correct), else 0. Each argument [n] bool -> [n]."""
    return [bonus if all(flags) else 0.0 for flags in zip(in_round_b, hint_shown, failed_cold, correct)]


def reward_schedule(cfg, step):
    """The weights that change halfway (the paper's epoch 2): w_div -> w_div * div_anneal, lambda_cm 0 ->
    lambda_cm, from step cfg.steps // 2 on (0-based)."""
    late = step >= cfg.steps // 2
    return {"w_div": cfg.w_div * (cfg.div_anneal if late else 1.0),
            "lambda_cm": cfg.lambda_cm if late else 0.0}


def group_advantages(rewards, scale="std"):
    """GRPO advantage over one group: A = (R - mean) / (std + 1e-4) with the population std, or Dr. GRPO's
    A = R - mean (scale="none"); a constant group gets 0. rewards: [n] -> [n]."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    std = rewards.std(unbiased=False)  # 0 for a single trace
    if std < 1e-8:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (std + 1e-4 if scale == "std" else 1.0)


# -----------------------------------------------------------------------------
# The update: token log-probabilities, the loss, one AdamW step per model

def policy_loss(logp, ref_logp, advantages, round_w, mask, beta, rho=None):
    """Token sums of loss_t = w(tau) * (-A(tau) * rho_t * log pi(y_t) + beta * KL_t) and of k3's KL_t = exp(r)
    - r - 1, r = log pi_ref - log pi (ref_logp None: no KL term; rho None: 1). One update per batch, so PPO's
    ratio is 1. logp, ref_logp, mask, rho: [b, L-1]; advantages, round_w: [b] -> (loss sum, KL sum)."""
    pg = -advantages[:, None] * logp * (1.0 if rho is None else rho)
    if ref_logp is None:
        return (round_w[:, None] * pg * mask).sum(), torch.zeros((), device=logp.device)
    log_ratio = ref_logp - logp
    kl = torch.exp(log_ratio) - log_ratio - 1
    per_token = round_w[:, None] * (pg + beta * kl)
    return (per_token * mask).sum(), (kl.detach() * mask).sum()


def update_policy(policy, traces, cfg, lr):
    """One AdamW step of one model: the token-level mean of policy_loss over its traces on every rank, in
    micro-batches of similar length, then clip and step (a non-finite loss or gradient skips the step).
    Returns the logged numbers (UpdateLog.stats)."""
    model, device = policy.model, policy.device
    tokens = torch.tensor(float(sum(len(t.completion_ids) for t in traces)), device=device)
    total_tokens = all_reduce_sum(tokens).item()  # the mean's denominator: this model's tokens on all ranks
    if total_tokens == 0:  # no traces on any rank
        return UpdateLog.stats(dict.fromkeys(UpdateLog.NAMES, 0.0), total_tokens, 0.0, False, cfg)
    log = UpdateLog(device)
    ordered = sorted(traces, key=lambda t: len(t.prompt_ids) + len(t.completion_ids))
    for start in range(0, len(ordered), cfg.micro_batch):
        mb = ordered[start:start + cfg.micro_batch]
        prompts = [t.cold_prompt_ids or t.prompt_ids for t in mb]  # the cold one under --round-b-context cold
        ids, mask, adv, w = padded_batch(mb, prompts, policy, cfg)
        with torch.no_grad(), lora_disabled(model):  # pi_ref: the base model (--beta-kl 0: no KL term)
            ref = token_logprobs(model, ids, cfg.logprob_chunk)[0] if cfg.beta_kl > 0 else None
        model.train(not cfg.no_grad_checkpoint)  # pi_theta; gradient checkpointing acts in train mode only
        logp, entropy, logp_tempered = token_logprobs(model, ids, cfg.logprob_chunk, cfg.temperature or 1.0)
        model.eval()  # (Qwen has no dropout: the mode changes no number)
        rho = importance_weights(mb, logp, policy, cfg)  # None but for hinted traces on their cold prompt
        loss, kl = policy_loss(logp, ref, adv, w, mask, cfg.beta_kl, rho)
        (loss / total_tokens).backward()
        log.add(mb, mask, loss, kl, entropy, logp_tempered)
    sums = log.over_ranks()
    all_reduce_grads(lora_parameters(model))  # the gradients, too, summed over ranks
    grad_norm, skipped = clip_and_step(policy, sums["loss"], cfg, lr)
    return log.stats(sums, total_tokens, grad_norm, skipped, cfg)


def token_logprobs(model, input_ids, chunk, sampling_temperature=None):
    """(logp, entropy, logp_tempered), each [b, L-1] fp32 (L: input length). logp: log pi(x_{t+1} | x_<=t) at
    temperature 1, the loss's. For the log only, given a sampling temperature (else None), no gradient: the
    entropy at temperature 1 and each target's log softmax(logits / temperature). Rows right-padded (no mask);
    the lm_head runs `chunk` positions at a time: no [b, L, V] tensor exists."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    targets = input_ids[:, 1:]
    diagnostics = {}  # chunk start -> (entropy, tempered log-probs): once each, not again when recomputed

    def chunk_logprobs(h, y, start):
        logp = torch.log_softmax(head(h).float(), dim=-1)  # [b, chunk, V]
        target = logp.gather(-1, y[..., None]).squeeze(-1)
        if sampling_temperature is not None and start not in diagnostics:
            with torch.no_grad():  # the entropy; log softmax(logits / temp) = log softmax(logp / temp), at y
                diagnostics[start] = (-logp.exp().mul_(logp).sum(-1), target / sampling_temperature
                                      - torch.logsumexp(logp / sampling_temperature, dim=-1))
        return target

    starts = range(0, hidden.shape[1], chunk)
    chunks = [(hidden[:, s:s + chunk], targets[:, s:s + chunk], s) for s in starts]
    logp = torch.cat([checkpoint(chunk_logprobs, *c, use_reentrant=False) if torch.is_grad_enabled()
                      else chunk_logprobs(*c) for c in chunks], dim=1)  # logits recomputed, never kept
    if sampling_temperature is None:
        return logp, None, None
    entropy = torch.cat([diagnostics[s][0] for s in starts], dim=1)
    logp_tempered = torch.cat([diagnostics[s][1] for s in starts], dim=1)
    return logp, entropy, logp_tempered


def padded_batch(traces, prompts, policy, cfg):
    """Right-padded prompt + completion ids [b, L], the mask of the log-prob positions that predict completion
    tokens [b, L-1], advantages [b], loss weights [b] (round B: round_b_weight)."""
    device = policy.device
    width = max(len(p) + len(t.completion_ids) for p, t in zip(prompts, traces))
    ids = torch.full((len(traces), width), policy.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(traces), width - 1), device=device)
    for row, (prompt, t) in enumerate(zip(prompts, traces)):
        seq = prompt + t.completion_ids
        ids[row, :len(seq)] = torch.tensor(seq, device=device)
        mask[row, len(prompt) - 1:len(seq) - 1] = 1
    adv = torch.tensor([t.advantage for t in traces], device=device)
    w = torch.tensor([1.0 if t.round == "A" else cfg.round_b_weight for t in traces], device=device)
    return ids, mask, adv, w


def importance_weights(traces, logp, policy, cfg):
    """rho_t = min(1, pi(y_t | cold prompt) / pi(y_t | hinted prompt)), no gradient, for each token of a
    hinted trace trained on its cold prompt (Guide-GRPO's correction, truncated as in V-trace); 1 for the
    others. logp: [b, L-1] -> [b, L-1], or None when no trace is trained on a cold prompt."""
    if not any(t.cold_prompt_ids for t in traces):
        return None
    with torch.no_grad():
        ids, _, _, _ = padded_batch(traces, [t.prompt_ids for t in traces], policy, cfg)
        sampled = token_logprobs(policy.model, ids, cfg.logprob_chunk)[0]
    shift = torch.tensor([len(t.prompt_ids) - len(t.cold_prompt_ids or t.prompt_ids) for t in traces],
                         device=logp.device)  # where each completion starts later in the hinted layout
    index = torch.arange(logp.shape[1], device=logp.device)[None] + shift[:, None]
    rho = torch.exp(logp.detach() - sampled.gather(1, index.clamp(0, sampled.shape[1] - 1))).clamp(max=1.0)
    hinted = torch.tensor([t.cold_prompt_ids is not None for t in traces], device=logp.device)
    return torch.where(hinted[:, None], rho, torch.ones_like(rho))


def clip_and_step(policy, loss_sum, cfg, lr):
    """The gradients clipped to cfg.grad_clip, then one AdamW step at `lr`, unless the loss or the gradient is
    not finite. Returns (the gradient norm before clipping, whether it skipped)."""
    params = lora_parameters(policy.model)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    skipped = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
    if not skipped:
        for group in policy.optimizer.param_groups:
            group["lr"] = lr
        policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def learning_rate(cfg, step):
    """10% linear warm-up, then cosine decay towards 0 at step cfg.steps."""
    warmup = max(1, int(0.1 * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


class UpdateLog:
    """What update_policy logs: token sums over its micro-batches, then its ranks, of the loss, the KL, the
    entropy and the sampler/update mismatch (over the `measured` tokens: those with sampler log-probs)."""
    NAMES = ("loss", "kl", "entropy", "mismatch", "mismatch_kl", "measured")

    def __init__(self, device):
        self.sums = {name: torch.zeros((), device=device) for name in self.NAMES}  # one tensor each

    def add(self, traces, mask, loss, kl, entropy, logp_tempered):  # one micro-batch's
        rollout_logp, measured = sampler_logprobs(traces, mask)
        mismatch, mismatch_kl = rollout_mismatch(rollout_logp, logp_tempered, measured)
        batch = {"loss": loss.detach(), "kl": kl, "entropy": (entropy * mask).sum(), "mismatch": mismatch,
                 "mismatch_kl": mismatch_kl, "measured": measured.sum()}
        self.sums = {name: self.sums[name] + batch[name] for name in self.NAMES}

    def over_ranks(self):  # one all-reduce
        totals = all_reduce_sum(torch.stack([self.sums[name] for name in self.NAMES]))
        return dict(zip(self.NAMES, totals.tolist()))

    @staticmethod
    def stats(sums, total_tokens, grad_norm, skipped, cfg):
        """The logged numbers: per token (the mismatch: per measured token)."""
        tokens, measured = total_tokens or 1.0, sums["measured"]
        return {"loss": sums["loss"] / tokens,
                "kl": sums["kl"] / tokens if cfg.beta_kl > 0 else None,  # beta 0: not measured
                "entropy": sums["entropy"] / tokens, "grad_norm": grad_norm, "tokens": total_tokens,
                "skipped": int(skipped), "mismatch": sums["mismatch"] / measured if measured else None,
                "mismatch_kl": sums["mismatch_kl"] / measured if measured else None}


def sampler_logprobs(traces, mask):
    """The sampler's log-probability of each completion token at padded_batch's positions [b, L-1], and the
    mask [b, L-1] of those known: traces that carry them, trained on the prompt they were sampled from."""
    logp, measured = torch.zeros_like(mask), torch.zeros_like(mask)
    for row, t in enumerate(traces):
        if t.rollout_logprobs is not None and t.cold_prompt_ids is None:
            span = slice(len(t.prompt_ids) - 1, len(t.prompt_ids) - 1 + len(t.completion_ids))
            logp[row, span] = torch.tensor(t.rollout_logprobs, device=mask.device)
            measured[row, span] = 1
    return logp, measured


def rollout_mismatch(rollout_logp, update_logp, mask):
    """Sums over the masked tokens of |r| and of exp(r) - r - 1 (in fp64), r = log pi_update - log pi_rollout
    (same temperature): the sampler/update gap per sampled token. The tokens come from the top-p cut, so the
    second is k3's form, not an unbiased KL. All args [b, L-1] -> two scalars."""
    r = (update_logp - rollout_logp).double()
    return (r.abs() * mask).sum().float(), ((torch.expm1(r) - r) * mask).sum().float()


# -----------------------------------------------------------------------------
# The training loop

@dataclass
class Run:
    """A training run's state, passed whole between the parts of the loop."""
    cfg: Config
    policies: list                # the models being trained, model 1 first
    test_set: list                # the evaluation's questions
    out: Path                     # the run folder
    loop_state: dict = field(default_factory=lambda: new_loop_state())  # carried across steps, checkpointed
    start: int = 0                # the first step of this invocation (a resumed run's checkpoint step)
    stop: object = None           # main's StopRequest (its `in_loop` set while the loop runs)


def train(cfg, policies, train_set, test_set, out, stop):
    """The training loop (after start_or_resume: a checkpoint, or eval_before): per step (0-based) its
    questions, core_step, one update per model, the log, then end_of_step. Returns (exit code, whether all
    cfg.steps are done). Ctrl-C and SIGTERM stop after the step with a checkpoint (stop: main's StopRequest);
    out of memory raises a TrainingError."""
    rank, world = dist_info()
    run = start_or_resume(Run(cfg, policies, test_set, out, stop=stop))
    step, stats, stop.in_loop = run.start, [], True
    try:
        for step in range(run.start, cfg.steps):
            started, stats = time.time(), []
            order = training_order(len(train_set), step, cfg.batch_questions, cfg.seed)
            batch = [train_set[i] for i in order][rank::world]  # this rank's share of the step's questions
            usable = [p for p in batch if fits(policies, p, cfg.max_new_tokens, cfg.max_prompt_tokens)]
            groups, hints = core_step(policies, usable, cfg, reward_schedule(cfg, step))
            rollout_s = time.time() - started
            for m, policy in enumerate(policies, 1):  # every rank updates, traces or not: gradients summed
                traces = [t for g in groups for t in g if t.model == m]
                stats.append(update_policy(policy, traces, cfg, learning_rate(cfg, step)))
            count_nonfinite(run, stats, step)
            row = metrics_row(run, step, groups, stats, started, rollout_s, len(batch) - len(usable))
            if row:
                log_step(run, step, row, usable, groups, hints)
            code = end_of_step(run, step + 1)
            if code is not None:
                return code, False
    except Exception as error:
        if not out_of_memory(error):
            raise
        save_before_failed_step(run, step, stats)
        raise out_of_memory_error(run, step) from None
    finally:
        stop.in_loop = False
    return 0, True


def start_or_resume(run):
    """The run at its first step: a resumed run's newest checkpoint, else step 0 after eval_before (unless
    --no-eval-before)."""
    rank, cfg, out = dist_info()[0], run.cfg, run.out
    folder = newest_checkpoint(out, warn=True) if cfg.resume else None
    if folder:
        state = load_checkpoint(folder, run.policies)
        barrier()  # every rank has chosen and loaded its checkpoint before rank 0 moves any
        if rank == 0:
            keep_logged_steps(out, state["step"])
            for damaged in (c for c in checkpoints(out) if c.name > folder.name):  # passed over: damaged
                set_aside(damaged)
        print(f"resumed from {folder} at step {state['step']}")
        saved = state.get("loop_state", state.get("counters", {}))  # "counters": an older checkpoint's name
        return replace(run, start=state["step"], loop_state=new_loop_state() | saved)  # older: fewer keys
    if cfg.resume:  # stopped before its first checkpoint: the run starts again from step 0
        print(f"{out} has no checkpoint yet: starting the run again from step 0 with its saved config")
        if rank == 0:
            keep_logged_steps(out, -1)
    if not cfg.no_eval_before:
        run_evaluation(run.policies, run.test_set, cfg, out, "eval_before", "before training", step=0)
    return run


def new_loop_state():
    """What the loop carries across steps (checkpointed): per model, non-finite updates in a row, the collapse
    watch's streak and window start, sampled tokens; the nothing-to-learn streak; problems skipped."""
    return {"nonfinite_in_a_row": [0, 0], "skipped_problems": 0, "pushed_away": [0, 0], "nothing_to_learn": 0,
            "kl_before": [0.0, 0.0], "entropy_before": [0.0, 0.0], "sampled_tokens": [0, 0]}


def end_of_step(run, done):
    """After step `done`: the evaluation curve, checkpoints, and an exit code to stop with (None: go on)."""
    cfg, out, stop, policies = run.cfg, run.out, run.stop, run.policies
    if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:  # the last one is eval_after
        run_evaluation(policies, run.test_set, cfg, out, f"evals/step_{done:06d}", f"step {done}", step=done)
    requested = torch.tensor(float(stop.take()), device=policies[0].device)
    stopping = all_reduce_sum(requested).item() > 0  # every rank's decision, the same
    if max(run.loop_state["nonfinite_in_a_row"]) >= 3:
        save_checkpoint(run, done)
        raise TrainingError(f"3 non-finite updates in a row at step {done}: stopping (try a lower --lr "
                            f"or --max-new-tokens); the last checkpoint is in {out / 'checkpoints'}")
    invocation_done = done - run.start == cfg.stop_after  # --stop-after's steps of this invocation are done
    if done % cfg.save_every == 0 or done == cfg.steps or stopping or invocation_done:
        save_checkpoint(run, done)
    if stopping:
        print(f"stopped after step {done}; continue with: {resume_command(out)}")
        return 130
    if invocation_done and done < cfg.steps:
        print(f"--stop-after {cfg.stop_after}: stopped after step {done}; continue with: "
              f"{resume_command(out)}")
        return 0
    return None


def count_nonfinite(run, stats, step):
    """Each model's non-finite updates in a row (three stop the run: end_of_step); each one warns."""
    in_a_row = run.loop_state["nonfinite_in_a_row"]
    for i, (pol, s) in enumerate(zip(run.policies, stats)):
        in_a_row[i] = in_a_row[i] + 1 if s["skipped"] else 0
        if s["skipped"]:
            print(f"warning: non-finite loss or gradient for {pol.name} at step {step + 1}: update skipped")


def save_before_failed_step(run, step, stats):
    """After out of memory in `step`, a single process past this invocation's first step saves the adapters of
    the step's start if no model updated in it (`stats` empty); the resumed step draws anew."""
    if not stats and step > run.start and dist_info()[1] == 1:
        save_checkpoint(run, step)


def out_of_memory_error(run, step):
    """The TrainingError for CUDA out of memory in `step`: resume with smaller batches."""
    halve = f"--gen-batch {max(1, run.cfg.gen_batch // 2)} --micro-batch {max(1, run.cfg.micro_batch // 2)}"
    return TrainingError(f"CUDA out of memory at step {step + 1}; continue from the last checkpoint with "
                         f"smaller batches: {resume_command(run.out)} {halve}")


def resume_command(out):
    """The command that continues the run in `out`: under torchrun, with as many nodes and processes."""
    world = dist_info()[1]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world == 1:
        return f"python core.py --resume {shlex.quote(str(out))}"
    nodes = f"--nnodes {world // per_node} (and your rendezvous flags) " if world > per_node else ""
    return f"torchrun {nodes}--nproc_per_node {per_node} core.py --resume {shlex.quote(str(out))}"


# -----------------------------------------------------------------------------
# LoRA, by hand: the trainable policy pi_theta; with the adapters off, the reference policy pi_ref

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x around a frozen nn.Linear; B starts at zero (training starts at the base
    model). A and B stay fp32, cast to the input's dtype. Rollouts and the update both run this forward: the
    sampler draws from the policy itself, not from a merged bf16 copy that would round small changes away."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True  # False: behave as the base layer (the frozen reference policy)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        low = x.flatten(0, -2) @ self.lora_A.T.to(x.dtype)  # [tokens, r]
        return torch.addmm(y.flatten(0, -2), low, self.lora_B.T.to(x.dtype), alpha=self.scale).view_as(y)


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Freeze the model, wrap each nn.Linear whose name ends in one of `targets`; returns their names."""
    targets = set(targets.split(",")) if isinstance(targets, str) else set(targets)
    model.requires_grad_(False)
    linear = {n: n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmatched = sorted(targets - set(linear.values()))
    if unmatched:
        verb = "matches" if len(unmatched) == 1 else "match"
        raise UsageError(f"--lora-targets: {', '.join(unmatched)} {verb} no linear layer of the model (its "
                         f"layers: {', '.join(sorted(set(linear.values())))})")
    names = [n for n, last in linear.items() if last in targets]
    narrowest = min(min(model.get_submodule(n).weight.shape) for n in names)
    if rank > narrowest:  # the update B A has rank <= the layer's width anyway
        raise UsageError(f"--lora-rank {rank} is over the narrowest adapted layer's width, {narrowest} "
                         f"(see --lora-targets)")
    for name in names:
        set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return names


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def lora_disabled(model):
    """Every adapter off: the model is its frozen base (the reference policy of the KL term)."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def lora_state(model):
    """The adapters under PEFT's names: 'base_model.model.<module>.lora_A.weight' [r, in], lora_B [out, r]."""
    return {f"base_model.model.{name}.{key}.weight": getattr(layer, key).detach().cpu().contiguous()
            for name, layer in lora_layers(model).items() for key in ("lora_A", "lora_B")}


def lora_config(model, base_model):
    """PEFT's adapter_config.json (read by PeftModel.from_pretrained, transformers' load_adapter and vLLM)."""
    layers = lora_layers(model)
    rank = next(iter(layers.values())).lora_A.shape[0]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
            "lora_alpha": next(iter(layers.values())).scale * rank,
            "target_modules": sorted({n.split(".")[-1] for n in layers}), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None}


def save_lora(model, folder, base_model):
    """The adapters in PEFT's layout: folder/adapter_model.safetensors and folder/adapter_config.json."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(lora_state(model), str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    (Path(folder) / "adapter_config.json").write_text(json.dumps(lora_config(model, base_model), indent=1))


def load_lora(model, folder):
    """Adapters saved by save_lora, into a model with LoRA layers of the same rank, alpha and targets."""
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    saved = json.loads((Path(folder) / "adapter_config.json").read_text())
    expected, config = lora_state(model), lora_config(model, None)
    if (set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state)
            or (saved["r"], saved["lora_alpha"]) != (config["r"], config["lora_alpha"])):
        raise UsageError(f"{folder}: adapter does not fit this model (other modules, rank, alpha or shapes)")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(state[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"base_model.model.{name}.lora_B.weight"])


# -----------------------------------------------------------------------------
# Rollouts: prompts, hints, and the reference sampler (a readable KV-cached loop; the CPU path)

FORMAT_INSTRUCTION = {
    "number": "Put the final answer in \\boxed{}.",
    "math": "Put the final answer in \\boxed{}.",
    "integer": "The answer is an integer from 0 to 999; put it in \\boxed{}.",
    "choice": "Answer with the letter of the correct option in \\boxed{}, e.g. \\boxed{A}.",
}


def build_prompt(tokenizer, question, kind, hint=None):
    """Token ids of the chat prompt (prompt_ids: cached per tokenizer, question, kind, hint), a new list."""
    return list(prompt_ids(tokenizer, question, kind, hint))


@functools.lru_cache(maxsize=16384)
def prompt_ids(tokenizer, question, kind, hint):
    content = user_prompt(question, kind, hint)
    if getattr(tokenizer, "chat_template", None):
        content = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    return tuple(tokenizer(content, add_special_tokens=False)["input_ids"])


def user_prompt(question, kind, hint=None):
    """The prompt's text before the chat template wraps it: the question, the hint, the instruction."""
    hinted = f"Hint:\n{hint}\n" if hint else ""
    return f"Question: {question}\n{hinted}Let's solve this step by step. {FORMAT_INSTRUCTION[kind]}"


def cap_hint(hint, tokenizer, max_tokens):
    """The first max_tokens tokens of the hint, in the receiving model's tokenizer."""
    ids = tokenizer(hint, add_special_tokens=False)["input_ids"]
    return hint if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def prompt_room(policy, problem, new_tokens, max_prompt=math.inf):
    """The one length rule: how many tokens the question's cold prompt could grow by and stay at most
    max_prompt tokens long, with new_tokens more in the model's context (negative: it does not fit)."""
    cold = len(build_prompt(policy.tokenizer, problem.question, problem.kind))
    return min(max_prompt - cold, policy.context - new_tokens - cold)


def fits(policies, problem, new_tokens, max_prompt=math.inf):
    """Whether a question's cold prompt (at most max_prompt tokens) and new_tokens more fit every model."""
    return all(prompt_room(policy, problem, new_tokens, max_prompt) >= 0 for policy in policies)


def hint_for(policy, problem, hint, cfg):
    """The hint capped at cfg.hint_tokens receiver tokens, and shorter if the prompt would overflow (16 tokens
    spare for the 'Hint:' lines); None (the sample is drawn cold, not counted as hinted) when none is left."""
    left = prompt_room(policy, problem, cfg.max_new_tokens, cfg.max_prompt_tokens) - 16
    tokens = min(cfg.hint_tokens, left)
    return cap_hint(hint, policy.tokenizer, tokens) if tokens > 0 else None


def cold_prompt(policy, problem, hint, cfg):
    """The prompt without the hint, for a hinted trace that --round-b-context cold trains on (else None)."""
    if hint is None or cfg.round_b_context != "cold":
        return None
    return build_prompt(policy.tokenizer, problem.question, problem.kind)


def generate(policy, prompts, max_new_tokens, cfg, n=1, generator=None, progress=None):
    """n completions per prompt, about cfg.gen_batch rows at a time, from `generator` (default: the policy's
    training stream) -> (ids, text, log-probs as drawn: pick_tokens) per row, prompt-major."""
    results = []
    per_batch = max(1, cfg.gen_batch // n)
    sampler = pick_sampler(policy, prompts, cfg)
    for batch in (prompts[i:i + per_batch] for i in range(0, len(prompts), per_batch)):
        if progress is not None:
            progress.batch(len(batch) * n, max_new_tokens)
        ids, logprobs = sampler(policy.model, batch, max_new_tokens, policy.eos_ids,
                                policy.pad_id, cfg.temperature, cfg.top_p, generator or policy.generator, n,
                                progress=progress)
        results += [(row, policy.tokenizer.decode(row, skip_special_tokens=True), logp)
                    for row, logp in zip(ids, logprobs)]
        if progress is not None:
            progress.add(len(ids), sum(map(len, ids)))
    return results


@torch.no_grad()
def sample(model, prompts, max_new_tokens, eos_ids, pad_id, temperature=0.7, top_p=0.9, generator=None, n=1,
           progress=None):
    """KV-cached batched sampling, n rows per prompt -> per row, prompt-major, the sampled ids (EOS included)
    and their log-probs as drawn (pick_tokens); a row leaves batch and cache at an EOS id or its budget."""
    cache, logits, mask, next_pos = prefill(model, prompts, pad_id, n)
    live = torch.arange(len(logits), device=logits.device)  # original row of each batch row
    eos = torch.tensor(sorted(eos_ids), device=logits.device)
    out, out_logp, sampled = [[] for _ in live], [[] for _ in live], 0
    for step in range(max_new_tokens):
        sampled += len(live)
        if progress is not None and progress.due():
            progress.show(len(out) - len(live), sampled, step)
        tokens, logp = pick_tokens(logits, temperature, top_p, generator)
        for row, token, token_logp in zip(live.tolist(), tokens.tolist(), logp.tolist()):
            out[row].append(token)
            out_logp[row].append(token_logp)
        keep = ~torch.isin(tokens, eos)
        if step + 1 == max_new_tokens or not keep.any():
            break
        if not keep.all():
            kept = keep.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, tokens, mask, next_pos = live[kept], tokens[kept], mask[kept], next_pos[kept]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       cache=cache, use_cache=True).logits[:, -1].float()
        next_pos = next_pos + 1
    return out, out_logp


def prefill(model, prompts, pad_id, n):
    """The left-padded prompts through the model at once, then repeated n times (a prompt's samples share one
    prefill) -> DynamicCache, next-token logits [rows, V] fp32, mask [rows, width], next position [rows]."""
    from transformers import DynamicCache
    ids, mask = left_pad(prompts, pad_id, next(model.parameters()).device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask, positions = (x.repeat_interleave(n, dim=0) for x in (logits, mask, positions))
    return cache, logits, mask, positions[:, -1] + 1


def left_pad(prompts, pad_id, device):
    """Token-id lists -> ids [b, width] left-padded with pad_id, attention mask [b, width]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, device=device)
        mask[row, width - len(p):] = 1
    return ids, mask


def pick_tokens(logits, temperature, top_p, generator):
    """Next token per row from fp32 logits [b, V]: greedy at T = 0, else temperature + top-p -> tokens [b] and
    their log-prob under softmax(logits / T) before the top-p cut [b] (T = 0: softmax(logits))."""
    every_row = torch.ones(len(logits), dtype=torch.bool, device=logits.device)  # here, every row is live
    tokens, logp, _ = draw_tokens(logits, temperature, top_p, generator, sort_for=every_row)
    return tokens, logp


def draw_tokens(logits, temperature, top_p, generator, sort_for=None, candidates=1024):
    """pick_tokens, its nucleus looked for among the `candidates` likeliest -> also the rows whose nucleus is
    wider [b]. sort_for: the rows (bool [b]) whose wider nucleus makes every row draw from a full sort (a
    host read); None: no sort (sample_fast then redoes the window, judging its live rows)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(1)
        return tokens, logp, torch.zeros_like(tokens, dtype=torch.bool)  # no nucleus: nothing past it
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        logp = probs.gather(-1, tokens[:, None]).log().squeeze(1)
        return tokens, logp, torch.zeros_like(tokens, dtype=torch.bool)
    top, order = probs.topk(min(candidates, probs.shape[-1]), dim=-1)  # sorted, most likely first
    wider = top.sum(-1) < top_p
    if sort_for is not None and (wider & sort_for).any():
        top, order = probs.sort(dim=-1, descending=True)
        wider = torch.zeros_like(wider)
    top = top.masked_fill(top.cumsum(-1) - top > top_p, 0)  # mass before this token > top_p: outside
    tokens = order.gather(-1, torch.multinomial(top, 1, generator=generator)).squeeze(1)
    return tokens, probs.gather(-1, tokens[:, None]).log().squeeze(1), wider


def hit_budget(ids, budget, eos_ids):
    """A sample cut off by its token budget: as long as the budget, and no EOS at its end."""
    return len(ids) >= budget and ids[-1] not in eos_ids


def until_eos(ids, eos_ids):
    """The tokens up to and including the first EOS (all of them if there is none)."""
    return next((ids[:i + 1] for i, token in enumerate(ids) if token in eos_ids), ids)


# -----------------------------------------------------------------------------
# The GPU sampler: sample() on a static cache, each decode step recorded once as a CUDA graph

def fast_decoding(model, cfg):
    """Whether the GPU sampler can run: CUDA, sdpa, full attention only, and not --decoder reference."""
    config = model.config
    full_attention = not getattr(config, "use_sliding_window", False) and all(
        t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))
    return (model.device.type == "cuda" and cfg.decoder != "reference" and full_attention
            and config._attn_implementation == "sdpa")


def pick_sampler(policy, prompts, cfg):
    """sample_fast where it can run, else sample. On first use for a model, greedy rows of the two must agree;
    if not, or if sample_fast fails, it warns once and keeps sample (fatal_cuda_error's errors propagate)."""
    if not fast_decoding(policy.model, cfg):
        return sample
    if policy.fast_agrees is None and prompts:  # a torchrun rank may have no test question to sample
        greedy = dict(prompts=prompts[:4], max_new_tokens=16, eos_ids=policy.eos_ids, pad_id=policy.pad_id,
                      temperature=0)
        try:
            agree = sample_fast(policy.model, **greedy)[0] == sample(policy.model, **greedy)[0]
            problem = None if agree else "the GPU sampler's greedy tokens differ from the reference loop's"
        except Exception as e:  # a changed transformers internal, ...: the reference loop
            if fatal_cuda_error(e):
                raise
            problem = f"the GPU sampler failed ({type(e).__name__}: {first_line(e)})"
        policy.fast_agrees = problem is None
        if problem:
            print(f"warning: {policy.name}: {problem}; sampling with the reference loop from now on",
                  file=sys.stderr, flush=True)
    return sample_fast if policy.fast_agrees else sample


FALLBACK_SAMPLERS = ("no graphs", "reference (fallback)")


def sampler_in_use(policy, cfg):
    """What samples a model's rollouts: "graphs" (the GPU sampler), "reference" (the loop: on the CPU, or
    --decoder reference), or a fallback: "no graphs" (the GPU sampler after a refused capture) or "reference
    (fallback)" (the loop, the GPU sampler having failed its first-use check)."""
    if not fast_decoding(policy.model, cfg):
        return "reference"
    if policy.fast_agrees is False:
        return "reference (fallback)"
    return "no graphs" if policy.model in GRAPHLESS else "graphs"


def first_line(error, width=200):
    return (str(error).splitlines() or [""])[0][:width]


@torch.no_grad()
def sample_fast(model, prompts, max_new_tokens, eos_ids, pad_id, temperature=0.7, top_p=0.9, generator=None,
                n=1, segment=256, cuda_graph=None, progress=None):
    """sample() for the GPU: the same prefill, then a StaticCache and each decode step a CUDA graph (default:
    on CUDA). The host reads the device once per window of up to 8 steps (redone, checked, if a nucleus
    overflowed: draw_tokens) and per `segment`, where finished rows leave. Greedy tokens equal sample()'s."""
    if model.config._attn_implementation != "sdpa":  # the boolean 4D mask means "may attend" to sdpa only
        raise ValueError(f"sample_fast needs sdpa attention, not {model.config._attn_implementation}")
    cache, logits, mask, next_pos = prefill(model, prompts, pad_id, n)
    (rows, width), device = mask.shape, logits.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    generator = generator or (torch.cuda.default_generators[device.index] if device.type == "cuda"
                              else torch.default_generator)
    eos = torch.tensor(sorted(eos_ids), device=device)
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros(rows, max_new_tokens, device=device)
    live = torch.arange(rows, device=device)          # original row of each batch row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    attn, positions, sampled = mask.bool()[:, None, None, :], next_pos[:, None], 0
    for first in range(0, max_new_tokens, segment):
        keep = (~finished).nonzero().squeeze(1)  # drop finished rows; a cache (and a graph) for this segment
        if len(keep) == 0:
            break
        last = min(first + segment, max_new_tokens)
        cache = static_cache(model, cache, keep, width + first, width + last)
        live, logits, finished, positions = live[keep], logits[keep], finished[keep], positions[keep]
        attn = torch.cat([attn[keep], attn.new_zeros(len(keep), 1, 1, last - first)], dim=-1)
        step = DecodeStep(model, cache, attn, positions, torch.tensor([width + first], device=device),
                          cuda_graph)
        for start in range(first, last, 8):
            window = range(start, min(start + 8, last))
            sampled += len(live) * len(window)
            if progress is not None and progress.due():
                progress.show(rows - len(live) + int(finished.sum()), sampled, start)
            saved = logits.clone(), finished.clone(), step.snapshot(), generator.get_state()
            for checked in (False, True):  # unchecked (one host read); checked if a nucleus overflowed
                overflow = torch.zeros((), dtype=torch.bool, device=device)
                for s in window:
                    tokens, logp, wider = draw_tokens(logits, temperature, top_p, generator,
                                                      sort_for=~finished if checked else None)
                    tokens = tokens.masked_fill(finished, pad_id)
                    out[live, s], out_logp[live, s] = tokens, logp
                    overflow |= (wider & ~finished).any()
                    finished |= torch.isin(tokens, eos)
                    logits = step(tokens) if s + 1 < max_new_tokens else logits
                flags = (overflow.int() + 2 * finished.all().int()).item()  # two answers in one host read
                overflowed, all_finished = bool(flags & 1), bool(flags & 2)
                if not overflowed:
                    break
                logits, finished = saved[0], saved[1].clone()
                step.restore(saved[2])
                generator.set_state(saved[3])
            if all_finished:
                break
    kept = [until_eos(row, eos_ids) for row in out.tolist()]
    return kept, [logp[:len(row)] for row, logp in zip(kept, out_logp.tolist())]


def static_cache(model, source, rows, filled, length):
    """A StaticCache with room for `length` positions, holding positions [0, filled) of the given rows of
    `source` (the prefill's DynamicCache or the previous StaticCache), consumed layer by layer."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=length)
    for new, old in zip(cache.layers, source.layers):
        keys, values = old.keys[rows, :, :filled], old.values[rows, :, :filled]
        old.keys = old.values = None
        new.lazy_initialization(keys, values)  # allocates keys/values [rows, kv_heads, length, head_dim]
        new.keys[:, :, :filled], new.values[:, :, :filled] = keys, values
        new.cumulative_length.fill_(filled)  # next write position
    return cache


def out_of_memory(error):
    """Whether an error is the GPU's out of memory: torch.OutOfMemoryError (the caching allocator's), or an
    AcceleratorError (a CUDA call's, such as a graph's instantiation) whose error_code, which torch 2.13 sets
    on those it raises, is cudaErrorMemoryAllocation (2); one made without a code is judged by its message."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    code = getattr(error, "error_code", None)
    cuda_error = isinstance(error, getattr(torch, "AcceleratorError", ()))
    return cuda_error and (code == 2 if code is not None else "out of memory" in str(error))


def fatal_cuda_error(error):
    """Whether an error must reach the run rather than turn a fast path off: out of memory, or a CUDA error
    (AcceleratorError) other than a graph capture's refusal (whose message names the capture)."""
    cuda_error = isinstance(error, getattr(torch, "AcceleratorError", ()))
    return out_of_memory(error) or cuda_error and "captur" not in str(error).lower()


GRAPHLESS = weakref.WeakSet()  # the models whose CUDA graph capture failed: their steps run eagerly


class DecodeStep:
    """One decode step on fixed buffers, for CUDA to record once as a graph and replay. One row per live
    sample: tokens [rows, 1], position ids [rows, 1], attn [rows, 1, 1, length] (bool: the cache positions
    each row may see), cursor [1] (the cache position written this step)."""

    def __init__(self, model, cache, attn, positions, cursor, cuda_graph):
        self.model, self.cache, self.attn, self.positions, self.cursor = model, cache, attn, positions, cursor
        self.tokens, self.cuda_graph = torch.zeros_like(positions), cuda_graph
        self.graph = self.logits = None

    def forward(self):
        self.attn.index_fill_(3, self.cursor, True)  # each row's new token sees itself
        logits = self.model(input_ids=self.tokens, attention_mask=self.attn, position_ids=self.positions,
                            cache=self.cache, use_cache=True).logits[:, -1].float()
        self.cursor.add_(1)
        self.positions.add_(1)
        return logits

    def __call__(self, tokens):
        """Feed tokens [rows]; returns next-token logits [rows, V] (fp32; on the GPU, the graph's buffer)."""
        self.tokens.copy_(tokens[:, None])
        if not self.cuda_graph or self.model in GRAPHLESS:
            return self.forward()
        with torch.cuda.device(self.tokens.device):  # streams and graphs belong to the current device
            if self.graph is None:
                return self.capture()
            self.graph.replay()
            return self.logits

    def capture(self):
        """This step run once on the device's capture stream (the warm-up), then recorded as a CUDA graph in
        its pool. A refused capture warns and turns graphs off for this model only; the errors
        fatal_cuda_error names propagate."""
        stream, pool = capture_stream_and_pool(self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self.forward()
            try:
                self.graph, self.logits = record_graph(self.forward, pool)  # recorded, not run
            except RuntimeError as e:  # a refusal: the eager step computes the same thing
                if fatal_cuda_error(e):
                    raise
                GRAPHLESS.add(self.model)
                print(f"warning: CUDA graph capture failed ({first_line(e)}); decoding "
                      f"{self.model.config.name_or_path} without graphs from now on", file=sys.stderr,
                      flush=True)
        torch.cuda.current_stream().wait_stream(stream)
        return logits

    def snapshot(self):
        """Copies of the buffers a step changes (attn, positions, cursor), for restore()."""
        return [x.clone() for x in (self.attn, self.positions, self.cursor)]

    def restore(self, saved):
        """Back to a snapshot: the steps since are undone (the cache positions they wrote get rewritten)."""
        for buffer, value in zip((self.attn, self.positions, self.cursor), saved):
            buffer.copy_(value)
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(self.cursor[0])  # where the cache writes next, as in static_cache()


def record_graph(fn, pool):
    """fn() recorded as a CUDA graph on the current stream, in `pool`: (graph, fn's output). A failed capture
    is ended before its first error propagates."""
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool.id)
    try:
        output = fn()
    except BaseException:
        with contextlib.suppress(RuntimeError):  # ending a broken capture raises too
            graph.capture_end()
        raise
    graph.capture_end()
    return graph, output


@functools.cache
def capture_stream_and_pool(device):
    """The stream that records `device`'s decode steps and their graphs' memory pool, one each per device
    (entering torch.cuda.graph each time would wait for the device and empty the allocator's cache)."""
    with torch.cuda.device(device):
        return torch.cuda.Stream(), torch.cuda.MemPool()


# -----------------------------------------------------------------------------
# Answers: extraction, normalisation, correctness c(tau), and the answer stripped from a teacher's trace

BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*\{|\s+(?=[^\s{$}]))")
NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
# an answer marker ("####", "answer is/:/=", "**Answer**:"), then its value: the rest of this line, or of the
# next non-blank line when the marker ends its line
ANSWER_MARK = r"(?:####|answer(?:\*\*|__|\*|_)?\s*(?:is\b|:|=)[*_]*)\s*:?\s*"
ANSWER_MARK_RE = re.compile(ANSWER_MARK + r"([^\n]*)", re.IGNORECASE)
LETTER_RE = re.compile(r"\(?\b([A-D])\b\)?")
# what after a first number makes it part of an expression (2^{10}, 5 \times 4, 2\sqrt{3}, 3-4, 5 * 4), not a
# degree (30^\circ) or bold (**18**)
OPERATOR_RE = re.compile(r"\s*(?:\^(?!\s*\{?\s*(?:\\circ|o\b|\\text))|\\times|\\cdot|\u00d7|\\sqrt|\\pi|\+"
                         r"|-\s*[\d\\]|(?<!\*)\*(?=\s*[\d(\\]))")


def boxed_spans(text):
    """(start, end, content) of each outermost \\boxed{...} (balanced braces) or '\\boxed 2', in order."""
    spans, i = [], 0
    while (m := BOXED_RE.search(text, i)):
        if not m.group().endswith("{"):  # \boxed 2: up to the next space or $
            bare = re.match(r"[^\s${}]+", text[m.end():])
            spans.append((m.start(), m.end() + len(bare.group()), bare.group()))
            i = m.end() + len(bare.group())
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # never closed: look for a later box
            i = m.end()
            continue
        spans.append((m.start(), j, text[m.end():j - 1]))
        i = j
    return spans


def last_boxed(text):
    spans = [content for _, _, content in boxed_spans(text) if content.strip()]  # an empty box: no answer
    return spans[-1] if spans else None


def marked_spans(text):
    """The rest of the line after the last '####' / 'answer is' / 'answer:' marker and after each later marker
    on it, the last first ("the answer is 20, no: the answer is 18" gives '18', then '20, no: ...')."""
    spans = ANSWER_MARK_RE.findall(text)[-1:]
    while spans and (inner := ANSWER_MARK_RE.findall(spans[-1])):
        spans.append(inner[-1])
    return spans[::-1]


def parse_number(s):
    """First number in s as an exact Fraction ('1,000' and '1{,}000' -> 1000, '\\frac{1}{2}' and '1/2' -> 1/2,
    '3\\frac{1}{2}' -> 7/2), or None, also when it begins an expression ('2^{10}', '5 \\times 4', '3-4')."""
    s = s.replace("\u2212", "-").replace("\\!", "").replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = re.sub(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))", ",", s)  # LaTeX thousands: 1{,}000, 70\,000
    frac = (re.search(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s)
            or re.search(r"(-?)(\d+)\s*/\s*(\d+)(?![\d.])", s))
    plain = NUMBER_RE.search(s)
    try:
        if frac and (not plain or frac.start() <= plain.start()):
            value = Fraction(int(frac.group(2)), int(frac.group(3)))
            return -value if frac.group(1) else value
        if not plain or OPERATOR_RE.match(s, plain.end()):
            return None
        value = Fraction(plain.group().replace(",", ""))
        if frac and not frac.group(1) and "frac" in frac.group() and not s[plain.end():frac.start()].strip():
            part = Fraction(int(frac.group(2)), int(frac.group(3)))  # a mixed number, 3\frac{1}{2}
            value += -part if plain.group().startswith("-") else part
        return value
    except (ValueError, ZeroDivisionError):  # huge digit strings, x/0
        return None


def format_number(value):
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def normalize_math(s):
    """MATH answer string -> canonical form (Hendrycks-style string rules, numbers made exact)."""
    s = s.strip().replace("\n", " ").replace("\u2212", "-")
    for old, new in [("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\displaystyle", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""),
                     ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\\dollars", "")]:
        s = s.replace(old, new)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s+[^{}]*\}(?:\^\{?[23]\}?)?$", "", s).strip()  # "5\text{ cm}^2"
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|textrm)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s*(?:degrees?|units?|cm|inches|meters?)$", "", s)
    s = re.sub(r"^[a-zA-Z]\s*(?:=|\\in\b)\s*", "", s)  # "x = 5" -> "5", "x \in [-2,7]" -> "[-2,7]"
    s = re.sub(r"^\\\{(.*)\\\}$", r"\1", s)  # a set: \{1, -2\} -> 1, -2
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac9{19}
    s = re.sub(r"(?<!\d)\\frac\{(-?\d+)\}\{(-?\d+)\}", r"\1/\2", s)  # \frac{1}{5} -> 1/5, in a vector too
    s = re.sub(r"_\{(\w+)\}(?![\w{\\])", r"_\1", s)  # a base: 4210_{5} -> 4210_5 (not \log_{10}5)
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # an option: (C) -> C
    s = s.lower() if re.fullmatch(r"[A-Za-z]{3,}", s) else s  # a word: East = east
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    # a number, a fraction, or a mixed number (1\frac{2}{3}): parse_number makes it exact
    number = r"\d+(,\d{3})*(\.\d+)?|\.\d+|\d+/\d+|\\frac\{-?\d+\}\{-?\d+\}|\d+\\frac\{\d+\}\{\d+\}"
    if re.fullmatch(f"-?({number})", s):
        value = parse_number(s)
        if value is not None:
            return format_number(value)
    return s


def extract_answer(text, kind, fallback=True):
    """The final answer of a model output, normalised for comparison, or None. number and integer: the last
    \\boxed{}, else the last answer marker's line, else (fallback) the last number; math: the last \\boxed{};
    choice: a letter A-D boxed, marked or (fallback) alone. fallback=False: explicit answers only."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if kind == "math":
        return normalize_math(boxed) if boxed is not None and boxed.strip() else None
    if kind == "choice":
        bare = text.strip() if fallback and len(text.strip()) <= 4 else None
        for span in (boxed, *marked_spans(text), bare):
            letter = LETTER_RE.search(re.sub(r"\\text\{([^{}]*)\}", r"\1", span)) if span else None
            if letter:
                return letter.group(1)
        return None
    value = None
    in_box = None if boxed is None else re.sub(r"^\s*-\s+", "-", boxed.rsplit("=", 1)[-1])  # {6 \cdot 3 = 18}
    for span in (in_box, *marked_spans(text)):
        if span is not None and (value := parse_number(span)) is not None:
            break
    if value is None and fallback and boxed is None:  # a boxed answer that is no one number is no answer
        numbers = NUMBER_RE.findall(text.replace("\u2212", "-"))
        value = parse_number(numbers[-1]) if numbers else None
    if value is None or (kind == "integer" and value.denominator != 1):
        return None
    return format_number(value)


def normalize_gold(gold, kind):
    """The gold answer in the same canonical form as extract_answer."""
    if kind == "math":
        return normalize_math(gold)
    if kind == "choice":
        return gold.strip().upper()
    value = parse_number(gold)
    return format_number(value) if value is not None else gold.strip()


def is_correct(text, gold, kind):
    """Correctness c(tau) in {0, 1}: the extracted answer equals the normalised gold."""
    if extract_answer(text, kind) != normalize_gold(gold, kind):  # None (no answer) is never a gold
        return False
    if kind == "math":  # normalize_math drops 'x =', but 'y = 3/2' is not the asymptote 'x = 3/2'
        named = [re.match(r"\s*([a-zA-Z])\s*=", s) for s in (last_boxed(text), gold)]
        return len({m.group(1).lower() for m in named if m}) < 2
    return True


# A final-answer statement: optional emphasis and lead-in ("So the final"), the marker and value that
# extract_answer reads, through the end of the sentence holding the value's first digit or letter (closing
# markup included), or of the line; a marker whose value was a removed box ends at its own punctuation.
SENTENCE_END = r"(?:(?<=[.!?])[*_)\]\"']*(?=\s)|$)"
ANSWER_STATEMENT_RE = re.compile(
    r"[*_]*(?:(?:so|thus|therefore|hence)\b,?\s*)?(?:(?:the|our|my)\s+)?(?:final\s+)?" + ANSWER_MARK
    + r"(?:[.!?,;]?[*_)\]\"']*(?=\s|$)|[^\n]*?(?:\d|(?-i:\b[A-D]\b))[^\n]*?" + SENTENCE_END + r"|[^\n]*$)",
    re.IGNORECASE | re.MULTILINE)
FINAL_HEADING_RE = re.compile(r"^[#*_ \t]*final answer\b[*_:]*", re.IGNORECASE | re.MULTILINE)  # a heading
BOX_LEFTOVER_RE = re.compile(r"\$+\x00\$+|\\\[\s*\x00\s*\\\]|\\\(\s*\x00\s*\\\)|\x00")  # a removed box's $ $


def strip_answer(text):
    """The trace without its final answers: boxed spans and each statement extract_answer reads as one, to the
    end of its sentence; the reasoning before it on the same line stays."""
    if not isinstance(text, str):
        return ""
    pieces, last, text = [], 0, text.replace("\x00", "")
    for start, end, _ in boxed_spans(text):
        pieces.append(text[last:start] + "\x00")  # \x00 marks the box, to drop its math delimiters with it
        last = end
    text = "".join(pieces) + text[last:]
    text = BOX_LEFTOVER_RE.sub("", BOXED_RE.sub("", text))  # an unclosed box: its opener goes
    text = FINAL_HEADING_RE.sub("", ANSWER_STATEMENT_RE.sub("", text))
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def is_bare_answer(text, gold, kind):
    """Whether a stripped trace is nothing but the gold answer ('18.', '$18$', '(B)'): no hint is given then.
    The whole text is compared, never its first number."""
    bare = re.sub(r"^[\s*_(\[]+|[\s*_)\].]+$", "", text)
    if kind == "choice":
        return bare.upper() == normalize_gold(gold, kind)
    return bare != "" and normalize_math(bare) == normalize_math(gold)


SIGN = r"(?:(?<![\w)])-)?"  # a minus sign, not a subtraction ("20-5" reads 20 and 5)
VALUE_RE = re.compile(SIGN + r"\\[dt]?frac\{-?\d+\}\{-?\d+\}|" + SIGN + r"\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|"
                      + SIGN + r"\.\d+")


def gold_visible(text, problem):
    """The hint leak: whether a reader who knows what to look for reads the gold in `text`. A number (and a
    numeric MATH answer) appears as a number; another MATH answer appears in the normalised text; the correct
    option is named by its letter ("(B)", "option B", "answer: B") or its text."""
    gold = normalize_gold(problem.gold, problem.kind)
    if problem.kind == "choice":
        option = re.search(rf"^\({gold}\)\s*(.+?)\s*$", problem.question, re.MULTILINE)
        named = rf"\({gold}\)|(?i:option|choice|answer)\s*(?:is\s*)?:?\s*\(?{gold}\b"
        return bool(re.search(named, text) or option and re.search(
            rf"(?<!\w){re.escape(option.group(1))}(?!\w)", text, re.IGNORECASE))
    if problem.kind != "math" or re.fullmatch(r"-?\d+(?:/\d+)?", gold):
        value = parse_number(gold)
        return value is not None and any(parse_number(v) == value for v in VALUE_RE.findall(text))
    return gold in normalize_math(text)


# -----------------------------------------------------------------------------
# Data: six public datasets (downloaded once into a cache) or the user's own JSONL

@dataclass
class Problem:
    id: str        # stable id within its dataset
    question: str  # full question text (GPQA: with the lettered options)
    gold: str      # gold final answer
    kind: str      # answer kind: number | math | integer | choice
    source: str = ""  # the file it was read from ("": generated, as the demo's)


GITHUB, HF = "https://raw.githubusercontent.com", "https://huggingface.co/datasets"
SOURCES = {  # each file is downloaded once into the cache, or read from --data-dir/<name>/<file>
    "gsm8k": {f"{s}.jsonl": f"{GITHUB}/openai/grade-school-math/master/grade_school_math/data/{s}.jsonl"
              for s in ("train", "test")},
    "math": {"MATH.tar": "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"},
    "math500": {"test.jsonl": f"{HF}/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"},
    "aime24": {"test.jsonl": f"{GITHUB}/QwenLM/Qwen2.5-Math/main/evaluation/data/aime24/test.jsonl"},
    "aime25": {"test.jsonl": f"{HF}/math-ai/aime25/resolve/main/test.jsonl"},
    "gpqa": {"dataset.zip": "https://github.com/idavidrein/gpqa/raw/main/dataset.zip"},
}
GPQA_PASSWORD = b"deserted-untie-orchid"  # public, from the GPQA README
CACHE_DIR = Path(os.environ.get("CORE_CACHE", Path.home() / ".cache" / "core"))


def load_data(cfg):
    """(training set, test set): cfg.train_n seeded training questions and the first cfg.eval_n test
    questions (--eval-only on a single-file dataset: all of it)."""
    train_set = [] if cfg.eval_only else load_problems(cfg.data, "train", cfg.data_dir, cfg.seed)
    test_split = "all" if cfg.eval_only and cfg.data in ("aime24", "aime25", "gpqa") else "test"
    test_set = load_problems(cfg.data, test_split, cfg.data_dir, cfg.seed)
    random.Random(cfg.seed).shuffle(train_set)
    train_set, test_set = train_set[:cfg.train_n], test_set[:cfg.eval_n] if cfg.eval_n else test_set
    public = cfg.data in DATASET_NAMES or Path(cfg.data).name in DATASET_NAMES
    print(f"data: {cfg.data}: {len(train_set)} train / {len(test_set)} test questions, answer kind "
          f"{test_set[0].kind}{'' if public else ' (inferred from the golds)'}")
    return train_set, test_set


def load_problems(name, split, data_dir="", seed=42):
    """Problems of a dataset split ('train', 'test' or 'all'); `name` is a dataset name or a local path."""
    path = Path(name)
    if name not in DATASET_NAMES and path.is_dir() and path.name in DATASET_NAMES:  # e.g. shared/data/gsm8k
        name, data_dir = path.name, str(path.parent)
    if name in DATASET_NAMES:
        problems = public_problems(name, split, data_dir, seed)
    elif path.is_dir():
        files = {s: path / f"{s}.jsonl" for s in ("train", "test")}
        if files["train"].exists() and files["test"].exists() and split != "all":
            problems = jsonl_problems(files[split])
        else:
            problems = split_80_20(sum((jsonl_problems(p) for p in sorted(path.glob("*.jsonl"))), []), split)
    else:
        problems = split_80_20(jsonl_problems(path), split)
    if not problems:
        raise UsageError(f"no usable problems in dataset '{name}' (split {split})")
    return problems


def public_problems(name, split, data_dir, seed):
    splits = ["train", "test"] if split == "all" else [split]
    if name == "gsm8k":
        return sum((jsonl_problems(locate("gsm8k", f"{s}.jsonl", data_dir), "number") for s in splits), [])
    if name == "gpqa":
        return split_80_20(gpqa_problems(locate("gpqa", "dataset.zip", data_dir), seed), split)
    if name in ("aime24", "aime25"):
        problems = split_80_20(jsonl_problems(locate(name, "test.jsonl", data_dir), "integer"), split)
        return [replace(p, question=p.question.replace("\x0c", "\\f").replace("\t", "\\t")) for p in problems]
    problems = []  # math, math500: MATH's train split; the test split of MATH or MATH-500
    for s in splits:
        local = Path(data_dir) / (name if s == "test" else "math") / f"{s}.jsonl" if data_dir else None
        if local and local.exists():
            problems += jsonl_problems(local, "math")
        elif s == "test" and name == "math500":
            problems += jsonl_problems(locate("math500", "test.jsonl", data_dir), "math")
        else:
            problems += math_tar_problems(locate("math", "MATH.tar", data_dir), s)
    return problems


def locate(name, filename, data_dir):
    """Path of a dataset file: --data-dir first, then the cache, else download it into the cache."""
    if data_dir and (Path(data_dir) / name / filename).exists():
        return Path(data_dir) / name / filename
    cached = CACHE_DIR / name / filename
    if cached.exists():
        return cached
    url = SOURCES[name][filename]
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except Exception as e:
        files = ", ".join(f"{CACHE_DIR / name / f} ({u})" for f, u in SOURCES[name].items())
        looked = f"{Path(data_dir) / name / filename} does not exist and " if data_dir else ""
        elsewhere = (f"in {Path(data_dir) / name}/" if data_dir
                     else f"pass --data-dir DIR with them in DIR/{name}/")
        raise UsageError(f"{looked}cannot download {url} ({type(e).__name__}); offline? put the files of "
                         f"'{name}' at {files}, or {elsewhere}") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.with_suffix(".part").write_bytes(payload)
    os.replace(cached.with_suffix(".part"), cached)
    return cached


def jsonl_problems(path, kind=None):
    """Problems of a JSONL file. kind=None: a user's file, strict (a bad row is an error), its kind guessed
    from the golds; else a public dataset, whose few rows without a usable gold are skipped."""
    problems, unusable = [], 0
    for lineno, row in enumerate(read_jsonl(path), 1):
        try:
            where = f"{path}:{lineno}"
            problems.append(row_to_problem(row, kind or "math", f"{path.stem}-{lineno}", where, path))
        except UsageError:
            if kind is None:
                raise
            unusable += 1
    if unusable:
        print(f"note: {unusable} row(s) of {path} skipped: no question or no gold answer")
    if kind is None:
        kinds = {guess_kind(p.gold) for p in problems}
        guessed = kinds.pop() if len(kinds) == 1 else "math"  # one kind for the whole file
        problems = [replace(p, kind=guessed) for p in problems]
    return problems


def row_to_problem(row, kind, pid, where, source):
    """One row of the file `source` -> Problem: GSM8K, MATH, MATH-500, AIME and generic {question, answer}."""
    question = row.get("question") or row.get("problem") or row.get("Question")
    if "answer" in row and row["answer"] is not None:
        answer = str(row["answer"])
        gold = gsm8k_gold(answer) if "####" in answer else answer.strip()
    else:
        gold = last_boxed(row["solution"]) if row.get("solution") else None
    if not isinstance(question, str) or not question.strip():
        raise UsageError(f"{where}: row has no 'question' or 'problem' field")
    if not gold:
        raise UsageError(f"{where}: row has no 'answer' field (or 'solution' with a \\boxed answer)")
    pid = str(row.get("unique_id") or row.get("id") or pid)
    return Problem(pid, question.strip(), gold, kind, str(source))


def gsm8k_gold(solution):
    return solution.split("####")[-1].strip().replace(",", "")


def guess_kind(gold):
    """choice for a letter A-D, number for a plain number ('1,000', '-0.5', '$5', '5%'), math for the rest."""
    gold = gold.strip()
    if re.fullmatch(r"[A-D]", gold):
        return "choice"
    plain = re.sub(r"^[+$]|[%.]$", "", gold.replace("\u2212", "-"))  # '+5', '$5', '5%', '5.', a Unicode minus
    return "number" if NUMBER_RE.fullmatch(plain) or re.fullmatch(r"-?\d+/\d+", plain) else "math"


def gpqa_problems(zip_path, seed):
    """GPQA Diamond from the upstream password-protected zip; options shuffled with a fixed seed per row."""
    with zipfile.ZipFile(zip_path) as z:
        text = z.read("dataset/gpqa_diamond.csv", pwd=GPQA_PASSWORD).decode("utf-8")
    problems = []
    for row in csv.DictReader(io.StringIO(text)):
        options = [row["Correct Answer"]] + [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
        order = list(range(4))
        random.Random(f"{seed}-{row['Record ID']}").shuffle(order)
        lines = [f"({'ABCD'[pos]}) {options[o].strip()}" for pos, o in enumerate(order)]
        question = row["Question"].strip() + "\n\n" + "\n".join(lines)
        problems.append(Problem(row["Record ID"], question, "ABCD"[order.index(0)], "choice", str(zip_path)))
    return problems


def math_tar_problems(tar_path, split):
    """MATH from the original Hendrycks tarball (one JSON file per problem)."""
    problems = []
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if member.isfile() and member.name.endswith(".json") and len(parts) >= 3 and parts[-3] == split:
                with contextlib.suppress(UsageError):  # the few rows without a usable \\boxed gold
                    row = json.load(tar.extractfile(member))
                    problems.append(row_to_problem(row, "math", "/".join(parts[-3:]), member.name, tar_path))
    return problems


def split_80_20(problems, split):
    """Single-file datasets: first 80% train, last 20% test (by file order); 'all' keeps everything."""
    cut = int(0.8 * len(problems))
    return {"train": problems[:cut], "test": problems[cut:], "all": problems}[split]


def training_order(n, step, batch, seed):
    """Indices of the questions of `step`: epochs of seeded shuffles, so the order follows from step alone."""
    indices = []
    for epoch, offset in (divmod(i, n) for i in range(step * batch, (step + 1) * batch)):
        order = list(range(n))
        random.Random(stream_seed(seed, "data order", epoch)).shuffle(order)
        indices.append(order[offset])
    return indices


# -----------------------------------------------------------------------------
# Evaluation: cold prompts only, k samples per model and question, each model from its own stream; every
# number is computed from the per-question records written next to it

def evaluate(policies, test_set, cfg, tag):
    """Prints the table; returns (metrics, records), a record per question: id, question, gold and, per model
    ('m1', 'm2'), every sample's extracted answer, correctness, token count, truncation and text. The metrics
    name what was evaluated: the question set's fingerprint (equal on every rank) and the settings."""
    rank, world = dist_info()
    settings = eval_settings(cfg)
    fingerprint = question_set(test_set, settings)
    fingerprints = set(all_gather(fingerprint))  # checked before any sampling
    if len(fingerprints) > 1:
        raise TrainingError(f"the {world} processes hold different test questions (is the data the same on "
                            f"every machine?): question sets {sorted(f[:12] for f in fingerprints)}")
    mine = list(enumerate(test_set))[rank::world]  # this rank's share of the questions
    start = time.time()
    records = [{"index": i, "id": p.id, "question": p.question, "gold": p.gold} for i, p in mine]
    progress = Progress(f"{tag}: evaluating", len(policies) * len(mine) * cfg.eval_k, always=True)
    for m, pol in enumerate(policies, 1):
        prompts = [build_prompt(pol.tokenizer, p.question, p.kind) for _, p in mine]
        stream = torch.Generator(device=pol.device).manual_seed(stream_seed(cfg.seed, "evaluation", m, rank))
        outs = generate(pol, prompts, cfg.eval_max_new_tokens, cfg, cfg.eval_k, stream, progress)
        for q, (r, (_, p)) in enumerate(zip(records, mine)):
            r[f"m{m}"] = [graded_answer(ids, text, p, pol.eos_ids, cfg.eval_max_new_tokens)
                          for ids, text, _ in outs[q * cfg.eval_k:(q + 1) * cfg.eval_k]]
    progress.close()
    records = sorted((r for shard in all_gather(records) for r in shard), key=lambda r: r.pop("index"))
    metrics = eval_metrics(records, cfg.eval_k) | {"seconds": time.time() - start}
    metrics |= {"question_set": fingerprint, "eval_settings": settings}
    print_table(tag, metrics, [p.name for p in policies])
    return metrics, records


def graded_answer(ids, text, problem, eos_ids, budget):
    correct = is_correct(text, problem.gold, problem.kind)  # c(tau), as in training
    return {"answer": extract_answer(text, problem.kind), "correct": correct, "tokens": len(ids),
            "truncated": hit_budget(ids, budget, eos_ids), "text": text}


def eval_metrics(records, k):
    """Every number of an evaluation, from its records. With k even, also the team over the first k/2 samples
    of each model: k candidates, the budget of one model's Pass@k and maj@k."""
    metrics = {"questions": len(records), "k": k}
    for m in (m for m in (1, 2) if f"m{m}" in records[0]):  # one model alone: no team numbers
        metrics |= model_metrics(records, m, k)
    if "m2" in records[0]:
        metrics |= team_metrics(records, k) | (team_metrics(records, k // 2) if k % 2 == 0 else {})
    return metrics


def pass_at(n, c, j):
    """Unbiased Pass@j (Chen et al. 2021), c correct among n samples: 1 - C(n - c, j) / C(n, j)."""
    return 1.0 - math.comb(n - c, j) / math.comb(n, j)


def majority_correct(samples):
    """1 if the majority answer of `samples` is correct, else 0; a tie scores the fraction of the tied answers
    that are correct. Samples without an answer do not vote; no vote scores 0."""
    answers = [s["answer"] for s in samples if s["answer"] is not None]
    counts = {a: answers.count(a) for a in answers}
    tied = [a for a, c in counts.items() if c == max(counts.values())]
    right = {s["answer"] for s in samples if s["correct"]}
    return sum(a in right for a in tied) / len(tied) if tied else 0.0


def model_metrics(records, m, k):
    """Model m: Pass@j for j = 1..k, maj@k (self-consistency), mean sample length, fraction truncated."""
    samples = [r[f"m{m}"] for r in records]
    correct = [sum(s["correct"] for s in ss) for ss in samples]
    out = {f"pass@{j}_m{m}": sum(pass_at(k, c, j) for c in correct) / len(samples) for j in range(1, k + 1)}
    out[f"maj@{k}_m{m}"] = sum(map(majority_correct, samples)) / len(samples)
    flat = [s for ss in samples for s in ss]
    out[f"tokens_m{m}"] = sum(s["tokens"] for s in flat) / len(flat)
    out[f"truncated_m{m}"] = sum(s["truncated"] for s in flat) / len(flat)
    return out


def team_metrics(records, j):
    """The team over the first j samples of each model. Team Pass@j: any of the 2j is correct (the paper's
    oracle). Team vote@j: their majority answer is correct (ties: majority_correct). p_12: both models
    solve it. Joint failure: both fail. Correlated failure: joint failure - the product of failure rates."""
    n = len(records)
    solved1, solved2 = ([any(s["correct"] for s in r[f"m{m}"][:j]) for r in records] for m in (1, 2))
    joint = sum(not a and not b for a, b in zip(solved1, solved2)) / n
    votes = [majority_correct(r["m1"][:j] + r["m2"][:j]) for r in records]  # the 2j candidates' vote
    return {f"team_pass@{j}": sum(a or b for a, b in zip(solved1, solved2)) / n,
            f"team_vote@{j}": sum(votes) / n,
            f"p_12@{j}": sum(a and b for a, b in zip(solved1, solved2)) / n,
            f"joint_failure@{j}": joint,
            f"correlated_failure@{j}": joint - (1 - sum(solved1) / n) * (1 - sum(solved2) / n)}


def run_evaluation(policies, test_set, cfg, out, name, tag, step=None):
    """evaluate(), then out/NAME.json and its records out/NAME_samples.jsonl; an evaluation with a `step` also
    goes into out/evals.jsonl, the run's evaluation curve."""
    metrics, records = evaluate(policies, test_set, cfg, tag)
    if dist_info()[0] == 0:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(metrics, indent=1))
        write_jsonl(out / f"{name}_samples.jsonl", records)
        if step is not None:
            append_jsonl(out / "evals.jsonl", {"step": step} | metrics)
    return metrics


def print_table(tag, m, names):
    """The evaluation as one block; k even: the team at k candidates beside each model's Pass@k and maj@k."""
    k, n = m["k"], m["questions"]
    print(f"\n{tag}: {n} question{'s' * (n != 1)}, {k} sample{'s' * (k != 1)} per model (question set "
          f"{m['question_set'][:12]})")
    header = "".join(f"{f'Pass@{j}':>8}" for j in range(1, k + 1))
    print(f"  {'':<28}{header}{f'maj@{k}':>8}{'truncated':>10}")
    for i, name in enumerate(names, 1):
        passes = "".join(f"{m[f'pass@{j}_m{i}']:>8.3f}" for j in range(1, k + 1))
        print(f"  {shortened(name, 28):<28}{passes}{m[f'maj@{k}_m{i}']:>8.3f}{m[f'truncated_m{i}']:>10.3f}")
    if len(names) == 1:  # one model alone
        return print()
    print(f"  team, {k} + {k} samples: Team Pass@{k} {m[f'team_pass@{k}']:.3f} | team vote "
          f"{m[f'team_vote@{k}']:.3f} | p_12 (both right) {m[f'p_12@{k}']:.3f} | joint failure "
          f"{m[f'joint_failure@{k}']:.3f} | correlated failure {m[f'correlated_failure@{k}']:+.3f}")
    if k % 2 == 0:
        h = k // 2
        print(f"  at an equal budget of {k} candidates:")
        print(f"    {f'team, {h} + {h} samples':<26} Team Pass@{h} {m[f'team_pass@{h}']:.3f}   "
              f"team vote {m[f'team_vote@{h}']:.3f}   p_12 {m[f'p_12@{h}']:.3f}")
        for i, name in enumerate(names, 1):
            print(f"    {shortened(name, 26):<26} best-of-{k} (Pass@{k}) {m[f'pass@{k}_m{i}']:.3f}   "
                  f"self-consistency (maj@{k}) {m[f'maj@{k}_m{i}']:.3f}")
    print()


def shortened(name, width):
    return name if len(name) <= width else name[:width - 3] + "..."


# -----------------------------------------------------------------------------
# Checkpoints and resume: each written to a temporary folder and renamed into place (a kill leaves no half)

def save_checkpoint(run, done):
    """checkpoints/step_NNNNNN/ after `done` steps: adapters (PEFT's layout), optimizer states, every rank's
    RNG states, data position, loop state, config and each file's sha256. Every rank takes part; rank 0 writes
    (durable_rename). A damaged checkpoint of this step is replaced; the damaged ones set aside at a resume
    are deleted once the run has saved their step or a later one."""
    cfg, policies, out = run.cfg, run.policies, run.out
    check_in_sync(policies)
    rngs = all_gather((rng_tensors(policies), [policy.hint_draws.getstate() for policy in policies]))
    if dist_info()[0] != 0:
        return None
    root = out / "checkpoints"
    final, tmp = root / f"step_{done:06d}", root / f".tmp-step_{done:06d}"
    if final.exists() and checkpoint_damage(final) is None:
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for m, policy in enumerate(policies, 1):
        save_lora(policy.model, tmp / f"adapter_{m}", getattr(cfg, f"model{m}"))
        tensors, meta = optimizer_tensors(policy.optimizer)
        save_file(tensors, str(tmp / f"optimizer_{m}.safetensors"), metadata=meta)
    save_file({f"rank{r}.{k}": v for r, (tensors, _) in enumerate(rngs) for k, v in tensors.items()},
              str(tmp / "rng.safetensors"))
    files = {f.relative_to(tmp).as_posix(): file_sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    state = {"step": done, "data_position": done * cfg.batch_questions, "world_size": len(rngs),
             "python_rng": [py for _, py in rngs], "loop_state": run.loop_state, "config": asdict(cfg),
             "sha256": files}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # damaged (a crash)
        set_aside(final)
    durable_rename(tmp, final)
    for old in checkpoints(out)[:-cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    for damaged in root.glob(".damaged-step_*"):
        if damaged.name.removeprefix(".damaged-") <= final.name:  # superseded by this checkpoint
            shutil.rmtree(damaged, ignore_errors=True)
    return final


def durable_rename(tmp, final):
    """Renames the folder tmp to final so that a machine crash leaves one or the other whole: every file and
    folder is fsync'd before the rename, the two folders above it after (the rename; a new checkpoints/)."""
    for path in [*sorted(tmp.rglob("*")), tmp]:
        fsync(path)
    os.replace(tmp, final)
    fsync(final.parent)
    fsync(final.parent.parent)


def set_aside(folder):
    """A damaged checkpoint, renamed .damaged-step_N: out of the checkpoints a resume or --keep counts, kept
    (its adapters may still be usable by hand) until the run saves that step or a later one."""
    aside = folder.with_name(f".damaged-{folder.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)


def fsync(path):
    """Flushes a file, or a folder's entries, to the disk (Windows cannot open a folder: skipped there)."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable ones only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(folder, policies, with_optimizer=True):
    """Restore adapters (and the optimizer and RNG states, to resume); returns the saved state."""
    state = checkpoint_state(folder)
    for m, policy in enumerate(policies, 1):
        load_lora(policy.model, folder / f"adapter_{m}")
        if with_optimizer:
            load_optimizer(policy.optimizer, folder / f"optimizer_{m}.safetensors")
    if not with_optimizer:
        return state
    rank, world = dist_info()
    if state["world_size"] != world:
        raise UsageError(f"{folder} was written by {state['world_size']} process(es); resume it with as many "
                         f"(torchrun --nproc_per_node {state['world_size']})")
    rngs = load_file(str(folder / "rng.safetensors"))
    mine = {k.split(".", 1)[1]: v for k, v in rngs.items() if k.startswith(f"rank{rank}.")}
    torch.set_rng_state(mine["torch_cpu"])
    for m, policy in enumerate(policies, 1):
        policy.generator.set_state(mine[f"sampler_{m}"])  # generator states live on the CPU, CUDA ones too
    cuda = [mine[k] for k in sorted((k for k in mine if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])  # in device order
    saved = state["python_rng"][rank]  # each model's hint-dropout stream
    if isinstance(saved[0], int):  # an older checkpoint's one stream for both models: model 1's now
        saved = [saved] + [policy.hint_draws.getstate() for policy in policies[1:]]
    for policy, (version, internal, gauss) in zip(policies, saved):
        policy.hint_draws.setstate((version, tuple(internal), gauss))
    return state


def optimizer_tensors(optimizer):
    """AdamW state as flat safetensors entries, and its param groups as JSON metadata."""
    state = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value.detach().cpu().contiguous()
               for pid, slots in state["state"].items() for key, value in slots.items()}
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def load_optimizer(optimizer, path):
    state = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            pid, slot = key.split(".", 1)
            state.setdefault(int(pid), {})[slot] = f.get_tensor(key)
        groups = json.loads(f.metadata()["param_groups"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(policies):
    """This process's RNG states: torch CPU, each model's sampler, CUDA."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    tensors |= {f"sampler_{m}": policy.generator.get_state().cpu() for m, policy in enumerate(policies, 1)}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return tensors | {f"cuda_{i}": state for i, state in enumerate(cuda)}


def check_in_sync(policies):
    """Data-parallel guard: every rank must hold the same adapters (they take identical steps)."""
    sums = all_gather([sum(p.detach().double().sum().item() for p in lora_parameters(pol.model))
                       for pol in policies])
    if not all(math.isfinite(x) for rank_sums in sums for x in rank_sums):
        raise TrainingError("the adapters hold non-finite weights (an --lr or --weight-decay too large?): "
                            "stopping; the checkpoints saved before are kept")
    if any(not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for other in sums
           for a, b in zip(sums[0], other)):
        raise TrainingError(f"adapters differ across ranks (checksums {sums}): stopping")


def checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "state.json").exists())


def find_checkpoint(path, warn=False):
    """A checkpoint folder itself, or the newest checkpoint of a run folder that loads (newest_checkpoint);
    a checkpoint that does not load is a UsageError."""
    path = Path(path)
    if (path / "state.json").exists():
        if damage := checkpoint_damage(path):
            raise UsageError(f"checkpoint {path} does not load ({damage})")
        return path
    found = newest_checkpoint(path, warn)
    if not found:
        raise UsageError(f"no checkpoint in '{path}' (expected {path}/checkpoints/step_*/state.json)")
    return found


def newest_checkpoint(run_dir, warn=False):
    """The newest checkpoint of a run that loads; a damaged one (what a machine crash can leave) is passed
    over, named if `warn`. None for a run without checkpoints; a UsageError if none loads (none deleted)."""
    found = checkpoints(run_dir)
    for folder in reversed(found):
        damage = checkpoint_damage(folder)
        if damage is None:
            return folder
        if warn:
            print(f"warning: checkpoint {folder} does not load ({damage}): going on from the one before it "
                  f"(the steps since run again; a resume sets this one aside as .damaged-{folder.name})")
    if found:
        raise UsageError(f"none of the {len(found)} checkpoints in {Path(run_dir) / 'checkpoints'} loads "
                         f"(the newest: {checkpoint_damage(found[-1])}); nothing was deleted")
    return None


def checkpoint_damage(folder):
    """Why a checkpoint would not load, or None: state.json must parse and every file must have the sha256 it
    records (an older checkpoint, without them: every safetensors file must open)."""
    try:
        state = checkpoint_state(folder)
        if not isinstance(state, dict) or "step" not in state:
            return "state.json holds no step"
        for name, digest in state.get("sha256", {}).items():
            if file_sha256(Path(folder) / name) != digest:
                return f"{name} is not the file that was saved"
        if "sha256" not in state:  # an older checkpoint
            for path in Path(folder).rglob("*.safetensors"):
                safe_open(str(path), "pt")
    except (OSError, ValueError, SafetensorError) as e:  # ValueError: state.json is not JSON
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def checkpoint_state(folder):
    return json.loads((Path(folder) / "state.json").read_text())


def saved_config(path):
    """The Config of a checkpoint folder or a run's config.json, older runs' settings mapped to today's."""
    saved = checkpoint_state(path)["config"] if Path(path).is_dir() else json.loads(Path(path).read_text())
    saved.pop("export", None)
    for old, decoder in (("eager_decode", "reference"), ("compile_decode", "graphs")):
        saved["decoder"] = decoder if saved.pop(old, False) else saved.get("decoder", "graphs")
    saved["decoder"] = "graphs" if saved["decoder"] == "compiled" else saved["decoder"]
    return Config(**saved)


def keep_logged_steps(out, step):
    """On resume, drop the log rows of steps after `step` (the checkpoint resumed from): they run again."""
    for name in ("metrics.jsonl", "samples.jsonl", "evals.jsonl"):
        if (out / name).exists():
            rows = read_jsonl(out / name, lenient=True)
            write_jsonl(out / name, [row for row in rows if row["step"] <= step])


def resume_config(cfg, given):
    """The saved config of the run --resume names (its newest checkpoint's, else its config.json), with the
    RESUME_OVERRIDES flags among `given` applied; another given flag that differs is a UsageError."""
    found, config_file = newest_checkpoint(cfg.resume), Path(cfg.resume) / "config.json"
    if not found and not config_file.is_file():
        raise UsageError(f"'{cfg.resume}' is not a run folder (no checkpoint, no config.json)")
    saved = saved_config(found or config_file)
    changed = sorted(k for k in given - RESUME_OVERRIDES - {"resume"} if getattr(cfg, k) != getattr(saved, k))
    if "steps" in changed:
        raise UsageError(f"--steps cannot change on --resume: the learning-rate and reward schedules span "
                         f"the run's {saved.steps} steps. To train longer, start a new run from its adapters:"
                         f" python core.py --adapters {cfg.resume} --steps N (with the run's other flags)")
    if changed:
        allowed = ', '.join(map(flag_name, sorted(RESUME_OVERRIDES)))
        raise UsageError(f"--resume continues the saved run, which {', '.join(map(flag_name, changed))} "
                         f"would change; only {allowed} may differ")
    overrides = {k: getattr(cfg, k) for k in given & RESUME_OVERRIDES}  # --stop-after: this invocation's only
    return replace(saved, **overrides | {"resume": cfg.resume, "stop_after": cfg.stop_after})


def adapters_config(cfg, given=frozenset()):
    """--adapters: the models it was trained on unless --model1/--model2 are given (`given`: the flags set;
    another model name warns), and the checkpoint's own LoRA rank, alpha and targets."""
    saved = saved_config(find_checkpoint(cfg.adapters))
    trained = {f"model{m}": getattr(saved, f"model{m}") for m in (1, 2) if f"model{m}" not in given}
    cfg = replace(cfg, **trained)
    if saved.model2 == "none" and cfg.model2 != "none":
        raise UsageError(f"{cfg.adapters} trained one model alone: evaluate it with --model2 none")
    for m in (1, 2):
        trained, given = getattr(saved, f"model{m}"), getattr(cfg, f"model{m}")
        if Path(trained).name != Path(given).name:
            print(f"warning: adapter {m} of {cfg.adapters} was trained on '{trained}', not on --model{m} "
                  f"'{given}'")
    return replace(cfg, lora_rank=saved.lora_rank, lora_alpha=saved.lora_alpha,
                   lora_targets=saved.lora_targets)


# -----------------------------------------------------------------------------
# Provenance: which code, libraries, device, models, data and questions made a run's numbers (no network)

def eval_settings(cfg):
    """The settings an evaluation's numbers depend on besides its questions and models."""
    return {"k": cfg.eval_k, "max_new_tokens": cfg.eval_max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "seed": cfg.seed}


def question_set(problems, settings):
    """The fingerprint of what an evaluation evaluates: sha256 of the ordered questions as the prompt template
    words them, their golds and kinds, and the settings. It is the same on every rank and machine (a model's
    chat template is the model's: its provenance); one changed question or setting changes it."""
    rows = [[user_prompt(p.question, p.kind), p.gold, p.kind] for p in problems]
    return hashlib.sha256(json.dumps([rows, settings], sort_keys=True).encode()).hexdigest()


def run_provenance(cfg, command, policies, adapters, train_set, test_set):
    """This invocation of the run, as provenance.json records it: the command, the code, the libraries, the
    world size, each model's source and device, the adapters loaded (a checkpoint folder or None), each data
    file read and the question counts."""
    files = sorted({str(Path(p.source).resolve()) for p in train_set + test_set if p.source})
    names = [f"model{m}" for m in range(1, len(policies) + 1)]
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command, "resumed": bool(cfg.resume),
            "code": code_version(), "versions": library_versions(), "world_size": dist_info()[1],
            "models": {name: model_source(path) for name, path in zip(names, model_paths(cfg))},
            "devices": {name: device_info(p.device) | {"dtype": str(p.model.dtype)}
                        for name, p in zip(names, policies)},
            "adapters": adapters_source(adapters, len(policies)) if adapters else None,
            "data": {"files": {f: file_sha256(f) for f in files}, "train_questions": len(train_set),
                     "test_questions": len(test_set)}}


def record_provenance(out, now):
    """Appends this invocation to out/provenance.json. A resumed run first warns of each difference from the
    invocation before it in code, libraries, models and data (fixing a bug and resuming is legitimate)."""
    path, before = out / "provenance.json", []
    try:
        before = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:  # not JSON (a crash while it was written): kept beside, a new history begun
        os.replace(path, path.with_suffix(".json.unreadable"))
        print(f"warning: {path} could not be read: kept as {path.name}.unreadable; a new one begins")
    if before:
        for key, old, new in provenance_changes(before[-1], now):
            print(f"warning: resumed with another {key}: {old} before, {new} now (provenance.json keeps "
                  f"both)")
    write_atomically(path, json.dumps(before + [now], indent=1))


def provenance_changes(before, now):
    """(what, before, now) for each leaf of code, versions, models and data that differs."""
    old, new = (flattened({key: p.get(key) for key in ("code", "versions", "models", "data")})
                for p in (before, now))
    return [(key, old.get(key, "none"), new.get(key, "none")) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def flattened(tree, prefix=""):
    """A nested dict as one level: {'models model1 commit': 'abc...'}."""
    if not isinstance(tree, dict):
        return {prefix.strip(): tree}
    return {k: v for key, sub in tree.items() for k, v in flattened(sub, f"{prefix} {key}").items()}


def code_version():
    """core.py's sha256; the commit of the git checkout holding it, read from .git (None outside one), and
    whether its Python files differ from it (asks git; None without a git binary)."""
    here = Path(__file__).resolve()
    try:
        commit = git_commit(here.parent)
    except (OSError, ValueError):  # a .git folder without HEAD, or unreadable
        commit = None
    return {"core_sha256": file_sha256(here), "git_commit": commit,
            "git_dirty": git_dirty(here.parent) if commit else None}


def git_commit(folder):
    """HEAD's commit, from the files of the .git folder above `folder` (a worktree's too): no git binary."""
    git = next((p / ".git" for p in (folder, *folder.parents) if (p / ".git").exists()), None)
    if git is None:
        return None
    if git.is_file():  # a worktree or submodule: "gitdir: PATH"
        git = (git.parent / git.read_text().removeprefix("gitdir:").strip()).resolve()
    common = (git / (git / "commondir").read_text().strip()) if (git / "commondir").is_file() else git
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head  # a detached HEAD
    ref = head.removeprefix("ref: ")
    for root in (git, common):
        if (root / ref).is_file():
            return (root / ref).read_text().strip()
    packed = common / "packed-refs"
    lines = packed.read_text().splitlines() if packed.is_file() else []
    return next((line.split()[0] for line in lines if line.endswith(" " + ref)), None)


def git_dirty(folder):
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
                                cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git binary
        return None
    return bool(status.stdout.strip()) if status.returncode == 0 else None


def library_versions():
    import safetensors
    import tokenizers
    import transformers
    return {"python": platform.python_version()} | {
        lib.__name__: lib.__version__ for lib in (torch, transformers, tokenizers, safetensors)}


MODEL_FILES = (".json", ".safetensors", ".bin", ".jinja", ".txt", ".model")  # config, weights, tokenizer


def model_source(name):
    """A local folder: its path and the sha256 of each of its MODEL_FILES (a full read: for a 14 GB pair, 10 s
    from the page cache, 17 s from a 0.84 GB/s disk: bench/results/hash_cost.txt); a hub id: the snapshot
    commit the local cache resolves it to, 'unknown' when not cached. The network is never asked."""
    if local_folder(name):
        folder = Path(name).expanduser().resolve()
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in MODEL_FILES)
        return {"folder": str(folder), "sha256": {f.name: file_sha256(f) for f in files}}
    from transformers.utils.hub import try_to_load_from_cache  # reads the cache's folders, nothing else
    found = None
    with contextlib.suppress(Exception):  # not a valid hub id
        found = try_to_load_from_cache(name, "config.json")  # a path in snapshots/COMMIT/, if cached
    return {"hub_id": name, "commit": Path(found).parent.name if isinstance(found, str) else "unknown"}


def adapters_source(folder, models):
    """The checkpoint --adapters loaded: its folder and each adapter's sha256."""
    folder = folder.resolve()
    files = {f"adapter_{m}": folder / f"adapter_{m}/adapter_model.safetensors" for m in range(1, models + 1)}
    return {"folder": str(folder), "sha256": {name: file_sha256(f) for name, f in files.items()}}


def device_info(device):
    """A device: CUDA's name, count, version and compute capability; the CPU's model, cores, threads and the
    vector instructions torch's kernels use (they move the CPU's numbers: docs/running.md)."""
    info = {"device": str(device)}
    if device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device)
        return info | {"name": gpu.name, "count": torch.cuda.device_count(), "cuda": torch.version.cuda,
                       "capability": f"{gpu.major}.{gpu.minor}"}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    name = found.group(1) if found else platform.processor() or platform.machine()
    return info | {"name": name, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Distributed: `torchrun --nproc_per_node N core.py ...` trains data-parallel (NCCL on GPUs, gloo on CPU).
# Each rank samples its share of every step's questions; token counts and LoRA gradients are summed over
# ranks, so every rank takes the same AdamW step; rank 0 logs and saves.

def dist_info():
    """(rank, world size); (0, 1) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(tensor):
    """Sum a tensor over ranks, in place (nothing to do in a single process)."""
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def all_gather(obj):
    """Every rank's `obj` (any picklable value), in rank order."""
    world = dist_info()[1]
    if world == 1:
        return [obj]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def all_reduce_grads(params):
    """Sum the gradients over ranks with one flat all-reduce (a rank without traces contributes zeros)."""
    if dist_info()[1] == 1:
        return
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    flat = all_reduce_sum(torch.cat(grads))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def barrier():
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def stream_seed(seed, stream, i=0, rank=0):
    """The seed of each random stream of a run (i: the model, 1 or 2, or the data order's epoch). Each rank
    draws its own hints and samples; the data order and the LoRA init are the same on every rank."""
    return {"data order": seed * 1_000_003 + i,
            "lora init": seed + i,
            "hint dropout": seed + 7919 * rank + 104_729 * i,
            "sampler": seed + 100 * i + 10007 * rank,
            "evaluation": seed + 1_000_003 * i + 7_919 * rank}[stream]


# -----------------------------------------------------------------------------
# Logging: one line and one metrics row per step, the sample log, progress lines, JSONL files

def log_step(run, step, row, problems, groups, hints):
    """Print the step's line (and --show questions in full); rank 0 appends its metrics and sample rows."""
    cfg = run.cfg
    print(format_log(row, cfg.steps), flush=True)
    names = {m: policy.name for m, policy in enumerate(run.policies, 1)}
    watch_for_nothing_to_learn(row, run.loop_state, cfg)
    watch_for_collapse(row, run.loop_state, names, cfg)
    for q in range(min(cfg.show, len(problems))):
        show_group(problems[q], groups[q], hints[q], names)
    if dist_info()[0] == 0:
        append_jsonl(run.out / "metrics.jsonl", row)
        if problems:
            append_jsonl(run.out / "samples.jsonl", traces_record(step, problems[0], groups[0], hints[0]))


def metrics_row(run, step, groups, stats, started, rollout_s, too_long):
    """The step's metrics row over all ranks (step_metrics), with the run's totals of problems skipped as too
    long and of sampled tokens (kept across resumes); None when no rank had a question that fitted."""
    loop_state = run.loop_state
    shards = all_gather((groups, too_long, rollout_s))
    all_groups = [g for shard, _, _ in shards for g in shard]
    too_long, rollout_s = sum(n for _, n, _ in shards), max(s for _, _, s in shards)  # the slowest rank's
    loop_state["skipped_problems"] += too_long
    if too_long:
        print(f"warning: {too_long} problem(s) skipped at step {step + 1}: prompt longer than "
              f"--max-prompt-tokens or the model context ({loop_state['skipped_problems']} so far)")
    if not all_groups:
        return None
    row = step_metrics(step, run.cfg, all_groups, stats, (rollout_s, time.time() - started - rollout_s),
                       too_long)
    row |= {f"sampler_m{m}": sampler_in_use(p, run.cfg) for m, p in enumerate(run.policies, 1)}  # this rank's
    row["skipped_problems_total"] = loop_state["skipped_problems"]  # steps that logged no row included
    totals = loop_state["sampled_tokens"]  # the run's compute, across resumes
    for m in (1, 2):
        totals[m - 1] += row[f"sampled_tokens_m{m}"]
        row[f"sampled_tokens_total_m{m}"] = totals[m - 1]
    return row


def step_metrics(step, cfg, groups, stats, seconds, skipped_problems):
    """One metrics row (its keys below); seconds: (the slowest rank's rollouts, the rest)."""
    traces = [t for g in groups for t in g]
    row = {"step": step + 1, "time": time.time(), "questions": len(groups), "lr": learning_rate(cfg, step)}
    for m in (1, 2):
        for rnd in ("A", "B"):
            own = [t for t in traces if t.model == m and t.round == rnd]
            row[f"acc_{rnd}_m{m}"] = sum(t.correct for t in own) / len(own) if own else None
            row[f"len_{rnd}_m{m}"] = sum(len(t.completion_ids) for t in own) / len(own) if own else None
        row[f"sampled_tokens_m{m}"] = sum(len(t.completion_ids) for t in traces if t.model == m)
    row["truncated"] = sum(t.truncated for t in traces) / len(traces)
    eligible = [t for t in traces if t.round == "B" and t.hint_shown and t.failed_cold]
    row["rescued"], row["eligible"] = sum(t.correct for t in eligible), len(eligible)
    row["rescue_rate"] = row["rescued"] / len(eligible) if eligible else None
    hinted = [t for t in traces if t.hint_shown]
    row["hints_shown"], row["hints_leaking"] = len(hinted), sum(t.hint_leaks for t in hinted)
    row["hint_leak"] = row["hints_leaking"] / len(hinted) if hinted else None
    row["reward"] = sum(t.reward for t in traces) / len(traces)
    row |= reward_schedule(cfg, step)  # the weights in force: w_div, lambda_cm
    for term in traces[0].terms:  # correct, div, cm, rescue, format: whatever score_group records
        row[term] = sum(t.terms[term] for t in traces) / len(traces)
    for m, s in enumerate(stats, 1):
        advantages = [t.advantage for t in traces if t.model == m]
        by_round = {r: [t.advantage for t in traces if t.model == m and t.round == r] for r in ("A", "B")}
        n = max(1, len(advantages))
        row |= {f"loss_m{m}": s["loss"], f"kl_m{m}": s["kl"], f"entropy_m{m}": s["entropy"],
                f"grad_norm_m{m}": s["grad_norm"], f"nonfinite_m{m}": s["skipped"],
                f"mismatch_m{m}": s["mismatch"], f"mismatch_kl_m{m}": s["mismatch_kl"],
                f"neg_adv_m{m}": sum(a < 0 for a in advantages) / n,
                f"pos_adv_m{m}": sum(a > 0 for a in advantages) / n}
        row |= {f"adv_{r}_m{m}": sum(a) / len(a) if a else None for r, a in by_round.items()}
    baselines = [a for g in groups for a in baseline_groups(g, cfg)]
    row["advantage_groups"] = len(baselines)
    row["constant_groups"] = sum(all(t.advantage == 0 for t in a) for a in baselines)  # nothing to learn
    row |= {"skipped_problems": skipped_problems, "rollout_s": seconds[0], "update_s": seconds[1],
            "seconds": sum(seconds)}
    row["tok_per_s"] = sum(len(t.completion_ids) for t in traces) / max(seconds[0], 1e-9)  # while sampling
    return row


def format_log(row, steps):
    def pair(key, fmt):  # model 1/model 2; "-" where a model has no value (no round B, or no second model)
        values = (row.get(f"{key}_m{m}") for m in (1, 2))
        return "/".join("-" if value is None else format(value, fmt) for value in values)
    samplers = [row.get(f"sampler_m{m}") or "-" for m in (1, 2)]  # shown if one is a fallback
    note = f" ({'/'.join(samplers)})" if set(samplers) & set(FALLBACK_SAMPLERS) else ""
    r = row
    return (f"step {r['step']}/{steps} | acc A {pair('acc_A', '.2f')} B {pair('acc_B', '.2f')} | rescue "
            f"{r['rescued']}/{r['eligible']} leak {r['hints_leaking']}/{r['hints_shown']} const "
            f"{r['constant_groups']}/{r['advantage_groups']} | R {r['reward']:.3f} c {r['correct']:.2f} "
            f"div {r['div']:.2f}x{r['w_div']:g} cm {r['cm']:.2f}x{r['lambda_cm']:g} resc {r['rescue']:.3f} "
            f"fmt {r['format']:.2f} | A<0 {pair('neg_adv', '.2f')} H {pair('entropy', '.2f')} loss "
            f"{pair('loss', '+.4f')} kl {pair('kl', '.4f')} | trunc {r['truncated']:.2f} | mismatch "
            f"{pair('mismatch', '.1e')} | {r['tok_per_s']:.0f} tok/s{note} | "
            f"{r['rollout_s']:.1f}+{r['update_s']:.1f}s")


def watch_for_nothing_to_learn(row, state, cfg, every=5):
    """Warn when every sample of a step hit the token budget or every advantage group had equal rewards (no
    advantage is nonzero): at the first such step, then every `every` steps while it goes on."""
    truncated, constant = row["truncated"] == 1, row["constant_groups"] == row["advantage_groups"]
    streak = state["nothing_to_learn"] = state["nothing_to_learn"] + 1 if truncated or constant else 0
    if streak == 0 or (streak - 1) % every:
        return
    verdict = {0.0: "wrong", 1.0: "right"}.get(row["correct"], "equally rewarded")
    if truncated:
        why = (f"every sample hit --max-new-tokens {cfg.max_new_tokens} before its end: raise it, or use "
               f"easier data or stronger models")
    elif verdict == "wrong":
        why = "every question's samples were all wrong: use easier data or stronger models (or more tokens)"
    else:
        why = f"every question's samples were all {verdict}: use harder data"
    steps = f"{streak} step{'s' * (streak != 1)} in a row"
    print(f"warning: step {row['step']}: nothing to learn ({steps}): {why}", flush=True)


def watch_for_collapse(row, state, names, cfg, patience=3, push=-0.3):
    """Warn when for `patience` steps in a row a model's round-A traces had a mean advantage <= `push` while
    its KL to the base or its entropy rose: its updates push it away from its own cold behaviour. Round B is
    not read: rescued traces there stay positive while the cold ones are pushed down."""
    flags = (("--adv-group model", cfg.adv_group == "model" or cfg.single),  # --single: per model already
             ("--adv-scale none", cfg.adv_scale == "none"))
    options = [flag for flag, in_force in flags if not in_force]
    advice = f"try {' '.join(options)}" if options else "the advantage options are in force: lower --lr"
    kl_before, entropy_before = state["kl_before"], state["entropy_before"]
    for m, name in names.items():
        i, kl, entropy, cold = m - 1, row[f"kl_m{m}"], row[f"entropy_m{m}"], row[f"adv_A_m{m}"]
        pushed = cold is not None and cold <= push
        streak = state["pushed_away"][i] = state["pushed_away"][i] + 1 if pushed else 0
        if streak and (streak - 1) % patience == 0:  # a window starts: where its KL and entropy were
            kl_before[i], entropy_before[i] = kl, entropy
        kl_rose = kl is not None and kl > kl_before[i]  # None: --beta-kl 0, the KL is not measured
        if streak and streak % patience == 0 and (kl_rose or entropy > entropy_before[i]):
            went = "" if kl is None else f"its KL to the base went {kl_before[i]:.4f} -> {kl:.4f} and "
            print(f"warning: {name}: for {streak} steps in a row its cold (round-A) traces had a mean "
                  f"advantage of {push:+.2f} or less ({cold:+.2f} now); over the last {patience} steps "
                  f"{went}its entropy went {entropy_before[i]:.2f} -> {entropy:.2f}: its updates push it "
                  f"away from its cold samples (docs/method.md: the weaker partner; {advice})", flush=True)


def show_group(problem, group, hint, names):
    """Print one question's rounds, teacher hint and rewards, each text on one line."""
    print(f"  Q: {one_line(problem.question, 100)}  gold {problem.gold}")
    for rnd in ("A", "B"):
        if rnd == "B" and hint:
            print(f"    hint (teacher's trace, answer stripped): {one_line(hint, 70)}")
        for t in (t for t in group if t.round == rnd):
            tag = f"round {t.round} {names[t.model]}" + (" +hint" if t.hint_shown else "")
            rescued = "  RESCUED" if t.terms.get("rescue") else ""
            print(f"    {tag:<28} {'right' if t.correct else 'wrong'}  R {t.reward:+.3f}  adv "
                  f"{t.advantage:+.2f}  {one_line(t.text, 70)}{rescued}")


def one_line(text, width):
    return shortened(text.strip().replace("\n", "\\n"), width)


def traces_record(step, problem, group, hint):
    traces = [{"model": t.model, "round": t.round, "hint_shown": t.hint_shown, "correct": t.correct,
               "reward": t.reward, "terms": t.terms, "advantage": t.advantage, "text": t.text} for t in group]
    return {"step": step + 1, "id": problem.id, "question": problem.question, "gold": problem.gold,
            "hint": hint, "traces": traces}


class Progress:
    """How far a long sampling phase is: rows done / total, tokens per second and the time left, once a second
    on a terminal (one updating line), every 10 s otherwise. A shorter phase is silent, unless `always`."""

    def __init__(self, label, total, always=False):
        self.label, self.total, self.always = label, total, always
        self.tty = sys.stdout.isatty()
        self.every = 1.0 if self.tty else 10.0
        self.start = self.last = self.batch_start = time.time()
        self.rows = self.tokens = 0  # of the batches done
        self.batch_rows, self.budget, self.shown = 0, 0, False

    def due(self):
        return time.time() - self.last >= self.every

    def batch(self, rows, budget):
        """A batch of `rows` rows starts, each with `budget` new tokens at most."""
        self.batch_start, self.batch_rows, self.budget = time.time(), rows, budget

    def add(self, rows, tokens):
        """The batch is done: its rows and tokens."""
        self.rows, self.tokens, self.batch_rows = self.rows + rows, self.tokens + tokens, 0

    def show(self, rows=0, tokens=0, position=0, closing=False):
        """rows, tokens: done so far in the current batch; position: its decode steps so far."""
        self.last, self.shown = time.time(), True
        done, elapsed = self.rows + rows, max(self.last - self.start, 1e-9)
        left = self.time_left(position)
        line = (f"  {self.label}: {done}/{self.total} rows | {(self.tokens + tokens) / elapsed:.0f} tok/s | "
                f"{elapsed:.0f}s, {'done' if closing else left}")
        end = "\n" if closing or not self.tty else ""
        print(f"\r{line}\033[K" if self.tty else line, end=end, flush=True)

    def time_left(self, position):
        """'≤ Ns left' while only the current batch is left: its steps to the budget at its pace so far
        (it ends sooner if its rows do). '~Ns left', a forecast, while batches are to come: that bound (or
        the time per row of the batches done), then the rows after it at the time per row so far."""
        ran = self.last - self.batch_start
        after = self.total - self.rows - self.batch_rows  # the rows of the batches still to come
        per_row = (self.batch_start - self.start) / self.rows if self.rows else None
        bound = ran / position * max(0, self.budget - position) if position else None
        if bound is not None and not after:
            return f"≤ {math.ceil(bound)}s left"
        if per_row is None and bound is None:
            return "time left: ?"
        per_row = per_row if per_row is not None else (ran + bound) / max(1, self.batch_rows)
        batch_left = bound if bound is not None else max(0.0, per_row * self.batch_rows - ran)
        return f"~{batch_left + after * per_row:.0f}s left"

    def close(self):
        if self.shown or self.always:
            self.show(closing=True)


def read_jsonl(path, lenient=False):
    """Rows of a JSONL file: strict for data (a bad line is a UsageError naming file and line), lenient for a
    run's own logs (a missing file has no rows, a line torn by a crash mid-write is dropped)."""
    if lenient and not Path(path).exists():
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSONL") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            if lenient:
                continue
            raise UsageError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if row is not None and not isinstance(row, dict) and not lenient:
            raise UsageError(f"{path}:{lineno}: expected a JSON object")
        rows += [row] if row is not None else []
    return rows


def write_jsonl(path, rows):
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_atomically(path, text):
    """path's new text, written beside it and renamed into place: a kill leaves the old text or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# The command line

class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM, from main() until release(). In the training loop (`in_loop`) the first
    is a request: end_of_step takes it (take), the ranks agree, and the loop checkpoints and exits 130. A
    second before it was taken, over a second later, raises KeyboardInterrupt. Elsewhere the handler found at
    the start acts (ignored stays ignored), SIGTERM's default as Ctrl-C's."""

    def __init__(self):
        # counts, not a flag: take() reads `signals` once, so a signal arriving while it runs is never lost
        self.in_loop, self.signals, self.taken = False, 0, 0  # signals in the loop, and those take() has seen
        self.counted_at = -math.inf  # when the last one was counted
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def install(self):
        """From here on the handler (its state is whole before: a signal may arrive at once)."""
        for s in self.previous:
            signal.signal(s, self)

    @property
    def requested(self):
        return self.signals > self.taken

    def take(self):
        """Whether a stop was requested since the last take; a signal after it is a first request again."""
        seen = self.signals  # read once: a signal arriving meanwhile stays for the next take
        requested, self.taken = seen > self.taken, seen
        return requested

    def release(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __call__(self, signum, frame):
        previous = self.previous[signum]
        if not self.in_loop and (previous == signal.SIG_IGN or callable(previous)):
            return None if previous == signal.SIG_IGN else previous(signum, frame)
        if self.in_loop and time.monotonic() - self.counted_at < 1.0:
            return None  # one request, delivered twice (a scheduler's signal and a launcher's forwarding)
        if self.requested or not self.in_loop:
            raise KeyboardInterrupt
        self.signals, self.counted_at = self.signals + 1, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (Ctrl-C "
              f"again, a second later, to abort)", flush=True)


def main(argv=None):
    stop = StopRequest()
    try:
        stop.install()  # SIGTERM (timeout, SLURM, Kubernetes) acts as Ctrl-C does
        cfg = Config(**vars(build_parser().parse_args(argv)))
        given = set(vars(build_parser(with_defaults=False).parse_args(argv)))
        command = shlex.join(sys.orig_argv if argv is None else ["core.py", *argv])  # as typed
        code = run_job(cfg, given, stop, command)
        barrier()  # under torchrun: every rank is done before any leaves
        return code
    except (UsageError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Exception as error:  # out of memory: in training a TrainingError; here, loading or evaluating
        if not out_of_memory(error):
            raise
        print("error: CUDA out of memory outside the training steps; lower --gen-batch (and "
              "--eval-max-new-tokens)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside the training loop, or a second one inside it
        print("\ninterrupted: the newest checkpoint (if any) is intact", file=sys.stderr)
        return 130
    finally:
        stop.release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_job(cfg, given, stop, command=""):
    """The whole job for one config; `given`: the flags set on the command line (they win on --resume and
    --demo); stop: main's StopRequest; command: the command line, for provenance.json."""
    if cfg.resume:
        cfg = resume_config(cfg, given)
        if run_finished(cfg):
            return 0
    elif cfg.demo:
        cfg = replace(cfg, **{k: v for k, v in DEMO_SETTINGS.items() if k not in given})  # a flag given wins
    if cfg.adapters and not cfg.resume:  # a resumed run's config holds what its --adapters set
        cfg = adapters_config(cfg, given)
    cfg = replace(cfg, single=not cfg.eval_only) if cfg.model2 == "none" else cfg  # one model alone: GRPO
    validate(cfg, given)
    cfg = replace(cfg, model1=absolute(cfg.model1), model2=absolute(cfg.model2))  # resumable from anywhere
    rank, world = start_processes(cfg)
    out = output_folder(cfg)
    barrier()  # every rank has checked the output folder before rank 0 creates it
    local = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 and torch.cuda.is_available() else ""
    devices = [resolve_device(cfg.device1 or local), resolve_device(cfg.device2 or cfg.device1 or local)]
    if cfg.demo:
        cfg, train_set, test_set = demo_data(cfg, out)
    else:
        train_set, test_set = load_data(cfg)
    check_models(cfg)
    policies = [load_policy(m, path, device, cfg)
                for m, (path, device) in enumerate(zip(model_paths(cfg), devices), 1)]
    adapters = find_checkpoint(cfg.adapters, warn=True) if cfg.adapters else None
    if adapters:
        load_checkpoint(adapters, policies, with_optimizer=False)
    test_set = usable_test_set(policies, train_set, test_set, cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {out}")
    if cfg.eval_only:
        run_evaluation(policies, test_set, cfg, out, "eval", "evaluation")
    if rank == 0:  # before training (a stopped run resumes from it); after an evaluation
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        record_provenance(out, run_provenance(cfg, command, policies, adapters, train_set, test_set))
    if cfg.eval_only:
        return 0
    code, finished = train(cfg, policies, train_set, test_set, out, stop)
    if not finished:
        return code
    run_evaluation(policies, test_set, cfg, out, "eval_after", "after training", step=cfg.steps)
    for policy in policies:  # a fallback that held for hours: said again at the end (metrics: sampler_m1/m2)
        if (sampler := sampler_in_use(policy, cfg)) in FALLBACK_SAMPLERS:
            print(f"note: {policy.name} was sampled with the {sampler} sampler, slower than the GPU sampler "
                  f"(its warning above says why)")
    print(f"curves: python tools/curves.py {out} draws {out / 'curves.svg'}")
    if cfg.demo:
        print(f"demo: what {cfg.steps} training steps changed, before -> after (change)")
        print_changes(out)
    return 0


def run_finished(cfg):
    """Whether --resume names a finished run: every step trained and evaluated (--eval-only: eval.json)."""
    found = newest_checkpoint(cfg.resume)
    step = checkpoint_state(found)["step"] if found else 0
    evaluation = Path(cfg.resume) / ("eval.json" if cfg.eval_only else "eval_after.json")
    if (cfg.eval_only or step == cfg.steps) and evaluation.is_file():
        done = "its evaluation is in eval.json" if cfg.eval_only else f"step {step} of {cfg.steps}"
        print(f"{cfg.resume} is finished ({done}); nothing to do")
        return True
    return False


def local_folder(name):
    """Whether a model name is a folder on this machine (else a hub id, or none): the one rule."""
    return Path(name).expanduser().is_dir()


def absolute(name):
    return str(Path(name).expanduser().absolute()) if local_folder(name) else name


def model_paths(cfg):
    return [cfg.model1] + ([] if cfg.model2 == "none" else [cfg.model2])


def usable_test_set(policies, train_set, test_set, cfg):
    """The test problems whose cold prompt plus the evaluation budget fits every model's context (the others
    are skipped, with a warning); a run none of whose test (or training) problems fits is refused."""
    usable = [p for p in test_set if fits(policies, p, cfg.eval_max_new_tokens)]
    if len(usable) < len(test_set):
        print(f"warning: {len(test_set) - len(usable)} test problem(s) skipped: prompt + "
              f"--eval-max-new-tokens {cfg.eval_max_new_tokens} over the model context")
    if not cfg.eval_only and not any(fits(policies, p, cfg.max_new_tokens, cfg.max_prompt_tokens)
                                     for p in train_set):
        raise UsageError(f"every training problem is too long: prompt over --max-prompt-tokens "
                         f"{cfg.max_prompt_tokens}, or prompt + --max-new-tokens {cfg.max_new_tokens} over "
                         f"the model context")
    if not usable:
        raise UsageError(f"every test problem is longer than the model context (prompt + "
                         f"--eval-max-new-tokens {cfg.eval_max_new_tokens}); lower --eval-max-new-tokens")
    return usable


def build_parser(with_defaults=True):
    """The command line of Config, in its sections. with_defaults=False: parsing returns only the flags given.
    A parsing error is a UsageError (one line, exit 2)."""
    parser = argparse.ArgumentParser(description="CORE: two LLMs trained together by cross teaching "
                                                 "(arXiv 2601.21600).")
    parser.error, group = parse_error, None
    for f in fields(Config):
        group = parser.add_argument_group(f.metadata["section"]) if f.metadata["section"] else group
        shown = f.default != "" and not isinstance(f.default, bool)  # a switch or an empty text: no default
        text = f.metadata["help"].replace("%", "%%") + (f" (default: {f.default})" if shown else "")
        default = f.default if with_defaults else argparse.SUPPRESS
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "section", "kind")}  # choices
        how = {"action": "store_true"} if isinstance(f.default, bool) else {"type": type(f.default)} | extra
        group.add_argument(flag_name(f.name), default=default, help=text, **how)
    return parser


def parse_error(message):
    flag = re.search(r"--[\w-]+", message)
    negative = f" (a negative value: {flag.group()}=-VALUE)" if flag and "expected one arg" in message else ""
    moved = " (--export moved: python tools/export.py RUN OUT)" if "--export" in message else ""
    raise UsageError(f"{message}{negative}{moved}; python core.py --help lists every flag")


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def validate(cfg, given=frozenset()):
    """Reject impossible settings before anything is loaded or written (`given`: the flags set)."""
    nonfinite = [flag_name(f.name) for f in fields(Config) if type(f.default) is float
                 and not math.isfinite(getattr(cfg, f.name))]  # argparse reads nan and inf as floats
    checks = [
        (not nonfinite, f"{', '.join(nonfinite)} must be a finite number, not nan or inf"),
        (cfg.k >= 1, "--k must be >= 1"),
        (cfg.k_rescue >= 1 or cfg.single, "--k-rescue must be >= 1"),
        (cfg.single_samples >= 0 and (cfg.single or not cfg.single_samples),
         "--single-samples needs --single and must be >= 0"),
        (0 <= cfg.hint_dropout <= 1, "--hint-dropout must be in [0, 1]"),
        (0 < cfg.top_p <= 1, "--top-p must be in (0, 1]"),
        (cfg.temperature >= 0, "--temperature must be >= 0"),
        (cfg.steps >= 1, "--steps must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.lora_rank >= 1 and cfg.lora_alpha > 0, "--lora-rank must be >= 1 and --lora-alpha > 0"),
        (cfg.max_new_tokens >= 1 and cfg.eval_max_new_tokens >= 1, "token budgets must be >= 1"),
        (cfg.hint_tokens >= 1, "--hint-tokens must be >= 1"),
        (cfg.batch_questions >= 1 and cfg.train_n >= 1, "--batch-questions and --train-n must be >= 1"),
        (cfg.eval_k >= 1 and cfg.eval_n >= 0 and cfg.eval_every >= 0,
         "--eval-k must be >= 1, --eval-n and --eval-every >= 0"),
        (cfg.gen_batch >= 1 and cfg.micro_batch >= 1 and cfg.logprob_chunk >= 1, "batch sizes must be >= 1"),
        (cfg.save_every >= 1 and cfg.keep >= 1 and cfg.stop_after >= 0 and cfg.show >= 0,
         "--save-every and --keep must be >= 1, --stop-after and --show >= 0"),
        (cfg.grad_clip > 0 and cfg.beta_kl >= 0 and cfg.weight_decay >= 0,
         "--grad-clip must be > 0, --beta-kl and --weight-decay >= 0"),
        (cfg.dpp_eps > 0 and cfg.ngram_dim >= 1, "--dpp-eps must be > 0 and --ngram-dim >= 1"),
        (cfg.data in DATASET_NAMES or Path(cfg.data).exists() or cfg.demo,
         f"dataset path '{cfg.data}' does not exist" if re.search(r"[/\\.]", cfg.data) else
         f"unknown dataset '{cfg.data}': use one of {', '.join(DATASET_NAMES)}, or a JSONL file or folder"),
        (not cfg.data_dir or Path(cfg.data_dir).is_dir(), f"--data-dir '{cfg.data_dir}' is not a folder"),
        (not (cfg.single and cfg.no_rescue), "--no-rescue does nothing with --single or --model2 none (no "
                                             "round B)"),
        (not (cfg.eval_only and given & TRAINING_ONLY), "--eval-only does not train, so "
         f"{', '.join(map(flag_name, sorted(given & TRAINING_ONLY)))} would do nothing (see --eval-*)"),
        (not Path(cfg.out).is_file(), f"--out '{cfg.out}' is a file; the output is a folder"),
    ]
    for m, name in ((1, cfg.model1), (2, cfg.model2)):
        path = Path(name).expanduser()
        path_like = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name  # not a hub id
        checks += [(not path_like or path.exists(), f"--model{m} '{name}' does not exist"),
                   (not path.is_file(), f"--model{m} '{name}' is a file; pass the folder that holds its "
                                        f"config.json, weights and tokenizer")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def start_processes(cfg):
    """(rank, world size): joins torchrun's process group; only rank 0 prints (errors show on every rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist_info()
    if world > 1:
        if cfg.demo or cfg.device1 or cfg.device2:
            raise UsageError("under torchrun each rank uses its own GPU (or the CPU): drop --demo, --device1 "
                             "and --device2")
        if cfg.batch_questions < world:
            raise UsageError(f"--batch-questions {cfg.batch_questions} is smaller than the {world} processes")
        if rank:
            sys.stdout = open(os.devnull, "w")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    return rank, world


def output_folder(cfg):
    """The run folder; an existing non-empty one is refused unless resuming."""
    if cfg.resume:
        return Path(cfg.resume)
    name = "demo" if cfg.demo else Path(cfg.data).stem + ("-eval" if cfg.eval_only else "")
    out = Path(cfg.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder '{out}' exists and is not empty; pick a new --out or continue it "
                         f"with --resume {out}")
    parent = next(p for p in (out, *out.parents) if p.exists())  # the nearest existing folder
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"output folder '{out}' cannot be created: '{parent}' is not a writable folder")
    return out


def resolve_device(name):
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' asked for, but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None


def load_policy(m, path, device, cfg):
    """Model m and its tokenizer through from_pretrained, LoRA added, AdamW on the adapter only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    local = local_folder(path) or not hub_reachable()  # offline: from the cache, no retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local).to(device)
    except Exception as e:
        raise load_error(path, m, e) from None
    model.eval()  # no dropout: rollout and update likelihoods coincide
    if not cfg.no_grad_checkpoint:  # layers are checkpointed in train mode only: update_policy switches
        model.activation_checkpointing_enable({"use_reentrant": False})
    torch.manual_seed(stream_seed(cfg.seed, "lora init", m))
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, (list, tuple)) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(cfg.seed, "sampler", m, dist_info()[0]))
    hint_draws = random.Random(stream_seed(cfg.seed, "hint dropout", m, dist_info()[0]))
    name = Path(path).name if local_folder(path) else path
    return Policy(name, model, tokenizer, device, eos - {None}, pad,
                  getattr(model.config, "max_position_embeddings", 1 << 30), optimizer, generator, hint_draws)


def load_error(path, m, e):
    """The one-line error for a model that from_pretrained cannot load, with advice that fits the case."""
    why = f"{type(e).__name__}: {first_line(e)}"
    config = Path(path) / "config.json"
    if config.is_file() and '"model1":' in config.read_text(errors="replace"):  # a run's config.json
        return UsageError(f"'{path}' is a run folder, not a model; its adapters load with --adapters {path}")
    if not local_folder(path):
        return UsageError(f"cannot load model id '{path}' ({why}); offline? copy the model to a local folder "
                          f"and pass --model{m} /path/to/folder")
    parts = {"config.json": "config.json", "weights (*.safetensors)": "*.safetensors",
             "a tokenizer": "tokenizer*"}
    lacks = [part for part, pattern in parts.items() if not any(Path(path).glob(pattern))]
    return UsageError(f"cannot load folder '{path}' ({why}); a model folder holds config.json, weights and a "
                      f"tokenizer" + (f", and it lacks {', '.join(lacks)}" if lacks else ""))


def check_models(cfg):
    """Before any loading, fail fast on a hub id neither cached nor reachable (validate checks folders)."""
    from transformers.utils.hub import try_to_load_from_cache  # the cache's folders only (no network)
    for m, name in enumerate(model_paths(cfg), 1):
        with contextlib.suppress(Exception):  # not a valid hub id, or not cached: the hub must answer
            if local_folder(name) or isinstance(try_to_load_from_cache(name, "config.json"), str):
                continue
        if not hub_reachable():
            raise UsageError(f"'{name}' is neither a folder nor a model id in the local cache, and the "
                             f"Hugging Face hub cannot be reached (offline?); download it elsewhere and pass "
                             f"--model{m} /path/to/folder")


@functools.cache
def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub answers (False at once under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# -----------------------------------------------------------------------------
# Appendix, the demo: two tiny models (Qwen2 and Qwen3 architectures), a tiny tokenizer, generated arithmetic

# The demo's settings (a flag given on the command line wins). Its advantages are each model's own, in reward
# units: with the paper's joint ones the weaker tiny model loses accuracy at some seeds (docs/method.md).
DEMO_SETTINGS = dict(data="arithmetic (demo)", steps=30, batch_questions=32, max_new_tokens=20,
                     eval_max_new_tokens=20, eval_n=400, lr=2e-3, lora_rank=8, lora_alpha=16.0,
                     adv_group="model", adv_scale="none", micro_batch=96, show=1, save_every=10, train_n=200,
                     device1="cpu", device2="cpu", no_grad_checkpoint=True)
DEMO_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                      "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEMO_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def demo_data(cfg, out):
    """(cfg, training set, test set) of the demo; a new demo first builds its models in out/models."""
    if not cfg.resume:  # a resumed demo reloads the models its config names
        out.mkdir(parents=True, exist_ok=True)
        print(f"demo: building two tiny models (Qwen2 and Qwen3 architectures) in {out / 'models'}; "
              f"advantages: --adv-group {cfg.adv_group} --adv-scale {cfg.adv_scale} (the paper: joint, std)")
        try:
            paths = build_demo_models((out / "models").absolute(), cfg.seed)
            cfg = replace(cfg, model1=paths[0], model2="none" if cfg.model2 == "none" else paths[1])
        except BaseException:  # stopped while building: leave no half-made run folder behind
            shutil.rmtree(out, ignore_errors=True)
            raise
    print(f"demo: it trains on {cfg.train_n} and evaluates on {cfg.eval_n} draws of the same 25 questions "
          f"'What is a + b ?' (a, b in 0-4): the evaluation measures the trained skill on the questions it "
          f"trains on, not generalisation to new ones")
    return cfg, arithmetic_problems(cfg.train_n, cfg.seed), arithmetic_problems(cfg.eval_n, cfg.seed + 1)


# the headline numbers, as the demo's closing table and tools/compare.py label them ({k}: the evaluation's k)
HEADLINE = [("Pass@1 m1", "pass@1_m1"), ("Pass@1 m2", "pass@1_m2"), ("Pass@k m1", "pass@{k}_m1"),
            ("Pass@k m2", "pass@{k}_m2"), ("maj@k m1", "maj@{k}_m1"), ("maj@k m2", "maj@{k}_m2"),
            ("Team Pass@k", "team_pass@{k}"), ("team vote@k", "team_vote@{k}"), ("p_12@k", "p_12@{k}"),
            ("joint failure@k", "joint_failure@{k}"), ("correlated failure@k", "correlated_failure@{k}"),
            ("Team Pass@k/2", "team_pass@{h}"), ("team vote@k/2", "team_vote@{h}")]


def print_changes(out):
    """The demo's closing table: each headline number before -> after (change)."""
    files = [out / f"eval_{when}.json" for when in ("before", "after")]
    before, after = (json.loads(f.read_text()) if f.exists() else {} for f in files)
    k = after["k"]
    print(f"{'':<22}{out.name}\n{'k, questions':<22}{k}, {after['questions']}")
    for label, key in HEADLINE:
        key = key.format(k=k, h=k // 2)
        if key in before and key in after:
            b, a = before[key], after[key]
            print(f"{label:<22}{b:.3f} -> {a:.3f} ({a - b:+.3f})")
        else:
            print(f"{label:<22}" + (f"after {after[key]:.3f}" if key in after else "-"))


def arithmetic_problems(n, seed):
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 4), rng.randint(0, 4)) for _ in range(n)]
    return [Problem(f"arith-{seed}-{i}", f"What is {a} + {b} ?", str(a + b), "number")
            for i, (a, b) in enumerate(pairs)]


def arithmetic_solution(problem):
    a, _, b = problem.question.split()[2:5]
    return f"{a} + {b} = {problem.gold} . \\boxed{{{problem.gold}}}"


def build_demo_models(folder, seed, targets=(0.45, 0.45)):
    """Two tiny models saved with save_pretrained, then warmed up to the target accuracies with the tokenizer
    as it loads back from disk: the demo uses them exactly like any downloaded checkpoint."""
    from transformers import AutoTokenizer
    problems = arithmetic_problems(500, seed + 7)
    paths = []
    for arch, target in zip(("qwen2", "qwen3"), targets):
        path = Path(folder) / f"tiny-{arch}"
        tokenizer = demo_tokenizer()
        model = tiny_model(arch, tokenizer, seed)
        tokenizer.save_pretrained(path)
        model.save_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        steps, accuracy = supervised_warmup(model, tokenizer, problems, target, seed)
        print(f"demo: tiny-{arch} warmed up for {steps} supervised steps: it answers {accuracy:.0%} of "
              f"sampled questions right")
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def demo_tokenizer():
    """A tiny byte-level BPE trained on the demo's texts, with Qwen's normaliser, split regex and decoder (so
    transformers' Qwen2Tokenizer rebuilds the same tokenizer from the saved files), plus a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    problems = arithmetic_problems(200, 0)
    corpus = ([f"user\nQuestion: {p.question}\nHint:\n{strip_answer(arithmetic_solution(p))}\nLet's solve "
               f"this step by step. {FORMAT_INSTRUCTION['number']}\nassistant\n" for p in problems]
              + [arithmetic_solution(p) for p in problems])
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=DEMO_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


def tiny_model(arch, tokenizer, seed, hidden=64, layers=2):
    """A randomly initialised Qwen2 or Qwen3 causal LM small enough for a CPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config = Qwen2Config(**shape) if arch == "qwen2" else Qwen3Config(head_dim=hidden // 4, **shape)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def supervised_warmup(model, tokenizer, problems, target, seed, lr=3e-3, batch=32, max_steps=600):
    """Supervised training on worked solutions (half the prompts hinted) until the sampled accuracy (T = 0.7,
    4 samples of each of the 25 questions) reaches `target`. Returns (steps, accuracy)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    checks = [Problem("", f"What is {a} + {b} ?", str(a + b), "number") for a in range(5) for b in range(5)]
    prompts = [build_prompt(tokenizer, p.question, p.kind) for p in checks]
    generator = torch.Generator().manual_seed(seed)

    @functools.cache
    def example(question, gold, hinted):  # (prompt + solution + EOS token ids, where the solution starts)
        solution = arithmetic_solution(Problem("", question, gold, "number"))
        prompt = build_prompt(tokenizer, question, "number", strip_answer(solution) if hinted else None)
        ids = prompt + tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids, len(prompt)

    accuracy = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        seqs, starts = zip(*(example(p.question, p.gold, rng.random() < 0.5)
                             for p in (rng.choice(problems) for _ in range(batch))))
        ids = torch.full((batch, max(map(len, seqs))), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)
        for row, (seq, start) in enumerate(zip(seqs, starts)):
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, start:len(seq)] = torch.tensor(seq[start:])
        attention = (labels != -100) | (ids != tokenizer.pad_token_id)
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            model.eval()
            outs = sample(model, prompts, 20, {tokenizer.eos_token_id}, tokenizer.pad_token_id, 0.7, 0.9,
                          generator, n=4)[0]
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outs]
            right = [is_correct(t, checks[i // 4].gold, "number") for i, t in enumerate(texts)]
            accuracy = sum(right) / len(outs)
            if accuracy >= target:
                break
            if step % 30 == 0:  # a sign of life on a slow machine
                print(f"demo: warming up, step {step}: {accuracy:.0%} of sampled answers right", flush=True)
    model.eval()
    return step, accuracy


if __name__ == "__main__":
    sys.exit(main())
