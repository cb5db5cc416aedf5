"""The pipeline: a chain of stages from a preset (conf/pipeline/NAME.yaml, read by launcher.stages),
run locally (one subprocess per entry, in order) or on SLURM (one job per entry, chained with afterok).

    ./launch.sh pipeline [preset=NAME] [--config FILE.yaml] [key=value ...] [NAME:key=value ...]
                         [from=NAME | only=NAME[,NAME]] [base_run=DIR] [executor=slurm cluster=NAME] [--dry-run]
    ./launch.sh smoke    [key=value ...]

Presets: default (data -> sft -> rm -> rl -> eval); megatron (chosen by engine=megatron without preset=:
data, import -> sft -> sft_export, rm -> rl -> rl_export -> eval); smoke. `key=value` applies to every
entry; `NAME:key=value` to one entry of the chain (e.g. `sft:train.lr=1e-5`).

Which entries run:
- A stage whose output dir already holds a finished run of the same config is skipped, so a pipeline
  that stopped half-way picks up where it stopped; an unfinished stage resumes from its checkpoint. An
  entry after one that runs again is not skipped (its input changed); its own checks then decide.
- from=NAME runs NAME and the entries after it; only=A,B runs just those. The entries they need must be
  finished (in this run dir, or linked from base_run=); the others are left as they are.
- base_run=DIR (a new run_dir): each entry of DIR that is finished, has the same config as this run's
  (paths aside), needs only linked entries, and whose training record and content fingerprints check out
  is linked into run_dir (a symbolic link, recorded in RUN_DIR/links.json) instead of run again. The first
  changed entry, and everything after it, runs in the new run dir; DIR is only read.
- A training stage whose output dir holds a run of other settings is refused before anything runs, with
  the way out: a new run_dir, with base_run= to reuse the unchanged stages.
The smoke pipeline (conf/pipeline/smoke.yaml) starts from a clean runs/smoke every time: it clears a run
dir only when an earlier smoke created it (the .hs3-smoke file inside), and a dry run touches nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from recipes.config import REPO_ROOT, ConfigError, compose, split_config_args, to_yaml
from hs3.io import UserError, atomic_write_json, sha256_file
from launcher.stages import Entry, is_finished, load_preset, setting_changes, stored_config

DEFAULT_PRESET = "default"
# engine=megatron without preset=: the Megatron chain (import -> sft -> export -> rm -> rl -> export -> eval).
ENGINE_PRESETS = {"megatron": "megatron"}
LINKS_FILE = "links.json"
PIPELINE_KEYS = ("from", "only", "base_run")


def split_args(args: list[str], names) -> tuple[list[str], dict[str, list[str]], bool, str | None]:
    """Common key=value args, per-entry `NAME:key=value` args, --dry-run, and preset=NAME."""
    common: list[str] = []
    per_entry: dict[str, list[str]] = {n: [] for n in names}
    dry_run, preset = False, None
    for arg in args:
        if arg == "--dry-run":
            dry_run = True
            continue
        if arg.startswith("preset="):
            preset = arg.split("=", 1)[1]
            continue
        head, sep, rest = arg.partition(":")
        if sep and "=" not in head and head in per_entry:
            per_entry[head].append(rest)
        elif sep and "=" not in head and not head.startswith("-") and "/" not in head:
            from launcher.help import did_you_mean

            raise UserError(f"{arg!r}: {head!r} is not a pipeline stage{did_you_mean(head, names)} ({', '.join(names)})")
        else:
            common.append(arg)
    return common, per_entry, dry_run, preset


def pipeline_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """from=, only= and base_run= (the pipeline's own keys), and the other args."""
    options, rest = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in PIPELINE_KEYS:
            if not value.strip():
                raise UserError(f"{key}= is empty")
            options[key] = value.strip()
        else:
            rest.append(arg)
    if "from" in options and "only" in options:
        raise UserError("from= and only= together: use one (from=NAME runs NAME and what follows; only=A,B just those)")
    return options, rest


def _file_engine(args: list[str]) -> str | None:
    """`engine:` of the last --config file that names one."""
    import yaml

    engine = None
    for path in split_config_args(list(args))[0]:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # compose() reports it
        if isinstance(data, dict) and isinstance(data.get("engine"), str):
            engine = data["engine"]
    return engine


def preset_for(args: list[str], default: str = DEFAULT_PRESET) -> str:
    """preset=NAME if given; else the engine's chain for engine=ENGINE (on the command line, or in a
    --config file; e.g. megatron); else `default`."""
    chosen = None
    for arg in args:
        if arg.startswith("preset="):
            chosen = arg.split("=", 1)[1]
    if chosen:
        return chosen
    if default == DEFAULT_PRESET:
        engines = [a.split("=", 1)[1] for a in args if a.startswith("engine=")]
        engine = engines[-1] if engines else _file_engine(args)
        if engine in ENGINE_PRESETS:
            return ENGINE_PRESETS[engine]
    return default


def stage_args(preset: str, args: list[str]) -> tuple[dict[str, Entry], dict[str, list[str]], bool]:
    """The chain and the key=value list of each entry: preset, then the entry's own preset args, its
    placement (name, out), then the command line (common, then NAME:...). The pipeline's own keys
    (from=, only=, base_run=) are not passed on."""
    _, args = pipeline_options(args)
    preset_common, chain = load_preset(preset_for(args, preset))
    common, per_entry, dry_run, _ = split_args(args, list(chain))
    return chain, {name: preset_common + list(e.args) + e.config_args() + common + per_entry[name]
                   for name, e in chain.items()}, dry_run


# ---- which entries run: selection, base_run links, the refusal of changed settings ----------------

@dataclass
class Decision:
    action: str  # run | skip (finished, same config) | linked (from base_run) | keep (not selected)
    note: str = ""
    link: dict = field(default_factory=dict)  # what links.json records for a link made now


def selected(chain: dict[str, Entry], options: dict[str, str]) -> list[str]:
    from launcher.help import did_you_mean

    names = list(chain)
    if "from" in options:
        start = options["from"]
        if start not in chain:
            raise UserError(f"from={start}: not an entry of the chain{did_you_mean(start, names)} ({', '.join(names)})")
        return names[names.index(start):]
    if "only" in options:
        wanted = [n.strip() for n in options["only"].split(",") if n.strip()]
        for name in wanted:
            if name not in chain:
                raise UserError(f"only={options['only']}: {name!r} is not an entry of the chain{did_you_mean(name, names)} "
                                f"({', '.join(names)})")
        return [n for n in names if n in wanted]
    return names


def read_links(run_dir: Path) -> dict:
    try:
        links = json.loads((run_dir / LINKS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return links if isinstance(links, dict) and isinstance(links.get("entries"), dict) else {}


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_base_entry(name: str, entry: Entry, args: list[str], base: Path) -> tuple[dict | None, str]:
    """(what links.json records, '') when base/NAME is a finished run of exactly this entry's config
    (composed with the base run's run_dir), with a training record and fingerprints that check out;
    (None, why not) otherwise."""
    from recipes.provenance import model_fingerprint

    out = base / name
    stored = stored_config(out)
    summary = _json(out / "summary.json")
    if stored is None or summary is None:
        return None, f"{out} is not a finished stage (no config.yaml and summary.json)"
    try:
        cfg = compose(entry.stage, args + [f"run_dir={stored.get('run_dir')}"])
    except ConfigError as exc:
        return None, f"its config does not compose with the base run's run_dir ({exc})"
    if Path(str(cfg.out)).resolve() != out.resolve():
        return None, f"its out={cfg.out} is not {out}"
    changed = setting_changes(stored, cfg)
    if changed:
        return None, f"its settings differ from this run's ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''})"
    if summary.get("stage") != entry.stage:
        return None, f"summary.json is of stage {summary.get('stage')!r}"
    record = {"target": str(out.resolve()), "stage": entry.stage, "config_sha256": sha256_file(out / "config.yaml"),
              "summary_sha256": sha256_file(out / "summary.json")}
    manifest = Path(str(cfg.data_dir)) / "manifest.json"
    final = out / "final"
    if (final / "hs3_training.json").is_file():
        training = _json(final / "hs3_training.json")
        if training is None:
            return None, "final/hs3_training.json is not readable"
        data_sha = sha256_file(manifest) if manifest.is_file() else None
        if training.get("data_manifest_sha256") != data_sha:
            return None, (f"final/ was trained on data manifest {str(training.get('data_manifest_sha256'))[:12]}, "
                          f"the base run's data is now {str(data_sha)[:12]}")
        checked = []
        for key, model in (training.get("inputs") or {}).items():
            if isinstance(model, dict) and model.get("fingerprint") and model.get("resolved") and Path(model["resolved"]).is_dir():
                if model_fingerprint(model["resolved"]) != model["fingerprint"]:
                    return None, f"its {key} ({model['resolved']}) changed since it was trained (content fingerprint)"
                checked.append(key)
        record.update(data_manifest_sha256=data_sha, inputs_checked=checked)
    if final.is_dir():
        record["final_fingerprint"] = model_fingerprint(final)
    return record, ""


def still_linked(out: Path, recorded: dict, args: list[str], entry: Entry) -> str:
    """'' when the link recorded earlier still points at the same, unchanged finished stage; else why not."""
    if not out.is_symlink() or str(out.resolve()) != recorded.get("target"):
        return "the link is gone or points elsewhere"
    record, why = check_base_entry(out.name, entry, args, out.resolve().parent)
    if record is None:
        return why
    for key in ("config_sha256", "summary_sha256", "final_fingerprint"):
        if record.get(key) != recorded.get(key):
            return f"its {key.replace('_', ' ')} changed since it was linked"
    return ""


def decide(chain: dict[str, Entry], entry_args: dict[str, list[str]], cfgs: dict,
           options: dict[str, str]) -> dict[str, Decision]:
    """What happens to each entry (see the module docstring), checked before anything runs."""
    run_dir = Path(str(next(iter(cfgs.values())).run_dir))
    chosen = set(selected(chain, options))
    base = Path(options["base_run"]) if "base_run" in options else None
    if base is not None:
        if not base.is_dir():
            raise UserError(f"base_run={base}: no such run dir")
        if base.resolve() == run_dir.resolve():
            raise UserError(f"base_run={base} is this run's run_dir: base_run links another run's finished stages "
                            "into a new run_dir (run_dir=NEW base_run=OLD)")
    links = read_links(run_dir).get("entries", {})
    decisions: dict[str, Decision] = {}
    for name, entry in chain.items():
        cfg = cfgs[name]
        out = Path(str(cfg.out))
        needs = [decisions[n] for n in entry.needs]
        if name in links and out.is_symlink():
            why = still_linked(out, links[name], entry_args[name], entry)
            if not why:
                decisions[name] = Decision("linked", f"linked from {links[name]['target']}")
                continue
            if name not in chosen and not any(d.action == "run" for d in needs):
                raise UserError(f"{name}: the stage linked from {links[name]['target']} no longer matches ({why}); "
                                f"rerun it (from={name}) in this run dir")
            decisions[name] = Decision("run", f"unlinked: {why}", link={"unlink": True})
            continue
        if out.is_symlink():
            raise UserError(f"{out} is a symbolic link this pipeline did not make (not in {run_dir / LINKS_FILE}): "
                            "a stage would write through it; remove the link or pick another run_dir")
        if base is not None and not out.exists() and all(d.action == "linked" for d in needs):
            record, why = check_base_entry(name, entry, entry_args[name], base)
            if record is not None:
                decisions[name] = Decision("linked", f"linked from {record['target']}", link=record)
                continue
            note = f"not linked from {base}: {why}"
        else:
            note = ""
        if name not in chosen:
            decisions[name] = Decision("keep", note)
            continue
        if is_finished(cfg) and not any(d.action == "run" for d in needs):
            decisions[name] = Decision("skip", "finished earlier with the same config")
            continue
        decisions[name] = Decision("run", note)
    for name, entry in chain.items():  # what a running entry needs must be there
        if decisions[name].action != "run":
            continue
        for need in entry.needs:
            if decisions[need].action == "keep" and not (Path(str(cfgs[need].out)) / "summary.json").is_file():
                raise UserError(f"{name} needs {need}, which is not finished in {run_dir} (run it first: drop from=/only=, "
                                f"or add {need} to only=)")
    check_settings(chain, cfgs, decisions, run_dir, base)
    return decisions


def check_settings(chain, cfgs, decisions, run_dir: Path, base: Path | None) -> None:
    """A training stage to run whose output dir holds a run of other settings is refused now, before
    anything runs, saying what to do (recipes.training.check_output_dir is the stage's own check)."""
    from recipes.preemption import TRAINING_STAGES
    from recipes.training import check_output_dir

    for name, decision in decisions.items():
        cfg = cfgs[name]
        if decision.action != "run" or cfg.stage not in TRAINING_STAGES or cfg.engine != "hf" or decision.link.get("unlink"):
            continue  # (a stale link is removed before the stage runs: it then starts in an empty dir)
        try:
            check_output_dir(cfg)
        except ConfigError as exc:
            raise UserError(f"{name}: {exc}. To train it with the new settings and keep this run, start a new run "
                            f"dir that reuses this one's finished, unchanged stages: run_dir=NEW_DIR base_run={run_dir}"
                            ) from None


def record_links(run_dir: Path, base: Path | None, made: dict[str, dict], removed: list[str]) -> None:
    links = read_links(run_dir) or {"entries": {}}
    if base is not None:
        links["base_run"] = str(base.resolve())
    for name in removed:
        links["entries"].pop(name, None)
    for name, record in made.items():
        links["entries"][name] = {**record, "linked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(run_dir / LINKS_FILE, links)


def apply_links(decisions: dict[str, Decision], cfgs: dict, options: dict[str, str], dry_run: bool, say) -> None:
    """Make the links decided (and remove the stale ones we made), recorded in RUN_DIR/links.json."""
    run_dir = Path(str(next(iter(cfgs.values())).run_dir))
    base = Path(options["base_run"]) if "base_run" in options else None
    made = {n: d.link for n, d in decisions.items() if d.action == "linked" and d.link}
    removed = [n for n, d in decisions.items() if d.link.get("unlink")]
    for name in removed:
        say(f"{name}: {'would remove' if dry_run else 'removing'} the link {cfgs[name].out} ({decisions[name].note})")
        if not dry_run:
            Path(str(cfgs[name].out)).unlink()  # our own recorded link; what it pointed at is untouched
    for name, record in made.items():
        say(f"{name}: {'would link' if dry_run else 'linked'} {cfgs[name].out} -> {record['target']} "
            f"(finished in base_run, same settings, training record and fingerprints checked)")
        if not dry_run:
            out = Path(str(cfgs[name].out))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.symlink_to(record["target"], target_is_directory=True)
    if (made or removed) and not dry_run:
        record_links(run_dir, base, made, removed)


# ---- running it here -----------------------------------------------------------------------------

def run_local(chain: dict[str, Entry], entry_args: dict[str, list[str]],
              decisions: dict[str, Decision] | None = None) -> list[dict]:
    """Run each entry to run as `python -m launcher STAGE ...`, in chain order, stopping at the first failure."""
    from rich.console import Console

    console = Console(stderr=True)
    rows = []
    todo = [n for n in chain if decisions is None or decisions[n].action != "keep"]
    for i, name in enumerate(todo, 1):
        entry, args = chain[name], entry_args[name]
        cfg = compose(entry.stage, args)
        decision = decisions[name] if decisions else Decision("skip" if is_finished(cfg) else "run")
        console.rule(f"[bold]stage {i}/{len(todo)}: {name}[/bold]  -> {cfg.out}")
        if decision.action in ("skip", "linked"):
            summary = _json(Path(str(cfg.out)) / "summary.json") or {}
            what = "finished earlier with the same config, skipped" if decision.action == "skip" else decision.note
            print(f"{name}: {what}", file=sys.stderr, flush=True)  # one line, unwrapped
            rows.append({**summary, "stage": name, "wall_s": 0.0, "out": str(cfg.out),
                         "note": "skipped" if decision.action == "skip" else "linked"})
            continue
        if decision.note:
            print(f"{name}: {decision.note}", file=sys.stderr, flush=True)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "launcher", entry.stage, *args], cwd=REPO_ROOT, env=os.environ.copy())
        wall = time.monotonic() - start
        if proc.returncode != 0:
            rows.append({"stage": name, "metric": "failed", "value": None, "wall_s": wall, "out": str(cfg.out)})
            print_table(rows, console)
            if proc.returncode == 2:  # a one-line error of the stage (config, input): rerunning as is repeats it
                raise UserError(f"stage {name} failed (exit 2: the error above); later stages not run. Fix what it "
                                f"says and rerun: the finished stages are skipped.")
            raise UserError(f"stage {name} failed (exit {proc.returncode}); later stages not run. "
                            f"Rerun the same command to resume it from its last checkpoint.")
        summary = _json(Path(str(cfg.out)) / "summary.json") or {}
        rows.append({**summary, "stage": name, "wall_s": wall})
    print_table(rows, console)
    return rows


def print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="pipeline summary")
    for column in ("stage", "wall time", "key metric", "output dir"):
        table.add_column(column)
    for row in rows:
        value = row.get("value")
        metric = row.get("metric", "")
        shown = f"{metric} = {value:.4g}" if isinstance(value, (int, float)) else str(metric)
        table.add_row(row["stage"], f"{row['wall_s']:.1f} s", shown + (f" ({row['note']})" if row.get("note") else ""),
                      str(row.get("out", "")))
    console.print(table)


def hub_models(cfgs: dict) -> list[str]:
    """Hugging Face hub ids (not local dirs) the chain's Megatron jobs download: base model, tokenizer."""
    ids = []
    for cfg in cfgs.values():
        if cfg.engine != "megatron":
            continue
        for value in (cfg.model.path, cfg.megatron.hf_model_id):
            if value and "/" in value and not value.startswith(("/", ".", "builtin:")) and not Path(value).exists():
                ids.append(str(value))
    return sorted(set(ids))


def check_hf_token(cfgs: dict, dry_run: bool) -> None:
    """Jobs run with --no-container-mount-home, so ~/.cache/huggingface/token is not there: a gated model
    (Llama-3.3) needs HF_TOKEN in the environment sbatch passes to the job. Checked before submitting."""
    models = hub_models(cfgs)
    if not models or os.environ.get("HF_TOKEN") or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    message = (f"HF_TOKEN is not set: the jobs download {', '.join(models)} from the Hugging Face hub (gated), and run "
               "without your home directory's token; export HF_TOKEN=... before submitting (or HF_HUB_OFFLINE=1 with "
               "the model in HF_HOME)")
    if dry_run:
        print(f"# warning: {message}")
        return
    raise UserError(message)


def main(args: list[str], preset: str = DEFAULT_PRESET) -> int:
    options, _ = pipeline_options(args)
    chain, entry_args, dry_run = stage_args(preset, args)
    cfgs = {name: compose(e.stage, entry_args[name] + (["dry_run=true"] if dry_run else [])) for name, e in chain.items()}
    executor = {c.executor for c in cfgs.values()}
    if executor not in ({"slurm"}, {"local"}):
        raise UserError(f"executor must be the same for every stage, got {sorted(executor)}")
    run_dirs = {str(Path(str(c.run_dir)).resolve()) for c in cfgs.values()}
    if len(run_dirs) != 1:
        raise ConfigError(f"every pipeline stage needs the same run_dir, got {sorted(run_dirs)}")
    decisions = decide(chain, entry_args, cfgs, options)
    say = print if dry_run or executor == {"slurm"} else (lambda text: print(text, file=sys.stderr))
    apply_links(decisions, cfgs, options, dry_run, say)
    if executor == {"slurm"}:
        todo = {n: c for n, c in cfgs.items() if decisions[n].action == "run"}
        for name in cfgs:
            why = {"keep": "not selected", "linked": decisions[name].note,
                   "skip": f"finished earlier with the same config ({cfgs[name].out})"}.get(decisions[name].action)
            if why:
                say(f"{name}: {why}, not submitted")
        if not todo:
            say("nothing to submit")
            return 0
        check_hf_token(todo, dry_run)
        from launcher.slurm import submit_pipeline

        submit_pipeline(todo, {name: [n for n in chain[name].needs if n in todo] for name in todo}, dry_run=dry_run)
        return 0
    if dry_run:
        for name, cfg in cfgs.items():
            decision = decisions[name]
            needs = f" (after {', '.join(chain[name].needs)})" if chain[name].needs else ""
            if decision.action != "run":
                what = {"keep": "not selected, not run", "skip": "skipped", "linked": "not run"}[decision.action]
                print(f"# {name}: {what}" + (f" ({decision.note})" if decision.note else ""))
                continue
            print(f"# {name}: python -m launcher {chain[name].stage} {' '.join(entry_args[name])}{needs}\n{to_yaml(cfg)}")
        return 0
    run_local(chain, entry_args, decisions)
    return 0


# The smoke writes this file into a run dir it creates; it clears a run dir only when the file is there.
SMOKE_MARKER = ".hs3-smoke"


def prepare_smoke_dir(run_dir: str | os.PathLike, dry_run: bool) -> Path:
    """The smoke starts from an empty run dir. It deletes one only when the smoke created it (SMOKE_MARKER
    inside), never through a symbolic link, and a dry run changes nothing on disk."""
    path = Path(os.path.abspath(run_dir))
    if path.is_symlink():
        raise UserError(f"run_dir={run_dir} is a symbolic link (to {os.readlink(path)}): the smoke clears its run "
                        "dir before it starts and never does so through a link; pass the directory itself")
    if path.exists() and not path.is_dir():
        raise UserError(f"run_dir={run_dir} exists and is not a directory")
    marked = (path / SMOKE_MARKER).is_file()
    if path.is_dir() and not marked and any(path.iterdir()):
        raise UserError(f"run_dir={run_dir} exists and was not created by the smoke (no {SMOKE_MARKER} in it): the "
                        "smoke starts from an empty run dir and deletes only one it made itself; pick another "
                        "run_dir= (or remove this one yourself)")
    if dry_run:
        if marked:
            print(f"# dry run: {path} (an earlier smoke's run dir) would be cleared first")
        return path
    if marked:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / SMOKE_MARKER, {"created_by": "./launch.sh smoke", "note": "the smoke clears this "
                                            "run dir on its next start; remove this file to keep the dir"})
    return path


def smoke_main(args: list[str]) -> int:
    """The whole pipeline on the tiny model and the bundled sample rows, from a clean run dir (runs/smoke)."""
    chain, entry_args, dry_run = stage_args("smoke", args)
    first = next(iter(chain))
    cfg = compose(chain[first].stage, entry_args[first])
    prepare_smoke_dir(cfg.run_dir, dry_run or cfg.dry_run)
    # A CPU-only demo: say so to DeepSpeed (instead of its detection warning in every stage), and keep
    # the libraries' deprecation notices to each other (TRL -> transformers) off the newcomer's screen.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return main(args, preset="smoke")
