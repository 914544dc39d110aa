"""Splitting a sweep between processes: which shard a process is, which cases it runs, and merging
the shard files back into one record list.

A shard is ``INDEX/COUNT``, 0-based (``0/2`` and ``1/2`` for two processes). Every process selects the
same cases (the selection is deterministic) and keeps those at positions ``INDEX, INDEX + COUNT, ...``,
so no process needs to talk to another. Each writes its own file (``results.shard-0-of-2.jsonl``) beside
the others; readers merge them by record key, and a restarted process resumes its own file."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import KnoweditError

SHARD_HELP = ("run only shard INDEX of COUNT equal parts of the cases (0-based: --shard 0/2 and --shard 1/2 for "
              "two processes, in the same --out); under torchrun or accelerate launch it is taken from RANK/WORLD_SIZE")
# (rank, size) variables of the launchers, first match wins: torchrun and accelerate's GPU launcher, then
# mpirun (accelerate's multi-CPU launcher uses it). Slurm's SLURM_PROCID/SLURM_NTASKS are left out on purpose:
# a batch script that runs one process in an allocation of several tasks has them too, and would then run
# only part of the cases; under srun pass --shard $SLURM_PROCID/$SLURM_NTASKS.
LAUNCH_VARS = (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
               ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
               ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_FILE = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, items) -> list:
        """The items this shard runs: every ``count``-th, from position ``index``."""
        return [x for i, x in enumerate(items) if i % self.count == self.index]

    def file_name(self, name: str) -> str:
        """``results.jsonl`` -> ``results.shard-1-of-2.jsonl``."""
        stem, dot, suffix = name.rpartition(".")
        return f"{stem}.shard-{self.index}-of-{self.count}.{suffix}" if dot else f"{name}.shard-{self.index}-of-{self.count}"


def parse_shard(spec, where: str = "--shard") -> Shard:
    """``"1/4"`` -> ``Shard(1, 4)``; anything else is an error naming ``where`` and the fix."""
    m = _SPEC.match(str(spec))
    if not m:
        raise KnoweditError(f"{where} {spec!r}: expected INDEX/COUNT in whole numbers, 0-based, e.g. "
                            f"{where} 0/2 and {where} 1/2 for two processes")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise KnoweditError(f"{where} {spec!r}: COUNT must be at least 1 (the number of processes), e.g. {where} 0/2")
    if i >= n:
        raise KnoweditError(f"{where} {spec!r}: INDEX is 0-based and must be below COUNT {n}: use "
                            f"{' ... '.join(f'{where} {k}/{n}' for k in sorted({0, n - 1}))}")
    return Shard(i, n)


def shard_from_env(environ=None) -> Shard | None:
    """The shard of this process under torchrun, ``accelerate launch`` or an initialised
    ``torch.distributed`` group; None for a single process.

    The rank and world size come from ``torch.distributed`` when a group is up, else from the launcher's
    environment (:data:`LAUNCH_VARS`: ``RANK``/``WORLD_SIZE`` first). accelerate's
    ``PartialState`` is not consulted: on CPU it reports a single process even under a 2-process launch,
    and shards need no process group (they never communicate)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        n = dist.get_world_size()
        return Shard(dist.get_rank(), n) if n > 1 else None
    env = os.environ if environ is None else environ
    for rank_var, size_var in LAUNCH_VARS:
        if size_var in env:
            rank, size = env.get(rank_var, "0"), env[size_var]
            try:
                i, n = int(rank), int(size)
            except ValueError:
                raise KnoweditError(f"environment: {rank_var}={rank!r} and {size_var}={size!r} must be whole numbers "
                                    "(set by torchrun / accelerate launch); unset them, or pass --shard INDEX/COUNT") from None
            if n <= 1:
                return None
            return parse_shard(f"{i}/{n}", where=f"{rank_var}/{size_var}")
    return None


def resolve_shard(spec: str | None) -> Shard | None:
    """``--shard`` if given, else the launcher's. Both at once would split the cases twice over."""
    env = shard_from_env()
    if spec is None:
        return env
    shard = parse_shard(spec)
    if env is not None:
        raise KnoweditError(f"--shard {spec} under a {env.count}-process launch (rank {env.index}): the launcher "
                            "already gives each process its shard; drop --shard, or run the processes yourself "
                            "without torchrun / accelerate launch")
    return None if shard.count == 1 else shard


def check_shard_count(meta: dict, shard: Shard | None, where) -> None:
    """Refuse to add a run split into a different number of shards to ``where``: its cases would be
    assigned differently, and a process would redo cases another file already holds. An empty ``meta``
    (no run there yet) accepts any split."""
    if not meta:
        return
    old = int(meta.get("shards") or 1)
    new = shard.count if shard else 1
    if old != new:
        fix = (f"run its shards with --shard INDEX/{old} (or under a {old}-process launch)" if old > 1
               else "run it without --shard or a multi-process launch")
        raise KnoweditError(f"{where} holds a run split into {old} shard(s) (run.json 'shards'), this one into {new}; "
                            f"to continue that run, {fix}; or pass another --out. Nothing was changed")


def shard_files(directory, name: str) -> list[tuple[Shard, Path]]:
    """The shard files of ``name`` (e.g. ``results.jsonl``) in ``directory``, by count then index."""
    directory = Path(directory)
    stem, _, suffix = name.rpartition(".")
    found = []
    for p in directory.glob(f"{stem}.shard-*-of-*.{suffix}"):
        m = _FILE.match(p.name)
        if m and m["stem"] == stem and int(m["index"]) < int(m["count"]):
            found.append((Shard(int(m["index"]), int(m["count"])), p))
    return sorted(found, key=lambda x: (x[0].count, x[0].index))


def merge(parts: list[tuple[Shard | None, list[dict]]], group, key) -> list[dict]:
    """One list from the shards' lists (``None`` for an unsharded file), in the order one process
    would have written it, each ``key(record)`` once: the first found, where an unsharded file comes
    before a split into fewer shards, and within a split the earlier position wins.

    ``group(record)`` names the unit that was assigned (a case, a lifelong editor): shard ``i`` of ``n``
    ran its units in order at positions ``i, i + n, ...``, so its ``j``-th unit sat at ``j * n + i``.
    A single file is returned as written (the reader of an unsharded run sees what it saw before shards)."""
    if len(parts) == 1:
        return list(parts[0][1])
    ranked = []
    for rank, (shard, records) in enumerate(parts):
        index, count = (shard.index, shard.count) if shard else (0, 1)
        units: dict = {}
        for r in records:
            j = units.setdefault(group(r), len(units))
            ranked.append((count, j * count + index, rank, r))
    ranked.sort(key=lambda x: x[:3])   # stable: the records of one unit keep their file order
    out: dict = {}
    for *_, r in ranked:
        out.setdefault(key(r), r)
    return list(out.values())
