"""Reading a compiled train step: which kernels read the gradients, and what fused with what.

``analyse(compiled.as_text())`` tags every HLO instruction by where it came
from, using the op names JAX writes (``transpose(jvp(...))`` is the backward
pass) and the stack frames in the HLO's metadata (``_norms.py``, with
``_packing.py`` and ``_shards.py``, is optaxclip's norm, optax's ``tree.norm``
is optax's, ``scale_by_adam`` and ``apply_updates`` are Adam). A kernel, one
instruction of the entry computation, carries the tags of everything fused into
it. Kernels inside a conditional's branches (the overflow rescue) are not
counted: they run only when their branch is taken.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_FRAME_LINE = re.compile(r"^(\d+) \{(.*)\}$")
_NOT_KERNELS = frozenset({
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start",
    "copy-done", "after-all", "opt-barrier",
})
_TRANSPARENT = frozenset({"get-tuple-element", "bitcast", "tuple", "opt-barrier", "copy"})


@dataclass
class Instruction:
    name: str
    opcode: str
    operands: list[str]
    calls: list[str]
    op_name: str
    frame: int | None
    tags: set[str] = field(default_factory=set)


def _split_tables(text: str) -> dict[str, dict[int, str]]:
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        if current is None:
            continue
        if not line.strip():
            current = None
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if m:
            current[int(m.group(1))] = m.group(2)
    return tables


def _frames(text: str) -> dict[int, list[tuple[str, str]]]:
    """Stack frame id -> [(file, function)] from innermost to outermost."""
    t = _split_tables(text)
    files = {k: v.strip('"') for k, v in t.get("FileNames", {}).items()}
    functions = {k: v.strip('"') for k, v in t.get("FunctionNames", {}).items()}
    locations = {}
    for k, v in t.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        g = re.search(r"function_name_id=(\d+)", v)
        locations[k] = (files.get(int(f.group(1)), "") if f else "",
                        functions.get(int(g.group(1)), "") if g else "")
    parents, own = {}, {}
    for k, v in t.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        own[k] = locations.get(int(loc.group(1)), ("", "")) if loc else ("", "")
        parents[k] = int(parent.group(1)) if parent else None
    out = {}
    for k in own:
        chain, seen, cur = [], set(), k
        while cur is not None and cur in own and cur not in seen:
            seen.add(cur)
            chain.append(own[cur])
            cur = parents.get(cur)
            if cur == 0:
                break
        out[k] = chain
    return out


def _tags(op_name: str, chain: list[tuple[str, str]]) -> set[str]:
    files = " ".join(f for f, _ in chain)
    functions = " ".join(fn for _, fn in chain)
    tags = set()
    if "transpose(" in op_name:
        tags.add("backward")
    elif "jvp(" in op_name:
        tags.add("forward")
    norm_files = ("optaxclip/_norms.py", "optaxclip/_packing.py", "optaxclip/_shards.py")
    if any(f in files for f in norm_files) or ("_tree_math.py" in files and "norm" in functions):
        tags.add("norm")
    if "optaxclip/_scaling.py" in files and "apply_scale" in functions:
        tags.add("scale")
    if "transforms/_clipping.py" in files and "clip_fn" in functions:
        tags.add("scale")
    if ("scale_by_adam" in functions or "tree_update_moment" in functions
            or "apply_updates" in functions or "bias_correction" in functions):
        tags.add("adam")
    if "optaxclip/guards.py" in files or "benchmarks/designs.py" in files:
        tags.add("guard")
    return tags


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations by name, and the entry computation's name."""
    frames = _frames(text)
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line)
            if m:
                current = computations.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if current is None or line.startswith("}"):
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, opcode, rest = m.group(1), m.group(3), m.group(4)
        depth, args = 1, ""
        for ch in rest:
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
            args += ch
        operands = re.findall(r"%([\w.\-]+)", args)
        calls = re.findall(r"(?:calls|to_apply|true_computation|false_computation|"
                           r"branch_computations|body|condition)=\{?%?([\w.\-]+)", rest)
        calls += re.findall(r"branch_computations=\{([^}]*)\}", rest)
        flat_calls = []
        for c in calls:
            flat_calls += [x.strip().lstrip("%") for x in c.split(",")]
        op = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        inst = Instruction(name, opcode, operands, flat_calls, op.group(1) if op else "",
                           int(frame.group(1)) if frame else None)
        inst.tags = _tags(inst.op_name, frames.get(inst.frame, []) if inst.frame else [])
        if "norm" in inst.tags:
            # Only the norm's reads count: its scalar epilogue fuses anywhere.
            inst.tags.discard("norm")
            if opcode in ("reduce", "reduce-window"):
                inst.tags.add("norm")
            elif opcode == "concatenate":
                inst.tags.add("pack")
        current.append(inst)
    return computations, entry


def _kernel_tags(inst: Instruction, computations: dict[str, list[Instruction]],
                 has_norm_reduce: list[bool]) -> set[str]:
    tags = set(inst.tags)
    if inst.opcode in ("reduce",) and "norm" in inst.tags:
        has_norm_reduce[0] = True
    if inst.opcode == "conditional":
        return {"conditional"}
    for called in inst.calls:
        for sub in computations.get(called, []):
            tags |= _kernel_tags(sub, computations, has_norm_reduce)
    return tags


def analyse(text: str) -> dict[str, Any]:
    """Counts of what the step's kernels are and which of them read the gradients.

    * ``kernels``: top-level kernels by sorted tag set, e.g. ``"adam+scale": 160``
      (Adam's update with the clip's scale fused in).
    * ``norm_kernels``: the kernels holding a norm reduction, by tag set:
      ``"norm"`` alone (a kernel of its own), ``"backward+norm"`` (fused into the
      backward pass) or ``"adam+norm"`` (into Adam's update).
    * ``gradient_reads``: for each gradient (a value the backward pass produces
      and Adam's update reads), how many kernels read it, as a histogram:
      ``{"2": 160}`` means every gradient is read by two kernels.
    """
    computations, entry = parse(text)
    instructions = computations.get(entry, [])
    by_name = {i.name: i for i in instructions}
    kernel_tags: dict[str, set[str]] = {}
    norm_kernels: Counter = Counter()
    kernels: Counter = Counter()
    for inst in instructions:
        if inst.opcode in _NOT_KERNELS:
            continue
        flag = [False]
        tags = _kernel_tags(inst, computations, flag)
        kernel_tags[inst.name] = tags
        label = "+".join(sorted(tags - {"forward"} if "backward" in tags else tags)) or "other"
        kernels[label] += 1
        if flag[0]:
            norm_kernels[label] += 1

    def producers(name: str, seen: frozenset = frozenset()) -> set[str]:
        inst = by_name.get(name)
        if inst is None or name in seen:
            return set()
        if inst.opcode in _TRANSPARENT:
            out = set()
            for o in inst.operands:
                out |= producers(o, seen | {name})
            return out
        return {name} if name in kernel_tags else set()

    readers: dict[str, set[str]] = {}
    for inst in instructions:
        if inst.name not in kernel_tags:
            continue
        if inst.opcode == "conditional":
            continue  # its branches read only when taken (the rescue)
        for operand in inst.operands:
            for p in producers(operand):
                if p != inst.name:
                    readers.setdefault(p, set()).add(inst.name)
    gradient_reads: Counter = Counter()
    reader_kinds: Counter = Counter()
    for producer, consumers in readers.items():
        if "backward" not in kernel_tags[producer] or "adam" in kernel_tags[producer]:
            continue
        if not any("adam" in kernel_tags[c] for c in consumers):
            continue
        gradient_reads[str(len(consumers))] += 1
        kinds = sorted("+".join(sorted(kernel_tags[c] - {"forward", "backward"}) or ["backward"])
                       for c in consumers)
        reader_kinds[" | ".join(kinds)] += 1
    return {
        "kernels": dict(kernels.most_common()),
        "norm_kernels": dict(norm_kernels),
        "gradient_reads": dict(gradient_reads),
        "gradient_readers": dict(reader_kinds.most_common(6)),
        "conditionals": sum(1 for i in instructions if i.opcode == "conditional"),
    }


def parameter_readers(text: str, prefix: str = "g") -> dict[str, int]:
    """How many kernels read each entry parameter whose name starts with ``prefix``:
    ``{"1": 148}`` means every gradient is read by one kernel (one pass)."""
    computations, entry = parse(text)
    instructions = computations.get(entry, [])
    by_name = {i.name: i for i in instructions}

    def sources(name: str, seen: frozenset = frozenset()) -> set[str]:
        inst = by_name.get(name)
        if inst is None or name in seen:
            return set()
        if inst.opcode == "parameter":
            return {name}
        if inst.opcode in _TRANSPARENT:
            out = set()
            for o in inst.operands:
                out |= sources(o, seen | {name})
            return out
        return set()

    readers: Counter = Counter()
    for inst in instructions:
        if inst.opcode in _NOT_KERNELS or inst.opcode == "conditional":
            continue
        for p in {p for o in inst.operands for p in sources(o)}:
            readers[p] += 1
    histogram: Counter = Counter()
    for inst in instructions:
        if inst.opcode == "parameter" and inst.name.startswith(prefix):
            histogram[str(readers.get(inst.name, 0))] += 1
    return dict(histogram)
