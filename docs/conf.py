"""Sphinx configuration of the trm_jax API reference (built offline, warnings as errors).

    pip install -e '.[docs]' && python -m sphinx -W --keep-going -n -b html docs docs/_build/html

tests/test_docs.py builds it the same way. Nothing is fetched at build time: no
intersphinx inventories, the bundled alabaster theme.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing the library must not probe a GPU

project = "trm_jax"
author = "trm_jax developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_use_index = False  # the API pages are the index
html_copy_source = False
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]  # links to repository files outside docs/

autodoc_member_order = "bysource"
autodoc_typehints = "description"  # types under Args, so signatures stay one readable line
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" of the config dataclasses, next to their fields

# -n (nitpicky): every reference must resolve, except to the libraries we build on (there is
# no network for their inventories) and to the type aliases that stand for "any pytree".
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|chex|optax|flax|nn|orbax|ocp|tfds|tf|tyro|tqdm|matplotlib|"
               r"plt|absl|sklearn|collections|typing|types|pathlib|os|io|contextlib|enum|"
               r"dataclasses|concurrent|threading|argparse)(\..*)?"),
    (r"py:.*", r"(Array|ArrayTree|PRNGKey|Params|Numeric|PyTree|OptState|Shape|DType|Any|"
               r"Callable|Iterator|Iterable|Mapping|Sequence|NamedTuple|Literal|Optional|"
               r"ModuleType|Path|PathLike|TextIO|np\.ndarray|ndarray|Module)"),
    (r"py:class", r"(int|float|str|bool|None|dict|list|tuple|type|object|callable|optional|"
                  r"function|array|arrays|pytree|bytes)"),
    (r"py:class", r".*[|\[].*"),  # type expressions written as strings ("str | None")
]

def _attribute_docstring(app, what, name, obj, options, lines):
    """``#: The grid: 9 learning rates`` documents a constant, and napoleon reads the text
    before the first colon as the constant's *type* (``:type: The grid``, a broken
    cross-reference). Runs after napoleon: the text goes back in front of the description."""
    if what not in ("data", "attribute", "property"):
        return
    typed = [i for i, line in enumerate(lines) if line.startswith(":type: ")]
    text = [i for i, line in enumerate(lines) if line.strip()]
    if len(typed) == 1 and text and text[0] < typed[0]:
        words = lines.pop(typed[0])[len(":type: "):]
        lines[text[0]] = f"{words}: {lines[text[0]].lstrip()}"


def _defined_in(name: str) -> str:
    """The module that defines the object documented as ``name`` (``trm_jax.evaluate``:
    ``trm_jax.evaluation``)."""
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(getattr(importlib.import_module(module), attr), "__module__", "") or ""
    except (ImportError, AttributeError, ValueError):
        return ""


def _unique_suffix(app, env, node, contnode):
    """``:class:`ConfigError``` inside trm_jax.datasets means trm_jax.errors.ConfigError:
    a short (or re-exported) name resolves to the one documented object that ends with it
    (among several, the one nearest the docstring's own module); no match: left unresolved,
    and the build fails on it."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    if getattr(env, "_trm_objects", (None,))[0] is not domain.objects:  # once per build
        env._trm_objects = (domain.objects, {name: entry for name, entry in domain.objects.items()
                                             if not entry.aliased})
    objects = env._trm_objects[1]
    found = [name for name in objects if name == target or name.endswith("." + target)]
    if not found:  # re-exported: trm_jax.methods.config_for is documented as trm_jax.config_for
        last = target.rsplit(".", 1)[-1]
        found = [name for name in objects if name.rsplit(".", 1)[-1] == last]
    if len(found) > 1:  # "docstring of trm_jax.evaluation.evaluate": prefer trm_jax.evaluation's
        where = str(node.source or "").rpartition("docstring of ")[2]
        home = [name for name in found if where.startswith(f"{_defined_in(name)}.")]
        shared = lambda name: len(os.path.commonprefix([name.split("."), where.split(".")]))
        best = max(map(shared, home or found))
        found = [name for name in home or found if shared(name) == best]
    if len(found) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node["refdoc"], objects[found[0]].docname,
                        objects[found[0]].node_id, contnode, found[0])


def setup(app):
    app.connect("autodoc-process-docstring", _attribute_docstring, priority=600)
    app.connect("missing-reference", _unique_suffix)
