"""MkDocs hooks: the release table and the API page are generated from the code, and every public name must have a
docstring.

``mkdocs build --strict`` (run by ``tests/test_docs.py``) fails when a public function, class or module of
``qscope_hf`` / ``qscope_trl`` has no docstring, so the API reference cannot silently lose a page.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from mkdocs.exceptions import PluginError

PACKAGES = ("qscope_hf", "qscope_trl")
RELEASE_TABLE = "{{ release_table }}"
API_REFERENCE = "{{ api_reference }}"


def public_modules() -> list[str]:
    """Every module of the two packages whose name has no leading underscore."""
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return names


def undocumented() -> list[str]:
    """Public modules, and the public functions, classes and methods (overrides aside) defined in them, without a
    docstring of their own."""
    missing = []
    for name in public_modules():
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
            if inspect.isclass(obj):
                for method, member in vars(obj).items():
                    function = getattr(member, "fget", member)  # properties: their getter
                    if method.startswith("_") or not inspect.isfunction(function):
                        continue
                    if any(hasattr(base, method) for base in obj.__mro__[1:] if base is not object):
                        continue  # an override documented by the class it overrides (TrainerCallback, nn.Module)
                    if not (function.__doc__ or "").strip():
                        missing.append(f"{name}.{attr}.{method}")
    return missing


def release_table() -> str:
    """The Markdown table of the registered Qwen-Scope releases."""
    from qscope_hf.releases import list_releases

    rows = ["| repo | backbone | family | layers | d_model | d_sae | k |", "|---|---|---|---|---|---|---|"]
    rows += [f"| `{r.repo_id}` | {r.backbone} | {r.family} | {r.num_layers} | {r.d_model} | {r.d_sae} | {r.k} |"
             for r in list_releases()]
    return "\n".join(rows)


def on_pre_build(config, **kwargs) -> None:
    missing = undocumented()
    if missing:
        raise PluginError(f"{len(missing)} public names have no docstring: {', '.join(missing)}")


def api_reference() -> str:
    """One mkdocstrings section per public module."""
    return "\n\n".join(f"## `{name}`\n\n::: {name}\n    options:\n      show_root_heading: false"
                       for name in public_modules())


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if RELEASE_TABLE in markdown:
        markdown = markdown.replace(RELEASE_TABLE, release_table())
    if API_REFERENCE in markdown:
        markdown = markdown.replace(API_REFERENCE, api_reference())
    return markdown
