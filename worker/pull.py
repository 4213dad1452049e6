"""The model a worker serves: found in the models folders, or pulled through the mesh when it is not there, and
known by its content (sha256 and size, from the digest cache, so a restart does not hash it again).

A pull writes into the first models folder (``$QMESH_MODELS_DIR``'s first, else ``./models``); its progress goes to
stderr on a terminal and to the log. ``qmesh-worker --no-pull`` turns it off.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from qmesh.common import protocol as p
from qmesh.common.errors import ModelNotFound, TransferFailed
from qmesh.common.keys import CurveClientKeys
from qmesh.common.modelfiles import DigestCache
from qmesh.common.paths import models_dirs
from qmesh.common.pull import ProgressReport, pull_model
from qmesh.worker.models import ModelFile, is_path_spec, resolve_model

log = logging.getLogger(__name__)


def find_or_pull(
    spec: str, broker: str, digests: DigestCache, *, curve: CurveClientKeys | None = None, pull: bool = True
) -> ModelFile:
    """The model ``spec`` names (a path, or a short name in the models folders), with its digest. A short name
    found nowhere is pulled from the mesh at ``broker`` unless ``pull`` is False; ModelNotFound says why not."""
    try:
        model = resolve_model(spec)
    except ModelNotFound as missing:
        if not pull or is_path_spec(spec) or p.model_name_problem(spec) is not None:
            raise
        folder = models_dirs()[0]
        log.info("model %s is not here: pulling it through the mesh at %s into %s", spec, broker, folder)
        try:
            result = pull_model(spec, folder, broker, curve=curve, digests=digests, report=ProgressReport())
        except TransferFailed as failed:
            raise ModelNotFound(f"{missing}. Pulling it through the mesh failed too: {failed}") from failed
        log.info(
            "pulled %s (sha256 %s) into %s: %d bytes received, resumed at %d, %.1f MB verified in %.2f s",
            spec,
            result.model.sha256,
            result.path,
            result.received,
            result.resumed_at,
            result.model.size / 1e6,
            result.seconds,
        )
        model = resolve_model(spec)
    return replace(model, digest=digests.digest(model.path))
