"""Run every ```python block of README.md in order, in one namespace, as written.

    PYTHONPATH=src python scripts/check_readme.py            # on a CUDA machine
    PYTHONPATH=src python scripts/check_readme.py --cpu      # blocks without CUDA streams,
                                                             # "cuda" -> "cpu", f32, N=2048
The CPU mode is a cheap pre-check of names and shapes; the snippets are written for a GPU.
"""
import pathlib
import re
import sys
import time


def blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def main() -> int:
    cpu = "--cpu" in sys.argv
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    namespace: dict = {}
    for i, code in enumerate(blocks(readme.read_text()), 1):
        if cpu:
            if "torch.cuda." in code:
                print(f"block {i}: skipped on CPU (CUDA streams / graphs)")
                continue
            code = (code.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
                    .replace("16384", "2048"))
        t0 = time.perf_counter()
        exec(compile(code, f"README.md block {i}", "exec"), namespace)
        print(f"block {i}: ok ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
