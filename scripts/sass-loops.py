#!/usr/bin/env python3
"""The machine code of an artifact's GEMM main loops, without a GPU.

Assembles an artifact's module.ptx with ptxas (sm_90 by default), disassembles it with
cuobjdump/nvdisasm, and for every kernel whose name matches a pattern finds its hottest loop
(the innermost backward branch enclosing the most tensor-core or FMA instructions) and
counts what the loop body holds: tensor-core mma (HMMA), FMA, shared loads, global loads and
async copies, barriers, and the integer/address work around them. A static mix, not a
timing: it shows what each multiply costs in issue slots.

    scripts/sass-loops.py compiled/resnet44_b4096_exact_tc [--match wgrad] [--arch sm_90]

Needs the ptxas of scripts/install-ptxas.sh; installs cuobjdump and nvdisasm (PyPI wheels)
into .tools/sass on first use.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "13.5.37"
PTXAS = os.path.join(ROOT, ".tools/ptxas/nvidia/cu13/bin/ptxas")
SASS_BIN = os.path.join(ROOT, ".tools/sass/nvidia/cu13/bin")

# SASS opcode (before the first dot) -> the column it counts in
KINDS = {
    "HMMA": "mma", "FFMA": "fma", "FMUL": "fp", "FADD": "fp", "FMNMX": "fp", "FSEL": "fp",
    "LDS": "lds", "STS": "sts", "LDG": "ldg", "LDGSTS": "cp.async", "LDGDEPBAR": "cp.async",
    "DEPBAR": "cp.async", "BAR": "bar", "STG": "stg",
    "IMAD": "int", "IADD3": "int", "IADD": "int", "VIADD": "int", "LEA": "int", "LOP3": "int",
    "SHF": "int", "ISETP": "int", "SEL": "int", "IMNMX": "int", "VIMNMX": "int", "MOV": "move",
    "I2F": "div", "F2I": "div", "MUFU": "div", "PLOP3": "pred", "P2R": "pred", "R2P": "pred",
    "BRA": "branch", "S2R": "special", "CS2R": "special", "S2UR": "special",
}
COLUMNS = ["mma", "fma", "lds", "sts", "ldg", "cp.async", "bar", "int", "div", "other"]


def tools():
    if not os.access(PTXAS, os.X_OK):
        sys.exit("sass-loops: no ptxas: run scripts/install-ptxas.sh")
    if not os.access(os.path.join(SASS_BIN, "cuobjdump"), os.X_OK):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--target", os.path.join(ROOT, ".tools/sass"),
                        f"nvidia-cuda-cuobjdump=={VERSION}", f"nvidia-cuda-nvdisasm=={VERSION}"],
                       check=True)


def disassemble(ptx, arch):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "module.cubin")
        subprocess.run([PTXAS, f"-arch={arch}", "-o", cubin, ptx], check=True)
        env = dict(os.environ, PATH=SASS_BIN + os.pathsep + os.environ.get("PATH", ""))
        out = subprocess.run([os.path.join(SASS_BIN, "cuobjdump"), "-sass", cubin],
                             check=True, capture_output=True, text=True, env=env)
        return out.stdout


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def functions(sass):
    """name -> [(address, opcode, operands)]"""
    result, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            result[name] = []
            continue
        m = INSTRUCTION.search(line)
        if m and name:
            result[name].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return result


def hottest_loop(code):
    """The body of the backward branch enclosing the most mma (else fma) instructions."""
    best, best_key = None, (-1, -1)
    for i, (address, opcode, operands) in enumerate(code):
        if not opcode.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if not target or int(target.group(1), 16) >= address:
            continue
        start = int(target.group(1), 16)
        body = [c for c in code if start <= c[0] <= address]
        mma = sum(c[1].startswith("HMMA") for c in body)
        fma = sum(c[1].startswith("FFMA") for c in body)
        # prefer the innermost (shortest) loop among those with the most work
        key = (mma or fma, -len(body))
        if key > best_key:
            best, best_key = body, key
    return best or []


def mix(body):
    counts = collections.Counter()
    for _, opcode, _ in body:
        kind = KINDS.get(opcode.split(".")[0], "other")
        counts[kind if kind in COLUMNS else "other"] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="an artifact directory (module.ptx) or a .ptx file")
    parser.add_argument("--match", default="forward|dgrad|wgrad",
                        help="regex over kernel names (default: the convolution GEMMs)")
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    ptx = args.artifact if args.artifact.endswith(".ptx") else os.path.join(args.artifact, "module.ptx")
    tools()
    code = functions(disassemble(ptx, args.arch))
    rows, totals = [], collections.Counter()
    for name in sorted(code):
        if not re.search(args.match, name):
            continue
        body = hottest_loop(code[name])
        if not body:
            continue
        counts = mix(body)
        rows.append((name, len(body), counts))
        totals.update(counts)
        totals["all"] += len(body)
    header = f"{'kernel':<44} {'loop':>5} " + " ".join(f"{c:>8}" for c in COLUMNS) + "  per mma/fma"
    print(header)
    for name, length, counts in rows:
        work = counts["mma"] or counts["fma"]
        per = f"{length / work:.2f}" if work else "-"
        print(f"{name:<44} {length:>5} " + " ".join(f"{counts[c]:>8}" for c in COLUMNS) + f"  {per:>11}")
    work = totals["mma"] or totals["fma"]
    if rows:
        print(f"{'all ' + str(len(rows)) + ' kernels':<44} {totals['all']:>5} "
              + " ".join(f"{totals[c]:>8}" for c in COLUMNS)
              + f"  {totals['all'] / work if work else 0:>11.2f}")


if __name__ == "__main__":
    main()
