"""The module paths of sscflow 0.1 before its folders (``core/``, ``methods/``, ``flow/``,
``views/``): scripts written against them (``from sscflow.registration import register``,
``sscflow.pipeline.run``) keep working. An old name is the new module itself, not a copy, so
``sscflow.pipeline is sscflow.flow.pipeline``; new code imports the new paths."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "geometry": "core.geometry",
    "store": "core.store",
    "imageio": "core.imageio",
    "segment": "methods.segment",
    "segment_lungmask": "methods.segment_lungmask",
    "registration": "methods.registration",
    "jacobian": "methods.jacobian",
    "classify": "methods.classify",
    "stats": "methods.stats",
    "quality": "methods.quality",
    "extent": "methods.extent",
    "template": "methods.template",
    "groups": "methods.groups",
    "analysis": "methods.analysis",
    "ingest": "methods.ingest",
    "pipeline": "flow.pipeline",
    "lease": "flow.lease",
    "cluster": "flow.cluster",
    "kubernetes": "flow.kubernetes",
    "metrics": "flow.metrics",
    "gpu": "flow.gpu",
    "status": "flow.status",
    "report": "views.report",
    "qa": "views.qa",
    "figures": "views.figures",
    "export": "views.export",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``sscflow.<old>[.sub]`` to ``sscflow.<new>[.sub]``."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "sscflow" or parts[1] not in MOVED:
            return None
        new = ".".join(["sscflow", MOVED[parts[1]], *parts[2:]])
        return importlib.util.spec_from_loader(fullname, self, origin=new)

    def create_module(self, spec):
        module = importlib.import_module(spec.origin)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the module keeps its own identity


def install() -> None:
    """Put the alias finder first (before the path finder would load a second copy)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
