"""Every flag of every experiment, fed a bad value: one line naming the flag, exit 2, no compute.

The cases are generated, not written: for each experiment's config class, every leaf flag
(``_cli.flag_names``) and the domain its config declares for it (``DOMAINS``,
:mod:`trm_jax.validate`) give a value just outside the domain, a huge one (``10**30``,
``1e308``: beyond int64 / float32) and a wrong type (``abc``); a switch, a value given to
it; a setting met again in another experiment (``--attack.*``, ``--seeds``) gets one case
there, under its own flag. Each must be refused before any compute (conftest's ``no_compute``), in one line ``error: ...`` that names the flag,
within :data:`MAX_SECONDS`, leaving no run folder. A flag with no declared domain fails the
test unless it is listed below with the reason it has none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import time
import typing
from typing import Annotated, Any

import pytest

from experiments import (_cli, attack, compare, omniglot_digits, reverse_maml, simulated_attack,
                         simulated_attack_search, skd, train_reference, unlearning)
from trm_jax import validate

#: Every experiment with a config-class command line (skd_mask_search parses with argparse:
#: see test_skd_mask_search_flags_are_checked_by_argparse).
MODULES = (train_reference, reverse_maml, skd, unlearning, compare, simulated_attack,
           simulated_attack_search, omniglot_digits, attack)
MAX_SECONDS = 5.0

#: Leaf fields (by name) whose domain is every value a command line can give: no case.
UNBOUNDED = {
    "workdir": "a path: checked for writability by the pre-flight (test_cli_safety)",
    "data_dir": "a path: checked by the pre-flight (test_cli_safety)",
    "run": "attack --run: a path, opened as a run folder (test_cli_safety)",
    "reference": "attack --reference: a path, opened as a run folder",
    "coordinator": "HOST:PORT or 'auto': parsed and dialled only in a multi-process run",
    "dataset": "its own pre-parse check (peek_dataset; test_cli_safety: unknown, given twice)",
}
#: Domains of fields whose class declares none (its checks are hand-written).
EXTRA = {
    "inner_unroll": validate.Int(1),  # None, a bool, or an int >= 1: the int part
    "timeout": validate.Int(1), "heartbeat_timeout": validate.Int(1),  # DistributedConfig
    "num_processes": validate.Int(1, none=True), "process_id": validate.Int(0, none=True),
}


def leaves(config_cls: type) -> list[tuple[str, type, str, Any]]:
    """``(dotted path, owner class, field name, type)`` of every leaf setting."""
    out = []

    def walk(cls: type, path: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            if typing.get_origin(hint) is Annotated:
                hint = typing.get_args(hint)[0]
            if dataclasses.is_dataclass(hint):
                walk(hint, (*path, field.name))
            else:
                out.append((".".join((*path, field.name)), cls, field.name, hint))

    walk(config_cls, ())
    return out


def text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def values(domain: Any) -> list[tuple[str, list[str]]]:
    """``(kind, argv values)`` for one domain: outside, huge, wrong type."""
    item = domain.item if isinstance(domain, validate.Tuple) else domain
    out = [(f"outside {text(v[0] if isinstance(v, tuple) else v)}",
            [text(v[0] if isinstance(v, tuple) else v)]) for v in domain.outside()]
    if isinstance(item, validate.Int):
        out += [("huge", [str(10**30)]), ("wrong type", ["abc"])]
    elif isinstance(item, validate.Float):
        out += [("huge", ["1e308"]), ("wrong type", ["abc"])]
    elif isinstance(item, validate.Str):
        out += [("unknown name", ["abc"])]
    return out


def generate() -> tuple[list[Any], dict[str, str]]:
    params, skipped, seen = [], {}, set()
    for module in MODULES:
        flags = _cli.flag_names(module.Config)
        for path, owner, name, hint in leaves(module.Config):
            flag = flags[path]
            if hint is bool:  # a switch: its bad input is a value given to it
                params.append(pytest.param(module, flag, "value to a switch", ["abc"],
                                           id=f"{module.__name__.split('.')[-1]}{flag}-value"))
                continue
            if name in UNBOUNDED:
                skipped[f"{module.__name__} {flag}"] = UNBOUNDED[name]
                continue
            domain = getattr(owner, "DOMAINS", {}).get(name, EXTRA.get(name))
            if domain is None:  # a flag nobody declared a domain for: a failing case
                params.append(pytest.param(module, flag, "no domain declared", None,
                                           id=f"{module.__name__.split('.')[-1]}{flag}-undeclared"))
                continue
            cases = values(domain)
            if (owner, name) in seen:  # the same setting in another experiment: its flag's
                cases = cases[:1]      # name is what differs, one case checks it (CI time)
            seen.add((owner, name))
            for kind, argv in cases:
                params.append(pytest.param(module, flag, kind, argv,
                                           id=f"{module.__name__.split('.')[-1]}{flag}-{kind}"))
    return params, skipped


CASES, SKIPPED = generate()
TIMES: list[float] = []


def base_args(module, data_dir: str, workdir) -> list[str]:
    if module is attack:
        return ["--run", str(workdir)]
    if module is omniglot_digits:
        return ["--malicious", "digits", "--mock-beneficial", "--seeds", "1", "--no-progress",
                "--data-dir", data_dir, "--workdir", str(workdir)]
    return ["--dataset", "digits", "--seeds", "1", "--no-progress", "--data-dir", data_dir,
            "--workdir", str(workdir)]


@pytest.mark.parametrize("module, flag, kind, argv", CASES)
def test_a_bad_value_of_every_flag_is_one_line_naming_it(module, flag, kind, argv, digits_data_dir,
                                                         tmp_path, capsys, no_compute):
    assert argv is not None, f"{flag} of {module.__name__}: no domain declared (DOMAINS)"
    workdir = tmp_path / "w"
    data_before = _BEFORE.setdefault(digits_data_dir, checksums(digits_data_dir))
    cwd_before = sorted(os.listdir())
    start = time.perf_counter()
    code = _cli.main(module.main, [*base_args(module, digits_data_dir, workdir), flag, *argv])
    TIMES.append(time.perf_counter() - start)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and flag in err, err
    assert TIMES[-1] < MAX_SECONDS, f"{TIMES[-1]:.1f}s to refuse {flag} {argv}"
    assert not workdir.exists()
    # Nothing outside the run folder changed: the data dir (checksums) and the current folder.
    assert checksums(digits_data_dir) == data_before and sorted(os.listdir()) == cwd_before


def checksums(folder: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


_BEFORE: dict[str, dict[str, str]] = {}  # the data dir's checksums before the first case


def test_the_table_covers_every_flag():
    """Every leaf flag of every experiment is a case or listed with its reason; prints the
    counts (and the slowest refusal of the cases that ran before it)."""
    total = sum(len(_cli.flag_names(m.Config)) for m in MODULES)
    covered = {(c.values[0].__name__, c.values[1]) for c in CASES}
    skipped = {tuple(k.split(" ")) for k in SKIPPED}
    assert len(covered) + len(skipped) == total and not covered & skipped
    assert all(c.values[3] is not None for c in CASES), "flags without a domain"
    print(f"\n{total} flags of {len(MODULES)} experiments: {len(covered)} flags in "
          f"{len(CASES)} cases, {len(skipped)} without a generated bad value (paths, --dataset, "
          "the coordinator: test_cli_safety); "
          f"slowest refusal {max(TIMES, default=math.nan):.3f}s")


def test_skd_mask_search_flags_are_checked_by_argparse(capsys):
    from experiments import skd_mask_search

    for args in (["--seeds", "abc"], ["--unprotected", "abc"]):
        with pytest.raises(SystemExit) as exit_:
            skd_mask_search.main(args)
        assert exit_.value.code == 2 and args[0] in capsys.readouterr().err
