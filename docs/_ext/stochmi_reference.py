"""Sphinx directives that generate reference tables from the code itself.

- ``.. stochmi-experiment-keys::`` every key of an experiment file, its type, whether it
  is required and its default, obtained by *running the validator*
  (:func:`stochmi.experiments.parse_experiment`) on probe files; the key list is the
  validator's own (``stochmi.experiments.config._ALLOWED``) and the descriptions come
  from the commented format in that module's docstring. A key the validator accepts
  but the docstring does not describe (or the reverse) is a build warning, which fails
  the ``-W`` build: the reference cannot drift from the validator.
- ``.. stochmi-spec-keys::`` the model-spec schema (``stochmi.models.spec.SCHEMA``), the
  table the spec validator checks against.
- ``.. stochmi-cli::`` every subcommand and option of ``stochmi.cli.build_parser()``.
- ``.. stochmi-check-api::`` warns when a name in ``stochmi.__all__`` has no entry in the
  API reference's autosummary tables.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

_MINIMAL = {
    "experiment": {"name": '"probe"', "seeds": "[0]"},
    "estimate": {"epochs": "[0]"},
    "model": {"spec": '"noisy_mlp"'},
}
_TYPE_WORDS = [
    ("non-empty list of integers", "list of int"),
    ("must be a string", "string"),
    ("must be an integer", "int"),
    ("must be a finite number", "float"),
    ("must be true or false", "bool"),
    ("table of 'key = [values]'", "table: key = [values]"),
    ("table of 'key = value'", "table: key = value"),
]


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("`", "\\`").replace("|", "\\|")


def _list_table(header: list[str], rows: list[list[str]], widths: str | None = None) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1"]
    if widths:
        out.append(f"   :widths: {widths}")
    out.append("")
    for row in [header, *rows]:
        for j, cell in enumerate(row):
            out.append(("   * - " if j == 0 else "     - ") + (cell or " "))
    out.append("")
    return out


def _toml(sections: dict[str, dict[str, str]]) -> str:
    lines = []
    for sec, kv in sections.items():
        lines.append(f"[[{sec}]]" if sec == "model" else f"[{sec}]")
        lines += [f"{k} = {v}" for k, v in kv.items()]
    return "\n".join(lines) + "\n"


def _docstring_descriptions(doc: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(section, key) -> (example value, comment) from the commented format block."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    section, last = None, None
    for line in doc.splitlines():
        s = line.strip()
        m = re.match(r"^\[\[?([a-z_]+)\]\]?\s*(?:#\s*(.*))?$", s)
        if m:
            section, last = m.group(1), None
            out[(section, "")] = ("", m.group(2) or "")
            continue
        m = re.match(r"^([a-z_]+)\s*=\s*(.*?)\s*(?:#\s*(.*))?$", s)
        if section and m and line.startswith("    "):
            key, value, comment = m.group(1), m.group(2), m.group(3) or ""
            out[(section, key)] = (value, comment)
            last = (section, key)
            continue
        if last and s.startswith("#"):
            value, comment = out[last]
            out[last] = (value, (comment + " " + s.lstrip("# ")).strip())
            continue
        if not s:
            continue
        last = None
    return out


def _config_value(cfg, section: str, key: str):
    if section == "experiment":
        return getattr(cfg, key)
    if section == "training":
        return getattr(cfg, f"training_{key}")
    if section == "model":
        return getattr(cfg.models[0], key)
    return getattr(getattr(cfg, section), key)


def _render_default(v) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "``true``" if v else "``false``"
    if isinstance(v, str):
        return f'``"{v}"``'
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, dict) and not v:
        return "``{}``"
    return f"``{v!r}``"


def experiment_key_rows() -> tuple[list[list[str]], list[str]]:
    """Rows (key, type, required, default, description) and problems found."""
    from stochmi.experiments import config as C

    problems: list[str] = []
    descr = _docstring_descriptions(C.__doc__ or "")
    allowed = {s: sorted(keys) for s, keys in C._ALLOWED.items() if s}
    base = C.parse_experiment(_toml(_MINIMAL), path="probe")
    rows = []
    for section in ["experiment", "data", "training", "estimate", "resources", "model"]:
        for key in allowed.get(section, []):
            # required: drop the key from the minimal file
            required = False
            if key in _MINIMAL.get(section, {}):
                probe = {s: dict(kv) for s, kv in _MINIMAL.items()}
                del probe[section][key]
                try:
                    C.parse_experiment(_toml(probe), path="probe")
                except C.ConfigError as exc:
                    required = "missing required" in str(exc)
            # type: a value of the wrong kind makes the validator name the expected one
            typ = "?"
            for bad in ("{ probe = 1 }", '"probe-string"'):
                probe = {s: dict(kv) for s, kv in _MINIMAL.items()}
                probe.setdefault(section, {})[key] = bad
                try:
                    C.parse_experiment(_toml(probe), path="probe")
                except C.ConfigError as exc:
                    msg = str(exc)
                    hit = [name for word, name in _TYPE_WORDS if word in msg]
                    if hit:
                        typ = hit[0]
                        break
            if typ == "?":
                problems.append(f"experiment key {section}.{key}: type not found by probing")
            default = "(required)" if required else _render_default(
                _config_value(base, section, key)
            )
            if (section, key) not in descr:
                problems.append(
                    f"experiment key {section}.{key} is accepted by the validator but not "
                    "described in stochmi/experiments/config.py's docstring"
                )
            example, comment = descr.get((section, key), ("", ""))
            if comment.lower().startswith("required"):
                comment = comment[len("required") :].lstrip(": ")
            pulled = comment.lower().startswith("default:")
            if pulled:
                default, comment = _esc(comment[len("default:") :].strip()), ""
            elif default == "unset" and example:
                default, example = f"``{example}`` (unset)", ""
            if not comment and not pulled:  # fall back on the table's own comment
                comment = descr.get((section, ""), ("", ""))[1]
            text = _esc(comment)
            shown = f"``{example.replace('false', 'False').replace('true', 'True')}``"
            same = default.lower() in (shown.lower(), f"``{example}``")
            if example and not required and not same:
                text += f" Example: ``{example}``."
            rows.append([f"``{section}.{key}``", typ, "yes" if required else "no", default, text])
    for section, key in descr:
        if key and key not in C._ALLOWED.get(section, set()):
            problems.append(
                f"config.py docstring describes {section}.{key}, which the validator rejects"
            )
    return rows, problems


class ExperimentKeys(SphinxDirective):
    def run(self):
        rows, problems = experiment_key_rows()
        for p in problems:
            logger.warning(p, location=self.get_location())
        text = _list_table(
            ["key", "type", "required", "default", "description"], rows, "18 12 8 12 50"
        )
        return self._parse(text)

    def _parse(self, lines):
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines), self.content_offset, node)
        return node.children


class SpecKeys(ExperimentKeys):
    def run(self):
        from stochmi.models import spec as S

        rows = []
        for section, keys in S.SCHEMA.items():
            for key, k in keys.items():
                constraint = []
                if k.choices:
                    constraint.append("one of " + ", ".join(f"``{c}``" for c in k.choices))
                if k.minimum is not None:
                    constraint.append(f"{'>' if k.strict_min else '>='} {k.minimum:g}")
                kinds = "all" if tuple(k.kinds) == tuple(S.MODEL_KINDS) else ", ".join(k.kinds)
                kind_defaults = [
                    f"{kind}: ``{d[f'{section}.{key}']!r}``"
                    for kind, d in S._KIND_DEFAULTS.items()
                    if f"{section}.{key}" in d
                ]
                default = _render_default(k.default) if k.default is not None else ""
                if kind_defaults:
                    default = "; ".join(([default] if default else []) + kind_defaults)
                rows.append(
                    [
                        f"``{section}.{key}``",
                        k.type,
                        default or "unset",
                        "; ".join(constraint),
                        kinds,
                        _esc(k.help),
                    ]
                )
        return self._parse(
            _list_table(
                ["key", "type", "default", "constraint", "model kinds", "description"],
                rows,
                "16 8 20 20 12 24",
            )
        )


def _option_rows(parser: argparse.ArgumentParser) -> list[list[str]]:
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        flags = ", ".join(f"``{f}``" for f in a.option_strings) or f"``{a.metavar or a.dest}``"
        if a.option_strings and a.nargs != 0:
            flags += f" *{a.metavar or a.dest.upper()}*"
        if a.choices:
            flags += " (" + " | ".join(f"``{c}``" for c in a.choices) + ")"
        rows.append([flags, _esc(" ".join((a.help or "").split()))])
    return rows


class CLIReference(ExperimentKeys):
    def run(self):
        from stochmi.cli import build_parser

        parser = build_parser()
        lines = [
            "Options of every subcommand (given before or after the subcommand's name):",
            "",
        ]
        lines += _list_table(["option", "description"], _option_rows(parser), "30 70")
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {c.dest: c.help for c in sub._choices_actions}
        for name, p in sub.choices.items():
            title = f"stochmi {name}"
            lines += [title, "~" * len(title), ""]
            lines += [_esc(" ".join((p.description or helps.get(name) or "").split())), ""]
            lines += ["::", "", "    " + p.format_usage().strip().replace("\n", "\n    "), ""]
            lines += _list_table(["argument", "description"], _option_rows(p), "30 70")
        return self._parse(lines)


class CheckAPI(SphinxDirective):
    """Warn for each public name that the API page does not list."""

    def run(self):
        import stochmi

        src = Path(self.env.srcdir)
        text = "\n".join(p.read_text() for p in src.glob("api*.rst"))
        listed = set(re.findall(r"^\s{3}~?([A-Za-z_][\w.]*)\s*$", text, re.M))
        for name in stochmi.__all__:
            obj = getattr(stochmi, name)
            real = getattr(obj, "__name__", name) if hasattr(obj, "__path__") or hasattr(
                obj, "__file__"
            ) else name
            if not ({name, f"stochmi.{name}", real} & listed):
                logger.warning(
                    f"public name stochmi.{name} has no entry in the API reference",
                    location=self.get_location(),
                )
        return []


def setup(app):
    app.add_directive("stochmi-experiment-keys", ExperimentKeys)
    app.add_directive("stochmi-spec-keys", SpecKeys)
    app.add_directive("stochmi-cli", CLIReference)
    app.add_directive("stochmi-check-api", CheckAPI)
    return {"parallel_read_safe": True, "version": "1"}
