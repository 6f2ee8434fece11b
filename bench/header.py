"""The header every bench script prints above its results (what bench/results/*.txt keep): the command, the date,
the code (core.py's sha256 and git commit), the device and the library versions, read by core.py's provenance
functions (the ones a run's provenance.json comes from), never written by hand.

    python bench/header.py "a title" ["the command it heads"]   # the header alone, on the GPU if there is one
"""
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402


def print_header(title, device="cpu", command=None):
    """`title`, then the command (default: this process's), date, code, device and versions, each on a line of
    its own starting with '#'."""
    code, versions = core.code_version(), core.library_versions()
    commit = (code["git_commit"] or "none")[:12]
    if code["git_dirty"]:
        commit += " (with uncommitted changes)"
    info = core.device_info(core.torch.device(device))
    if info["device"].startswith("cuda"):
        where = f"{info['name']} x{info['count']}, CUDA {info['cuda']}, compute capability {info['capability']}"
    else:
        where = (f"CPU {info['name']}, {info['cpu_capability']} kernels, {info['cores']} cores, "
                 f"{info['threads']} torch threads")
    print(f"# {title}\n# command: {command or shlex.join(['python', *sys.argv])}\n"
          f"# made {time.strftime('%Y-%m-%d %H:%M %Z')} by core.py sha256 {code['core_sha256'][:12]}, git commit "
          f"{commit}\n# on {where}\n# " + ", ".join(f"{name} {v}" for name, v in versions.items()), flush=True)


def print_wall_time(started):
    print(f"# wall time: {time.time() - started:.1f} s")


if __name__ == "__main__":
    title = sys.argv[1] if len(sys.argv) > 1 else "bench"
    command = sys.argv[2] if len(sys.argv) > 2 else None
    print_header(title, "cuda" if core.torch.cuda.is_available() else "cpu", command)
