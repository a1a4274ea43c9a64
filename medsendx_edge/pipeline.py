"""The stage graph, declared once (issue 25): which stage reads which queue, where its output goes, and
what a crash loop on that queue does.  The daemon builds its runners from it, the spool its recovery
map (what a crash-looping queue skips to, which stage a quarantine folder is named for), and
:func:`problems` checks that every queue has a reader and every stage an exit, for both settings of
``triage.enabled``: a file can never wait in a folder nothing reads.

::

    incoming --anonymize--> anonymized --triage--> triaged --route--> outbox --upload--> sent
                                 \\______________route (triage off)______/

With triage off, ``route`` reads both ``anonymized`` and ``triaged`` (files triaged before the switch,
and a triage crash loop's skips, are never stranded); with triage on, a file that crash-loops in triage
skips it (triage never blocks an upload), one that crash-loops anywhere else goes to quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsendx_edge.spool import ANONYMIZED, INCOMING, OUTBOX, PIPELINE, SENT, TRIAGED

CrashLoop = Literal["quarantine", "skip", "requeue"]


@dataclass(frozen=True)
class StageSpec:
    name: str                 # the stage (and its quarantine folder)
    input: str                # the queue it reads
    output: str               # the queue its output goes to (``sent``: delivered)
    on_crash_loop: CrashLoop  # what recovery does with an item that keeps crashing the daemon here


def graph(triage_enabled: bool) -> tuple[StageSpec, ...]:
    """The stages of the pipeline for this configuration, in order."""
    specs = [StageSpec("anonymize", INCOMING, ANONYMIZED, "quarantine")]
    if triage_enabled:
        specs += [StageSpec("triage", ANONYMIZED, TRIAGED, "skip"),
                  StageSpec("route", TRIAGED, OUTBOX, "quarantine")]
    else:
        specs += [StageSpec("route", ANONYMIZED, OUTBOX, "quarantine"),
                  StageSpec("route", TRIAGED, OUTBOX, "quarantine")]
    # An upload cut short by a power cut is the normal life of a truck on 4G: requeued, never skipped.
    specs.append(StageSpec("upload", OUTBOX, SENT, "requeue"))
    return tuple(specs)


def skip_map(specs: tuple[StageSpec, ...]) -> dict[str, str]:
    """Queue -> where a crash-looping item goes instead of quarantine (an optional stage's output)."""
    return {s.input: s.output for s in specs if s.on_crash_loop == "skip"}


def stage_of_queue(specs: tuple[StageSpec, ...]) -> dict[str, str]:
    """Queue -> the stage that reads it (quarantine folders are named by stage)."""
    out = {s.input: s.name for s in specs}
    out[SENT] = "sent"
    return out


def problems(specs: tuple[StageSpec, ...]) -> list[str]:
    """What would strand a file: a queue of the pipeline nobody reads, an output nobody reads."""
    readers = {s.input for s in specs}
    found = [f"queue {q!r} has no reader" for q in PIPELINE if q != SENT and q not in readers]
    found += [f"stage {s.name!r} writes {s.output!r}, which nothing reads" for s in specs
              if s.output != SENT and s.output not in readers]
    return found


def table(triage_enabled: bool) -> str:
    """The graph as a Markdown table, for docs/architecture.md (a test keeps the docs equal to it)."""
    rows = ["| stage | reads | writes | a file that keeps crashing the daemon here |", "|---|---|---|---|"]
    what = {"quarantine": "quarantined (`quarantine/<stage>/`, with its reason)",
            "skip": "skips the stage (passed on untriaged, at normal priority: triage never blocks an upload)",
            "requeue": "requeued, never counted (a send cut by a power cut is normal life on 4G)"}
    for s in graph(triage_enabled):
        rows.append(f"| {s.name} | `{s.input}/` | `{s.output}/` | {what[s.on_crash_loop]} |")
    return "\n".join(rows)


def docs_section() -> str:
    return ("With `triage.enabled: true` (the default):\n\n" + table(True) +
            "\n\nWith `triage.enabled: false`:\n\n" + table(False) + "\n")
