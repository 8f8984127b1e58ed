"""Every experiment's --help explains every option: a description, one default, no raw markup."""
from __future__ import annotations

import importlib
import re

import pytest

EXPERIMENTS = ["train_reference", "reverse_maml", "skd", "unlearning", "attack", "compare",
               "simulated_attack", "simulated_attack_search", "omniglot_digits"]
# Sphinx roles and double backquotes are markup for the API reference, not for a terminal.
MARKUP = re.compile(r":(func|class|data|mod|meth|attr|exc|obj):|``")
OPTION = re.compile(r"^ {2}(-h, --help|--[a-z][\w.-]*)")  # tyro: an option's line, its help below


def help_text(name: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # one column of panels
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def options(text: str) -> dict[str, str]:
    """``--flag`` -> its help text (beside it or on the indented lines under it, joined)."""
    out: dict[str, str] = {}
    current = None
    for line in text.rstrip().splitlines():
        line = line.rstrip()
        if OPTION.match(line):
            current = line.split()[0].rstrip(",")
            out[current] = " ".join(re.split(r"\s{2,}", line.strip())[1:])
        elif current and not out[current] and re.match(r" {2}\S", line):
            continue  # a long metavar (the choices) wrapped onto the next line
        elif current and line.startswith(" " * 6) and line.strip():
            out[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(help_.split()) for flag, help_ in out.items()}


def test_options_reads_tyros_layouts():
    text = ("  --a INT    first (default: 1)\n"
            "  --bee {x,y,\n  z}\n        second,\n        wrapped (default: x)\n"
            "  --c STR\n"
            "\n  --d {None}|INT  one (default: 2) (default: None)\n")
    assert options(text) == {"--a": "first (default: 1)", "--bee": "second, wrapped (default: x)",
                             "--c": "", "--d": "one (default: 2) (default: None)"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_option_is_explained_once_without_markup(name, capsys, monkeypatch):
    text = help_text(name, capsys, monkeypatch)
    found = options(text)
    assert len(found) > 5 and "-h" in found, text[:2000]
    problems = []
    for flag, help_ in found.items():
        if not re.sub(r"\(default: [^)]*\)|\(required\)", "", help_).strip():
            problems.append(f"{flag}: no description")
        if len(re.findall(r"\(default", help_)) > 1:
            problems.append(f"{flag}: more than one default: {help_}")
        if MARKUP.search(help_):
            problems.append(f"{flag}: markup: {help_}")
    description = text.split("\n  --", 1)[0]  # the experiment's description and group titles
    for line in description.splitlines() + [ln for ln in text.splitlines()
                                             if re.match(r" {2}[A-Z]", ln)]:
        if MARKUP.search(line):
            problems.append(f"markup: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_the_attack_flag_names_every_attack(capsys, monkeypatch):
    import trm_jax

    suite = trm_jax.attacks
    help_ = options(help_text("attack", capsys, monkeypatch))["--attack.attacks"]
    missing = [name for name in suite.ATTACKS if name not in help_]
    assert not missing, (missing, help_)
