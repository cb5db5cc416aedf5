"""`./launch.sh STAGE --help` and `./launch.sh config STAGE [key=value ...] [--only SECTION] [--diff]`.

STAGE --help lists every key the stage reads, section by section (the run's own keys, model, cluster,
then the stage's sections and its engines'), each with its type, its value for this stage (the schema
default with conf/ applied, and any key=value or --config given with --help) and a one-line doc. The docs
are the comments beside the fields in recipes/config.py (the schema), else the comment beside the key in
conf/stage/STAGE.yaml; the allowed range or choices come from the field's rule when it declares one.

`config` prints the resolved config a stage would run with, as YAML: --only SECTION one section,
--diff only the keys whose value differs from the stage's defaults (`./launch.sh config STAGE`), which is
a config file you can pass back with --config.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import io
import re
import tokenize
import typing
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from hs3.io import UserError
from launcher.stages import flatten
from recipes import config as schema
from recipes.config import ALIASES, CONF_DIR, GROUPS, STAGES, ConfigError, RunConfig, compose

# The sections each stage reads beside the common ones (the run's keys, model, cluster); an engine's
# sections are added for each engine the stage runs on (launcher.run.STAGE_RUNNERS).
STAGE_SECTIONS = {
    "data": ("prep",), "sft": ("train", "peft"), "feedback": ("train", "peft"), "rm": ("train", "peft", "rm"),
    "select": ("train", "peft", "rm"), "rl": ("train", "peft", "rl"), "dpo": ("train", "peft", "dpo"),
    "eval": ("eval",), "its": ("its",), "convert": (),
}
ENGINE_SECTIONS = {"hf": ("hf",), "megatron": ("parallel", "megatron")}
COMMON_SECTIONS = ("model", "cluster")
STAGE_SUMMARY = {
    "data": "HelpSteer3 -> SFT conversations, preference pairs, RL prompts (python -m data_prep --help: its options)",
    "sft": "edit SFT on data_dir/sft/train.jsonl; loss on the edited response only",
    "rm": "Bradley-Terry edit reward model on data_dir/pairs/train.jsonl",
    "rl": "RLOO: policy = sft, reward = rm, KL to sft, on data_dir/prompts/train.jsonl",
    "dpo": "DPO on data_dir/pairs/train.jsonl (an offline alternative to rl)",
    "eval": "score a checkpoint or endpoint on the held-out validation splits",
    "convert": "checkpoint conversion between HF and Megatron / NeMo-RL (engine=megatron)",
    "feedback": "the Feedback model: SFT on the feedback subset",
    "select": "the Select model: scaled Bradley-Terry on the preference subset",
    "its": "Feedback-Edit inference-time scaling: responses -> feedback -> edits -> select",
}


# ---- the docs: comments beside the schema's fields, parsed once ------------------------------------

@functools.lru_cache(maxsize=None)
def schema_docs() -> dict[str, dict[str, str]]:
    """{dataclass name: {field: doc}} from recipes/config.py: a field's metadata["doc"] when it has one,
    else its trailing comment, else the comment lines right above it."""
    source = Path(schema.__file__).read_text(encoding="utf-8")
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            trailing = comments.get(item.end_lineno) if lines[item.end_lineno - 1].lstrip()[:1] != "#" else None
            above, line = [], item.lineno - 1
            while line >= 1 and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            fields[item.target.id] = " ".join(p for p in (" ".join(above), trailing) if p)
    for cls in _dataclasses():
        for f in dataclasses.fields(cls):
            if "doc" in f.metadata:
                docs.setdefault(cls.__name__, {})[f.name] = str(f.metadata["doc"])
    return docs


def _dataclasses() -> list[type]:
    found, todo = [], [RunConfig]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]
    return found


_YAML_KEY = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*?)(?:\s+#\s?(.*))?$")


@functools.lru_cache(maxsize=None)
def conf_docs(path: Path) -> dict[str, str]:
    """{dotted key: the comment beside it} of a conf/ YAML file."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return docs
    for line in text.splitlines():
        match = _YAML_KEY.match(line)
        if not match:
            continue
        indent, key, _, comment = len(match.group(1)), match.group(2), match.group(3), match.group(4)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if comment:
            docs[dotted] = comment.strip()
    return docs


# ---- what a key is ---------------------------------------------------------------------------------

def type_name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union and type(None) in args:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + " | null"
    if origin in (list, tuple):
        return f"list[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]"
    return getattr(kind, "__name__", str(kind))


def section_fields(section: str | None) -> list[tuple[str, dataclasses.Field, object]]:
    """(dotted key, field, type) of one section (None: the run's own scalar keys)."""
    hints = typing.get_type_hints(RunConfig)
    if section is None:
        return [(f.name, f, hints[f.name]) for f in dataclasses.fields(RunConfig) if not dataclasses.is_dataclass(hints[f.name])]
    cls = hints[section]
    sub = typing.get_type_hints(cls)
    return [(f"{section}.{f.name}", f, sub[f.name]) for f in dataclasses.fields(cls)]


# Stages that run the same code on either engine (engine=megatron only picks their container): no engine sections.
ENGINE_NEUTRAL = ("data", "eval", "its")


def sections_for(stage: str) -> list[str | None]:
    from launcher.run import STAGE_RUNNERS

    engines = [] if stage in ENGINE_NEUTRAL else [e for e in ENGINE_SECTIONS if (stage, e) in STAGE_RUNNERS]
    wanted: list[str | None] = [None, *STAGE_SECTIONS.get(stage, ()), *COMMON_SECTIONS]
    for engine in engines:
        wanted += [s for s in ENGINE_SECTIONS[engine] if s not in wanted]
    return wanted


def shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value).lower() if isinstance(value, bool) else str(value)


def key_doc(stage: str, key: str, f: dataclasses.Field, owner: str) -> str:
    doc = schema_docs().get(owner, {}).get(f.name, "")
    stage_doc = conf_docs(CONF_DIR / "stage" / f"{stage}.yaml").get(key, "")
    doc = doc or stage_doc
    rule = f.metadata.get(getattr(schema, "RULE", "hs3_rule"))
    if rule is not None and hasattr(rule, "describe"):
        doc = f"{doc} [{rule.describe()}]" if doc else f"[{rule.describe()}]"
    return doc


def stage_help(stage: str, args: list[str]) -> str:
    """The text of `./launch.sh STAGE --help [key=value ...]`."""
    cfg = compose(stage, args)
    values = OmegaConf.to_container(cfg, resolve=True)
    hints = typing.get_type_hints(RunConfig)
    lines = [f"usage: ./launch.sh {stage} [key=value ...] [--config FILE.yaml] [--dry-run]",
             f"  {STAGE_SUMMARY.get(stage, '')}",
             f"  values below: this stage's defaults (engine={cfg.engine}, model={cfg.model.name}"
             + (f", with {' '.join(args)}" if args else "") + "); later layers win: schema <- conf/ <- --config FILE <- key=value",
             "  groups: " + "; ".join(f"{g}=NAME ({', '.join(sorted(p.stem for p in (CONF_DIR / g).glob('*.yaml')))})"
                                   for g in ("engine", "model", "cluster")),
             "  short keys: " + ", ".join(f"{a}={k}" for a, k in ALIASES.items()),
             "  ./launch.sh config " + stage + " [key=value ...] [--only SECTION] [--diff]: the resolved config"]
    for section in sections_for(stage):
        owner = "RunConfig" if section is None else hints[section].__name__
        title = "run" if section is None else section
        rows = []
        for key, f, kind in section_fields(section):
            value = values[section].get(key.split(".", 1)[1]) if section else values.get(key)
            rows.append((key, type_name(kind), shown(value), key_doc(stage, key, f, owner)))
        head = f"[{title}]"
        if section and hints[section].__doc__ and not hints[section].__doc__.startswith(hints[section].__name__ + "("):
            head += "  " + " ".join(hints[section].__doc__.split())
        lines += ["", head]
        width_key = max(len(r[0]) for r in rows)
        width_type = max(len(r[1]) for r in rows)
        for key, kind, value, doc in rows:
            value = value if len(value) <= 40 else value[:37] + "..."
            lines.append(f"  {key:<{width_key}}  {kind:<{width_type}}  {value:<14} {doc}".rstrip())
    return "\n".join(lines)


# ---- did you mean ----------------------------------------------------------------------------------

def all_keys() -> list[str]:
    keys = []
    for section in [None, *[f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(typing.get_type_hints(RunConfig)[f.name])]]:
        keys += [k for k, _, _ in section_fields(section)]
    return keys + list(ALIASES) + list(GROUPS)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# ---- ./launch.sh config --------------------------------------------------------------------------

def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def config_main(argv: list[str]) -> int:
    """./launch.sh config STAGE [key=value ...] [--config FILE] [--only SECTION] [--diff]"""
    from recipes.config import to_yaml

    if not argv or argv[0] in ("-h", "--help"):
        print(config_main.__doc__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        raise UserError(f"config {stage}: unknown stage{did_you_mean(stage, STAGES)} (stages: {', '.join(STAGES)})")
    only, diff, args = None, False, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--diff":
            diff = True
        elif arg == "--only" or arg.startswith("--only="):
            if arg == "--only":
                if i + 1 >= len(rest):
                    raise UserError("--only needs a section name, e.g. --only train")
                i += 1
                only = rest[i]
            else:
                only = arg.split("=", 1)[1]
        else:
            args.append(arg)
        i += 1
    cfg = compose(stage, args)
    data = OmegaConf.to_container(cfg, resolve=True)
    if diff:
        defaults = flatten(OmegaConf.to_container(compose(stage, []), resolve=True))
        data = _nest({k: v for k, v in flatten(data).items() if defaults.get(k, object()) != v})
    if only is not None:
        sections = [k for k, v in OmegaConf.to_container(cfg, resolve=True).items() if isinstance(v, dict)]
        if only not in sections:
            raise ConfigError(f"--only {only}: not a section{did_you_mean(only, sections)} (sections: {', '.join(sections)})")
        data = {only: data.get(only, {})} if (data.get(only) or not diff) else {}
    if not data:
        print(f"# {stage}: nothing differs from the defaults" if diff else "{}")
        return 0
    print(to_yaml(OmegaConf.create(data)), end="")
    return 0
