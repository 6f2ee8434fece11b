"""The update's transient memory per log-prob chunk (core.token_logprobs with core.policy_loss and backward), on
the CPU with the real Qwen vocabulary (151,936) in bf16, as on a GPU: each phase runs in a fresh process and its
peak resident memory above the process's memory before the phase is printed. The [rows, chunk, vocab] tensors
dominate; the decoder is one small layer here (hidden 64), so what is measured is the chunk's head, log-softmax,
entropy and their gradients, the part that grows with --micro-batch x --logprob-chunk.

    python bench/chunk_memory.py [--rows 8] [--chunk 512]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHASES = ("reference pass (no grad)", "policy pass (with the entropy and tempered log-probs)", "backward")


def measure(phase, rows, chunk):
    """Peak RSS growth in GB of one phase, in this process (called in a child)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    import core
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    core.add_lora(model, 16, 32)
    ids = torch.randint(0, config.vocab_size, (rows, chunk + 1))
    mask, adv, w = torch.ones(rows, chunk), torch.randn(rows), torch.ones(rows)

    def policy_pass():  # in train mode, as core.update_policy runs it
        model.train()
        logp, _, _ = core.token_logprobs(model, ids, chunk, 0.7)
        model.eval()
        return core.policy_loss(logp, logp.detach(), adv, w, mask, 0.04)[0]

    loss = policy_pass() if phase == 2 else None  # the backward is measured alone, after its policy pass
    with PeakRSS() as peak:
        if phase == 0:
            with torch.no_grad(), core.lora_disabled(model):
                core.token_logprobs(model, ids, chunk)
        elif phase == 1:
            policy_pass()
        else:
            loss.backward()
    return peak.gb


class PeakRSS:
    """The peak of this process's resident memory above its value on entry, in GB, polled every millisecond
    (a [rows, chunk, vocab] tensor is allocated and freed in whole pages: its size shows in the RSS)."""

    def __enter__(self):
        self.start = self.top = rss_bytes()
        self.done = False
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.done:
            self.top = max(self.top, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.gb = (self.top - self.start) / 1e9


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="sequences per micro-batch (--micro-batch)")
    parser.add_argument("--chunk", type=int, default=512, help="positions per chunk (--logprob-chunk)")
    parser.add_argument("--phase", type=int, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(measure(args.phase, args.rows, args.chunk)))
        return
    import torch
    from bench.header import print_header
    print_header("Peak memory of core.token_logprobs' chunked log-softmax, the model in bfloat16 (the chunks are fp32)")
    one = args.rows * args.chunk * 151936 * 4 / 1e9
    print(f"torch {torch.__version__}, CPU; {args.rows} rows x {args.chunk} positions x 151,936 vocabulary: "
          f"one fp32 [rows, chunk, vocab] tensor is {one:.2f} GB, one bf16 {one / 2:.2f} GB")
    for i, phase in enumerate(PHASES):
        child = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--chunk", str(args.chunk),
                                "--phase", str(i)], capture_output=True, text=True)
        if child.returncode:
            sys.exit(child.stderr.strip().splitlines()[-1])
        gb = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  {phase:<55} peak {gb:5.2f} GB above its start ({gb / one:.1f} fp32 chunk tensors)")


if __name__ == "__main__":
    main()
