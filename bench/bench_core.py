"""
Benchmark core.py on random-weight models of the exact Qwen2.5-3B and Qwen3-4B shapes (no download):

  0. greedy identity: core.sample_fast's greedy tokens vs generate's, first 32 tokens of 8 rows;
  1. rollout speed, with the adapters applied as in a run (unmerged: LoRALinear.forward): core.sample_fast
     (static cache + CUDA graphs) and core.sample (the reference loop) vs transformers' generate (dynamic cache;
     with --static also the static cache and its automatic compile) at the training (8 rows) and evaluation
     (64 rows) batch sizes, in tokens/s, as a fraction of the memory-bandwidth floor, with peak memory and the
     warm-up time;
  2. what sampling unmerged costs: the run's sampler (sample_fast on a GPU, sample on a CPU) with the adapters
     unmerged, with them merged into the weights (what core.py did before: in bf16 the merge rounds away small
     updates) and without adapters, in tokens/s at each batch size;
  3. the LoRA update (core.update_policy) in tokens/s, with peak memory;
  4. one full CORE step (as core.train runs it) for the pair: 4 questions, K=2, K'=1, every response forced to
     --step-tokens tokens (no EOS), with its time, peak memory and each model's rollout-update mismatch.

  python bench/bench_core.py                  # on a GPU, the real shapes (bf16)
  python bench/bench_core.py --tiny           # the same code on CPU with tiny shapes (the demo models' size)
  python bench/bench_core.py --models qwen2.5-3b --parts lora --layers 2 --lora-tokens 16   # a 3B-shaped
                                              # stack of 2 layers (the real vocabulary), on a CPU
  python bench/bench_core.py --tiny --parts sampler --batches 24 --new-tokens 96   # the CPU's reference loop
  python bench/bench_core.py --model runs/smollm2-135m-instruct --parts sampler --batches 24 --new-tokens 96
                                              # against generate, on a tiny model and on a real one

Prints a table and writes JSON (--out; default bench/out/bench_results.json, a folder git ignores: copy the
figures worth keeping to bench/results/).
"""

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402
from bench.header import print_header, print_wall_time  # noqa: E402

# copied from the models' config.json files (../shared/tokenizers/*/config.json)
SHAPES = {
    "qwen2.5-3b": dict(arch="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen3-4b": dict(arch="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True, rope_theta=5e6, rms_norm_eps=1e-6),
}
PARTS = ("greedy", "sampler", "lora", "update", "step")
TINY = {name: dict(shape, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512) for name, shape in SHAPES.items()}


def build_model(shape, device, dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config
    fields = {k: v for k, v in shape.items() if k != "arch"}
    config = (Qwen2Config if shape["arch"] == "qwen2" else Qwen3Config)(max_position_embeddings=8192, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # At the default init (std 0.02) greedy decoding repeats one token, which would make the greedy identity
    # check vacuous. Variance-preserving weights, with the layers' outputs (o_proj, down_proj) 4x larger so that
    # the residual stream is not dominated by the current token's (tied) embedding, give varied tokens.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if p.shape[0] == shape["vocab_size"] else p.shape[1] ** -0.5
                p.normal_(0, std * (4 if pname.endswith(("o_proj.weight", "down_proj.weight")) else 1))
    return model.eval()


def load_model(folder, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def folder_shape(folder):
    """The shape fields the benchmark reads, from a model folder's config.json."""
    c = json.loads((Path(folder) / "config.json").read_text())
    return {k: c.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads")} | {
        "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], "arch": c["model_type"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def bandwidth_floor(model, shape, batch, prompt_len, new_tokens, bytes_per_s):
    """Tokens/s if every decode step read the weights and the (average-length) KV cache once at bytes_per_s."""
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    context = prompt_len + new_tokens / 2
    kv = batch * shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * context * elem
    return batch / ((weights + kv) / bytes_per_s)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def bench_sampler(name, shape, model, args, device):
    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, shape["vocab_size"], (batch, args.prompt_len), device=device)
        mask = torch.ones_like(prompts)
        gen = torch.Generator(device=device).manual_seed(0)
        fast = lambda n: core.sample_fast(model, prompts.tolist(), n, set(), 0, 0.7, 0.9, gen)  # noqa: E731
        eager = lambda n: core.sample(model, prompts.tolist(), n, set(), 0, 0.7, 0.9, gen)  # noqa: E731
        theirs = {
            "generate (dynamic cache)": lambda n: model.generate(prompts, attention_mask=mask, do_sample=True, temperature=0.7,
                                                                 top_p=0.9, top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0),
            "generate (static cache)": lambda n: model.generate(prompts, attention_mask=mask, do_sample=True, temperature=0.7,
                                                                top_p=0.9, top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                                                cache_implementation="static"),
        }
        methods = {"core.sample_fast (graphs)": fast, "core.sample (reference loop)": eager}
        methods |= {k: v for k, v in theirs.items() if "static" not in k or args.static}
        floor = bandwidth_floor(model, shape, batch, args.prompt_len, args.new_tokens, args.bandwidth)
        for method, fn in methods.items():
            _, warmup = timed(lambda: fn(min(8, args.new_tokens)), device)  # (and compile, where there is one)
            reset_peak(device)
            _, seconds = timed(lambda: fn(args.new_tokens), device)
            tps = batch * args.new_tokens / seconds
            rows.append({"model": name, "method": method, "batch": batch, "prompt_len": args.prompt_len,
                         "new_tokens": args.new_tokens, "tokens_per_s": tps, "fraction_of_floor": tps / floor,
                         "floor_tokens_per_s": floor, "peak_gb": peak_gb(device), "warmup_s": warmup})
            print(f"  {name:<11} {method:<28} batch {batch:>4}  {tps:>10.0f} tok/s  {tps / floor:>6.1%} of floor "
                  f"({floor:.0f})  peak {fmt_gb(rows[-1]['peak_gb'])}  warm-up {warmup:.1f} s", flush=True)
    return rows


def greedy_check(name, shape, model, args, device, batch=8, tokens=32):
    """Greedy tokens of core.sample_fast vs generate's, row by row, for the first `tokens` tokens. generate runs with its default dynamic cache and with a static cache (uncompiled):
    without padding the dynamic cache attends with no mask (sdpa may pick another kernel, whose bf16 rounding
    can flip a near-tie of a random model), the static cache with a mask as ours does."""
    prompts = torch.randint(0, shape["vocab_size"], (batch, args.prompt_len), device=device)
    refs = {cache: model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0, disable_compile=True,
                                  **({"cache_implementation": "static"} if cache == "static" else {})
                                  )[:, args.prompt_len:].tolist() for cache in ("dynamic", "static")}
    distinct = [len(set(r)) for r in refs["dynamic"]]  # a row of one repeated token makes the check weak
    print(f"  {name:<11} greedy: distinct tokens per generate row: {distinct}", flush=True)
    rows = []
    for label in ("core.sample_fast",):
        ours, seconds = timed(lambda: core.sample_fast(model, prompts.tolist(), tokens, set(), 0, temperature=0)[0],
                              device)
        for cache, ref in refs.items():
            equal = sum(o == r for o, r in zip(ours, ref))
            first_diff = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), tokens) for o, r in zip(ours, ref)]
            print(f"  {name:<11} greedy: {label} == generate ({cache} cache) for the first {tokens} tokens in "
                  f"{equal}/{batch} rows (equal prefix per row: {first_diff}; first call: {seconds:.1f} s)",
                  flush=True)
            rows.append({"model": name, "method": label, "generate_cache": cache, "rows": batch, "tokens": tokens,
                         "rows_equal": equal, "equal_prefix": first_diff, "first_call_s": seconds,
                         "distinct_tokens": distinct})
    return rows


def profile_sampler(name, shape, model, args, device, batch=64, tokens=16):
    """torch.profiler over core.sample_fast: the kernels that take the decode time, top 15 by self time."""
    from torch.profiler import ProfilerActivity, profile
    prompts = torch.randint(0, shape["vocab_size"], (batch, args.prompt_len), device=device).tolist()
    core.sample_fast(model, prompts, tokens, set(), 0, 0.7, 0.9)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        core.sample_fast(model, prompts, tokens, set(), 0, 0.7, 0.9)
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"  {name}: profile of core.sample_fast, batch {batch}, {tokens} tokens")
    print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)


def fmt_gb(x):
    return "-" if x is None else f"{x:.1f} GB"


def make_policy(name, model, device, tokenizer):
    cfg = core.Config()
    core.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    with torch.no_grad():  # a trained adapter's size: B A adds about 1% to W
        for layer in core.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.01 * layer.base.weight.float().std().item() / layer.scale)
    optimizer = torch.optim.AdamW(core.lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return core.Policy(name, model, tokenizer, device, set(), 0, 8192, optimizer,  # no EOS: forced lengths
                       torch.Generator(device=device).manual_seed(0))


def bench_update(name, shape, policy, args, device):
    """One update on 12 traces (4 questions x (K + K')) of prompt_len + new_tokens random tokens."""
    cfg = core.Config(micro_batch=args.micro_batch)
    traces = [core.Trace(1, "A" if i % 3 else "B", torch.randint(0, shape["vocab_size"], (args.prompt_len,)).tolist(),
                         torch.randint(0, shape["vocab_size"], (args.new_tokens,)).tolist(), "", False,
                         advantage=random.Random(i).gauss(0, 1)) for i in range(12)]
    core.update_policy(policy, traces[:2], cfg, cfg.lr)  # warm-up
    reset_peak(device)
    stats, seconds = timed(lambda: core.update_policy(policy, traces, cfg, cfg.lr), device)
    tokens = 12 * (args.prompt_len + args.new_tokens)
    row = {"model": name, "sequences": 12, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
           "peak_gb": peak_gb(device)}
    print(f"  {name:<11} update: 12 sequences x {args.prompt_len + args.new_tokens} tokens in {seconds:.2f} s "
          f"({tokens / seconds:.0f} tok/s)  peak {fmt_gb(row['peak_gb'])}", flush=True)
    return row


def bench_core_step(policies, args, device):
    """One full training step for the pair (core_step, an update per model, the metrics row): 4 questions, K=2, K'=1, responses forced to new_tokens, with each
    model's rollout-update mismatch (the sampler's log-probs against the update's, metrics mismatch_m1/m2)."""
    cfg = core.Config(max_new_tokens=args.new_tokens, micro_batch=args.micro_batch, steps=2)
    sentence = "Consider the following numbers carefully."
    per_sentence = len(policies[0].tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
    filler = " ".join([sentence] * max(1, args.prompt_len // per_sentence))  # a prompt of about prompt_len tokens
    problems = [core.Problem(f"b{i}", f"{filler} What is {i} + 1 ?", str(i + 1), "number") for i in range(4)]
    run = core.Run(cfg, policies, [], Path(args.out).parent)  # the state core.train carries (loop_state)
    step = lambda: one_step(policies, problems, cfg, run)  # noqa: E731
    _, warmup = timed(step, device)  # the first step also checks the fast path
    reset_peak(device)
    result, seconds = timed(step, device)
    metrics = result
    sampler = "core.sample_fast" if all(p.fast_agrees for p in policies) else "core.sample"
    row = {"questions": 4, "k": cfg.k, "k_rescue": cfg.k_rescue, "new_tokens": args.new_tokens, "seconds": seconds,
           "rollout_s": metrics["rollout_s"], "update_s": metrics["update_s"], "peak_gb": peak_gb(device),
           "sampled_tokens_per_s": metrics["tok_per_s"], "sampler": sampler, "first_step_seconds": warmup,
           **{f"{key}_m{m}": metrics[f"{key}_m{m}"] for key in ("mismatch", "mismatch_kl") for m in (1, 2)}}
    print(f"  CORE step (pair, 4 questions, K=2, K'=1, {args.new_tokens} new tokens each, {sampler}): {seconds:.2f} s "
          f"({metrics['rollout_s']:.2f} s rollouts + {metrics['update_s']:.2f} s updates)  peak "
          f"{fmt_gb(row['peak_gb'])}  (first step {warmup:.2f} s)", flush=True)
    for m, policy in enumerate(policies, 1):
        print(f"    {policy.name}: rollout-update mismatch, mean |log p difference| {row[f'mismatch_m{m}']:.2e}, "
              f"KL (k3) {row[f'mismatch_kl_m{m}']:.2e}", flush=True)
    return row


def one_step(policies, problems, cfg, run):
    """What core.train does in one step, without the loop around it: the metrics row."""
    started = time.time()
    groups, _ = core.core_step(policies, problems, cfg, core.reward_schedule(cfg, 0))
    rollout_s = time.time() - started
    stats = [core.update_policy(policy, [t for g in groups for t in g if t.model == m], cfg, core.learning_rate(cfg, 0))
             for m, policy in enumerate(policies, 1)]
    return core.metrics_row(run, 0, groups, stats, started, rollout_s, 0)


def bench_lora(name, shape, policy, args, device, repeats=2):
    """Tokens/s of the run's sampler with the adapters unmerged (core.py), merged into W, and off (the base)."""
    sampler = core.sample_fast if device.type == "cuda" else core.sample
    variants = {"unmerged (core.py)": contextlib.nullcontext, "merged into W": merged, "no adapters": core.lora_disabled}
    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, shape["vocab_size"], (batch, args.prompt_len), device=device).tolist()
        run = lambda n: sampler(policy.model, prompts, n, set(), 0, 0.7, 0.9, torch.Generator(device).manual_seed(0))  # noqa: E731
        best = {}
        for _ in range(repeats):  # interleaved, the best of each: a busy CPU slows whichever runs then
            for variant, context in variants.items():
                with context(policy.model):
                    timed(lambda: run(min(4, args.lora_tokens)), device)  # warm-up (and graph capture)
                    _, seconds = timed(lambda: run(args.lora_tokens), device)
                best[variant] = min(best.get(variant, seconds), seconds)
        for variant, seconds in best.items():
            tps = batch * args.lora_tokens / seconds
            rows.append({"model": name, "variant": variant, "batch": batch, "layers": shape["num_hidden_layers"],
                         "prompt_len": args.prompt_len, "new_tokens": args.lora_tokens, "tokens_per_s": tps,
                         "vs_merged": best["merged into W"] / seconds})
            print(f"  {name:<11} {variant:<20} batch {batch:>4}  {tps:>9.1f} tok/s  "
                  f"({rows[-1]['vs_merged']:.3f} x merged)", flush=True)
    return rows


@contextlib.contextmanager
def merged(model):
    """Every adapter folded into its base weight (W + scale B A, rounded to W's dtype) and switched off, as core.py
    sampled before; W restored afterwards."""
    layers = core.lora_layers(model).values()
    saved = [layer.base.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.base.weight += (layer.scale * layer.lora_B @ layer.lora_A).to(layer.base.weight.dtype)
            layer.enabled = False
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.base.weight.copy_(weight)
                layer.enabled = True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of the same code)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64],
                        help="sampler batch sizes (a training round: 8 rows per model, an evaluation batch: 64)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256, help="sampled tokens per row (the CORE step uses 300)")
    parser.add_argument("--lora-tokens", type=int, default=64, help="sampled tokens per row in the unmerged/merged part")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's; fewer for a CPU)")
    parser.add_argument("--step-tokens", type=int, default=300, help="forced response length in the CORE step")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="memory bandwidth in bytes/s for the floor")
    parser.add_argument("--static", action="store_true", help="also generate with the static cache (minutes to compile)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of the fast sampler")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to run")
    parser.add_argument("--model", help="a local model folder instead of the random shapes (e.g. the SmolLM2-135M-"
                                        "Instruct folder bench/cpu_recipe.py writes)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run (the CORE step needs both models)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_results.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.time()
    print_header("core.py's sampler, LoRA, update and CORE step, timed", str(device))
    if args.tiny:
        print("# --tiny: the shapes' names with hidden 64, 2 layers and a 512-token vocabulary: a check that the "
              "benchmark's code runs, and its time")
    if device.type == "cpu":
        print("# on a CPU, sample_fast runs its steps eagerly: its rows measure no CUDA graph, and the floor is a "
              "GPU's")
    shapes = TINY if args.tiny else SHAPES
    if args.model:
        shapes, args.models = {Path(args.model).name: folder_shape(args.model)}, [Path(args.model).name]
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {dtype}, "
          f"torch {torch.__version__}, shapes: {'tiny' if args.tiny else 'real'}")
    results = {"device": core.device_info(device), "code": core.code_version(), "versions": core.library_versions(),
               "dtype": str(dtype), "tiny": args.tiny,
               "sampler": [], "greedy": [], "lora": [], "update": [], "core_step": None}
    tokenizer = core.demo_tokenizer()
    policies = []
    for name in args.models:
        shape = shapes[name]
        shape = dict(shape, num_hidden_layers=args.layers or shape["num_hidden_layers"])
        model = load_model(args.model, device, dtype) if args.model else build_model(shape, device, dtype)
        if "greedy" in args.parts:
            results["greedy"] += greedy_check(name, shape, model, args, device)
        policy = make_policy(name, model, device, tokenizer)  # adapters applied from here on, as in a run
        if args.profile:
            profile_sampler(name, shape, model, args, device)
        if "sampler" in args.parts:
            results["sampler"] += bench_sampler(name, shape, model, args, device)
        if "lora" in args.parts:
            results["lora"] += bench_lora(name, shape, policy, args, device)
        if "update" in args.parts:
            results["update"].append(bench_update(name, shape, policy, args, device))
        policies.append(policy)
    if "step" in args.parts and len(policies) == 2:
        args.new_tokens = args.step_tokens
        results["core_step"] = bench_core_step(policies, args, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    print_wall_time(started)


if __name__ == "__main__":
    main()
