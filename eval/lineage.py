"""The policy's lineage, and the rule that keeps it away from gold scoring.

A policy's lineage is the policy itself, the training reward model of this eval (rm=), and every model its
training records name, transitively: hs3_training.json's `inputs` (base_model, init, reward_model,
reference; recipes.provenance.training_inputs) and `init` (records written before `inputs` existed).
Each member carries the path it was recorded at and its content fingerprint (recipes.provenance: from the
record, or computed now when the dir is here).

`check_gold` refuses a gold reward model that is a member (same path), a copy of one (same content
fingerprint, under any path), a checkpoint of a member's training run (a dir inside the stage dir that
wrote the member's final/, or a copy of one of that dir's checkpoint-N), or a model trained from a trained
member (its own record names one), and names the link it found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hs3.io import UserError
from recipes.provenance import model_fingerprint

from eval.data import training_record


@dataclass
class Member:
    path: str            # as recorded
    resolved: Optional[str]
    fingerprint: Optional[str]
    how: str             # how it is linked to the policy, for the message
    trained: bool = False  # it has a training record of ours (a base model has none)


def _abs(path: Optional[str]) -> Optional[str]:
    if not path or str(path).startswith(("http://", "https://", "builtin:", "pkg:")):
        return None
    return str(Path(path).resolve())


def _member(entry, how: str) -> Optional[Member]:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not entry.get("path"):
        return None
    path = str(entry["path"])
    resolved = entry.get("resolved") or _abs(path)
    fingerprint = entry.get("fingerprint")
    if fingerprint is None and resolved and Path(resolved).is_dir():
        fingerprint = model_fingerprint(resolved)
    return Member(path, resolved, fingerprint, how)


def lineage(policy: Optional[str], proxy_rm: Optional[str] = None) -> list[Member]:
    """The members (module docstring), the policy first; an endpoint policy has only rm=."""
    members: list[Member] = []
    queue: list[Member] = []
    if policy and not str(policy).startswith(("http://", "https://")):
        queue.append(_member(policy, f"{policy} is the policy under test"))
    if proxy_rm:
        queue.append(_member(proxy_rm, f"{proxy_rm} is this eval's training reward model (rm=)"))
    seen: set[str] = set()
    while queue:
        member = queue.pop(0)
        if member is None:
            continue
        key = member.resolved or member.path
        if key in seen:
            continue
        seen.add(key)
        members.append(member)
        record = training_record(member.resolved) if member.resolved and Path(member.resolved).is_dir() else None
        if not record:
            continue
        member.trained = True
        where = f"{member.path}/hs3_training.json"
        inputs = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
        for role, entry in inputs.items():
            if role != "data_manifest":
                queue.append(_member(entry, f"{(entry or {}).get('path')} is the {role} of {member.path} ({where})"))
        if record.get("init") and not inputs.get("init"):
            queue.append(_member(record["init"], f"{record['init']} is the init of {member.path} ({where})"))
    return members


def _run_dir_of(path: str) -> Optional[Path]:
    """The stage dir that wrote a final/ or checkpoint-N model (its parent), else None."""
    p = Path(path)
    return p.parent if p.name == "final" or p.name.startswith("checkpoint-") else None


def check_gold(gold: Optional[str], gold_dir: Optional[str], policy: Optional[str], proxy_rm: Optional[str]) -> list[str]:
    """Refuse (UserError) a gold scorer in the policy's lineage (module docstring). Returns notes for what
    could not be checked (an endpoint gold or policy)."""
    if not gold:
        return []
    if gold_dir is None:
        return [f"gold reward model {gold} is an endpoint: its independence from the policy's lineage cannot be "
                f"checked here"]
    members = lineage(policy, proxy_rm)
    resolved = str(Path(gold_dir).resolve())
    fingerprint = model_fingerprint(resolved)

    def refuse(link: str):
        raise UserError(f"eval.gold_rm={gold} {link}: a model in the policy's lineage cannot be its gold scorer "
                        f"(name an independent one, e.g. NVIDIA's Llama-3.3-Nemotron-70B-Select, or leave "
                        f"eval.gold_rm unset)")

    for m in members:
        if m.resolved and m.resolved == resolved:
            refuse(f"is {m.path}: {m.how}")
    for m in members:
        if fingerprint and m.fingerprint == fingerprint:
            refuse(f"is a copy of {m.path} (same content fingerprint {fingerprint[:12]}): {m.how}")
    gold_run = _run_dir_of(resolved)
    for m in members:
        run = _run_dir_of(m.resolved) if m.resolved else None
        if run is None:
            continue
        if gold_run is not None and gold_run == run:
            refuse(f"is a checkpoint of the run {run} that wrote {m.path}: {m.how}")
        if run.is_dir():
            for checkpoint in sorted(run.glob("checkpoint-*")):
                if checkpoint.is_dir() and fingerprint and model_fingerprint(checkpoint) == fingerprint:
                    refuse(f"is a copy of {checkpoint}, a checkpoint of the run that wrote {m.path}: {m.how}")
    trained = {m.fingerprint: m for m in members if m.trained and m.fingerprint}
    trained_paths = {m.resolved: m for m in members if m.trained and m.resolved}
    for ancestor in lineage(resolved)[1:]:
        m = trained.get(ancestor.fingerprint) or trained_paths.get(ancestor.resolved)
        if m:
            refuse(f"was trained from {m.path} ({ancestor.how}): {m.how}")
    notes = []
    if policy and str(policy).startswith(("http://", "https://")):
        notes.append(f"the policy is an endpoint ({policy}): the gold reward model was checked against rm= only")
    return notes
