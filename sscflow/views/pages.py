"""Render the HTML pages from the templates in ``sscflow/views/templates/``.

The environment escapes every value placed in a template (``autoescape``), refuses undefined
names (a typo in a template fails the page instead of printing nothing) and loads the templates
from the installed package, so a wheel renders the same pages as a checkout.

>>> page = render("report_failed.html", store="<script>", when="now", error="E")
>>> "<script>" in page, "&lt;script&gt;" in page
(False, True)
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("sscflow.views", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context) -> str:
    """The template ``name`` rendered with ``context`` (values are escaped)."""
    return environment().get_template(name).render(**context)


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` (UTF-8) through a ``.partial`` file beside it, renamed when whole:
    never a half-written page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
