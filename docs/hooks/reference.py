"""MkDocs hook: the reference pages generated from the code, and the site's order.

* ``reference/spec.md``: the marker ``<!-- spec-fields -->`` becomes one table per part of a study
  spec (the pydantic models of :mod:`wdstudy.spec` and :mod:`wdstudy.tasks`): every field, its type,
  default and meaning. A field's meaning is its ``Field(description=...)`` in the code, else its
  line in ``docs/reference/spec-fields.yaml``; a field with neither fails the build (and a test).
* ``reference/cli.md``: the marker ``<!-- cli -->`` becomes every subcommand's ``--help``, from argparse.
* ``reference/api.md``: the marker ``<!-- api -->`` becomes the Python API's signatures and docstrings.
* The navigation: Tutorials, How-to guides, Explanation, Reference, each folder's pages in
  alphabetical order, so a new page in a folder is in the site without editing ``mkdocs.yml``.
* The committed reports' figures and documents are served under ``assets/`` (they live in
  ``reports/``, outside ``docs/``).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTIONS = ROOT / "docs" / "reference" / "spec-fields.yaml"
SECTIONS = (("Tutorials", "tutorials"), ("How-to guides", "how-to"), ("Explanation", "explanation"),
            ("Reference", "reference"))
#: Committed report files served by the site: (source under the repository, path in the site).
ASSETS = [(f"reports/quickstart/figures/{p.name}", f"assets/quickstart/{p.name}")
          for p in sorted((ROOT / "reports" / "quickstart" / "figures").glob("*.png"))]
ASSETS += [("reports/quickstart/report.html", "assets/quickstart/report.html"),
           ("reports/quickstart/report.pdf", "assets/quickstart/report.pdf"),
           ("reports/claims/report.html", "assets/claims/report.html"),
           ("reports/claims/report.pdf", "assets/claims/report.pdf")]


def _models_in(annotation) -> list:
    """The pydantic models an annotation can hold, and whether through a list (through Optional,
    unions and dict values)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    out = []
    for arg in typing.get_args(annotation):
        out += [(m, in_list or typing.get_origin(annotation) is list) for m, in_list in _models_in(arg)]
    return out


def spec_parts():
    """``(title, path prefix, model)`` for every part of a spec, top to bottom: the models reached
    from :class:`~wdstudy.spec.StudySpec` through its fields (a list's entries as ``key[]``)."""
    from wdstudy.spec import StudySpec

    parts, queue = [], [("", StudySpec)]
    while queue:
        prefix, model = queue.pop(0)
        if any(p == prefix and m is model for _, p, m in parts):
            continue
        parts.append(("The study" if not prefix else f"`{prefix}`", prefix, model))
        for name, field in model.model_fields.items():
            for sub, in_list in _models_in(field.annotation):
                queue.append((f"{prefix}.{name}".lstrip(".") + ("[]" if in_list else ""), sub))
    return parts


def field_rows() -> list[tuple[str, str, str, str, str]]:
    """``(part title, key path, type, default, meaning)`` for every field of every part."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    described = yaml.safe_load(DESCRIPTIONS.read_text()) or {}
    rows = []
    for title, prefix, model in spec_parts():
        for name, field in model.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            meaning = field.description or described.get(path)
            value = field.default_factory() if field.default_factory else field.default
            default = "required" if value is PydanticUndefined else \
                "(its fields' defaults)" if isinstance(value, BaseModel) else repr(value)
            rows.append((title, path, _type(field.annotation), default, meaning or ""))
    return rows


def _type(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("wdstudy.spec.", "").replace("wdstudy.tasks.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    if typing.get_origin(annotation) is typing.Literal:
        text = " \\| ".join(repr(a) for a in typing.get_args(annotation))
    return text.replace("|", "\\|") if "\\|" not in text else text


def spec_tables() -> str:
    rows = field_rows()
    missing = [path for _, path, _, _, meaning in rows if not meaning]
    if missing:
        raise ValueError(f"spec fields without a description (add one to {DESCRIPTIONS.name}): {', '.join(missing)}")
    docs = {title: _first_paragraph(model) for title, _, model in spec_parts()}
    out, title = [], None
    for part, path, kind, default, meaning in rows:
        if part != title:
            title = part
            out += ["", f"### {part}", ""] + ([docs[part], ""] if docs[part] else [])
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        shown = default if default == "required" or default.startswith("(") else f"`{default}`"
        out.append(f"| `{path}` | {kind} | {shown} | {meaning} |")
    return "\n".join(out) + "\n"


def _first_paragraph(model) -> str:
    """A model's docstring's first paragraph, its reST markup made Markdown."""
    doc = (model.__doc__ or "").strip()
    if not doc or doc.startswith("Usage docs"):
        return ""
    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def cli_reference() -> str:
    from wdstudy.cli import build_parser

    parser = build_parser()
    out = ["```text", parser.format_help().rstrip(), "```"]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        out += ["", f"## `wdstudy {name}`", "", "```text", p.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"


#: The Python API a user calls, documented from its docstrings (module, names).
API = [
    ("wdstudy.results", ["load_results", "Results"]),
    ("wdstudy.spec", ["load_spec", "StudySpec"]),
    ("wdstudy.tasks.user", ["UserTask"]),
    ("wdstudy.regularizers", ["Regularizer", "NoRegularization", "L2Regularization", "DecoupledWeightDecay",
                              "IndependentWeightDecay", "L1Regularization", "DecoupledL1", "split_parameters",
                              "make_regularizer"]),
    ("wdstudy.train", ["train_run", "cosine_factor"]),
    ("wdstudy.analysis", ["compute_hours"]),
]


def api_reference() -> str:
    import importlib
    import inspect

    out = []
    for module_name, names in API:
        module = importlib.import_module(module_name)
        out += ["", f"## `{module_name}`", ""]
        doc = inspect.getdoc(module)
        if doc:
            out += [doc.split("\n\n")[0], ""]
        for name in names:
            obj = getattr(module, name)
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = "(...)"
            kind = "class" if inspect.isclass(obj) else "def"
            out += [f"### `{name}`", "", "```python", f"{kind} {name}{signature}", "```", ""]
            doc = inspect.getdoc(obj)
            if doc is None:
                raise ValueError(f"{module_name}.{name} has no docstring")
            out += ["```text", doc, "```", ""]
    return "\n".join(out) + "\n"


def on_config(config, **kwargs):
    docs = Path(config["docs_dir"])
    nav = [{"Home": "index.md"}]
    for title, folder in SECTIONS:
        pages = sorted(p.relative_to(docs).as_posix() for p in (docs / folder).glob("*.md"))
        if pages:
            nav.append({title: pages})
    config["nav"] = nav
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for source, target in ASSETS:
        if (ROOT / source).is_file():
            files.append(File.generated(config, target, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    if "<!-- spec-fields -->" in markdown:
        markdown = markdown.replace("<!-- spec-fields -->", spec_tables())
    if "<!-- api -->" in markdown:
        markdown = markdown.replace("<!-- api -->", api_reference())
    if "<!-- cli -->" in markdown:
        markdown = markdown.replace("<!-- cli -->", cli_reference())
    return markdown
