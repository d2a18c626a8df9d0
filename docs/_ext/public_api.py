"""A Sphinx directive that documents every name in ``optaxclip.__all__``.

``.. optaxclip-public-api::`` expands to a summary table and then one section per
public name, each holding the matching autodoc directive (``autofunction``,
``autoclass``, ``autoexception`` or ``autodata``). The list of names is read at
build time, so the reference never falls behind ``__all__``.
"""

from __future__ import annotations

import inspect
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def autodoc_directive(obj: Any) -> str:
    """The autodoc directive that documents ``obj``."""
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


def summary(obj: Any) -> str:
    """The first line of ``obj``'s docstring, or an empty string."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def public_api_rst(module_name: str = "optaxclip") -> list[str]:
    """reStructuredText for the summary table and one section per public name."""
    module = __import__(module_name)
    names = list(module.__all__)
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "",
             "   * - name", "     - summary"]
    for name in names:
        lines += [f"   * - :py:obj:`~{module_name}.{name}`",
                  f"     - {summary(getattr(module, name))}"]
    lines.append("")
    for name in names:
        directive = autodoc_directive(getattr(module, name))
        lines += [name, "-" * len(name), "", f".. {directive}:: {module_name}.{name}", ""]
    return lines


class PublicApi(SphinxDirective):
    """``.. optaxclip-public-api::``: the whole public API, from ``__all__``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        container = nodes.section()
        container.document = self.state.document
        content = StringList(public_api_rst(), source="optaxclip.__all__")
        nested_parse_with_titles(self.state, content, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("optaxclip-public-api", PublicApi)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
