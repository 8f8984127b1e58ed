"""Run folders: one shape for every experiment (see DESIGN.md).

``runs/<name>-<timestamp>/`` holds ``config.json`` (every setting, resolved),
``metrics.jsonl`` (one JSON object per logged step/epoch), ``results.json``,
figures (``*.png``) and ``checkpoints/`` (orbax). Existing folders are never
overwritten silently.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
from typing import Any, Sequence

import numpy as np

RESULT_KEYS = ("experiment", "dataset", "seeds", "beneficial_test_accuracy", "attacks",
               "references", "wall_seconds")


from trm_jax.errors import RunExistsError, RunFolderError  # noqa: F401  (re-exported)


def default_workdir(name: str, root: str = "runs") -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path(root) / f"{name}-{stamp}"


def to_jsonable(value: Any) -> Any:
    """Numpy/JAX arrays and scalars, dataclasses, tuples and paths -> plain JSON values.

    Non-finite floats become ``None`` so files stay valid JSON.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """A run folder. Create it with :meth:`create`; read one with :meth:`open`."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False,
               resume: bool = False) -> "RunDir":
        """Makes the folder. An existing non-empty folder is an error unless
        ``resume`` (keep and continue it) or ``overwrite`` (delete it first)."""
        path = pathlib.Path(path)
        if path.exists() and any(path.iterdir()):
            if resume:
                return cls(path)
            if not overwrite:
                raise RunExistsError(
                    f"run folder {path} already exists and is not empty; pass --overwrite to "
                    "replace it, --resume to continue it, or choose another --workdir")
            shutil.rmtree(path)
        elif resume:
            raise FileNotFoundError(f"--resume given but run folder {path} does not exist")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        path = pathlib.Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a run folder (no config.json)")
        return cls(path)

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return self.path / "checkpoints"

    def write_json(self, name: str, value: Any) -> pathlib.Path:
        """Writes atomically (temp file + rename): a crash never leaves half a file."""
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(value), indent=2) + "\n")
        os.replace(tmp, target)
        return target

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def write_config(self, config: Any) -> None:
        self.write_json("config.json", config)

    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    def log(self, record: dict[str, Any]) -> None:
        """Appends one JSON object to ``metrics.jsonl``."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, keep: callable) -> None:
        """Keeps only the metric records for which ``keep(record)`` is true (used on resume)."""
        records = [r for r in self.metrics() if keep(r)]
        (self.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def write_results(self, results: dict[str, Any]) -> None:
        missing = [k for k in RESULT_KEYS if k not in results]
        if missing:
            raise ValueError(f"results.json needs the keys {RESULT_KEYS}; missing {missing}")
        self.write_json("results.json", results)

    def results(self) -> dict[str, Any]:
        return self.read_json("results.json")


def summarize(per_seed: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """``{"per_seed": [...], "mean": m, "std": s}`` (population std over seeds)."""
    values = np.asarray(per_seed, dtype=np.float64).reshape(-1)
    return {"per_seed": values.tolist(), "mean": float(values.mean()), "std": float(values.std())}
