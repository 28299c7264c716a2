#!/usr/bin/env python3
"""The README's "Example with NumPy inputs", run exactly as written in a fresh folder: its Python
block, then its shell command, with only `mpirun` and `build/bin/` replaced by the test's own mpirun
command (which adds what this machine needs) and the built binary. The outputs must exist and head 0
must match the formula the README states (scale 1/sqrt(head_dim), natural-log LSE). Usage:
  readme_numpy_example.py <mpirun command...> -- <ring_attention binary> <README.md>
"""
import os
import re
import shlex
import subprocess
import sys
import tempfile

import numpy as np


def example_blocks(readme):
    text = open(readme).read()
    start = text.find("Example with NumPy inputs")
    if start < 0:
        sys.exit("README.md has no 'Example with NumPy inputs' section")
    blocks = re.findall(r"```(python|sh)\n(.*?)```", text[start:], re.S)
    python = next((b for lang, b in blocks if lang == "python"), None)
    shell = next((b for lang, b in blocks if lang == "sh"), None)
    if python is None or shell is None:
        sys.exit("the README's NumPy example lacks its python or sh block")
    return python, shell


def main():
    split = sys.argv.index("--")
    mpirun, (binary, readme) = sys.argv[1:split], sys.argv[split + 1:]
    python, shell = example_blocks(readme)
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "make_inputs.py"), "w") as f:
            f.write(python)
        subprocess.run([sys.executable, "make_inputs.py"], cwd=work, check=True)

        words = shlex.split(shell.replace("\\\n", " "))
        if words[0] != "mpirun":
            sys.exit(f"the README's command does not start with mpirun: {shell!r}")
        words = mpirun + [binary if w == "build/bin/ring_attention" else w for w in words[1:]]
        run = subprocess.run(words, cwd=work, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            sys.exit(f"the README's command failed (exit {run.returncode}):\n{' '.join(words)}\n{run.stdout}\n{run.stderr}")

        q, k, v = (np.load(os.path.join(work, "in", f"{n}.npy")).astype(np.float64) for n in ("q", "k", "v"))
        out = {n: np.load(os.path.join(work, "out", f"{n}.npy")) for n in ("o", "lse", "dq", "dk", "dv")}
        t, h, d = q.shape
        expected_shapes = {"o": q.shape, "lse": (h, t), "dq": q.shape, "dk": k.shape, "dv": v.shape}
        for name, shape in expected_shapes.items():
            if out[name].shape != shape or not np.all(np.isfinite(out[name])):
                sys.exit(f"out/{name}.npy: shape {out[name].shape} (expected {shape}) or non-finite values")

        # Head 0 (its kv head is 0 too): causal softmax with scale 1/sqrt(d), LSE in the natural log.
        s = q[:, 0, :] @ k[:, 0, :].T / np.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))[:, 0]
        o = np.exp(s - lse[:, None]) @ v[:, 0, :]
        err_o = np.abs(out["o"][:, 0, :] - o).max()
        err_lse = np.abs(out["lse"][0] - lse).max()
        print(f"README example: exit 0, outputs in out/, head 0 max error o {err_o:.2e}, lse {err_lse:.2e}")
        if err_o > 1e-3 or err_lse > 1e-3:
            sys.exit("head 0 does not match softmax(q k^T / sqrt(d)) v with a natural-log LSE")


if __name__ == "__main__":
    main()
