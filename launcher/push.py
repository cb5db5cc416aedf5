"""`./launch.sh push OUT/final ORG/NAME [--dry-run] [--public] [--eval EVAL_DIR] [--license ID] [--replace-card]
[--message TEXT] [--revision BRANCH]`

Publishes a checkpoint this project trained to the Hugging Face hub (huggingface_hub's create_repo +
upload_folder; a private repo unless --public), with a model card written into OUT/final/README.md:
the base model, the data manifest's sha256, the training record (final/hs3_training.json), the resolved
config (OUT/config.yaml, without its cluster section), the headline of the eval report of this very
checkpoint with its confidence intervals, and the paper's citation. TRL's card (OUT/README.md, "a
fine-tuned version of [None]") is not uploaded.

The eval report is one whose `meta.model` is this final/ (by path or content fingerprint), looked for in
--eval DIR, else under RUN_DIR/eval/; a report of another model is never put on the card.
--dry-run prints the card and the calls it would make, and writes nothing. Login: huggingface_hub's own
(HF_TOKEN, or `hf auth login`); HF_ENDPOINT points it at another hub. The card's license is the base
model's (Llama 3.3, Llama 3.1, SmolLM2), else none unless --license ID (a hub license id). A final/README.md this command did
not write is kept unless --replace-card.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from hs3.io import UserError, atomic_write_text

CARD_MARKER = "<!-- hs3: model card written by ./launch.sh push -->"
# Files of final/ that are not the model: the Trainer's pickled arguments, hidden files.
IGNORE = ["training_args.bin", ".*", "**/.*"]
# The eval report's headline, in this order, when present (report.json `overall`).
HEADLINE = [
    ("gold_judge_win_rate", "edit beats the original (LLM judge)"),
    ("gold_reward_win_rate", "edit beats the original (gold reward model)"),
    ("gold_reward_win_rate_vs_reference", "edit beats the human reference edit (gold reward model)"),
    ("copy_rate", "edits that copy the original unchanged"),
    ("near_copy_rate", "near-copies (chrF vs the original >= eval.near_copy_chrf)"),
    ("chrf", "chrF vs the human reference edit"),
    ("rm_accuracy", "reward model: good edit ranked above the bad one / the original"),
    ("gold_rm_accuracy", "gold reward model on the same pairs"),
    ("accuracy", "accuracy"),
]
CITATION = """@misc{wang2025dedicatedfeedbackeditmodels,
  title         = {Dedicated Feedback and Edit Models Empower Inference-Time Scaling for Open-Ended General-Domain Tasks},
  author        = {Zhilin Wang and Jiaqi Zeng and Olivier Delalleau and Daniel Egert and Ellie Evans and Hoo-Chang Shin
                   and Felipe Soares and Yi Dong and Oleksii Kuchaiev},
  year          = {2025},
  eprint        = {2503.04378},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CL},
  url           = {https://arxiv.org/abs/2503.04378},
}"""
# The hub license id of a fine-tune of these base models (the base model's own); others: --license ID.
LICENSES = {"llama-3.3": "llama3.3", "llama-3.1": "llama3.1", "smollm2": "apache-2.0"}
WHAT = {
    "sft": "An Edit model (supervised fine-tuning on HelpSteer3's edit subset)",
    "rl": "An Edit model (RLOO against an edit reward model, from the Edit SFT model)",
    "dpo": "An Edit model (DPO on HelpSteer3's edit_quality pairs, from the Edit SFT model)",
    "rm": "An edit reward model (Bradley-Terry on HelpSteer3's edit_quality pairs)",
    "feedback": "A Feedback model (supervised fine-tuning on HelpSteer3's feedback subset)",
    "select": "A Select model (scaled Bradley-Terry on HelpSteer3's preference subset)",
}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({what}): {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object ({what})")
    return data


def _model_of(report: dict):
    meta = report.get("meta") if isinstance(report.get("meta"), dict) else {}
    model = meta.get("model")
    if isinstance(model, dict):
        return model.get("resolved") or model.get("path"), model.get("fingerprint")
    return model, meta.get("model_fingerprint")


def is_report_of(report: dict, final: Path, fingerprint: str | None) -> bool:
    """The report scored this final/: same directory, or the same content fingerprint."""
    path, reported = _model_of(report)
    if reported and fingerprint:
        return reported == fingerprint
    return bool(path) and Path(str(path)).resolve() == final.resolve()


def find_report(final: Path, config: dict, eval_dir: str | None, fingerprint: str | None) -> tuple[dict | None, Path | None]:
    if eval_dir:
        path = Path(eval_dir) / "report.json"
        report = _read_json(path, "the eval report (--eval)")
        if not is_report_of(report, final, fingerprint):
            raise UserError(f"--eval {eval_dir}: that report scored {_model_of(report)[0]}, not {final} (a card shows the "
                            f"eval of its own checkpoint: ./launch.sh eval model={final})")
        return report, path
    run_dir = Path(str(config.get("run_dir") or final.parent.parent))
    for path in sorted(run_dir.glob("eval/report.json")) + sorted(run_dir.glob("eval*/**/report.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and is_report_of(report, final, fingerprint):
            return report, path
    return None, None


def headline(report: dict) -> list[str]:
    overall = report.get("overall") if isinstance(report.get("overall"), dict) else {}
    rows = []
    for key, label in HEADLINE:
        entry = overall.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
            continue
        ci = entry.get("ci")
        ci_text = (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2
                   and all(isinstance(c, (int, float)) for c in ci) else "")
        rows.append(f"| `{key}` | {label} | {entry['value']:.3f} | {ci_text} | {entry.get('n', '')} |")
    return rows


def build_card(final: Path, repo_id: str, eval_dir: str | None = None, license: str | None = None) -> str:
    """The model card (README.md) of a final/ dir this project wrote."""
    from recipes.provenance import model_fingerprint

    final = Path(final)
    if not (final / "config.json").is_file():
        raise UserError(f"{final}: no model there (no config.json); push takes a stage's final/ dir, e.g. runs/NAME/rl/final")
    record = _read_json(final / "hs3_training.json", "the training record: push publishes checkpoints this project trained")
    config_file = final.parent / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: no readable resolved config beside {final} (the card shows what it was trained with)")
    stage = str(record.get("stage") or config.get("stage"))
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    base = str(model.get("path", "unknown"))
    hub_base = "/" in base and not base.startswith(("/", ".", "~", "builtin:", "pkg:", "http"))
    fingerprint = model_fingerprint(final)
    report, report_path = find_report(final, config, eval_dir, fingerprint)
    shown_config = {k: v for k, v in config.items() if k != "cluster"}  # the cluster's setup lines are the user's business

    front = {"library_name": "transformers", "datasets": ["nvidia/HelpSteer3"],
             "tags": ["helpsteer3", "edit", "feedback-edit", stage],
             "pipeline_tag": "text-classification" if stage in ("rm", "select") else "text-generation"}
    if hub_base:
        front["base_model"] = base
    license_id = license or next((lic for key, lic in LICENSES.items() if key in base.lower()), None)
    if license_id:
        front = {"license": license_id, **front}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", CARD_MARKER, "",
             f"# {repo_id.split('/')[-1]}", "",
             f"{WHAT.get(stage, f'A {stage} checkpoint')}, trained with the HelpSteer3 Edit recipes "
             f"(a reproduction of NVIDIA's Feedback-Edit system, [arXiv 2503.04378](https://arxiv.org/abs/2503.04378)).",
             "", "## What it was trained from", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| started from | `{record.get('init', base)}` |",
             f"| trained on | {', '.join(f'`{s}`' for s in record.get('trained_on') or []) or 'n/a'} |",
             f"| data manifest sha256 | `{record.get('data_manifest_sha256')}` |",
             f"| stage, engine | {stage}, {config.get('engine')} |",
             f"| content fingerprint of these weights | `{fingerprint}` |",
             "", "## Evaluation", ""]
    if report:
        meta = report.get("meta") if isinstance(report.get("meta"), dict) else {}
        counts = report.get("counts") if isinstance(report.get("counts"), dict) else {}
        gold = meta.get("gold") if isinstance(meta.get("gold"), dict) else {}
        lines += [f"HelpSteer3 `{meta.get('split', 'validation')}` split ({counts.get('rows', '?')} rows, "
                  f"{counts.get('pairs', '?')} pairs), scored by this repository's eval (`{report_path.parent.name}/report.json`); "
                  f"95% bootstrap confidence intervals. Gold scorer: `{gold.get('reward_model') or gold.get('judge_model')}`.",
                  "", "| metric | what | value | 95% CI | n |", "|---|---|---|---|---|", *headline(report)]
        notes = [n for n in meta.get("notes") or [] if isinstance(n, str)]
        lines += [""] + [f"- {n}" for n in notes]
    else:
        lines += [f"No eval report of this checkpoint was found: score it with `./launch.sh eval model={final}` "
                  "and push again (or `--eval EVAL_DIR`)."]
    use = {"rm": "It scores an edit: the conversation with the edit request, then the edit as the assistant's turn "
                 "(the reward is the single logit).",
           "select": "It scores a response: the conversation, then the response as the assistant's turn.",
           "feedback": "It writes feedback on the last assistant answer of a conversation (data_prep.feedback_prompt)."}
    lines += ["", "## Use", "",
              use.get(stage, "It takes the conversation, its last assistant answer, and a user turn that asks for the "
                             "edit in the exact format of the paper's data:"), "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer" if stage not in ("rm", "select") else
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
              (f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")' if stage not in ("rm", "select") else
               f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")'),
              'messages = [{"role": "user", "content": "..."}, {"role": "assistant", "content": "original answer"},',
              '            {"role": "user", "content": "Edit the response to the previous prompt based on the following '
              'feedback:\\n\\n" + "\\n\\n".join(feedback_items)}]',
              "```", "",
              "## Training record (`hs3_training.json`)", "", "```json", json.dumps(record, indent=1), "```", "",
              "<details><summary>Resolved config (config.yaml, without the cluster section)</summary>", "", "```yaml",
              yaml.safe_dump(shown_config, sort_keys=False).strip(), "```", "", "</details>", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def parse(argv: list[str]) -> dict:
    flags = {"--dry-run": "dry_run", "--public": "public", "--replace-card": "replace_card"}
    valued = {"--eval": "eval_dir", "--message": "message", "--revision": "revision", "--license": "license"}
    opts: dict = {"dry_run": False, "public": False, "replace_card": False, "eval_dir": None, "message": None,
                  "revision": None, "license": None, "positional": []}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, sep, value = arg.partition("=")
        if arg in flags:
            opts[flags[arg]] = True
        elif key in valued:
            if not sep:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value")
                i += 1
                value = argv[i]
            opts[valued[key]] = value
        elif arg.startswith("-"):
            raise UserError(f"push: unknown option {arg} ({', '.join([*flags, *valued])})")
        else:
            opts["positional"].append(arg)
        i += 1
    if len(opts["positional"]) != 2:
        raise UserError("usage: ./launch.sh push OUT/final ORG/NAME [--dry-run] [--public] [--eval EVAL_DIR] "
                        "[--replace-card] [--message TEXT]")
    return opts


def main(argv: list[str]) -> int:
    opts = parse(argv)
    final, repo_id = Path(opts["positional"][0]), opts["positional"][1]
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id}: a hub repo is ORG/NAME (or USER/NAME)")
    if not final.is_dir():
        raise UserError(f"{final}: no such directory")
    card = build_card(final, repo_id, opts["eval_dir"], opts["license"])
    readme = final / "README.md"
    if readme.exists() and CARD_MARKER not in readme.read_text(encoding="utf-8", errors="replace") and not opts["replace_card"]:
        raise UserError(f"{readme} exists and was not written by push (kept); move it away, or pass --replace-card")
    private = not opts["public"]
    message = opts["message"] or f"Upload {final.parent.name}/final (HelpSteer3 Edit recipes)"
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.name != "training_args.bin")
    calls = (f"HfApi().create_repo({repo_id!r}, repo_type='model', private={private}, exist_ok=True)\n"
             f"HfApi().upload_folder(repo_id={repo_id!r}, repo_type='model', folder_path={str(final)!r}, "
             f"ignore_patterns={IGNORE!r}, commit_message={message!r}" + (f", revision={opts['revision']!r}" if opts["revision"] else "") + ")")
    if opts["dry_run"]:
        print(card)
        print(f"# dry run: nothing written or uploaded. Would write {readme}, then call:\n{calls}\n"
              f"# files: {', '.join(files + (['README.md'] if 'README.md' not in files else []))}")
        return 0
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError("HF_HUB_OFFLINE is set: push needs the hub (unset it, or --dry-run to see the card)")
    atomic_write_text(readme, card)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if opts["revision"]:
            api.create_branch(repo_id, branch=opts["revision"], exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(final), ignore_patterns=IGNORE,
                                 commit_message=message, revision=opts["revision"])
    except HfHubHTTPError as exc:
        raise UserError(f"push to {repo_id}: {str(exc).splitlines()[0]} (logged in? `hf auth login` or HF_TOKEN)") from None
    except OSError as exc:  # connection refused, DNS, TLS
        raise UserError(f"push to {repo_id}: cannot reach {api.endpoint}: {exc}") from None
    print(f"pushed {final} to {url} ({'private' if private else 'public'}), commit {info.oid}: {info.commit_url}")
    return 0
