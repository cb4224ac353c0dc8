"""What the compiler made of each CPU level's copy of the kernels.

    python -m benchmarks.isa_report [PATH.so | PATH.o ...] [--hot-only]

Disassembles the native extension (by default the tallytrain._C that
tallytrain.ops loads) with objdump and, for every function the level
dispatch runs (simd.h: ``Compiled<level>::run<kernel>``), counts its
instructions by the widest register they touch (zmm, ymm, xmm, none) and the
ones that show a vector loop gone scalar: lane inserts and extracts
(``pinsr*``/``pextr*``, element by element building or taking apart of a
vector) and ``set<cc>`` (a compare done one element at a time). A kernel
vectorised for its level uses that level's widest registers (v4: zmm, v3:
ymm, v2 and baseline: xmm) and has few or no lane inserts; docs/ops.md shows
the table and what it means.

x86-64 only (objdump's AT&T syntax); needs binutils.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

LEVELS = {"0": "baseline", "1": "v2", "2": "v3", "3": "v4"}
_FUNCTION = re.compile(r"^[0-9a-f]+ <(?P<name>.*)>:$")
_LEVEL = re.compile(r"Compiled<\(tallytrain::cpu::Level\)(?P<level>\d)>::run<(?P<kernel>.*)$")
_INSERT = re.compile(r"^v?(pinsr|pextr|insertps|extractps)")
_SETCC = re.compile(r"^set[a-z]+$")


def kernel_name(template_args: str) -> str:
    """The kernel of a demangled ``run<Kernel, Args...>(...)``: its first
    template argument, namespaces dropped."""
    depth, end = 0, len(template_args)
    for i, ch in enumerate(template_args):
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                end = i
                break
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    name = template_args[:end]
    name = re.sub(r"tallytrain::cpu::(\(anonymous namespace\)::)?", "", name)
    return re.sub(r"\s+", " ", name).strip()


def classify(operands: str) -> str:
    for reg in ("zmm", "ymm", "xmm"):
        if f"%{reg}" in operands:
            return reg
    return "none"


def report(path: str) -> List[Tuple[str, str, Counter]]:
    """(kernel, level, counts) per dispatched function of one object file."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise SystemExit("objdump (binutils) is needed")
    text = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: Dict[Tuple[str, str], Counter] = {}
    current: Optional[Counter] = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = None
            lm = _LEVEL.search(m["name"])
            if lm:  # a function and its split-off cold part count together
                key = (kernel_name(lm["kernel"]), LEVELS[lm["level"]])
                current = counts.setdefault(key, Counter())
            continue
        if current is None or "\t" not in line:
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        fields = parts[1].split(None, 1)
        if not fields:
            continue
        mnemonic, operands = fields[0], (fields[1] if len(fields) > 1 else "")
        current["instructions"] += 1
        current[classify(operands)] += 1
        if _INSERT.match(mnemonic):
            current["lane insert/extract"] += 1
        if _SETCC.match(mnemonic):
            current["setcc"] += 1
    return [(kernel, level, c) for (kernel, level), c in counts.items()]


def default_extension() -> str:
    import tallytrain.ops as ops

    path = ops.backend_info()["extension"]
    if not path:
        raise SystemExit("the native extension is not loaded; pass the .so to inspect")
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.isa_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="shared objects or object files (default: the loaded tallytrain._C)",
    )
    args = parser.parse_args(argv)
    paths = args.paths or [default_extension()]
    rows = [row for path in paths for row in report(path)]
    if not rows:
        raise SystemExit("no level copies found (a portable build has none)")
    order = {name: i for i, name in enumerate(LEVELS.values())}
    rows.sort(key=lambda r: (r[0], order[r[1]]))
    head = ["kernel", "level", "instructions", "zmm", "ymm", "xmm", "lane insert/extract", "setcc"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for kernel, level, c in rows:
        print("| " + " | ".join([kernel, level] + [str(c[h]) for h in head[2:]]) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
