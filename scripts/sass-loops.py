#!/usr/bin/env python3
"""The machine code of an artifact's GEMM main loops, without a GPU.

Assembles an artifact's module.ptx with ptxas (sm_90 by default), disassembles it with
cuobjdump/nvdisasm, and for every kernel whose name matches a pattern finds its hottest loop
(the innermost backward branch enclosing the most tensor-core or FMA instructions) and
counts what the loop body holds: tensor-core mma (HMMA), FMA, shared loads, global loads and
async copies, barriers, and the integer/address work around them. A static mix, not a
timing: it shows what each multiply costs in issue slots.

    scripts/sass-loops.py compiled/resnet44_b4096_exact_tc [--match wgrad] [--arch sm_90]
    scripts/sass-loops.py compiled/resnet44_b4096_exact_tc --estimate   # + whole-step bounds
    scripts/sass-loops.py compiled/resnet44_b4096_exact_tc --estimate --top 10  # + by kernel
    scripts/sass-loops.py DIR --estimate --measured fisherc.json --top 10  # + GPU times by node

With --estimate (an artifact directory: its plan.json states each GEMM's main loop, trips per
block and multiplies per warp and trip), every launch's loop is multiplied out: the mma (or
FMA) instructions the step issues, the loop instructions around them, and two lower bounds on
the GPU's time for these loops alone: issue (every SM sub-partition issuing one instruction
per clock) and tensor (mma at the card's dense peak). Not a timing: it leaves out memory
traffic, latency, occupancy, the loops' prologues and epilogues, and every other kernel. A
part of a loop behind a forward branch (a convolution's halo, staged once per channel group)
counts once in `branch_every` trips, as plan.json states it. A third bound, shared: the loops'
shared-memory accesses (LDS, STS, cp.async) in 128-byte wavefronts, one an SM and clock, bank
conflicts left out. And the shared-memory load instructions the step's loops issue per mma
(LDS and LDSM over mma, weighted by each launch's trips): the measure of how well fragment
loads are shared among mma.

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


def branched_over(body):
    """Addresses of `body`'s instructions that a forward branch within it jumps over."""
    end = body[-1][0] if body else 0
    skipped = set()
    for address, opcode, operands in body:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and address < int(target.group(1), 16) <= end:
            skipped.update(a for a, _, _ in body if address < a < int(target.group(1), 16))
    return skipped


def branched(body):
    """How many instructions of `body` a forward branch within it jumps over."""
    return len(branched_over(body))


# shared-memory instructions: each warp-wide access of `width` bits per lane takes width/32
# wavefronts of 128 bytes, and an SM serves one wavefront a clock (L1 and shared memory share
# it; bank conflicts would add more)
SHARED = ("LDS", "STS", "LDGSTS", "LDSM")


def shared_loads(body, every=1):
    """Shared-memory load instructions (LDS, LDSM) of one trip through `body`; a part behind
    a forward branch counted once in `every` trips."""
    skipped = branched_over(body) if every > 1 else set()
    return sum((1 / every if address in skipped else 1)
               for address, opcode, _ in body if opcode.split(".")[0] in ("LDS", "LDSM"))


def wavefronts(body, every=1):
    """Shared-memory wavefronts of one trip through `body`, conflict-free; a part behind a
    forward branch counted once in `every` trips."""
    skipped = branched_over(body) if every > 1 else set()
    total = 0.0
    for address, opcode, _ in body:
        if not opcode.startswith(SHARED):
            continue
        width = 128 if ".128" in opcode else 64 if ".64" in opcode else 32
        total += width / 32 / (every if address in skipped else 1)
    return total


def mix(body):
    counts = collections.Counter()
    for _, opcode, _ in body:
        kind = KINDS.get(opcode.split(".")[0], "other")
        counts[kind if kind in COLUMNS else "other"] += 1
    return counts


# H100 SXM: 132 SMs of 4 sub-partitions; the clock under sustained tensor load; dense TF32
# tensor peak (494.7 TFLOP/s at the 1.83 GHz boost: 2048 FLOP, one m16n8k8, per SM and clock);
# fp32 FMA peak 67 TFLOP/s
H100 = {"sms": 132, "ghz": 1.755, "mma_per_sm_clock": 1.0, "fma_flops": 67e12}


def estimate(artifact, code, card=H100, top=0, measured=None):
    """Per convolution kind: launches, mma/FMA instructions, loop instructions, bounds (ms);
    then the `top` kernels by issue bound; with `measured` (a `fisherc bench --json` file of
    the same configuration), each node's measured time beside its loops' bounds."""
    import json
    with open(os.path.join(artifact, "plan.json")) as f:
        plan = json.load(f)
    rows, unrolled = collections.OrderedDict(), set()
    kernels = collections.defaultdict(collections.Counter)
    clock = card["sms"] * card["ghz"] * 1e9
    by_node = collections.defaultdict(collections.Counter)  # plan node -> issue/work seconds
    for launch in plan["launches"]:
        kernel = plan["kernels"][launch["kernel"]]
        main_loop = kernel.get("main_loop")
        if not main_loop:
            continue
        body = hottest_loop(code.get(kernel["name"], []))
        if not body:
            unrolled.add(kernel["name"])
            continue
        counts = mix(body)
        tensor = counts["mma"] > 0
        # a part behind a branch (a halo's staging) runs in one step of branch_every
        every = main_loop.get("branch_every", 1)
        issued = len(body)
        if every > 1:
            skipped = branched(body)
            issued = len(body) - skipped + skipped / every
        per_multiply = issued / (counts["mma"] or counts["fma"])
        # ptxas may unroll the loop: its body then runs several of plan.json's trips
        unroll = max(1, round((counts["mma"] or counts["fma"]) / main_loop["multiplies"]))
        loads = shared_loads(body, every) / unroll
        warps = launch["grid"][0] * launch["grid"][1] * launch["block"] // 32
        shared = (warps * main_loop["trips"] * wavefronts(body, every) / unroll
                  / (card["sms"] * card["ghz"] * 1e9))
        multiplies = warps * main_loop["trips"] * main_loop["multiplies"]
        kind = re.search(r"forward|dgrad|wgrad", kernel["name"])
        row = rows.setdefault((kind.group(0) if kind else "other", tensor), collections.Counter())
        row["launches"] += 1
        row["multiplies"] += multiplies
        row["instructions"] += multiplies * per_multiply
        row["shared"] += shared
        row["loads"] += warps * main_loop["trips"] * loads
        kernels[kernel["name"]].update({"launches": 1, "instructions": multiplies * per_multiply})
        kernels[kernel["name"]]["per_multiply"] = per_multiply
        by_node[launch["node"]]["issue"] += multiplies * per_multiply / (4 * clock)
        by_node[launch["node"]]["shared"] += shared
        by_node[launch["node"]]["work"] += (
            multiplies / (card["mma_per_sm_clock"] * clock) if tensor
            else multiplies * 64 / card["fma_flops"])
    print(f"\n{'kind':<10} {'unit':>6} {'launches':>8} {'multiplies (G)':>15} "
          f"{'instructions (G)':>17} {'issue bound ms':>15} {'tensor/FMA bound ms':>20} "
          f"{'shared bound ms':>16} {'LDS per mma':>12}")
    totals = collections.Counter()
    for (kind, tensor), row in rows.items():
        issue = row["instructions"] / (4 * clock) * 1e3
        if tensor:
            work = row["multiplies"] / (card["mma_per_sm_clock"] * clock) * 1e3
        else:
            work = row["multiplies"] * 32 * 2 / card["fma_flops"] * 1e3
        shared = row["shared"] * 1e3
        totals.update({"launches": row["launches"], "issue": issue, "work": work,
                       "multiplies": row["multiplies"], "instructions": row["instructions"],
                       "shared": shared, "loads": row["loads"]})
        per_mma = f"{row['loads'] / row['multiplies']:.2f}" if tensor else "-"
        print(f"{kind:<10} {'mma' if tensor else 'fma':>6} {row['launches']:>8} "
              f"{row['multiplies'] / 1e9:>15.3f} {row['instructions'] / 1e9:>17.2f} "
              f"{issue:>15.2f} {work:>20.2f} {shared:>16.2f} {per_mma:>12}")
    per_mma = totals["loads"] / totals["multiplies"] if totals["multiplies"] else 0
    print(f"{'all':<10} {'':>6} {totals['launches']:>8} {totals['multiplies'] / 1e9:>15.3f} "
          f"{totals['instructions'] / 1e9:>17.2f} {totals['issue']:>15.2f} {totals['work']:>20.2f} "
          f"{totals['shared']:>16.2f} {per_mma:>12.2f}")
    print(f"(H100 SXM assumed: {card['sms']} SMs at {card['ghz']} GHz; the loops alone)")
    if unrolled:
        print(f"left out, their loop unrolled by ptxas (no backward branch): {sorted(unrolled)}")
    if top:
        print(f"\n{'kernel':<44} {'launches':>8} {'instructions per mma/fma':>25} {'issue ms':>9}")
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["instructions"])
        for name, k in ranked[:top]:
            issue = k["instructions"] / (4 * clock) * 1e3
            print(f"{name:<44} {k['launches']:>8} {k['per_multiply']:>25.2f} {issue:>9.2f}")
    if measured:
        against_measured(plan, by_node, measured, top)


def against_measured(plan, by_node, path, top):
    """Each node of `plan` with a GEMM loop: its time in the bench record of `path` whose
    kernels are `plan`'s, its loops' issue and tensor/FMA bounds; by op, then the `top` nodes
    furthest over their bound."""
    import gzip
    import json
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        records = json.load(f)
    names = {k["name"] for k in plan["kernels"]}
    record = max(records, key=lambda r: sum(k in names for n in r.get("nodes", [])
                                             for k in n["kernels"]))
    launched = [(i, n) for i, n in enumerate(plan["nodes"]) if n["launch_count"]]
    if len(launched) != len(record.get("nodes", [])) or any(
            n["layer"] != m["layer"] for (_, n), m in zip(launched, record["nodes"])):
        sys.exit(f"sass-loops: {path} holds no measurement of this artifact's nodes")
    print(f"\nmeasured: {record['model']} batch {record['batch']} fisher {record['fisher']} "
          f"{record['variant']} on {record['device']}: {record['median_ms']:.1f} ms a step")
    ops, rows = collections.defaultdict(collections.Counter), []
    for (i, node), m in zip(launched, record["nodes"]):
        bound = by_node.get(i)
        if not bound:
            continue
        issue, work, shared = (bound[b] * 1e3 for b in ("issue", "work", "shared"))
        ops[node["op"]].update({"nodes": 1, "ms": m["ms"], "issue": issue, "work": work,
                                "shared": shared})
        rows.append((m["ms"] - max(issue, work, shared), node["layer"], node["op"], m["ms"],
                     issue, work, shared))
    print(f"{'op':<26} {'nodes':>5} {'measured ms':>12} {'issue bound':>12} {'tensor/FMA':>11} "
          f"{'shared':>8} {'measured/largest':>17}")
    for op, t in sorted(ops.items(), key=lambda kv: -kv[1]["ms"]):
        largest = max(t["issue"], t["work"], t["shared"], 1e-9)
        print(f"{op:<26} {t['nodes']:>5} {t['ms']:>12.2f} {t['issue']:>12.2f} {t['work']:>11.2f} "
              f"{t['shared']:>8.2f} {t['ms'] / largest:>17.1f}")
    if top:
        print(f"\n{'layer':<30} {'op':<18} {'measured ms':>12} {'issue bound':>12} "
              f"{'tensor/FMA':>11} {'shared':>8}  (furthest over their bounds)")
        for _, layer, op, ms, issue, work, shared in sorted(rows, reverse=True)[:top]:
            print(f"{layer:<30} {op:<18} {ms:>12.3f} {issue:>12.3f} {work:>11.3f} {shared:>8.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="an artifact directory (module.ptx) or a .ptx file")
    parser.add_argument("--match", default="forward|dgrad|wgrad",
                        help="regex over kernel names (default: the convolution GEMMs)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--estimate", action="store_true",
                        help="multiply the loops out over the step's launches (plan.json)")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="with --estimate, the N kernels with the largest issue bound")
    parser.add_argument("--measured", metavar="BENCH_JSON",
                        help="with --estimate, a `fisherc bench --json` file (or .json.gz) of this "
                             "artifact's configuration: each node's measured time beside its "
                             "bounds")
    args = parser.parse_args()
    if args.estimate and args.artifact.endswith(".ptx"):
        sys.exit("sass-loops: --estimate needs an artifact directory (its plan.json)")
    ptx = args.artifact
    if not ptx.endswith(".ptx"):
        ptx = os.path.join(ptx, "module.ptx")
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
        print(f"{name:<44} {length:>5} " + " ".join(f"{counts[c]:>8}" for c in COLUMNS)
              + f"  {per:>11}")
    work = totals["mma"] or totals["fma"]
    if rows:
        print(f"{'all ' + str(len(rows)) + ' kernels':<44} {totals['all']:>5} "
              + " ".join(f"{totals[c]:>8}" for c in COLUMNS)
              + f"  {totals['all'] / work if work else 0:>11.2f}")
    if args.estimate:
        estimate(args.artifact, code, top=args.top, measured=args.measured)


if __name__ == "__main__":
    main()
