"""Device time per XLA operation from a JAX profiler trace, and what each operation is
(the source scope and the kind of kernel) from the compiled program's HLO text.

Shared by `profile_decode.py` and `profile_train_step.py`.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re


def _events(trace_dir: str) -> tuple[list, set, bool]:
    """(the trace's events, the process ids whose events are device operations, whether
    those are host threads: the CPU backend, where only events naming an op count)."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        print(f"no perfetto trace under {trace_dir}")
        return [], set(), False
    with gzip.open(sorted(files)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items()
                   if any(k in name for k in ("GPU", "TPU", "gpu"))}
    on_host = not device_pids
    if on_host:
        # The CPU backend runs its operations on host threads; they are the events that
        # name an HLO operation (`hlo_op`).
        device_pids = {e.get("pid") for e in events
                       if e.get("ph") == "X" and "hlo_op" in e.get("args", {})}
        if not device_pids:
            print(f"no device process in the trace; processes: {list(names.values())[:12]}")
    return events, device_pids, on_host


def device_time_by_op(trace_dir: str, top: int) -> list[tuple[str, float, int]]:
    """(op name, total device milliseconds, calls) from a Perfetto trace, longest first.

    Device events are those of processes whose name mentions a GPU/TPU device (on the
    CPU, the host events that name an HLO op); the op is the event's `hlo_op` argument
    where there is one (XLA's instruction name), else the kernel name."""
    events, device_pids, on_host = _events(trace_dir)
    total = collections.defaultdict(float)
    calls = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        args = e.get("args", {})
        if on_host and "hlo_op" not in args:
            continue
        name = args.get("hlo_op") or args.get("long_name") or e.get("name", "?")
        total[name] += float(e.get("dur", 0)) / 1000.0
        calls[name] += 1
    rows = sorted(((n, ms, calls[n]) for n, ms in total.items()), key=lambda r: -r[1])
    return rows[:top] if top else rows


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
    """Instruction name -> {"op_name": source scope, "kind": what runs} for every
    instruction of an optimised HLO module (`compiled.as_text()`).

    kind: a fusion's `kind=` (kLoop, kInput, kOutput, kCustom), a custom call's target
    (`__cudnn$convForward`, `__cublas$gemm`, ...), else the opcode. An instruction without
    metadata of its own takes the op_name of its fused computation's root (or of its
    first instruction that has one), else that of its first operand with one."""
    computations: dict[str, list[dict[str, str]]] = {}
    current: list[dict[str, str]] | None = None
    for line in hlo_text.splitlines():
        if current is None or line.startswith(("%", "ENTRY")):
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("(")[0]:
                current = computations.setdefault(m.group(1), [])
                continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, opcode = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        fusion_kind = re.search(r"kind=(k\w+)", line)
        kind = (target.group(1) if target else
                fusion_kind.group(1) if opcode == "fusion" and fusion_kind else opcode)
        args = line.split(f"{opcode}(", 1)[1].split(")", 1)[0]
        current.append(dict(name=name, op_name=op_name.group(1) if op_name else "",
                            calls=calls.group(1) if calls else "", kind=kind,
                            root=str(line.lstrip().startswith("ROOT")),
                            operands=re.findall(r"%([\w.\-]+)", args)))
    out: dict[str, dict[str, str]] = {}

    def scope_of(computation: str) -> str:
        body = computations.get(computation, [])
        for instr in sorted(body, key=lambda i: i["root"] != "True"):  # the root first
            if instr["op_name"]:
                return instr["op_name"]
        return ""

    def resolved(instr: dict, by_name: dict, seen: set) -> str:
        """Own op_name, else its fused computation's, else its first operand's (XLA's
        rewrites, e.g. a weight gradient's convolution, can drop the metadata)."""
        op_name = instr["op_name"] or (scope_of(instr["calls"]) if instr["calls"] else "")
        if op_name or instr["name"] in seen:
            return op_name
        seen.add(instr["name"])
        for operand in instr["operands"]:
            if operand in by_name:
                op_name = resolved(by_name[operand], by_name, seen)
                if op_name:
                    return op_name
        return ""

    for body in computations.values():
        by_name = {i["name"]: i for i in body}
        for instr in body:
            op_name = resolved(instr, by_name, set())
            kind = instr["kind"]
            if kind == "kCustom" and instr["calls"]:
                # A custom fusion (cuDNN, Triton GEMM): name it by what it wraps.
                inner = {i["kind"] for i in computations.get(instr["calls"], [])}
                kind = "kCustom:" + ("dot" if "dot" in inner else
                                     "convolution" if "convolution" in inner else "other")
            out[instr["name"]] = dict(op_name=op_name, kind=kind)
    return out
