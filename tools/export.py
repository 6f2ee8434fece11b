"""Each model of a checkpoint with its LoRA merged in, saved as a plain transformers model folder that loads
with from_pretrained alone (no core.py, no peft):

    python tools/export.py CHECKPOINT OUT

CHECKPOINT is a checkpoint folder (RUN/checkpoints/step_NNNNNN) or a run folder (its newest checkpoint). The
models are those the run trained; each is loaded (on the GPU if there is one), its adapter merged in float32,
and saved in the dtype its model folder declares (bf16 for the Qwen models) to OUT/merged_1 (and OUT/merged_2).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402


def merged(model):
    """The model with every LoRA folded into its base weight, W + (alpha / r) B A computed in float32, and the
    LoRA wrappers removed."""
    with torch.no_grad():
        for name, layer in core.lora_layers(model).items():
            weight = layer.base.weight
            weight.copy_(weight.float() + layer.scale * layer.lora_B @ layer.lora_A)
            core.set_module(model, name, layer.base)
    return model


def export(checkpoint, out):
    from transformers import AutoConfig
    folder = core.find_checkpoint(checkpoint, warn=True)  # a damaged newest one is named and passed over
    cfg = core.replace(core.saved_config(folder), dtype="float32")  # merged in float32
    if Path(out).exists() and any(Path(out).iterdir()):
        raise core.UsageError(f"'{out}' exists and is not empty; pick a new folder")
    for m, path in enumerate(core.model_paths(cfg), 1):
        policy = core.load_policy(m, path, core.resolve_device(""), cfg)
        core.load_lora(policy.model, folder / f"adapter_{m}")
        dtype = AutoConfig.from_pretrained(path, local_files_only=True).dtype or torch.float32  # as it came
        model = merged(policy.model).to(dtype)
        model.config.dtype = dtype
        model.save_pretrained(Path(out) / f"merged_{m}")
        policy.tokenizer.save_pretrained(Path(out) / f"merged_{m}")
        print(f"model {m} ({path}) with the LoRA of {folder} merged in, saved in {str(dtype)[6:]}: "
              f"{Path(out) / f'merged_{m}'}")


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    try:
        export(*args)
    except core.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
